#!/usr/bin/env python
"""COCO mAP of a model (PyTorch weights) or an ONNX file, with the upstream YOLOv6 protocol.

    python tools/eval.py --cfg configs/yolov6lite_s.yaml
    python tools/eval.py --cfg configs/yolov6lite_s.yaml --ann val_ann_official --out runs/eval/s.json
    python tools/eval.py --cfg configs/yolov6lite_s.yaml --onnx runs/export/yolov6lite_s.onnx
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from yoloq.config import load_config, load_data_config
from yoloq.data.coco import DEFAULT_INTERPOLATION, INTERPOLATIONS
from yoloq.eval import OnnxPredictor, evaluate, evaluate_model, format_stats_table, save_result
from yoloq.eval.coco_eval import ANN_KEYS, BACKENDS
from yoloq.eval.predictors import load_eval_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, help="experiment config (configs/*.yaml)")
    p.add_argument("--weights", help="checkpoint (default: model.weights of the config)")
    p.add_argument("--onnx", help="evaluate this ONNX file with onnxruntime (CPU) instead of PyTorch")
    p.add_argument("--ort-bias", choices=("auto", "float", "int32"), default="auto",
                   help="with --onnx: conv biases as written (float) or rounded to int32 by onnxruntime's "
                        "WeightBiasQuantization (needed for integer kernels); auto = int32 only for "
                        "yoloq's onnxruntime fast-path files (default)")
    p.add_argument("--data", help="dataset YAML (default: data of the config)")
    p.add_argument("--img-size", type=int, help="square input size (default: ONNX input, else model.img_size)")
    p.add_argument("--ann", choices=ANN_KEYS, help="ground-truth key of the dataset YAML (default: eval.val_ann)")
    p.add_argument("--max-images", type=int, help="evaluate only the first N images (by id)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--backend", choices=BACKENDS)
    p.add_argument("--out", help="result JSON (default: runs/eval/<model name>[_onnx].json)")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default=DEFAULT_INTERPOLATION,
                   help="letterbox resampling (default: %(default)s, the reference protocol)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.cfg)
    data_path = args.data or cfg.data
    if not data_path:
        raise SystemExit(f"error: {args.cfg} has no 'data' and no --data was given")
    data_cfg = load_data_config(data_path)
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("workers", args.workers),
                                   ("backend", args.backend), ("val_ann", args.ann)) if v is not None}
    eval_cfg = dataclasses.replace(cfg.eval, **overrides)
    common = dict(max_images=args.max_images, progress=not args.no_progress, interpolation=args.interpolation)
    if args.onnx:
        predictor = OnnxPredictor(args.onnx, quantize_bias={"auto": None, "float": False, "int32": True}[args.ort_bias])
        img_size = args.img_size or predictor.img_size or cfg.model.img_size
        result = evaluate(predictor, data_cfg, eval_cfg, img_size, **common)
    else:
        model = load_eval_model(cfg.model, args.weights)
        img_size = args.img_size or cfg.model.img_size
        result = evaluate_model(model, data_cfg, eval_cfg, img_size, **common)
    out = Path(args.out or f"runs/eval/{cfg.model.name}{'_onnx' if args.onnx else ''}.json")
    save_result(result, out)
    source = args.onnx or args.weights or cfg.model.weights
    if args.onnx:
        source += f", onnxruntime {'int32' if predictor.quantize_bias else 'float'} conv biases"
    print(f"{cfg.model.name} ({source}) at {img_size} on {Path(result.ann_file).name}: "
          f"{result.n_images} images, {len(result.detections)} detections, {result.images_per_s:.1f} img/s, "
          f"{len(result.failed_files)} failed, backend {result.backend}")
    print(format_stats_table(result.stats))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as err:   # config / data / checkpoint problems: no traceback
        sys.exit(f"error: {err}")
