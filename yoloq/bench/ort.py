"""onnxruntime CPU latency (and mAP) of the FP32 and INT8 export variants of one quantized model: the
logic of ``yoloq bench-ort`` (usage and method: ``yoloq.cli.bench_ort``)."""
from __future__ import annotations

import dataclasses
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch






def hardswish_to_relu(model: torch.nn.Module) -> int:
    """Replace every ``nn.Hardswish`` submodule by ``nn.ReLU`` in place; returns how many."""
    swaps = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, torch.nn.Hardswish)]
    for parent, name in swaps:
        setattr(parent, name, torch.nn.ReLU())
    return len(swaps)


def build_quantized(cfg, args, calib_batches):
    """(prepared, calibrated model, where it came from)."""
    if args.ckpt:
        from yoloq.quant.checkpoint import load_quantized
        model, _ = load_quantized(args.ckpt)
        return model.eval(), args.ckpt
    from yoloq.models import load_model
    from yoloq.quant.calibrate import calibrate
    from yoloq.quant.prepare import prepare
    model = load_model(cfg.model, args.weights, random_weights=args.random_weights)
    where = f"{'random weights' if args.random_weights else args.weights} (max calibration)"
    if args.hardswish_as_relu:
        where += f", {hardswish_to_relu(model)} HardSwish replaced by ReLU"
    qmodel = prepare(model, cfg.quant)
    calibrate(qmodel, calib_batches, method="max", progress=False)
    return qmodel.eval(), where


def export_variants(qmodel, out: Path, img_size: int, batch: int, calib_batches, pre_act: str, other: str) -> dict:
    from yoloq.runtime.onnx_export import export_onnx
    from yoloq.runtime.ort_fast import make_ort_fast
    out.mkdir(parents=True, exist_ok=True)
    paths = {"fp32": out / "fp32.onnx", "int8 trt q/dq": out / "int8_trt.onnx",
             "int8 ort fast (exact)": out / "int8_ort_exact.onnx", "int8 ort fast": out / "int8_ort_fast.onnx"}
    export_onnx(qmodel, paths["fp32"], img_size=img_size, batch=batch, fp32=True)
    export_onnx(qmodel, paths["int8 trt q/dq"], img_size=img_size, batch=batch)
    for key, mode in (("int8 ort fast (exact)", "float"), ("int8 ort fast", pre_act)):
        info = make_ort_fast(paths["int8 trt q/dq"], paths[key], calib_batches, pre_act=mode, other=other)
        print(f"{key}: {info.n_conv} convs, {info.already_fused} already conv->Q, {info.relu_exact} conv->Relu "
              f"(exact), {info.pre_activation} pre-activation Q/DQ, {len(info.left_float)} float; "
              f"{info.propagated} Q/DQ propagated; {info.folded_weights} float convs with constant weights; "
              + "; ".join(info.notes))
    return paths


def session(path: Path, threads: int, profile_prefix: str | None = None, optimized_path: str | None = None):
    """Timed as evaluated: integer kernels (onnxruntime's int32 bias rounding) for the fast-path files,
    the graph as written for the others (``yoloq.runtime.ort.ort_session``)."""
    from yoloq.runtime.ort import ort_session, wants_integer_kernels
    return ort_session(path, threads, quantize_bias=wants_integer_kernels(path), profile_prefix=profile_prefix,
                       optimized_path=optimized_path)


BLOCK_WARMUP = 2      # untimed runs at the start of every round-robin block


