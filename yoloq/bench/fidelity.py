"""Deployed (onnxruntime) vs fake-quant mAP of quantized checkpoints, paired under input noise, and
the raw-output comparison: the logic of ``yoloq bench-fidelity`` (usage: ``yoloq.cli.bench_fidelity``)."""
from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from yoloq.device import module_device, resolve_device
from yoloq.errors import InputError




class InputNoise(torch.nn.Module):
    """``model(x + std * N(0, 1))`` with a fixed generator: a reproducible tiny perturbation. ``model``
    is a module or any predictor callable (an ``OnnxPredictor``): with the same seed, batch size and
    image order, both see exactly the same noise."""

    def __init__(self, model, std: float, seed: int):
        super().__init__()
        self.model, self.std = model, std
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=self.generator, dtype=x.dtype)
        return self.model(x + self.std * noise.to(x.device))


def has_offset_quantizers(model: torch.nn.Module) -> bool:
    from yoloq.quant.learnable import LSQActQuantizer
    return any(isinstance(m, LSQActQuantizer) and m.offset_mode for m in model.modules())


def measure(ckpt: str, cfg, data_cfg, args, tmp: Path) -> dict:
    from yoloq.eval import evaluate, evaluate_model
    from yoloq.runtime.ort import OnnxPredictor
    from yoloq.runtime.onnx_export import export_onnx
    from yoloq.quant.checkpoint import load_quantized

    model, _ = load_quantized(ckpt)
    model.to(resolve_device(args.device))    # the fake-quant side; onnxruntime runs on the CPU
    img_size = model.cfg.img_size            # the checkpoint's own model config
    eval_cfg = cfg.eval
    common = dict(max_images=args.images, progress=not args.no_progress)
    row = {"ckpt": ckpt, "img_size": img_size,
           "fake": 100 * evaluate_model(model, data_cfg, eval_cfg, img_size, **common).stats["AP"]}
    modes = ("subadd", "zero_point") if has_offset_quantizers(model) else ("subadd",)
    for mode in modes:
        path = tmp / f"{Path(ckpt).parent.name}_{mode}.onnx"
        export_onnx(model, path, img_size=img_size, offset_mode=mode)
        for bias in ("float", "int32"):
            predictor = OnnxPredictor(path, threads=args.threads, quantize_bias=bias == "int32")
            row[f"ort_{mode}_{bias}"] = 100 * evaluate(predictor, data_cfg, eval_cfg, img_size, **common).stats["AP"]
            if (mode, bias) == ("subadd", "float"):
                as_written = predictor           # the TensorRT graph as written: the pairs and outputs use it
    if args.output_images:
        images = first_val_images(data_cfg, eval_cfg, img_size, args.output_images)
        row["outputs"] = compare_outputs(model, as_written, images, args.noise_std)
    if args.noise:
        def noisy_map(predict, seed: int) -> float:
            noisy = InputNoise(predict, args.noise_std, seed)
            return 100 * evaluate_model(noisy, data_cfg, eval_cfg, img_size, **common).stats["AP"]
        row["noise"] = [noisy_map(model, seed) for seed in range(args.noise)]
        row["noise_ort"] = [noisy_map(as_written, seed) for seed in range(args.noise)]
    return row


def first_val_images(data_cfg, eval_cfg, img_size: int, n: int) -> torch.Tensor:
    """The first ``n`` val images (by id), letterboxed as in evaluation: ``[n, 3, S, S]``."""
    from yoloq.data.coco import FailedItem
    from yoloq.eval.coco_eval import resolve_ann_file, val_dataset

    ann_file = resolve_ann_file(data_cfg, eval_cfg.val_ann)
    dataset = val_dataset(data_cfg, ann_file, img_size, n)
    images = [item[0] for item in (dataset[i] for i in range(len(dataset))) if not isinstance(item, FailedItem)]
    if not images:
        raise InputError(f"no readable val image among the first {n} of {ann_file}")
    return torch.stack(images)


def output_difference(reference: torch.Tensor, other) -> dict:
    """Raw-output agreement of two ``[B, N, 4+nc]`` detector outputs: best-class score per anchor
    (mean |difference|, share of anchors > 0.05) and box coordinates (mean |difference|, pixels)."""
    reference, other = reference.float(), torch.as_tensor(other).float()
    score_diff = (other[..., 4:].amax(-1) - reference[..., 4:].amax(-1)).abs()
    return {"score_mean_abs": float(score_diff.mean()), "score_share_over_0.05": float((score_diff > 0.05).float().mean()),
            "box_mean_abs_px": float((other[..., :4] - reference[..., :4]).abs().mean())}


