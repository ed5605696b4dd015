"""Building an engine from an exported ONNX (TensorRT 8.6, 10.x and 11.x).

The network is created with the explicit-batch flag only before 10 (10 has no implicit batch), the
workspace is a memory-pool limit, engines are built with ``build_serialized_network`` and saved
atomically. TensorRT 11 builds every network strongly typed: it removed the precision flags
(``BuilderFlag.INT8`` / ``FP16``) and implicit INT8 calibration. :func:`builder_flags` decides per
major version: on 11 a Q/DQ ONNX builds as is (INT8 where the Q/DQ say, the rest in the ONNX's own
float type), an FP16 engine needs an ONNX whose float tensors are already FP16, and the
implicit-calibration baseline needs TensorRT 8.6-10.x. ``tensorrt`` is imported only when needed.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from yoloq.errors import InputError
from yoloq.io import atomic_write_bytes
from yoloq.runtime.tensorrt.env import (OnnxInfo, STRONGLY_TYPED_MAJOR, ShapeProfile, TrtBuildError, autocast_command,
                                        implicit_calibration_removed, import_tensorrt, inspect_onnx,
                                        normalize_precision, require_gpu, resolve_profile, trt_major)
from yoloq.runtime.tensorrt.trtexec import trtexec_or_reason


@dataclass
class BuildInfo:
    engine_path: str
    onnx_path: str
    precision: str
    mode: str                       # explicit-qdq | implicit-<calibrator> | fp16 | fp32
    n_qdq: int
    profile: dict
    seconds: float
    engine_bytes: int
    tensorrt_version: str
    trtexec: str
    notes: list = field(default_factory=list)


def _parser_errors(parser) -> list[str]:
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        try:
            lines.append(f"  node {err.node()}: {err.desc()} ({err.code()})")
        except Exception:  # noqa: BLE001 - the error object's accessors differ across versions
            lines.append(f"  {err}")
    return lines


def _network_flags(trt) -> int:
    if trt_major(trt) >= 10:
        return 0                     # explicit batch is the only mode (the flag is deprecated)
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def _set_workspace(trt, config, workspace_gb: float) -> None:
    limit = int(workspace_gb * (1 << 30))
    if hasattr(config, "set_memory_pool_limit"):       # TensorRT >= 8.4
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, limit)
    else:
        config.max_workspace_size = limit


def _network_has_qdq(trt, network) -> bool:
    kinds = (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
    return any(network.get_layer(i).type in kinds for i in range(network.num_layers))


def builder_flags(major: int, info: OnnxInfo, precision: str, mode: str) -> tuple[list[str], list[str]]:
    """(names of the ``trt.BuilderFlag`` members to set, notes) for an engine of ``info`` built in
    ``mode`` (:func:`build_mode`) by TensorRT ``major``; ValueError for what that version cannot build.
    Needs no TensorRT.

    Before 11 the flags allow the precisions (INT8 + FP16 for the Q/DQ graph, as trtexec --int8
    --fp16). TensorRT 11 builds strongly typed with no precision flags: the ONNX's types decide, so
    an FP16 engine needs FP16 tensors in the ONNX and an FP32 one must not have them.
    """
    precision = normalize_precision(precision)
    if major < STRONGLY_TYPED_MAJOR:
        return (["FP16"] if precision in ("int8", "fp16") else []) + (["INT8"] if precision == "int8" else []), []
    autocast, _ = autocast_command(info.path)
    if mode.startswith("implicit"):
        raise InputError(f"{info.path}: {implicit_calibration_removed(major)}")
    if precision == "fp16" and info.n_float16 == 0:
        raise InputError(f"{info.path} is FP32 and TensorRT {major} builds strongly typed (no FP16 flag): "
                         f"convert it first with `{autocast}` and build that file")
    if precision == "fp32" and info.n_float16:
        raise InputError(f"{info.path} has {info.n_float16} FP16 initializers, which TensorRT {major} keeps in "
                         "FP16 (strongly typed): build it as fp16, or use the FP32 export for an FP32 engine")
    notes = []
    if mode == "explicit-qdq" and info.n_float16 == 0:
        notes.append(f"TensorRT {major} builds strongly typed: the layers outside Q/DQ run in FP32 as the ONNX "
                     f"says (TensorRT 8.6/10 ran them in FP16); for FP16 there build from `{autocast}`")
    return [], notes


def build_mode(info: OnnxInfo, precision: str, calibrating: bool) -> str:
    """How an engine of ``info`` at ``precision`` gets built ("explicit-qdq", "implicit", "fp16",
    "fp32"), or ValueError for a combination TensorRT cannot build. Needs no TensorRT."""
    precision = normalize_precision(precision)
    n_qdq = info.n_quantize + info.n_dequantize
    if info.has_qdq and precision != "int8":
        raise InputError(f"{info.path} has {n_qdq} Q/DQ nodes: TensorRT builds it only as INT8; for a "
                         f"{precision.upper()} engine use the plain FP32 export (export_onnx(..., fp32=True))")
    if precision == "int8" and not info.has_qdq and not calibrating:
        raise InputError(f"{info.path} has no Q/DQ nodes and no calibrator was given: INT8 would have no "
                         "scales; export the quantized model with Q/DQ, or calibrate (entropy / minmax)")
    if info.has_qdq:
        return "explicit-qdq"
    return "implicit" if precision == "int8" else precision


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, precision: str = "int8",
                 workspace_gb: float = 4.0, min_batch: Optional[int] = None, opt_batch: Optional[int] = None,
                 max_batch: Optional[int] = None, img_size: Optional[int] = None, calibrator=None,
                 verbose: bool = False) -> BuildInfo:
    """Build and save (atomically) a TensorRT engine from an ONNX file.

    * ``precision="int8"`` (or "best") on a Q/DQ ONNX: explicit quantization (INT8 + FP16 flags,
      no calibrator: the Q/DQ scales are used as exported).
    * ``precision="int8"`` on a plain ONNX with ``calibrator`` (:class:`EntropyCalibrator` /
      :class:`MinMaxCalibrator`): TensorRT's implicit calibration, the baseline.
    * ``precision="fp16"`` / ``"fp32"`` on a plain ONNX: the float engines to compare against.

    TensorRT 11 sets no precision flags (:func:`builder_flags`): its FP16 engine needs an FP16 ONNX
    and it has no implicit calibration. A dynamic-batch input gets one optimization profile
    (min/opt/max batch, default 1/16/32).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    precision = normalize_precision(precision)
    info = inspect_onnx(onnx_path)                  # missing / unreadable ONNX -> clear error, no GPU needed
    profile = resolve_profile(info, min_batch, opt_batch, max_batch, img_size)
    notes: list[str] = []
    mode = build_mode(info, precision, calibrator is not None)
    if info.has_qdq and calibrator is not None:
        notes.append("calibrator ignored: the ONNX has Q/DQ nodes (explicit quantization)")
        warnings.warn(f"{onnx_path}: {notes[-1]}", stacklevel=2)
        calibrator = None
    elif calibrator is not None:
        mode = f"implicit-{getattr(calibrator, 'algorithm_name', 'calibrator')}"
    require_gpu()
    trt = import_tensorrt()
    flags, version_notes = builder_flags(trt_major(trt), info, precision, mode)   # 11: strongly typed
    notes += version_notes
    builder, network, config = _parse(trt, onnx_path, workspace_gb, verbose)
    _set_flags(trt, builder, config, flags, notes)
    if calibrator is not None and _network_has_qdq(trt, network):   # Q/DQ the node scan missed
        notes.append("calibrator ignored: the parsed network has Q/DQ layers")
        calibrator = None
    _add_profiles(builder, network, config, profile, info, calibrator, onnx_path)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    feeder = getattr(calibrator, "feeder", None)
    if feeder is not None and feeder.error is not None:
        raise TrtBuildError(f"calibration failed after {feeder.n_batches} batches: {feeder.error}") from feeder.error
    if serialized is None:
        raise TrtBuildError(f"TensorRT failed to build an engine from {onnx_path} ({mode}); see the TensorRT "
                            "log above (rerun with verbose=True / --verbose for details)")
    data = memoryview(serialized)
    atomic_write_bytes(engine_path, data)
    cache = getattr(feeder, "cache_file", None)
    command = trtexec_or_reason(onnx_path, precision, engine_path=engine_path, workspace_gb=workspace_gb,
                                min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, img_size=img_size,
                                calib_cache=cache if cache and Path(cache).is_file() else None,
                                trt_major=trt_major(trt))
    return BuildInfo(str(engine_path), str(onnx_path), precision, mode, info.n_quantize + info.n_dequantize,
                     {"input": profile.input_name, "min": list(profile.min), "opt": list(profile.opt),
                      "max": list(profile.max)}, seconds, data.nbytes, str(trt.__version__), command, notes)


