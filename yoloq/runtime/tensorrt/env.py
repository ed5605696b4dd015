"""TensorRT availability and version rules, and what an ONNX file asks of the builder.

``tensorrt`` is imported only when a function needs it, so everything here works without it.
TensorRT 11 builds every network strongly typed: it removed the precision flags and implicit INT8
calibration (``implicit_calibration_removed``); an FP16 engine needs an FP16 ONNX (``autocast_command``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from yoloq.errors import InputError, YoloqError


PRECISIONS = ("int8", "fp16", "fp32", "best")      # "best" = int8 (INT8 + FP16 kernels, as trtexec --best)

DEFAULT_BATCHES = (1, 16, 32)                       # min / opt / max batch of a dynamic-batch profile


class TrtUnavailable(YoloqError, RuntimeError):
    """TensorRT (the ``tensorrt`` Python package) or a CUDA GPU is missing."""


class TrtBuildError(YoloqError, RuntimeError):
    """The ONNX could not be parsed or TensorRT could not build / load an engine."""


def import_tensorrt():
    """The ``tensorrt`` module, or :class:`TrtUnavailable` saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) and err.name == "tensorrt":
            raise TrtUnavailable("the TensorRT Python package 'tensorrt' is not installed "
                                 "(pip install tensorrt; needs an NVIDIA GPU and driver)") from err
        raise TrtUnavailable(f"the TensorRT Python package 'tensorrt' failed to import: {err}") from err
    return trt


def missing_requirement() -> Optional[str]:
    """None when TensorRT and a CUDA GPU are usable, else a one-line reason."""
    try:
        import_tensorrt()
    except TrtUnavailable as err:
        return str(err)
    if not torch.cuda.is_available():
        return (f"no CUDA GPU visible to PyTorch (torch {torch.__version__}, CUDA build: "
                f"{torch.version.cuda or 'none'}); TensorRT needs an NVIDIA GPU and a CUDA build of torch")
    return None


def require_gpu() -> None:
    reason = missing_requirement()
    if reason:
        raise TrtUnavailable(reason)


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])

STRONGLY_TYPED_MAJOR = 11         # TensorRT 11 removed weak typing: precision flags and implicit INT8


def autocast_command(onnx_path: str | os.PathLike) -> tuple[str, Path]:
    """NVIDIA ModelOpt's FP32 -> FP16 ONNX conversion for TensorRT 11, and the file it writes."""
    source = Path(onnx_path)
    target = source.with_name(source.stem + "_fp16.onnx")
    return f"python -m modelopt.onnx.autocast --onnx_path {source} --output_path {target}", target


def implicit_calibration_removed(version) -> str:
    return (f"TensorRT {version} has no implicit INT8 calibration (removed in 11 with the IInt8*Calibrator "
            "classes, BuilderFlag.INT8 and trtexec --int8/--calib): the calibrated baseline needs TensorRT "
            "8.6-10.x (pip install 'tensorrt<11'); yoloq's Q/DQ export builds on any version")


def installed_trt_major() -> Optional[int]:
    """Major version of the importable ``tensorrt`` package (no GPU needed), or None."""
    try:
        return trt_major(import_tensorrt())
    except (TrtUnavailable, ValueError, AttributeError):
        return None


@dataclass
class OnnxInfo:
    path: str
    input_name: str
    input_shape: list              # ints; None where the dimension is dynamic
    output_names: list
    n_quantize: int
    n_dequantize: int
    n_float16: int = 0             # FP16 initializers: float layers already converted (e.g. ModelOpt AutoCast)

    @property
    def has_qdq(self) -> bool:
        return self.n_quantize + self.n_dequantize > 0

    @property
    def dynamic_batch(self) -> bool:
        return self.input_shape[0] is None

    @property
    def img_size(self) -> Optional[int]:
        h, w = self.input_shape[2], self.input_shape[3]
        return h if h is not None and h == w else None


def inspect_onnx(path: str | os.PathLike) -> OnnxInfo:
    """Input name/shape, outputs and Q/DQ node count of an ONNX file (weights are not loaded)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise InputError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})") from err
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise InputError(f"{path}: expected one image input, found {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    if len(shape) != 4:
        raise InputError(f"{path}: input '{inputs[0].name}' has rank {len(shape)}; expected [B,3,H,W]")
    ops = [n.op_type for n in graph.node]
    n_float16 = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    return OnnxInfo(str(path), inputs[0].name, shape, [o.name for o in graph.output],
                    ops.count("QuantizeLinear"), ops.count("DequantizeLinear"), n_float16)


def normalize_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"precision '{precision}': expected one of {PRECISIONS}")
    return "int8" if precision == "best" else precision


@dataclass
class ShapeProfile:
    """Input shapes TensorRT optimizes for: (min, opt, max) of [B,3,S,S]; all equal when static."""
    input_name: str
    min: tuple
    opt: tuple
    max: tuple

    @property
    def dynamic(self) -> bool:
        return self.min != self.max


def resolve_profile(info: OnnxInfo, min_batch: Optional[int] = None, opt_batch: Optional[int] = None,
                    max_batch: Optional[int] = None, img_size: Optional[int] = None) -> ShapeProfile:
    """The optimization profile for ``info``'s input.

    A fixed-batch ONNX takes no batch range (asking for one is an error: re-export with a dynamic
    batch). A dynamic batch defaults to 1/16/32. Dynamic H/W need ``img_size``.
    """
    asked = {k: v for k, v in (("min_batch", min_batch), ("opt_batch", opt_batch), ("max_batch", max_batch))
             if v is not None}
    for key, value in asked.items():
        if value < 1:
            raise InputError(f"{key} must be >= 1, got {value}")
    _, c, h, w = info.input_shape
    if h is None or w is None:
        if not img_size:
            raise InputError(f"{info.path}: input '{info.input_name}' has dynamic height/width; pass img_size")
        h = w = int(img_size)
    elif img_size and (h, w) != (img_size, img_size):
        raise InputError(f"{info.path}: input '{info.input_name}' is fixed at {h}x{w}, not {img_size}x{img_size}")
    c = c or 3
    if not info.dynamic_batch:
        b = info.input_shape[0]
        wrong = {k: v for k, v in asked.items() if v != b}
        if wrong:
            raise InputError(f"{info.path}: input '{info.input_name}' has a fixed batch of {b}, so {wrong} "
                             "cannot apply; export with a dynamic batch (batch=None) for a batch range")
        return ShapeProfile(info.input_name, (b, c, h, w), (b, c, h, w), (b, c, h, w))
    lo = min_batch or DEFAULT_BATCHES[0]
    hi = max_batch or max(DEFAULT_BATCHES[2], lo)
    opt = opt_batch or min(max(DEFAULT_BATCHES[1], lo), hi)
    if not lo <= opt <= hi:
        raise InputError(f"batch profile needs min <= opt <= max, got {lo} / {opt} / {hi}")
    return ShapeProfile(info.input_name, (lo, c, h, w), (opt, c, h, w), (hi, c, h, w))


def format_dims(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)
