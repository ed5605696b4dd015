#!/usr/bin/env python
"""Peer benchmark: yoloq PTQ vs onnxruntime's ``quantize_static`` on the same FP32 model and the
same calibration (train) images, evaluated through the same COCO pipeline.

    python tools/bench_ptq.py --cfg configs/yolov6lite_s.yaml                        # 256 calib, all val
    python tools/bench_ptq.py --cfg configs/yolov6lite_s.yaml --max-images 50 --calib-images 32   # quick

yoloq: TensorRT placement (Q/DQ on conv inputs and weights, shared scales), per-channel weights,
every calibration method from one statistics pass (its time = that pass + the method's amax search),
and ``auto`` (picks by detector-output SQNR on calibration images). onnxruntime: the fused FP32
model exported with ``torch.onnx.export(..., dynamo=False)``, then ``quantize_static`` (QDQ,
per_channel=True) with MinMax / Entropy / Percentile (S8S8) and MinMax U8S8 over every op (ORT's
default), and MinMax / Entropy / Percentile S8S8 restricted to Conv (``_conv``: decode left float, a
fair like-for-like with TensorRT placement); run with onnxruntime CPU. Writes <out>/bench.md, bench.json and bench.png.
Peers (``--peers default`` or PEER:VARIANT; ``yoloq.bench.peers``): NNCF, AMD Quark, AIMET with TensorRT-like
settings, each in a child process with its own interpreter (``--peer-python nncf=/work/venvs/nncf/bin/python``);
see docs/peers.md.
"""
from __future__ import annotations

import argparse
import multiprocessing
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

# pytorch-quantization 2.1.3 calls torch.jit.script at import; torch 2.14 warns about it
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

from yoloq.bench.peers import DEFAULT_PEERS, PeerError, parse_peer_python, parse_peer_specs
from yoloq.config import ConfigError
from yoloq.eval.coco_eval import evaluate
from yoloq.eval.predictors import OnnxPredictor
from yoloq.quant.calibrate import (AUTO_METHODS, CalibrationError, apply_calibration, calibrate_auto,
                                   collect_statistics, method_key)
from yoloq.quant.prepare import prepare
from yoloq.quant.ptq import (PTQOptions, calibration_batches, evaluate_stats, load_fp32_model, resolve,
                             seed_everything)
from yoloq.report import atomic_write_bytes, atomic_write_text, md_table, stat_drop, to_json

YOLOQ_METHODS = ("max", "percentile-99.99", "percentile-99.999", "entropy", "mse", "auto")
# "<calibration>_<activation/weight types>[_conv]": _conv quantizes only Conv / ConvTranspose (inputs,
# weights, outputs), leaving the decode (boxes in pixels and scores in 0..1 concatenated into one
# tensor, which one per-tensor scale wipes out) in float, as TensorRT placement does.
ORT_VARIANTS = ("minmax_s8s8", "entropy_s8s8", "percentile_s8s8", "minmax_u8s8",
                "minmax_s8s8_conv", "entropy_s8s8_conv", "percentile_s8s8_conv")


# --------------------------------------------------------------------------- onnxruntime side


def export_fp32_onnx(model: torch.nn.Module, path: Path, img_size: int, opset: int = 13) -> Path:
    """Plain FP32 export of the fused model (legacy exporter), dynamic batch."""
    dummy = torch.zeros(1, 3, img_size, img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), dummy, str(path), input_names=["images"], output_names=["outputs"],
                          opset_version=opset, dynamic_axes={"images": {0: "batch"}, "outputs": {0: "batch"}},
                          dynamo=False)
    return path


class _Reader:
    """onnxruntime CalibrationDataReader over our calibration batches (one batch per call)."""

    def __init__(self, input_name: str, batches: list[torch.Tensor]):
        self.input_name, self.batches, self.i = input_name, batches, 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.input_name: self.batches[self.i - 1].numpy().astype(np.float32)}

    def rewind(self):
        self.i = 0


