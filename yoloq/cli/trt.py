"""TensorRT engines of exported ONNX models: build, COCO evaluation, latency benchmark.

    # explicit quantization: the Q/DQ ONNX of `yoloq export` (scales from the ONNX)
    yoloq trt build --onnx runs/export/yolov6lite_s_qdq.onnx --precision int8
    # FP16 engine of the plain FP32 export, for comparison
    yoloq trt build --onnx runs/export/yolov6lite_s_fp32.onnx --precision fp16
    # implicit-calibration baseline (upstream's "simple PTQ"): plain ONNX + TensorRT entropy calibrator
    yoloq trt build --onnx runs/export/yolov6lite_s_fp32.onnx --precision int8 --calib entropy \\
        --cfg yolov6lite_s --calib-images 256
    yoloq trt eval  --engine runs/export/yolov6lite_s_qdq_int8.engine --cfg yolov6lite_s
    yoloq trt bench --engine runs/export/yolov6lite_s_qdq_int8.engine --batch 1 32

Each build also prints the equivalent trtexec command. Without the 'tensorrt' package or a CUDA GPU,
every subcommand exits with code 2 and a one-line message naming what is missing and the trtexec
command to run instead. A dynamic-batch ONNX gets one optimization profile (--min/--opt/--max-batch,
default 1/16/32); calibration uses train images only (data.train_images of the config).

TensorRT 11 builds strongly typed (no --int8/--fp16, no implicit calibration): the Q/DQ ONNX builds
as is (its float layers in FP32), an FP16 engine needs an FP16 ONNX (ModelOpt AutoCast; the printed
trtexec line includes that step), and --calib needs TensorRT 8.6-10.x.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from yoloq.cli.common import (CFG_HELP, add_evaluation_arguments, add_settings_argument, evaluation_overrides,
                              non_negative_int, parser, positive_float, positive_int)
from yoloq.config import load_config
from yoloq.data import load_data_config
from yoloq.errors import InputError
from yoloq.io import atomic_write_text, check_output_file
from yoloq.runtime import tensorrt as yt


class TensorRTMissing(InputError):
    """TensorRT or a CUDA GPU is not available here; the message gives the trtexec command instead."""


def build_parser(prog: str = "yoloq trt"):
    p = parser(prog, __doc__, settings=False)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build an engine from an ONNX file")
    b.add_argument("--onnx", required=True, help="ONNX file (Q/DQ export for int8, plain FP32 export otherwise)")
    b.add_argument("--engine", help="engine path (default: <onnx stem>_<mode>.engine next to the ONNX)")
    b.add_argument("--precision", choices=yt.PRECISIONS, default="int8",
                   help="int8/best: INT8+FP16 kernels; fp16; fp32 (default %(default)s)")
    b.add_argument("--calib", choices=yt.CALIBRATORS,
                   help="implicit INT8 calibration of a plain ONNX with TensorRT's entropy/minmax calibrator")
    b.add_argument("--cfg", help="experiment config: data (train images) and quant.calibration.images for --calib")
    b.add_argument("--data", help="dataset YAML (default: data of the config)")
    b.add_argument("--calib-images", type=positive_int, help="train images for --calib (default quant.calibration.images)")
    b.add_argument("--calib-batch", type=positive_int, default=8, help="calibration batch (dynamic-batch ONNX)")
    b.add_argument("--calib-cache", help="calibration cache (default <engine>.calib); reused when present")
    b.add_argument("--recalibrate", action="store_true", help="ignore an existing calibration cache")
    b.add_argument("--workers", type=non_negative_int, default=2, help="data loader workers for calibration")
    b.add_argument("--workspace", type=positive_float, default=4.0, help="builder workspace in GiB (default %(default)s)")
    b.add_argument("--min-batch", type=positive_int)
    b.add_argument("--opt-batch", type=positive_int)
    b.add_argument("--max-batch", type=positive_int)
    b.add_argument("--img-size", type=positive_int, help="input size when the ONNX height/width are dynamic")
    b.add_argument("--verbose", action="store_true", help="TensorRT verbose log")
    add_settings_argument(b)
    e = sub.add_parser("eval", help="COCO mAP of an engine (same pipeline as `yoloq eval`)")
    e.add_argument("--engine", required=True)
    e.add_argument("--cfg", required=True, help=CFG_HELP)
    e.add_argument("--data", help="dataset YAML (default: data of the config)")
    e.add_argument("--img-size", type=positive_int, help="input size (default: the engine's)")
    e.add_argument("--out", help="result JSON (default runs/eval/<engine stem>_trt.json)")
    add_evaluation_arguments(e)
    add_settings_argument(e)
    n = sub.add_parser("bench", help="GPU latency / throughput of an engine (CUDA events)")
    n.add_argument("--engine", required=True)
    n.add_argument("--batch", type=positive_int, nargs="+", default=[1, 32], help="batch sizes (default 1 32)")
    n.add_argument("--warmup", type=non_negative_int, default=50, help="untimed calls per batch size (default %(default)s)")
    n.add_argument("--iters", type=positive_int, default=200, help="timed calls per batch size (default %(default)s)")
    n.add_argument("--img-size", type=positive_int, help="input size of a dynamic-size engine (and the trtexec hint)")
    n.add_argument("--out", help="also write the results as JSON")
    return p


def default_engine_path(onnx: Path, precision: str, calib: Optional[str]) -> Path:
    mode = yt.normalize_precision(precision) + (f"_{calib}" if calib else "")
    return onnx.with_name(f"{onnx.stem}_{mode}.engine")


def require_tensorrt(what: str, command: str) -> None:
    reason = yt.missing_requirement()
    if reason is not None:
        raise TensorRTMissing(f"{what} needs TensorRT and a CUDA GPU: {reason}. Run instead: {command}")


def _data_config(cfg_path: Optional[str], data_path: Optional[str]):
    cfg = load_config(cfg_path) if cfg_path else None
    data_path = data_path or (cfg.data if cfg else None)
    if not data_path:
        raise InputError(f"{cfg_path or 'no --cfg'}: no dataset; give --cfg with 'data' or --data")
    return cfg, load_data_config(data_path)


def _calibrator(args, info, cache: Path):
    """TensorRT's implicit calibrator fed with train images (the baseline), or None."""
    if not args.calib:
        return None
    if info.has_qdq:
        print(f"note: {args.onnx} has Q/DQ nodes (explicit quantization); --calib {args.calib} is ignored")
        return None
    cfg, data_cfg = _data_config(args.cfg, args.data)
    img_size = info.img_size or args.img_size or (cfg.model.img_size if cfg else None)
    if not img_size:
        raise InputError(f"{args.onnx}: dynamic input size; pass --img-size")
    n_images = args.calib_images or (cfg.quant.calibration.images if cfg else 256)
    batch = args.calib_batch if info.dynamic_batch else info.input_shape[0]
    batches = yt.calibration_batches(data_cfg, n_images, img_size, batch, seed=cfg.quant.seed if cfg else 0,
                                     workers=args.workers)
    print(f"calibrating with TensorRT's {args.calib} calibrator on {n_images} train images (batch {batch}, cache {cache})")
    return yt.make_calibrator(args.calib, batches, cache, use_cache=not args.recalibrate)


