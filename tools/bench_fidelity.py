#!/usr/bin/env python
"""Deployment fidelity: COCO mAP of the fake-quantized PyTorch model vs its exported Q/DQ ONNX in onnxruntime.

    python tools/bench_fidelity.py --cfg configs/yolov6lite_s.yaml \\
        --ckpt runs/ptq/yolov6lite_s_auto/quant.pt runs/qat/yolov6lite_s_auto_lsqplus_offset/quant.pt
    python tools/bench_fidelity.py --cfg configs/yolov6lite_s.yaml --ckpt runs/ptq/yolov6lite_s_auto/quant.pt --noise 3

For each quantized checkpoint: the fake-quant model's mAP, then the TensorRT-variant export
(``export_onnx``; LSQ+ offset checkpoints in both offset forms, Sub/Add and zero point) run by
onnxruntime as written (float conv biases) and, for comparison, with onnxruntime's default int32 bias
rounding (``WeightBiasQuantization``, which a TensorRT-style graph does not need). ``--noise N`` adds
the mAP range of the fake-quant model over N seeds of Gaussian input noise (``--noise-std``, default
1e-4, i.e. 1/40 of one 8-bit pixel step): how much this mAP moves under perturbations far below
anything that matters, the scale against which a deployment difference should be read.
The checkpoint's own model is used; ``--cfg`` gives the dataset and evaluation settings.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, help="experiment config: dataset and eval settings (configs/*.yaml)")
    p.add_argument("--ckpt", nargs="+", required=True, help="quantized checkpoints (tools/ptq.py / tools/qat.py quant.pt)")
    p.add_argument("--images", type=int, help="first N val images (default: all)")
    p.add_argument("--noise", type=int, default=0, metavar="N", help="seeds of input noise on the fake-quant model")
    p.add_argument("--noise-std", type=float, default=1e-4)
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's)")
    p.add_argument("--out", help="also write the rows as JSON here")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


class InputNoise(torch.nn.Module):
    """``model(x + std * N(0, 1))`` with a fixed generator: a reproducible tiny perturbation."""

    def __init__(self, model: torch.nn.Module, std: float, seed: int):
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
    from yoloq.eval import OnnxPredictor, evaluate, evaluate_model
    from yoloq.export.onnx import export_onnx
    from yoloq.quant.qcheckpoint import load_quantized

    model, _ = load_quantized(ckpt)
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
    if args.noise:
        noisy = [100 * evaluate_model(InputNoise(model, args.noise_std, seed), data_cfg, eval_cfg, img_size,
                                      **common).stats["AP"] for seed in range(args.noise)]
        row["noise"] = noisy
    return row


def format_rows(rows: list[dict], header: str) -> str:
    noise = any("noise" in r for r in rows)
    cols = ["checkpoint", "fake-quant PyTorch", "onnxruntime Q/DQ", "difference",
            "onnxruntime, int32 biases", "difference"] + (["fake-quant, input noise (min..max)"] if noise else [])
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        for mode in ("subadd", "zero_point"):
            if f"ort_{mode}_float" not in r:
                continue
            name = r["ckpt"] + (" (zero point)" if mode == "zero_point" else "")
            f, b = r[f"ort_{mode}_float"], r[f"ort_{mode}_int32"]
            cells = [name, f"{r['fake']:.2f}", f"{f:.2f}", f"{f - r['fake']:+.2f}", f"{b:.2f}", f"{b - r['fake']:+.2f}"]
            if noise:
                cells.append(f"{min(r['noise']):.2f}..{max(r['noise']):.2f}" if "noise" in r else "–")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from yoloq.config import load_config, load_data_config
    cfg = load_config(args.cfg)
    if not cfg.data:
        raise SystemExit(f"error: {args.cfg} has no 'data'")
    data_cfg = load_data_config(cfg.data)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, workers=0))
    for ckpt in args.ckpt:
        if not Path(ckpt).is_file():
            raise SystemExit(f"error: checkpoint not found: {ckpt}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in args.ckpt:
            rows.append(measure(ckpt, cfg, data_cfg, args, Path(tmp)))
            print(f"{ckpt}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items() if isinstance(v, float)),
                  file=sys.stderr, flush=True)
    import onnxruntime
    images = f"first {args.images}" if args.images else "all"
    print(format_rows(rows, f"mAP (%) on {images} val images; onnxruntime {onnxruntime.__version__} CPU"))
    if args.out:
        from yoloq.report import atomic_write_bytes
        atomic_write_bytes(Path(args.out), json.dumps(rows, indent=2).encode())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
