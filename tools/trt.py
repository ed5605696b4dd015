#!/usr/bin/env python
"""TensorRT engines of exported ONNX models: build, COCO evaluation, latency benchmark.

    # explicit quantization: the Q/DQ ONNX of tools/export.py (INT8 + FP16 kernels, scales from the ONNX)
    python tools/trt.py build --onnx runs/export/yolov6lite_s_qdq.onnx --precision int8
    # FP16 engine of the plain FP32 export, for comparison
    python tools/trt.py build --onnx runs/export/yolov6lite_s_fp32.onnx --precision fp16
    # implicit-calibration baseline (upstream's "simple PTQ"): plain ONNX + TensorRT entropy calibrator
    python tools/trt.py build --onnx runs/export/yolov6lite_s_fp32.onnx --precision int8 --calib entropy \\
        --cfg configs/yolov6lite_s.yaml --calib-images 256
    python tools/trt.py eval  --engine runs/export/yolov6lite_s_qdq_int8.engine --cfg configs/yolov6lite_s.yaml
    python tools/trt.py bench --engine runs/export/yolov6lite_s_qdq_int8.engine --batch 1 32

Each build also prints the equivalent trtexec command. Without the 'tensorrt' package or a CUDA GPU,
every subcommand exits with code 2 and a one-line message naming what is missing and the trtexec
command to run instead. A dynamic-batch ONNX gets one optimization profile (--min/--opt/--max-batch,
default 1/16/32); calibration uses train images only (data.train_images of the config).

TensorRT 11 builds strongly typed (no --int8/--fp16, no implicit calibration): the Q/DQ ONNX builds
as is (its float layers in FP32), an FP16 engine needs an FP16 ONNX (ModelOpt AutoCast; the printed
trtexec line includes that step), and --calib needs TensorRT 8.6-10.x.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from yoloq.export import tensorrt as yt

EXIT_MISSING = 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build an engine from an ONNX file")
    b.add_argument("--onnx", required=True, help="ONNX file (Q/DQ export for int8, plain FP32 export otherwise)")
    b.add_argument("--engine", help="engine path (default: <onnx stem>_<mode>.engine next to the ONNX)")
    b.add_argument("--precision", choices=yt.PRECISIONS, default="int8",
                   help="int8/best: INT8+FP16 kernels; fp16; fp32 (default %(default)s)")
    b.add_argument("--calib", choices=yt.CALIBRATORS,
                   help="implicit INT8 calibration of a plain ONNX with TensorRT's entropy/minmax calibrator")
    b.add_argument("--cfg", help="experiment config: data (train images) and quant.calib_images for --calib")
    b.add_argument("--data", help="dataset YAML (default: data of the config)")
    b.add_argument("--calib-images", type=int, help="train images for --calib (default quant.calib_images)")
    b.add_argument("--calib-batch", type=int, default=8, help="calibration batch (dynamic-batch ONNX; default %(default)s)")
    b.add_argument("--calib-cache", help="calibration cache (default <engine>.calib); reused when present")
    b.add_argument("--recalibrate", action="store_true", help="ignore an existing calibration cache")
    b.add_argument("--workers", type=int, default=2, help="data loader workers for calibration")
    b.add_argument("--workspace", type=float, default=4.0, help="builder workspace in GiB (default %(default)s)")
    b.add_argument("--min-batch", type=int)
    b.add_argument("--opt-batch", type=int)
    b.add_argument("--max-batch", type=int)
    b.add_argument("--img-size", type=int, help="input size when the ONNX height/width are dynamic")
    b.add_argument("--verbose", action="store_true", help="TensorRT verbose log")

    e = sub.add_parser("eval", help="COCO mAP of an engine (same pipeline as tools/eval.py)")
    e.add_argument("--engine", required=True)
    e.add_argument("--cfg", required=True, help="experiment config (configs/*.yaml)")
    e.add_argument("--data", help="dataset YAML (default: data of the config)")
    e.add_argument("--img-size", type=int, help="input size (default: the engine's)")
    e.add_argument("--ann", choices=("val_ann", "val_ann_official"), help="ground truth (default eval.val_ann)")
    e.add_argument("--max-images", type=int, help="evaluate only the first N images (by id)")
    e.add_argument("--batch-size", type=int)
    e.add_argument("--workers", type=int)
    e.add_argument("--backend", choices=("pycocotools", "faster-coco-eval"))
    e.add_argument("--interpolation", choices=("pil", "linear", "area"), default="pil")
    e.add_argument("--out", help="result JSON (default runs/eval/<engine stem>_trt.json)")
    e.add_argument("--no-progress", action="store_true")

    n = sub.add_parser("bench", help="GPU latency / throughput of an engine (CUDA events)")
    n.add_argument("--engine", required=True)
    n.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes (default 1 32)")
    n.add_argument("--warmup", type=int, default=50, help="untimed calls per batch size (default %(default)s)")
    n.add_argument("--iters", type=int, default=200, help="timed calls per batch size (default %(default)s)")
    n.add_argument("--img-size", type=int, help="input size of a dynamic-size engine (and for the trtexec hint)")
    n.add_argument("--out", help="also write the results as JSON")
    return p.parse_args(argv)


def default_engine_path(onnx: Path, precision: str, calib: str | None) -> Path:
    mode = yt.normalize_precision(precision) + (f"_{calib}" if calib else "")
    return onnx.with_name(f"{onnx.stem}_{mode}.engine")


def _missing(what: str, command: str) -> int:
    reason = yt.missing_requirement()
    if reason is None:
        return 0
    print(f"error: {what} needs TensorRT and a CUDA GPU: {reason}. Run instead: {command}", file=sys.stderr)
    return EXIT_MISSING


def _data_config(args):
    from yoloq.config import load_config, load_data_config

    cfg = load_config(args.cfg) if args.cfg else None
    data_path = args.data or (cfg.data if cfg else None)
    if not data_path:
        raise ValueError(f"{args.cfg or 'no --cfg'}: no dataset; give --cfg with 'data' or --data")
    return cfg, load_data_config(data_path)


def cmd_build(args) -> int:
    onnx = Path(args.onnx)
    info = yt.inspect_onnx(onnx)                      # missing / unreadable file -> error, exit 1
    precision = yt.normalize_precision(args.precision)
    if args.calib and precision != "int8":
        raise ValueError(f"--calib {args.calib} calibrates INT8; it cannot go with --precision {args.precision}")
    if args.calib and not (args.cfg or args.data):
        raise ValueError("--calib needs calibration images: give --cfg (or --data)")
    yt.build_mode(info, precision, calibrating=bool(args.calib))      # impossible combinations: exit 1
    engine = Path(args.engine) if args.engine else default_engine_path(onnx, precision, args.calib)
    cache = Path(args.calib_cache) if args.calib_cache else engine.with_suffix(".calib")
    shapes = dict(min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch,
                  img_size=args.img_size)
    command = yt.trtexec_hint(onnx, precision, engine_path=engine, workspace_gb=args.workspace,
                              calib_cache=cache if args.calib and cache.is_file() else None, **shapes)
    code = _missing("building an engine", command)
    if code:
        return code
    print(f"equivalent trtexec command: {command}")

    calibrator = None
    if args.calib and not info.has_qdq:
        cfg, data_cfg = _data_config(args)
        img_size = info.img_size or args.img_size or (cfg.model.img_size if cfg else None)
        if not img_size:
            raise ValueError(f"{onnx}: dynamic input size; pass --img-size")
        n_images = args.calib_images or (cfg.quant.calib_images if cfg else 256)
        batch = args.calib_batch if info.dynamic_batch else info.input_shape[0]
        batches = yt.calibration_batches(data_cfg, n_images, img_size, batch,
                                         seed=cfg.quant.seed if cfg else 0, workers=args.workers)
        calibrator = yt.make_calibrator(args.calib, batches, cache, use_cache=not args.recalibrate)
        print(f"calibrating with TensorRT's {args.calib} calibrator on {n_images} train images "
              f"(batch {batch}, cache {cache})")
    elif args.calib:
        print(f"note: {onnx} has Q/DQ nodes (explicit quantization); --calib {args.calib} is ignored")

    result = yt.build_engine(onnx, engine, precision=precision, workspace_gb=args.workspace,
                             calibrator=calibrator, verbose=args.verbose, **shapes)
    print(f"built {result.engine_path} ({result.mode}, {result.engine_bytes / 2**20:.1f} MiB) in "
          f"{result.seconds:.0f} s with TensorRT {result.tensorrt_version}; profile {result.profile}")
    for note in result.notes:
        print(f"note: {note}")
    if calibrator is not None:
        print(f"trtexec with this calibration cache: {result.trtexec}")
    return 0


def cmd_eval(args) -> int:
    from yoloq.config import load_config, load_data_config
    from yoloq.eval import format_stats_table, save_result

    engine = Path(args.engine)
    if not engine.is_file():
        raise FileNotFoundError(f"TensorRT engine not found: {engine}")
    cfg = load_config(args.cfg)
    data_path = args.data or cfg.data
    if not data_path:
        raise ValueError(f"{args.cfg} has no 'data' and no --data was given")
    data_cfg = load_data_config(data_path)
    code = _missing("COCO evaluation of an engine",
                    f"{yt.trtexec_bench_command(engine)} (trtexec times the engine; mAP needs the Python API)")
    if code:
        return code
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("workers", args.workers),
                                   ("backend", args.backend), ("val_ann", args.ann)) if v is not None}
    eval_cfg = dataclasses.replace(cfg.eval, **overrides)
    result = yt.evaluate_engine(engine, data_cfg, eval_cfg, args.img_size, max_images=args.max_images,
                                progress=not args.no_progress, interpolation=args.interpolation)
    out = Path(args.out or f"runs/eval/{engine.stem}_trt.json")
    save_result(result, out)
    print(f"{engine} at {result.img_size} on {Path(result.ann_file).name}: {result.n_images} images, "
          f"{len(result.detections)} detections, {result.images_per_s:.1f} img/s (incl. loading and NMS)")
    print(format_stats_table(result.stats))
    print(f"wrote {out}")
    return 0


def cmd_bench(args) -> int:
    engine = Path(args.engine)
    if not engine.is_file():
        raise FileNotFoundError(f"TensorRT engine not found: {engine}")
    commands = " ; ".join(yt.trtexec_bench_command(engine, b, args.img_size, iters=args.iters) for b in args.batch)
    code = _missing("benchmarking an engine", commands)
    if code:
        return code
    results = yt.benchmark(engine, args.batch, warmup=args.warmup, iters=args.iters, img_size=args.img_size)
    print(yt.format_bench_table(results, f"{engine} (GPU time per call, CUDA events, {args.iters} iters)"))
    if args.out:
        yt.atomic_write_bytes(args.out, json.dumps({"engine": str(engine), "results": yt.bench_to_dict(results)},
                                                   indent=2).encode())
        print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return {"build": cmd_build, "eval": cmd_eval, "bench": cmd_bench}[args.command](args)
    except yt.TrtUnavailable as err:          # e.g. CUDA went away between the check and the call
        print(f"error: {err}", file=sys.stderr)
        return EXIT_MISSING
    except (ValueError, FileNotFoundError, yt.TrtBuildError) as err:   # bad input: no traceback
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