def _ort_quantize_in_process(fp32_onnx: Path, out: Path, variant: str, batches: list[torch.Tensor]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    method, types, *scope = variant.split("_")
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    act = {"s8s8": QuantType.QInt8, "u8s8": QuantType.QUInt8}[types]
    reader = type("Reader", (_Reader, CalibrationDataReader), {})("images", batches)
    op_types = ["Conv", "ConvTranspose"] if scope == ["conv"] else None     # None: every supported op
    # Not CalibMaxIntermediateOutputs: in onnxruntime 1.32 MinMax then fails with "No data is
    # collected" when the batch count is a multiple of it.
    quantize_static(str(fp32_onnx), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=act, weight_type=QuantType.QInt8, calibrate_method=calib,
                    op_types_to_quantize=op_types)


def ort_quantize(fp32_onnx: Path, out: Path, variant: str, batches: list[torch.Tensor]) -> float:
    """quantize_static with one of ``ORT_VARIANTS`` in a forked child process, so that a variant
    killed for memory (Entropy / Percentile over every op of Lite-M/L at 256 images need more than
    24 GB) becomes a failed row instead of ending the whole benchmark. Returns the seconds it took."""
    start = time.perf_counter()
    child = multiprocessing.get_context("fork").Process(target=_ort_quantize_in_process,
                                                          args=(fp32_onnx, out, variant, batches))
    child.start()
    child.join()
    if child.exitcode != 0:
        why = (" (killed by SIGKILL: most likely out of memory, onnxruntime's histogram calibrators keep "
               "every activation of every calibration image)" if child.exitcode == -signal.SIGKILL else "")
        raise RuntimeError(f"quantize_static {variant} exited with code {child.exitcode}{why}")
    return time.perf_counter() - start


# --------------------------------------------------------------------------- benchmark


def run_bench(args) -> dict:
    opts = PTQOptions(calib_images=args.calib_images, max_images=args.max_images, workers=args.workers,
                      progress=not args.no_progress, seed=args.seed)
    cfg, data_cfg, qcfg, eval_cfg = resolve(args.cfg, opts)
    seed_everything(qcfg.seed)
    img_size, progress = cfg.model.img_size, not args.no_progress
    fp32 = load_fp32_model(cfg)
    batches, files = calibration_batches(data_cfg, qcfg, img_size, eval_cfg.workers)
    n_calib = sum(b.shape[0] for b in batches)
    rows = []

    def add(tool, variant, fp32_stats, result, calib_s, note=""):
        rows.append({"tool": tool, "variant": variant, "fp32": fp32_stats, "int8": result.stats,
                     "drop": stat_drop(fp32_stats, result.stats), "calib_seconds": calib_s,
                     "eval_seconds": result.seconds, "images_per_s": result.images_per_s, "note": note})
        print(f"{tool:12s} {variant:20s} AP {result.stats['AP'] * 100:6.2f}  calib {calib_s:7.1f} s", flush=True)

    fp32_eval = evaluate_stats(fp32, data_cfg, eval_cfg, img_size, args.max_images, progress)
    print(f"FP32 (PyTorch) AP {fp32_eval.stats['AP'] * 100:.2f} on {fp32_eval.n_images} images", flush=True)

    if not args.skip_yoloq:
        qmodel = prepare(fp32, qcfg)
        start = time.perf_counter()
        collect_statistics(qmodel, batches, num_bins=qcfg.num_bins, progress=progress)
        collect_s = time.perf_counter() - start
        for method in [m for m in args.methods if m != "auto"]:
            start = time.perf_counter()
            apply_calibration(qmodel, method)
            calib_s = collect_s + time.perf_counter() - start
            add("yoloq", method_key(method), fp32_eval.stats,
                evaluate_stats(qmodel, data_cfg, eval_cfg, img_size, args.max_images, progress), calib_s)
        if "auto" in args.methods:
            auto_model = prepare(fp32, qcfg)
            start = time.perf_counter()
            info = calibrate_auto(auto_model, batches, fp32, AUTO_METHODS, num_bins=qcfg.num_bins, progress=progress)
            calib_s = time.perf_counter() - start
            done = {r["variant"]: r for r in rows if r["tool"] == "yoloq"}
            result = (_as_result(done[info["method"]])
                      if info["method"] in done else
                      evaluate_stats(auto_model, data_cfg, eval_cfg, img_size, args.max_images, progress))
            add("yoloq", "auto", fp32_eval.stats, result, calib_s, note=f"chose {info['method']}")

    if not args.skip_ort or args.peers:
        with tempfile.TemporaryDirectory() as tmp:
            fp32_onnx = export_fp32_onnx(fp32, Path(tmp) / "fp32.onnx", img_size)
            ort_fp32 = evaluate(OnnxPredictor(fp32_onnx), data_cfg, eval_cfg, img_size,
                                max_images=args.max_images, progress=progress)
            add("onnxruntime", "fp32", ort_fp32.stats, ort_fp32, 0.0, note="FP32 ONNX export (sanity check)")
            for variant in ([] if args.skip_ort else args.ort_variants):
                qpath = Path(tmp) / f"{variant}.onnx"
                try:
                    calib_s = ort_quantize(fp32_onnx, qpath, variant, batches)
                    result = evaluate(OnnxPredictor(qpath), data_cfg, eval_cfg, img_size,
                                      max_images=args.max_images, progress=progress)
                except Exception as err:  # noqa: BLE001 - a peer variant failing is a result, not a crash
                    rows.append({"tool": "onnxruntime", "variant": variant, "error": f"{type(err).__name__}: {err}"})
                    print(f"onnxruntime {variant}: failed: {err}", flush=True)
                    continue
                add("onnxruntime", variant, ort_fp32.stats, result, calib_s)
            if args.peers:   # peers: yoloq.bench.peers (NNCF, AMD Quark, AIMET in child processes)
                rows += _peer_rows(args, cfg, fp32_onnx, batches, ort_fp32.stats,
                                   lambda path: evaluate(OnnxPredictor(path), data_cfg, eval_cfg, img_size,
                                                         max_images=args.max_images, progress=progress), Path(tmp))

    return {"name": args.name or f"{cfg.model.name}_bench", "model": cfg.model.name, "config": cfg.path,
            "img_size": img_size, "calib_images": n_calib, "calib_files": files, "seed": qcfg.seed,
            "eval_images": fp32_eval.n_images, "ann_file": fp32_eval.ann_file, "fp32": fp32_eval.stats,
            "rows": rows}


def _peer_rows(args, cfg, fp32_onnx: Path, batches, fp32_stats: dict, evaluate_onnx, tmp: Path) -> list[dict]:
    from yoloq.bench import peers
    work = Path(args.out) / (args.name or f"{cfg.model.name}_bench") / "peers"
    work.mkdir(parents=True, exist_ok=True)
    calib = peers.save_calibration(batches, tmp / "calib.npy")
    return peers.peer_rows(fp32_onnx, calib, peers.parse_peer_specs(args.peers), evaluate_onnx, fp32_stats, work,
                           pythons=peers.parse_peer_python(args.peer_python), timeout=args.peer_timeout,
                           iterations=args.peer_iterations, adaround_images=args.peer_adaround_images)


class _as_result:
    """An already measured row, re-used for ``auto`` when it picked a method measured above."""

    def __init__(self, row: dict):
        self.stats, self.seconds, self.images_per_s = row["int8"], row["eval_seconds"], row["images_per_s"]


def render_bench_markdown(bench: dict) -> str:
    head = [f"# PTQ peer benchmark: {bench['model']} at {bench['img_size']}", "",
            f"{bench['eval_images']} images of `{bench['ann_file']}`; {bench['calib_images']} train images for "
            f"calibration (the same for every row), seed {bench['seed']}. AP in %, drop in points vs the "
            f"FP32 of the same runtime. Calibration time includes the statistics pass.", ""]
    table = []
    for r in bench["rows"]:
        if "error" in r:
            table.append((r["tool"], r["variant"], "-", "failed", "-", "-", "-", r["error"][:80]))
            continue
        table.append((r["tool"], r["variant"], f"{r['fp32']['AP'] * 100:.2f}", f"{r['int8']['AP'] * 100:.2f}",
                      f"{r['drop']['AP']:.2f}", f"{r['int8']['AP50'] * 100:.2f}", f"{r['calib_seconds']:.1f}",
                      r.get("note", "")))
    return "\n".join(head + [md_table(("tool", "variant", "FP32 AP", "INT8 AP", "drop", "INT8 AP50",
                                       "calib s", "note"), table), ""])


def plot_bench(bench: dict) -> bytes:
    from yoloq.report import _figure_bytes, _pyplot
    plt = _pyplot()
    rows = [r for r in bench["rows"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    labels = [f"{r['tool']} {r['variant']}" for r in rows]
    ax.bar(range(len(rows)), [r["int8"]["AP"] * 100 for r in rows],
           color=["tab:blue" if r["tool"] == "yoloq" else "tab:orange" for r in rows])
    ax.axhline(bench["fp32"]["AP"] * 100, color="k", ls="--", lw=1, label="FP32 (PyTorch)")
    ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("COCO AP %")
    ax.set_title(f"{bench['model']}: INT8 PTQ, yoloq vs onnxruntime quantize_static")
    ax.legend()
    return _figure_bytes(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True)
    p.add_argument("--calib-images", type=int, default=256)
    p.add_argument("--max-images", type=int, help="evaluate only the first N val images")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--methods", nargs="+", default=list(YOLOQ_METHODS), help="yoloq methods (default: all + auto)")
    p.add_argument("--ort-variants", nargs="+", default=list(ORT_VARIANTS), choices=ORT_VARIANTS)
    p.add_argument("--skip-yoloq", action="store_true")
    p.add_argument("--skip-ort", action="store_true")
    # peers (yoloq.bench.peers): NNCF / AMD Quark / AIMET, each in a child process
    p.add_argument("--peers", nargs="+", default=[],
                   help="PEER or PEER:VARIANT, or 'default' for " + " ".join(DEFAULT_PEERS) +
                        " (all: yoloq.bench.peers.PEER_VARIANTS); none by default")
    p.add_argument("--peer-python", nargs="+", default=[], metavar="PEER=PYTHON",
                   help="interpreter per peer, e.g. nncf=/work/venvs/nncf/bin/python (default: this one)")
    p.add_argument("--peer-timeout", type=float, default=3600.0, help="seconds per peer variant")
    p.add_argument("--peer-iterations", type=int, default=1000, help="AdaRound / AdaQuant iterations per layer")
    p.add_argument("--peer-adaround-images", type=int, default=64,
                   help="calibration images AdaRound / AdaQuant optimize on (ranges use all of them)")
    p.add_argument("--name")
    p.add_argument("--out", default="runs/bench_ptq")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    parse_peer_specs(args.peers), parse_peer_python(args.peer_python)   # bad peer requests fail before any work
    start = time.perf_counter()
    bench = run_bench(args)
    bench["seconds"] = time.perf_counter() - start
    out = Path(args.out) / bench["name"]
    atomic_write_bytes(out / "bench.png", plot_bench(bench))
    atomic_write_text(out / "bench.json", to_json(bench))
    atomic_write_text(out / "bench.md", render_bench_markdown(bench))
    print(render_bench_markdown(bench))
    print(f"wrote {out}/ in {bench['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, CalibrationError, PeerError, ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