def bench(paths: dict, threads: int, batch: int, img_size: int, iters: int, warmup: int, rounds: int) -> dict:
    """name -> list of ms, measured round-robin so background load hits every variant alike."""
    sessions = {k: session(p, threads) for k, p in paths.items()}
    x = np.random.default_rng(0).random((batch, 3, img_size, img_size), dtype=np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[k])
    times = {k: [] for k in sessions}
    per_round = max(1, iters // rounds)
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(BLOCK_WARMUP):     # untimed: the switch (cold caches, the last session's
                s.run(None, feeds[k])         # spinning threads) is not charged to this variant
            for _ in range(per_round):
                t = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append((time.perf_counter() - t) * 1e3)
    return times


def evaluate_all(paths: dict, qmodel, cfg, data_cfg, img_size: int, n: int, threads: int) -> dict:
    from yoloq.eval import evaluate, evaluate_model
    from yoloq.runtime.ort import OnnxPredictor
    eval_cfg = dataclasses.replace(cfg.eval, workers=0)
    common = dict(max_images=n, progress=False)
    maps = {"fake-quant pytorch": evaluate_model(qmodel, data_cfg, eval_cfg, img_size, **common).stats["AP"]}
    for k, p in paths.items():
        maps[k] = evaluate(OnnxPredictor(p, threads=threads), data_cfg, eval_cfg, img_size, **common).stats["AP"]
    return maps


CONV_OPS = {"Conv": 1, "FusedConv": 1, "QLinearConv": 3}     # op type -> index of its weight input


def conv_kinds(graph) -> dict:
    """node name -> "depthwise KxK" / "dense KxK" for every conv of an (onnxruntime-optimized) graph."""
    dims = {init.name: list(init.dims) for init in graph.initializer}
    kinds = {}
    for node in graph.node:
        if node.op_type not in CONV_OPS:
            continue
        attrs = {a.name: a for a in node.attribute}
        kernel = list(attrs["kernel_shape"].ints) if "kernel_shape" in attrs else \
            dims.get(node.input[CONV_OPS[node.op_type]], [0, 0, 0, 0])[2:]
        group = attrs["group"].i if "group" in attrs else 1
        kinds[node.name] = ("depthwise " if group > 1 else "dense ") + "x".join(map(str, kernel))
    return kinds


def op_profile(path: Path, threads: int, x: np.ndarray, runs: int) -> tuple[dict, dict]:
    """From onnxruntime's profiler over ``runs`` runs of the graph it executes (after its fusions):
    op type -> (ms per run, nodes), and "op type, conv kind" -> (ms per run, nodes) for the convs."""
    import json
    import tempfile

    import onnx
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(path, threads, profile_prefix=f"{tmp}/prof", optimized_path=f"{tmp}/optimized.onnx")
        feed = {sess.get_inputs()[0].name: x}
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
        kinds = conv_kinds(onnx.load(f"{tmp}/optimized.onnx").graph)
    by_op, by_conv = (defaultdict(float), defaultdict(set)), (defaultdict(float), defaultdict(set))
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op, node = e["args"]["op_name"], e["name"][: -len("_kernel_time")]
            groups = [(by_op, op)] + ([(by_conv, f"{op}, {kinds[node]}")] if node in kinds else [])
            for (total, nodes), key in groups:
                total[key] += e["dur"] / 1e3 / runs
                nodes[key].add(node)
    summary = lambda total, nodes: {k: (total[k], len(nodes[k])) for k in sorted(total, key=total.get, reverse=True)}  # noqa: E731
    return summary(*by_op), summary(*by_conv)


def format_profile(profiles: dict, top: int = 12, label: str = "op type", total: str = "all kernels") -> str:
    """One column per variant: ms per run (node count) of the ``top`` slowest rows (``label`` names
    what a row is), then the ``total`` row summed over all rows."""
    slowest = lambda op: max(p.get(op, (0.0, 0))[0] for p in profiles.values())   # noqa: E731
    ops = sorted({op for p in profiles.values() for op in p}, key=slowest, reverse=True)
    lines = [f"| {label} | " + " | ".join(profiles) + " |", "|---|" + "---|" * len(profiles)]
    for op in ops[:top]:
        cells = [f"{p[op][0]:.2f} ({p[op][1]})" if op in p else "–" for p in profiles.values()]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append(f"| {total} | " + " | ".join(f"{sum(v[0] for v in p.values()):.2f}" for p in profiles.values()) + " |")
    return "\n".join(lines)


def ratio_to_fp32(times: dict, key: str, rounds: int) -> float:
    """Median over round-robin blocks of (variant median / FP32 median in the same block): each ratio
    compares runs taken moments apart, so the machine's slow and fast phases cancel."""
    per_round = max(1, len(times["fp32"]) // rounds)
    ratios = [np.median(times[key][i:i + per_round]) / np.median(times["fp32"][i:i + per_round])
              for i in range(0, len(times["fp32"]), per_round)]
    return float(np.median(ratios))


def format_table(repeats: list, maps: dict | None, header: str, rounds: int) -> str:
    """``repeats``: one ``bench`` result per repetition. Median ms over all runs; ratio to FP32 = median
    of the repetitions' ratios, with their min..max when repeated."""
    cols = "| variant | median ms | p90 ms | x FP32 |" + (" x FP32 min..max |" if len(repeats) > 1 else "") \
        + (" mAP |" if maps else "")
    lines = [header, "", cols, "|" + "---|" * (cols.count("|") - 1)]
    for k in repeats[0]:
        t = [ms for times in repeats for ms in times[k]]
        ratios = [ratio_to_fp32(times, k, rounds) for times in repeats]
        row = f"| {k} | {np.median(t):.2f} | {np.percentile(t, 90):.2f} | {np.median(ratios):.2f} |"
        if len(repeats) > 1:
            row += f" {min(ratios):.2f}..{max(ratios):.2f} |"
        lines.append(row + (f" {100 * maps[k]:.2f} |" if maps else ""))
    if maps and "fake-quant pytorch" in maps:
        dashes = "– | " * (4 if len(repeats) > 1 else 3)
        lines.append(f"| fake-quant pytorch | {dashes}{100 * maps['fake-quant pytorch']:.2f} |")
    return "\n".join(lines)


def run(args) -> int:
    """The benchmark for parsed command-line ``args`` (``yoloq bench-ort``)."""
    from yoloq.config import load_config
    from yoloq.data import load_data_config
    from yoloq.data.coco import calibration_loader
    from yoloq.io import check_output_dir
    cfg = load_config(args.cfg)
    data_cfg = load_data_config(cfg.data)
    img_size = args.img_size or cfg.model.img_size
    out = check_output_dir(Path(args.out or f"/tmp/bench_ort/{cfg.model.name}_{img_size}"), "--out")
    calib = [images for images, _ in calibration_loader(data_cfg, args.calib_images, img_size, 8, args.workers)]
    qmodel, where = build_quantized(cfg, args, calib)
    paths = export_variants(qmodel, out, img_size, args.batch, calib, args.pre_act, args.other)
    repeats = [bench(paths, args.threads, args.batch, img_size, args.iters, args.warmup, args.rounds)
               for _ in range(args.repeat)]
    maps = None
    if args.map:
        if args.random_weights:
            print("note: --map with --random-weights measures an untrained model", file=sys.stderr)
        maps = evaluate_all(paths, qmodel, cfg, data_cfg, img_size, args.map, args.threads)
    from yoloq.runtime.ort import integer_kernel_note
    header = (f"{cfg.model.name} @ {img_size}, batch {args.batch}, {args.threads} threads, onnxruntime "
              f"{__import__('onnxruntime').__version__} CPU, {integer_kernel_note()}; {where}"
              + (f"; mAP on {args.map} val images" if maps else ""))
    print(format_table(repeats, maps, header, args.rounds))
    if args.profile:
        x = np.random.default_rng(0).random((args.batch, 3, img_size, img_size), dtype=np.float32)
        profiles = {k: op_profile(p, args.threads, x, args.profile) for k, p in paths.items()}
        print(f"\nms per run by op type (node count), onnxruntime profiler, {args.profile} runs:\n")
        print(format_profile({k: by_op for k, (by_op, _) in profiles.items()}))
        print("\nthe convs alone, by kind (Conv/FusedConv: float; QLinearConv: integer):\n")
        print(format_profile({k: by_conv for k, (_, by_conv) in profiles.items()}, top=20,
                             label="conv op, kind", total="all convs"))
    return 0