def compare_outputs(model: torch.nn.Module, predict, images: torch.Tensor, noise_std: float) -> dict:
    """``output_difference`` of ``predict`` (an ``OnnxPredictor``) against ``model``, and of ``model``
    on noisy inputs against itself: how far the deployed outputs are, next to how far the model's own
    outputs move under an imperceptible perturbation."""
    on_model = images.to(module_device(model))
    with torch.no_grad():
        reference = model.eval()(on_model).cpu()
        noisy = InputNoise(model, noise_std, seed=0)(on_model).cpu()
    return {"deployed": output_difference(reference, predict(images)), "noise": output_difference(reference, noisy)}


def paired_difference(row: dict) -> tuple[float, float]:
    """Mean and standard error of onnxruntime minus fake-quant mAP over the unperturbed pair and the
    noise-seed pairs of ``row`` (standard error 0 for a single pair)."""
    diffs = [row["ort_subadd_float"] - row["fake"]]
    diffs += [o - f for f, o in zip(row.get("noise", []), row.get("noise_ort", []))]
    if len(diffs) < 2:
        return diffs[0], 0.0
    return statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5


def format_rows(rows: list[dict], header: str) -> str:
    noise = any("noise" in r for r in rows)
    outputs = any("outputs" in r for r in rows)
    cols = ["checkpoint", "fake-quant PyTorch", "onnxruntime Q/DQ", "difference",
            "onnxruntime, int32 biases", "difference"]
    if outputs:
        cols += ["outputs: mean abs score diff (fake-quant under input noise)",
                 "anchors with score diff > 0.05 (noise)", "mean abs box diff, px (noise)"]
    if noise:
        cols += ["fake-quant, input noise (min..max)", "onnxruntime, input noise (min..max)",
                 "mean difference over all pairs (± s.e.)"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        for mode in ("subadd", "zero_point"):
            if f"ort_{mode}_float" not in r:
                continue
            name = r["ckpt"] + (" (zero point)" if mode == "zero_point" else "")
            f, b = r[f"ort_{mode}_float"], r[f"ort_{mode}_int32"]
            cells = [name, f"{r['fake']:.2f}", f"{f:.2f}", f"{f - r['fake']:+.2f}", f"{b:.2f}", f"{b - r['fake']:+.2f}"]
            if outputs and "outputs" in r and mode == "subadd":
                o, n = r["outputs"]["deployed"], r["outputs"]["noise"]
                cells += [f"{o['score_mean_abs']:.4f} ({n['score_mean_abs']:.4f})",
                          f"{o['score_share_over_0.05']:.2%} ({n['score_share_over_0.05']:.2%})",
                          f"{o['box_mean_abs_px']:.2f} ({n['box_mean_abs_px']:.2f})"]
            elif outputs:
                cells += ["–"] * 3
            if noise and "noise" in r and mode == "subadd":
                mean, se = paired_difference(r)
                cells += [f"{min(r['noise']):.2f}..{max(r['noise']):.2f}",
                          f"{min(r['noise_ort']):.2f}..{max(r['noise_ort']):.2f}",
                          f"{mean:+.2f} ± {se:.2f} ({1 + len(r['noise'])} pairs)"]
            elif noise:
                cells += ["–"] * 3
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> int:
    """The benchmark for parsed command-line ``args`` (``yoloq bench-fidelity``)."""
    from yoloq.config import load_config
    from yoloq.data import load_data_config
    from yoloq.io import check_output_file
    if args.out:
        check_output_file(args.out, "--out", inputs={"--ckpt": list(args.ckpt), "--cfg": str(args.cfg)})
    resolve_device(args.device)              # a GPU that is not there: one line, before any work
    cfg = load_config(args.cfg)
    if not cfg.data:
        raise InputError(f"{args.cfg} has no 'data'")
    data_cfg = load_data_config(cfg.data)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, workers=0))
    if args.noise < 0 or args.output_images < 0:
        raise InputError(f"--noise and --output-images must be >= 0, got {args.noise} and {args.output_images}")
    for ckpt in args.ckpt:
        if not Path(ckpt).is_file():
            raise InputError(f"checkpoint not found: {ckpt}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in args.ckpt:
            rows.append(measure(ckpt, cfg, data_cfg, args, Path(tmp)))
            summary = ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items() if isinstance(v, float))
            if args.noise:
                summary += ", mean paired difference {:+.2f} ± {:.2f}".format(*paired_difference(rows[-1]))
            print(f"{ckpt}: {summary}", file=sys.stderr, flush=True)
    import onnxruntime
    images = f"first {args.images}" if args.images else "all"
    print(format_rows(rows, f"mAP (%) on {images} val images; onnxruntime {onnxruntime.__version__} CPU"))
    if args.out:
        from yoloq.io import atomic_write_bytes
        atomic_write_bytes(Path(args.out), json.dumps(rows, indent=2).encode())
    return 0
