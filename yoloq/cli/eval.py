"""COCO mAP of a model (PyTorch weights, a quantized quant.pt) or an ONNX file, with the upstream
YOLOv6 protocol; AP per class, precision-recall curves and per-image timing.

    yoloq eval --cfg yolov6lite_s
    yoloq eval --cfg yolov6lite_s --ann val_ann_official --out runs/eval/s.json
    yoloq eval --cfg yolov6lite_s --weights my_yolov6lite_s.pt --device cuda
    yoloq eval --cfg yolov6lite_s --ckpt runs/ptq/yolov6lite_s_auto/quant.pt    # fake-quant INT8
    yoloq eval --cfg yolov6lite_s --onnx runs/export/yolov6lite_s.onnx
    yoloq eval --cfg yolov6s_repvgg --onnx yolov6s.onnx     # upstream's export_onnx.py output too
    yoloq eval --cfg yolov6lite_s --save-json dets.json     # COCO results file (evaluation server)
    torchrun --nproc_per_node 2 tools/eval.py --cfg yolov6lite_s   # sharded over 2 processes

Writes the result JSON (--out: stats, AP per class, PR curves, timing, detections), a PR-curve plot
beside it (<out>_pr.png) and, with --save-json, the detections as a COCO results file. Under
torchrun the images are split over the processes and rank 0 alone prints and writes; the numbers
equal a one-process run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from yoloq.cli.common import CFG_HELP, add_evaluation_arguments, evaluation_overrides, parser, positive_int
from yoloq.config import load_config
from yoloq.data import load_data_config
from yoloq.errors import InputError
from yoloq.io import check_output_file
from yoloq.recipes.common import align_classes


def build_parser(prog: str = "yoloq eval"):
    from yoloq.runtime.layouts import LAYOUTS
    p = parser(prog, __doc__)
    p.add_argument("--cfg", required=True, help=CFG_HELP)
    p.add_argument("--weights", help="checkpoint (default: model.weights of the config); every form yoloq reads")
    p.add_argument("--ckpt", help="a quantized checkpoint (quant.pt of ptq / qat): evaluate it fake-quantized")
    p.add_argument("--random-weights", action="store_true", help="smoke test with seeded random weights (meaningless mAP)")
    p.add_argument("--onnx", help="evaluate this ONNX file with onnxruntime (CPU) instead of PyTorch")
    p.add_argument("--onnx-layout", choices=LAYOUTS, default="auto",
                   help="with --onnx: its output layout; auto reads yoloq's [B,N,4+nc] x1y1x2y2, upstream "
                        "YOLOv6's [B,N,5+nc] cx,cy,w,h,objectness and its end-to-end NMS outputs (num_dets, "
                        "det_boxes, det_scores, det_classes, or [M,7]); xywh: [B,N,4+nc] centre/size boxes")
    p.add_argument("--ort-bias", choices=("auto", "float", "int32"), default="auto",
                   help="with --onnx: conv biases as written (float) or rounded to int32 by onnxruntime's "
                        "WeightBiasQuantization (needed for integer kernels); auto = int32 only for "
                        "yoloq's onnxruntime fast-path files (default)")
    p.add_argument("--device", default="auto",
                   help="PyTorch models: auto (cuda when available), cpu, cuda, cuda:N (ONNX runs on the CPU)")
    p.add_argument("--data", help="dataset YAML (default: data of the config)")
    p.add_argument("--img-size", type=positive_int, help="square input size (default: ONNX input, else model.img_size)")
    p.add_argument("--out", help="result JSON (default: runs/eval/<model name>[_onnx|_int8].json)")
    p.add_argument("--save-json", nargs="?", const="", metavar="PATH",
                   help="also write the detections as a COCO results file (default path: <out>_predictions.json)")
    p.add_argument("--no-plots", action="store_true", help="do not write the PR-curve plot (<out>_pr.png)")
    add_evaluation_arguments(p)
    return p


def _load_predictor(args, cfg, data_cfg, device):
    """(predictor, img_size, device for its input, source text) for --onnx / --ckpt / weights."""
    if args.onnx:
        from yoloq.runtime.ort import OnnxPredictor
        predictor = OnnxPredictor(args.onnx, quantize_bias={"auto": None, "float": False, "int32": True}[args.ort_bias],
                                  layout=args.onnx_layout, nc=data_cfg.nc)
        img_size = args.img_size or predictor.img_size or cfg.model.img_size
        bias = "int32" if predictor.quantize_bias else "float"
        return predictor, img_size, None, f"{args.onnx}, onnxruntime, {bias} conv biases"
    if args.ckpt:
        from yoloq.quant.checkpoint import load_quantized
        model, _ = load_quantized(args.ckpt)
        return model.to(device), args.img_size or model.cfg.img_size, device, f"{args.ckpt}, fake-quantized INT8"
    from yoloq.models import load_model
    model = load_model(cfg.model, random_weights=args.random_weights)
    source = "random weights: SMOKE TEST, meaningless mAP" if args.random_weights else cfg.model.weights
    return model.to(device), cfg.model.img_size, device, source


def _default_out(args, cfg) -> str:
    suffix = "_onnx" if args.onnx else "_int8" if args.ckpt else ""
    return f"runs/eval/{cfg.model.name}{suffix}.json"


def _outputs(args, cfg) -> tuple[Path, Optional[Path], Optional[Path]]:
    inputs = {"--weights": cfg.model.weights, "--ckpt": args.ckpt, "--onnx": args.onnx, "--cfg": cfg.path,
              "--data": cfg.data}
    out = check_output_file(args.out or _default_out(args, cfg), "--out", inputs=inputs)
    stem = out.with_suffix("")
    plot = None if args.no_plots else check_output_file(f"{stem}_pr.png", "the PR-curve plot", inputs=inputs)
    coco = None if args.save_json is None else check_output_file(args.save_json or f"{stem}_predictions.json",
                                                                  "--save-json", inputs=inputs)
    return out, plot, coco


def _report(result, cfg, source, img_size, outputs) -> None:
    """Rank 0: print the numbers and write the files."""
    from yoloq.eval import format_stats_table, save_coco_json, save_result
    from yoloq.io import atomic_write_bytes
    from yoloq.report.eval import per_class_table, plot_pr_curves, timing_line
    out, plot, coco = outputs
    processes = result.timing.get("processes", 1)
    print(f"{cfg.model.name} ({source}) at {img_size} on {Path(result.ann_file).name}: "
          f"{result.n_images} images, {len(result.detections)} detections, {result.images_per_s:.1f} img/s, "
          f"{len(result.failed_files)} failed, backend {result.backend}"
          + (f", sharded over {processes} processes (torch.distributed)" if processes > 1 else ""))
    print(format_stats_table(result.stats))
    print(timing_line(result.timing))
    print("AP per class (%):")
    print(per_class_table(result.per_class))
    save_result(result, out)
    print(f"wrote {out}")
    if plot is not None and result.pr_curve:
        atomic_write_bytes(plot, plot_pr_curves(result.pr_curve, f"{cfg.model.name}: precision-recall"))
        print(f"wrote {plot}")
    if coco is not None:
        save_coco_json(result, coco)
        print(f"wrote {coco} (COCO results, {len(result.detections)} detections)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from yoloq import distributed
    from yoloq.cli.common import init_distributed
    from yoloq.device import resolve_device
    from yoloq.eval import evaluate
    args = build_parser().parse_args(argv)
    if args.onnx and args.ckpt:
        raise InputError("--onnx and --ckpt: give one model to evaluate")
    device = resolve_device(args.device)
    cfg = load_config(args.cfg)
    cfg = cfg.with_overrides(data=args.data, model=dict(img_size=args.img_size, weights=args.weights),
                             eval=evaluation_overrides(args))
    if not cfg.data:
        raise InputError(f"{args.cfg} has no 'data' and no --data was given")
    data_cfg = load_data_config(cfg.data)
    cfg = align_classes(cfg, data_cfg)
    outputs = _outputs(args, cfg)
    started = init_distributed(device.type)
    try:
        predictor, img_size, input_device, source = _load_predictor(args, cfg, data_cfg, device)
        result = _evaluate(evaluate, predictor, data_cfg, cfg, img_size, input_device, args)
        if args.onnx:
            source += f", {predictor.layout_name} layout"
        if distributed.is_main_process():
            _report(result, cfg, source, img_size, outputs)
    finally:
        if started:
            import torch.distributed as dist
            dist.destroy_process_group()
    return 0


def _evaluate(evaluate, predictor, data_cfg, cfg, img_size, input_device, args):
    import torch
    common = dict(max_images=args.max_images, progress=not args.no_progress, interpolation=args.interpolation,
                  device=input_device)
    if isinstance(predictor, torch.nn.Module):
        from yoloq.eval import evaluate_model
        return evaluate_model(predictor, data_cfg, cfg.eval, img_size, **common)
    return evaluate(predictor, data_cfg, cfg.eval, img_size, **common)
