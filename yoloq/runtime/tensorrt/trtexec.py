"""The trtexec command lines equivalent to yoloq's builds and benchmarks, per TensorRT major version."""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Optional

from yoloq.errors import InputError
from yoloq.runtime.tensorrt.env import (STRONGLY_TYPED_MAJOR, autocast_command, format_dims,
                                        implicit_calibration_removed, inspect_onnx, installed_trt_major,
                                        normalize_precision, resolve_profile)


def trtexec_command(onnx_path: str | os.PathLike, precision: str = "int8", *,
                    engine_path: Optional[str | os.PathLike] = None, workspace_gb: float = 4.0,
                    min_batch: Optional[int] = None, opt_batch: Optional[int] = None,
                    max_batch: Optional[int] = None, img_size: Optional[int] = None,
                    calib_cache: Optional[str | os.PathLike] = None, trt_major: int = 10) -> str:
    """The ``trtexec`` command line that builds the same engine as :func:`build_engine` with TensorRT
    ``trt_major``.

    Reads the ONNX (when it exists) for the input name and whether the batch is dynamic.
    trtexec cannot run our calibration images: for implicit INT8 (TensorRT < 11) it takes
    ``--calib=<cache>`` written by a Python build (:func:`build_engine` with a calibrator).
    TensorRT 11 has no precision flags: an FP32 ONNX is first converted to FP16 with ModelOpt AutoCast
    for an FP16 engine (the command starts with that step), and implicit INT8 is a ValueError.
    """
    onnx_path = Path(onnx_path)
    precision = normalize_precision(precision)
    engine_path = Path(engine_path) if engine_path else onnx_path.with_suffix(".engine")
    info = inspect_onnx(onnx_path) if onnx_path.is_file() else None
    prefix, source = [], onnx_path
    if trt_major >= STRONGLY_TYPED_MAJOR:
        if calib_cache or (precision == "int8" and info is not None and not info.has_qdq):
            raise InputError(implicit_calibration_removed(trt_major))
        if precision == "fp16" and (info is None or info.n_float16 == 0):
            convert, source = autocast_command(onnx_path)
            prefix = shlex.split(convert) + ["&&"]
        if precision == "fp32" and info is not None and info.n_float16:
            raise InputError(f"{onnx_path} has FP16 tensors, which TensorRT {trt_major} keeps (strongly typed): "
                             "no FP32 engine from it")
    elif precision == "int8" and info is not None and not info.has_qdq and not calib_cache:
        raise InputError(f"{onnx_path} has no Q/DQ nodes: trtexec --int8 needs --calib=<cache>, which only a "
                         "Python build with a calibrator writes (yoloq trt build --calib entropy); without "
                         "it TensorRT uses placeholder scales")
    parts = ["trtexec", f"--onnx={source}", f"--saveEngine={engine_path}"]
    if trt_major < STRONGLY_TYPED_MAJOR:
        if precision == "int8":
            parts += ["--int8", "--fp16"]       # FP16 for the layers left in float (e.g. the decode)
        elif precision == "fp16":
            parts.append("--fp16")
        if calib_cache:
            parts.append(f"--calib={calib_cache}")
    parts.append(f"--memPoolSize=workspace:{int(round(workspace_gb * 1024))}")   # MiB, 8.x to 11.x
    if info is not None:
        profile = resolve_profile(info, min_batch, opt_batch, max_batch, img_size)
        if None in info.input_shape:        # any dynamic dimension needs explicit shapes
            name = profile.input_name
            parts += [f"--minShapes={name}:{format_dims(profile.min)}", f"--optShapes={name}:{format_dims(profile.opt)}",
                      f"--maxShapes={name}:{format_dims(profile.max)}"]
    return " ".join(p if p == "&&" else shlex.quote(p) for p in prefix + parts)


def trtexec_or_reason(*args, **kwargs) -> str:
    """:func:`trtexec_command`, or "none (why)" where trtexec cannot build that engine."""
    try:
        return trtexec_command(*args, **kwargs)
    except ValueError as err:
        return f"none ({err})"


def trtexec_hint(onnx_path: str | os.PathLike, precision: str = "int8", **kwargs) -> str:
    """The equivalent trtexec command for the installed TensorRT; both forms (8.6/10.x and 11.x) when
    none is importable, as the precision flags differ (:func:`builder_flags`)."""
    major = installed_trt_major()
    if major is not None:
        return trtexec_or_reason(onnx_path, precision, trt_major=major, **kwargs)
    before = trtexec_or_reason(onnx_path, precision, trt_major=10, **kwargs)
    after = trtexec_or_reason(onnx_path, precision, trt_major=STRONGLY_TYPED_MAJOR, **kwargs)
    return f"{before} (TensorRT 8.6/10.x); with TensorRT 11.x: {after}"


def trtexec_bench_command(engine_path: str | os.PathLike, batch: Optional[int] = None,
                          img_size: Optional[int] = None, input_name: str = "images",
                          warmup_ms: int = 500, iters: int = 200) -> str:
    """``trtexec --loadEngine`` timing one batch size (shapes only needed for dynamic engines)."""
    parts = ["trtexec", f"--loadEngine={engine_path}", f"--warmUp={warmup_ms}", f"--iterations={iters}",
             "--useSpinWait"]
    if batch and img_size:
        parts.append(f"--shapes={input_name}:{batch}x3x{img_size}x{img_size}")
    return " ".join(shlex.quote(p) for p in parts)