def cmd_build(args) -> int:
    onnx = Path(args.onnx)
    info = yt.inspect_onnx(onnx)
    precision = yt.normalize_precision(args.precision)
    if args.calib and precision != "int8":
        raise InputError(f"--calib {args.calib} calibrates INT8; it cannot go with --precision {args.precision}")
    if args.calib and not (args.cfg or args.data):
        raise InputError("--calib needs calibration images: give --cfg (or --data)")
    yt.build_mode(info, precision, calibrating=bool(args.calib))      # impossible combinations: an error
    engine = Path(args.engine) if args.engine else default_engine_path(onnx, precision, args.calib)
    check_output_file(engine, "--engine", inputs={"--onnx": onnx, "--calib-cache": args.calib_cache})
    cache = Path(args.calib_cache) if args.calib_cache else engine.with_suffix(".calib")
    shapes = dict(min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch, img_size=args.img_size)
    command = yt.trtexec_hint(onnx, precision, engine_path=engine, workspace_gb=args.workspace,
                              calib_cache=cache if args.calib and cache.is_file() else None, **shapes)
    require_tensorrt("building an engine", command)
    print(f"equivalent trtexec command: {command}")
    calibrator = _calibrator(args, info, cache)
    result = yt.build_engine(onnx, engine, precision=precision, workspace_gb=args.workspace,
                             calibrator=calibrator, verbose=args.verbose, **shapes)
    print(f"built {result.engine_path} ({result.mode}, {result.engine_bytes / 2**20:.1f} MiB) in "
          f"{result.seconds:.0f} s with TensorRT {result.tensorrt_version}; profile {result.profile}")
    for note in result.notes:
        print(f"note: {note}")
    if calibrator is not None:
        print(f"trtexec with this calibration cache: {result.trtexec}")
    return 0


