"""COCO mAP of a model (PyTorch weights) or an ONNX file, with the upstream YOLOv6 protocol.

    yoloq eval --cfg yolov6lite_s
    yoloq eval --cfg yolov6lite_s --ann val_ann_official --out runs/eval/s.json
    yoloq eval --cfg yolov6lite_s --weights my_yolov6lite_s.pt
    yoloq eval --cfg yolov6lite_s --onnx runs/export/yolov6lite_s.onnx
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from yoloq.cli.common import CFG_HELP, add_evaluation_arguments, evaluation_overrides, parser, positive_int
from yoloq.config import load_config, load_data_config
from yoloq.errors import InputError
from yoloq.io import check_output_file
from yoloq.recipes.common import align_classes


def build_parser(prog: str = "yoloq eval"):
    p = parser(prog, __doc__)
    p.add_argument("--cfg", required=True, help=CFG_HELP)
    p.add_argument("--weights", help="checkpoint (default: model.weights of the config); every form yoloq reads")
    p.add_argument("--random-weights", action="store_true", help="smoke test with seeded random weights (meaningless mAP)")
    p.add_argument("--onnx", help="evaluate this ONNX file with onnxruntime (CPU) instead of PyTorch")
    p.add_argument("--ort-bias", choices=("auto", "float", "int32"), default="auto",
                   help="with --onnx: conv biases as written (float) or rounded to int32 by onnxruntime's "
                        "WeightBiasQuantization (needed for integer kernels); auto = int32 only for "
                        "yoloq's onnxruntime fast-path files (default)")
    p.add_argument("--data", help="dataset YAML (default: data of the config)")
    p.add_argument("--img-size", type=positive_int, help="square input size (default: ONNX input, else model.img_size)")
    p.add_argument("--out", help="result JSON (default: runs/eval/<model name>[_onnx].json)")
    add_evaluation_arguments(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from yoloq.eval import evaluate, evaluate_model, format_stats_table, save_result
    args = build_parser().parse_args(argv)
    cfg = load_config(args.cfg)
    cfg = cfg.with_overrides(data=args.data, model=dict(img_size=args.img_size, weights=args.weights),
                             eval=evaluation_overrides(args))
    if not cfg.data:
        raise InputError(f"{args.cfg} has no 'data' and no --data was given")
    data_cfg = load_data_config(cfg.data)
    cfg = align_classes(cfg, data_cfg)
    out = check_output_file(args.out or f"runs/eval/{cfg.model.name}{'_onnx' if args.onnx else ''}.json", "--out",
                            inputs={"--weights": cfg.model.weights, "--onnx": args.onnx, "--cfg": str(args.cfg),
                                    "--data": cfg.data})
    common = dict(max_images=args.max_images, progress=not args.no_progress, interpolation=args.interpolation)
    if args.onnx:
        from yoloq.runtime.ort import OnnxPredictor
        predictor = OnnxPredictor(args.onnx, quantize_bias={"auto": None, "float": False, "int32": True}[args.ort_bias])
        img_size = args.img_size or predictor.img_size or cfg.model.img_size
        result = evaluate(predictor, data_cfg, cfg.eval, img_size, **common)
        source = f"{args.onnx}, onnxruntime {'int32' if predictor.quantize_bias else 'float'} conv biases"
    else:
        from yoloq.models import load_model
        model = load_model(cfg.model, random_weights=args.random_weights)
        img_size = cfg.model.img_size
        result = evaluate_model(model, data_cfg, cfg.eval, img_size, **common)
        source = "random weights: SMOKE TEST, meaningless mAP" if args.random_weights else cfg.model.weights
    save_result(result, out)
    print(f"{cfg.model.name} ({source}) at {img_size} on {Path(result.ann_file).name}: "
          f"{result.n_images} images, {len(result.detections)} detections, {result.images_per_s:.1f} img/s, "
          f"{len(result.failed_files)} failed, backend {result.backend}")
    print(format_stats_table(result.stats))
    print(f"wrote {out}")
    return 0