def _parse(trt, onnx_path: Path, workspace_gb: float, verbose: bool):
    """(builder, parsed network, builder config with the workspace limit)."""
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise TrtBuildError(f"TensorRT could not parse {onnx_path}:\n" + "\n".join(_parser_errors(parser)))
    config = builder.create_builder_config()
    _set_workspace(trt, config, workspace_gb)
    return builder, network, config


def _set_flags(trt, builder, config, flags: list[str], notes: list[str]) -> None:
    if "FP16" in flags and not getattr(builder, "platform_has_fast_fp16", True):   # deprecated in 10, gone in 11
        notes.append("this GPU has no fast FP16")
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))


def _add_profiles(builder, network, config, profile: ShapeProfile, info: OnnxInfo, calibrator, onnx_path: Path) -> None:
    """The optimization profile of a dynamic input; the calibrator and its one-shape profile."""
    input_tensor = network.get_input(0)
    if input_tensor.name != profile.input_name:
        raise TrtBuildError(f"{onnx_path}: TensorRT sees input '{input_tensor.name}', ONNX says '{profile.input_name}'")
    if profile.dynamic or -1 in tuple(input_tensor.shape):
        opt_profile = builder.create_optimization_profile()
        opt_profile.set_shape(profile.input_name, profile.min, profile.opt, profile.max)
        config.add_optimization_profile(opt_profile)
    if calibrator is None:
        return
    calib_batch = int(calibrator.get_batch_size())
    if not info.dynamic_batch and calib_batch != profile.min[0]:
        raise InputError(f"{onnx_path} has a fixed batch of {profile.min[0]}; the calibrator's batch size "
                         f"must match, got {calib_batch}")
    config.int8_calibrator = calibrator
    if info.dynamic_batch:          # calibration runs at one shape: the calibrator's batch
        shape = (calib_batch,) + tuple(profile.opt[1:])
        calib_profile = builder.create_optimization_profile()
        calib_profile.set_shape(profile.input_name, shape, shape, shape)
        config.set_calibration_profile(calib_profile)