def evaluate_engine(engine_path, data_cfg, eval_cfg, img_size: Optional[int] = None, **kwargs):
    """COCO evaluation of an engine through ``yoloq.eval.evaluate`` (same protocol as PyTorch and
    onnxruntime). ``img_size`` defaults to the engine's fixed input size."""
    from yoloq.eval.coco_eval import evaluate
    predictor = yt.TrtPredictor(engine_path)
    size = img_size or predictor.img_size
    if not size:
        raise InputError(f"{engine_path}: engine input size is dynamic; pass --img-size")
    # batches go to the engine's GPU from pinned memory, non-blocking, and are scaled there
    result = evaluate(predictor, data_cfg, eval_cfg, size, device=predictor.device, **kwargs)
    result.extra["engine"] = str(engine_path)
    return result


def cmd_eval(args) -> int:
    from yoloq.eval import format_stats_table, save_result
    from yoloq.report.eval import timing_line
    engine = Path(args.engine)
    if not engine.is_file():
        raise InputError(f"TensorRT engine not found: {engine}")
    cfg, data_cfg = _data_config(args.cfg, args.data)
    out = check_output_file(args.out or f"runs/eval/{engine.stem}_trt.json", "--out", inputs={"--engine": engine})
    require_tensorrt("COCO evaluation of an engine",
                     f"{yt.trtexec_bench_command(engine)} (trtexec times the engine; mAP needs the Python API)")
    cfg = cfg.with_overrides(eval=evaluation_overrides(args))
    result = evaluate_engine(engine, data_cfg, cfg.eval, args.img_size, max_images=args.max_images,
                             progress=not args.no_progress, interpolation=args.interpolation)
    save_result(result, out)
    print(f"{engine} at {result.img_size} on {Path(result.ann_file).name}: {result.n_images} images, "
          f"{len(result.detections)} detections, {result.images_per_s:.1f} img/s (incl. loading and NMS)")
    print(format_stats_table(result.stats))
    print(timing_line(result.timing))
    print(f"wrote {out}")
    return 0


def cmd_bench(args) -> int:
    engine = Path(args.engine)
    if not engine.is_file():
        raise InputError(f"TensorRT engine not found: {engine}")
    if args.out:
        check_output_file(args.out, "--out", inputs={"--engine": engine})
    commands = " ; ".join(yt.trtexec_bench_command(engine, b, args.img_size, iters=args.iters) for b in args.batch)
    require_tensorrt("benchmarking an engine", commands)
    results = yt.benchmark(engine, args.batch, warmup=args.warmup, iters=args.iters, img_size=args.img_size)
    print(yt.format_bench_table(results, f"{engine} (GPU time per call, CUDA events, {args.iters} iters)"))
    if args.out:
        atomic_write_text(args.out, json.dumps({"engine": str(engine), "results": yt.bench_to_dict(results)}, indent=2))
        print(f"wrote {args.out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return {"build": cmd_build, "eval": cmd_eval, "bench": cmd_bench}[args.command](args)
