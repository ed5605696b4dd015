"""TensorRT engines from exported ONNX: build, COCO evaluation, latency benchmark, trtexec equivalent.

Three ways to get an INT8 engine out of yoloq, side by side:

* **explicit quantization** (the product): a Q/DQ ONNX from ``yoloq.export.onnx.export_onnx`` carries
  every scale; TensorRT is only told it may use INT8 (and FP16 for what stays in float).
* **implicit calibration** (the baseline, upstream's "simple PTQ"): a plain FP32 ONNX plus a TensorRT
  calibrator (:class:`EntropyCalibrator` = ``IInt8EntropyCalibrator2``, :class:`MinMaxCalibrator` =
  ``IInt8MinMaxCalibrator``) fed with yoloq's calibration images (train split), with a cache file.
* **FP16 / FP32** engines of the plain ONNX for comparison.

TensorRT 8.6, 10.x and 11.x are supported: the network is created with the explicit-batch flag only
before 10 (10 has no implicit batch), the workspace is a memory-pool limit, engines are built with
``build_serialized_network``; inference uses the tensor-name API (``num_io_tensors``,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``, TensorRT >= 8.5) and falls back to
bindings (``execute_async_v2``) on older 8.x. Device memory is torch CUDA tensors (no pycuda).

TensorRT 11 builds every network strongly typed: it removed the precision flags (``BuilderFlag.INT8``,
``FP16``; trtexec ``--int8 --fp16 --best``) and implicit INT8 calibration (the ``IInt8*Calibrator``
classes, ``--calib``). :func:`builder_flags` decides per major version: on 11 a Q/DQ ONNX builds as
is (INT8 where the Q/DQ say, the rest in the ONNX's own float type, FP32 for yoloq's export), an FP16
engine needs an ONNX whose float tensors are already FP16 (NVIDIA's ``python -m
modelopt.onnx.autocast``), and the implicit-calibration baseline needs TensorRT 8.6-10.x.

``tensorrt`` is imported only when a function needs it, so this module (and everything that only
needs :func:`trtexec_command`, :func:`inspect_onnx` or the calibration batching) works without it.
"""
from __future__ import annotations

import os
import shlex
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from ..report import atomic_write_bytes

PRECISIONS = ("int8", "fp16", "fp32", "best")      # "best" = int8 (INT8 + FP16 kernels, as trtexec --best)
CALIBRATORS = ("entropy", "minmax")
_CALIBRATOR_BASES = {"entropy": "IInt8EntropyCalibrator2", "minmax": "IInt8MinMaxCalibrator"}
DEFAULT_BATCHES = (1, 16, 32)                       # min / opt / max batch of a dynamic-batch profile
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class TrtUnavailable(RuntimeError):
    """TensorRT (the ``tensorrt`` Python package) or a CUDA GPU is missing."""


class TrtBuildError(RuntimeError):
    """The ONNX could not be parsed or TensorRT could not build / load an engine."""


# --------------------------------------------------------------------------- availability
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


def _require_gpu() -> None:
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


# --------------------------------------------------------------------------- ONNX facts (no TensorRT)
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
        raise ValueError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})") from err
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"{path}: expected one image input, found {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    if len(shape) != 4:
        raise ValueError(f"{path}: input '{inputs[0].name}' has rank {len(shape)}; expected [B,3,H,W]")
    ops = [n.op_type for n in graph.node]
    n_float16 = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    return OnnxInfo(str(path), inputs[0].name, shape, [o.name for o in graph.output],
                    ops.count("QuantizeLinear"), ops.count("DequantizeLinear"), n_float16)


def normalize_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision '{precision}': expected one of {PRECISIONS}")
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
            raise ValueError(f"{key} must be >= 1, got {value}")
    _, c, h, w = info.input_shape
    if h is None or w is None:
        if not img_size:
            raise ValueError(f"{info.path}: input '{info.input_name}' has dynamic height/width; pass img_size")
        h = w = int(img_size)
    elif img_size and (h, w) != (img_size, img_size):
        raise ValueError(f"{info.path}: input '{info.input_name}' is fixed at {h}x{w}, not {img_size}x{img_size}")
    c = c or 3
    if not info.dynamic_batch:
        b = info.input_shape[0]
        wrong = {k: v for k, v in asked.items() if v != b}
        if wrong:
            raise ValueError(f"{info.path}: input '{info.input_name}' has a fixed batch of {b}, so {wrong} "
                             "cannot apply; export with a dynamic batch (batch=None) for a batch range")
        return ShapeProfile(info.input_name, (b, c, h, w), (b, c, h, w), (b, c, h, w))
    lo = min_batch or DEFAULT_BATCHES[0]
    hi = max_batch or max(DEFAULT_BATCHES[2], lo)
    opt = opt_batch or min(max(DEFAULT_BATCHES[1], lo), hi)
    if not lo <= opt <= hi:
        raise ValueError(f"batch profile needs min <= opt <= max, got {lo} / {opt} / {hi}")
    return ShapeProfile(info.input_name, (lo, c, h, w), (opt, c, h, w), (hi, c, h, w))


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


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
            raise ValueError(implicit_calibration_removed(trt_major))
        if precision == "fp16" and (info is None or info.n_float16 == 0):
            convert, source = autocast_command(onnx_path)
            prefix = shlex.split(convert) + ["&&"]
        if precision == "fp32" and info is not None and info.n_float16:
            raise ValueError(f"{onnx_path} has FP16 tensors, which TensorRT {trt_major} keeps (strongly typed): "
                             "no FP32 engine from it")
    elif precision == "int8" and info is not None and not info.has_qdq and not calib_cache:
        raise ValueError(f"{onnx_path} has no Q/DQ nodes: trtexec --int8 needs --calib=<cache>, which only a "
                         "Python build with a calibrator writes (tools/trt.py build --calib entropy); without "
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
            parts += [f"--minShapes={name}:{_dims(profile.min)}", f"--optShapes={name}:{_dims(profile.opt)}",
                      f"--maxShapes={name}:{_dims(profile.max)}"]
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


# --------------------------------------------------------------------------- calibration (implicit INT8)
class CalibrationBatches:
    """Fixed-size float32 batches ``[B,3,S,S]`` (contiguous, CPU) from an image loader.

    TensorRT's calibrator needs every batch to have exactly the calibration shape, while a loader's
    last batch may be short and failed images shrink batches: images are re-chunked, and a short
    remainder is dropped (with a warning) rather than padded, so no fake image skews the ranges.
    ``loader`` yields ``(images, metas)`` (yoloq loaders) or plain image tensors.
    """

    def __init__(self, loader: Iterable, batch_size: int, max_batches: Optional[int] = None):
        if batch_size < 1:
            raise ValueError(f"calibration batch size must be >= 1, got {batch_size}")
        self.loader = loader
        self.batch_size = int(batch_size)
        self.max_batches = max_batches
        self.dropped = 0             # images left over in the last, incomplete batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        pending: list[torch.Tensor] = []
        n_pending = n_batches = 0
        self.dropped = 0
        for item in self.loader:
            images = item[0] if isinstance(item, (tuple, list)) else item
            if images is None or images.numel() == 0:
                continue
            if images.ndim != 4:
                raise ValueError(f"calibration images must be [B,3,H,W], got shape {tuple(images.shape)}")
            pending.append(images.detach().to("cpu", torch.float32))
            n_pending += images.shape[0]
            while n_pending >= self.batch_size:
                stacked = torch.cat(pending, 0)
                yield stacked[:self.batch_size].contiguous()
                n_batches += 1
                if self.max_batches is not None and n_batches >= self.max_batches:
                    return
                rest = stacked[self.batch_size:]
                pending, n_pending = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
        self.dropped = n_pending
        if n_pending:
            warnings.warn(f"calibration: {n_pending} image(s) left over after the last full batch of "
                          f"{self.batch_size} were not used", stacklevel=2)
        if n_batches == 0:
            raise ValueError(f"calibration: fewer images than one batch of {self.batch_size}")


def calibration_batches(data_cfg, n_images: int, img_size: int, batch_size: int, *, seed: int = 0,
                        workers: int = 2) -> CalibrationBatches:
    """Batches of ``n_images`` train images (``yoloq.data.coco.calibration_loader``: train split,
    letterboxed like evaluation) for a TensorRT calibrator."""
    from ..data.coco import calibration_loader

    loader = calibration_loader(data_cfg, n_images, img_size, batch_size, workers, seed=seed)
    return CalibrationBatches(loader, batch_size)


class CalibrationFeeder:
    """The TensorRT-independent half of a calibrator: copies each batch into one device buffer and
    hands out its address; reads and (atomically) writes the calibration cache.

    Exceptions cannot cross back through TensorRT's C++ callback, so a failure is stored in
    ``error`` and calibration is ended; :func:`build_engine` re-raises it after the build.
    """

    def __init__(self, batches: Iterable[torch.Tensor], cache_file: Optional[str | os.PathLike] = None,
                 *, batch_size: Optional[int] = None, use_cache: bool = True, device: str | torch.device = "cuda"):
        self.batches = batches
        self.batch_size = int(batch_size or getattr(batches, "batch_size", 0) or 0)
        if self.batch_size < 1:
            raise ValueError("CalibrationFeeder needs batch_size (or batches with a batch_size attribute)")
        self.cache_file = Path(cache_file) if cache_file else None
        self.use_cache = use_cache
        self.device = torch.device(device)
        self.buffer: Optional[torch.Tensor] = None
        self.n_batches = 0
        self.error: Optional[BaseException] = None
        self._iter: Optional[Iterator[torch.Tensor]] = None

    def next_pointers(self, names: Sequence[str]) -> Optional[list[int]]:
        """Device addresses (one per input name) of the next batch, or None when done."""
        try:
            if len(names) != 1:
                raise ValueError(f"calibration feeds one image input, the network asks for {list(names)}")
            if self._iter is None:
                self._iter = iter(self.batches)
            batch = next(self._iter, None)
            if batch is None:
                return None
            if batch.shape[0] != self.batch_size:
                raise ValueError(f"calibration batch has {batch.shape[0]} images, expected {self.batch_size}")
            if self.buffer is None or self.buffer.shape != batch.shape:
                self.buffer = torch.empty(batch.shape, dtype=torch.float32, device=self.device)
            self.buffer.copy_(batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)   # TensorRT reads it on its own stream
            self.n_batches += 1
            return [int(self.buffer.data_ptr())]
        except BaseException as err:  # noqa: BLE001 - must not unwind through TensorRT
            self.error = err
            return None

    def read_cache(self) -> Optional[bytes]:
        if self.use_cache and self.cache_file and self.cache_file.is_file():
            return self.cache_file.read_bytes()
        return None

    def write_cache(self, cache) -> None:
        if self.cache_file is None:
            return
        try:
            atomic_write_bytes(self.cache_file, _to_bytes(cache))
        except BaseException as err:  # noqa: BLE001
            self.error = err


def _to_bytes(buffer) -> bytes:
    try:
        return memoryview(buffer).tobytes()
    except TypeError:
        return bytes(buffer)


def _make_calibrator_class(kind: str):
    """A TensorRT calibrator class (pybind11 subclass) delegating to :class:`CalibrationFeeder`."""
    if kind not in _CALIBRATOR_BASES:
        raise ValueError(f"calibrator '{kind}': expected one of {CALIBRATORS}")
    trt = import_tensorrt()
    base = getattr(trt, _CALIBRATOR_BASES[kind], None)
    if base is None:
        raise TrtUnavailable(implicit_calibration_removed(trt.__version__))

    class Calibrator(base):
        __doc__ = (f"``tensorrt.{_CALIBRATOR_BASES[kind]}`` fed by yoloq calibration batches.\n\n"
                   "    Calibrator(batches, cache_file=None, *, use_cache=True)")
        algorithm_name = kind

        def __init__(self, batches, cache_file=None, *, batch_size=None, use_cache=True):
            base.__init__(self)          # pybind11 needs the C++ base initialised explicitly
            self.feeder = CalibrationFeeder(batches, cache_file, batch_size=batch_size, use_cache=use_cache)

        def get_batch_size(self):
            return self.feeder.batch_size

        def get_batch(self, names, *unused):
            return self.feeder.next_pointers(names)

        def read_calibration_cache(self, *unused):
            return self.feeder.read_cache()

        def write_calibration_cache(self, cache):
            self.feeder.write_cache(cache)

    Calibrator.__name__ = Calibrator.__qualname__ = {"entropy": "EntropyCalibrator", "minmax": "MinMaxCalibrator"}[kind]
    return Calibrator


_CALIBRATOR_CLASSES: dict = {}


def calibrator_class(kind: str):
    """``EntropyCalibrator`` / ``MinMaxCalibrator`` (built on first use: needs ``tensorrt``)."""
    if kind not in _CALIBRATOR_CLASSES:
        _CALIBRATOR_CLASSES[kind] = _make_calibrator_class(kind)
    return _CALIBRATOR_CLASSES[kind]


def make_calibrator(kind: str, batches: CalibrationBatches, cache_file: Optional[str | os.PathLike] = None,
                    *, use_cache: bool = True):
    return calibrator_class(kind)(batches, cache_file, use_cache=use_cache)


def __getattr__(name: str):
    # Module attributes EntropyCalibrator / MinMaxCalibrator resolve lazily (PEP 562), so importing
    # this module never imports tensorrt.
    if name == "EntropyCalibrator":
        return calibrator_class("entropy")
    if name == "MinMaxCalibrator":
        return calibrator_class("minmax")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- build
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
        raise ValueError(f"{info.path}: {implicit_calibration_removed(major)}")
    if precision == "fp16" and info.n_float16 == 0:
        raise ValueError(f"{info.path} is FP32 and TensorRT {major} builds strongly typed (no FP16 flag): "
                         f"convert it first with `{autocast}` and build that file")
    if precision == "fp32" and info.n_float16:
        raise ValueError(f"{info.path} has {info.n_float16} FP16 initializers, which TensorRT {major} keeps in "
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
        raise ValueError(f"{info.path} has {n_qdq} Q/DQ nodes: TensorRT builds it only as INT8; for a "
                         f"{precision.upper()} engine use the plain FP32 export (export_onnx(..., fp32=True))")
    if precision == "int8" and not info.has_qdq and not calibrating:
        raise ValueError(f"{info.path} has no Q/DQ nodes and no calibrator was given: INT8 would have no "
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
    notes = []
    mode = build_mode(info, precision, calibrator is not None)
    if info.has_qdq and calibrator is not None:
        notes.append("calibrator ignored: the ONNX has Q/DQ nodes (explicit quantization)")
        warnings.warn(f"{onnx_path}: {notes[-1]}", stacklevel=2)
        calibrator = None
    elif calibrator is not None:
        mode = f"implicit-{getattr(calibrator, 'algorithm_name', 'calibrator')}"

    _require_gpu()
    trt = import_tensorrt()
    flags, version_notes = builder_flags(trt_major(trt), info, precision, mode)   # 11: strongly typed
    notes += version_notes
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise TrtBuildError(f"TensorRT could not parse {onnx_path}:\n" + "\n".join(_parser_errors(parser)))

    config = builder.create_builder_config()
    _set_workspace(trt, config, workspace_gb)
    if "FP16" in flags and not getattr(builder, "platform_has_fast_fp16", True):   # deprecated in 10, gone in 11
        notes.append("this GPU has no fast FP16")
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if calibrator is not None and _network_has_qdq(trt, network):   # Q/DQ the node scan missed
        notes.append("calibrator ignored: the parsed network has Q/DQ layers")
        calibrator = None
    input_tensor = network.get_input(0)
    if input_tensor.name != profile.input_name:
        raise TrtBuildError(f"{onnx_path}: TensorRT sees input '{input_tensor.name}', ONNX says '{profile.input_name}'")
    if profile.dynamic or -1 in tuple(input_tensor.shape):
        opt_profile = builder.create_optimization_profile()
        opt_profile.set_shape(profile.input_name, profile.min, profile.opt, profile.max)
        config.add_optimization_profile(opt_profile)
    if calibrator is not None:
        calib_batch = int(calibrator.get_batch_size())
        if not info.dynamic_batch and calib_batch != profile.min[0]:
            raise ValueError(f"{onnx_path} has a fixed batch of {profile.min[0]}; the calibrator's batch size "
                             f"must match, got {calib_batch}")
        config.int8_calibrator = calibrator
        if info.dynamic_batch:
            # Calibration runs at one shape: the calibrator's batch.
            shape = (calib_batch,) + tuple(profile.opt[1:])
            calib_profile = builder.create_optimization_profile()
            calib_profile.set_shape(profile.input_name, shape, shape, shape)
            config.set_calibration_profile(calib_profile)

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
    return BuildInfo(str(engine_path), str(onnx_path), precision, mode, info.n_quantize + info.n_dequantize,
                     {"input": profile.input_name, "min": list(profile.min), "opt": list(profile.opt),
                      "max": list(profile.max)},
                     seconds, data.nbytes, str(trt.__version__),
                     trtexec_or_reason(onnx_path, precision, engine_path=engine_path, workspace_gb=workspace_gb,
                                       min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                                       img_size=img_size, calib_cache=cache if cache and Path(cache).is_file() else None,
                                       trt_major=trt_major(trt)),
                     notes)


# --------------------------------------------------------------------------- inference
def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32, "INT8": torch.int8,
             "BOOL": torch.bool, "INT64": torch.int64, "BF16": torch.bfloat16, "UINT8": torch.uint8}
    for name, torch_dtype in table.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return torch_dtype
    raise TrtBuildError(f"unsupported TensorRT I/O data type {dtype}")


class _TensorIO:
    """I/O through the tensor-name API (TensorRT >= 8.5, the only one in 10)."""

    def __init__(self, trt, engine, context):
        self.engine, self.context = engine, context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self.shapes = {n: tuple(engine.get_tensor_shape(n)) for n in names}

    def batch_range(self, name: str) -> tuple[int, int]:
        if self.shapes[name][0] != -1:
            return self.shapes[name][0], self.shapes[name][0]
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        return int(lo[0]), int(hi[0])

    def bind(self, name: str, x: torch.Tensor) -> dict:
        self.context.set_input_shape(name, tuple(x.shape))
        self.context.set_tensor_address(name, int(x.data_ptr()))
        outs = {}
        for out in self.outputs:
            outs[out] = torch.empty(tuple(self.context.get_tensor_shape(out)), dtype=self.dtypes[out], device=x.device)
            self.context.set_tensor_address(out, int(outs[out].data_ptr()))
        return outs

    def execute(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TrtBuildError("TensorRT execute_async_v3 failed (see the TensorRT log)")


class _BindingIO:
    """I/O through bindings (TensorRT 8.x before the tensor-name API)."""

    def __init__(self, trt, engine, context):
        self.engine, self.context = engine, context
        names = [engine.get_binding_name(i) for i in range(engine.num_bindings)]
        self.index = {n: i for i, n in enumerate(names)}
        self.inputs = [n for n in names if engine.binding_is_input(self.index[n])]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(trt, engine.get_binding_dtype(self.index[n])) for n in names}
        self.shapes = {n: tuple(engine.get_binding_shape(self.index[n])) for n in names}
        self.pointers = [0] * len(names)

    def batch_range(self, name: str) -> tuple[int, int]:
        if self.shapes[name][0] != -1:
            return self.shapes[name][0], self.shapes[name][0]
        lo, _, hi = self.engine.get_profile_shape(0, self.index[name])
        return int(lo[0]), int(hi[0])

    def bind(self, name: str, x: torch.Tensor) -> dict:
        self.context.set_binding_shape(self.index[name], tuple(x.shape))
        self.pointers[self.index[name]] = int(x.data_ptr())
        outs = {}
        for out in self.outputs:
            shape = tuple(self.context.get_binding_shape(self.index[out]))
            outs[out] = torch.empty(shape, dtype=self.dtypes[out], device=x.device)
            self.pointers[self.index[out]] = int(outs[out].data_ptr())
        return outs

    def execute(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v2(bindings=self.pointers, stream_handle=stream.cuda_stream):
            raise TrtBuildError("TensorRT execute_async_v2 failed (see the TensorRT log)")


class TrtPredictor:
    """Runs a serialized TensorRT engine: ``Tensor[B,3,S,S] -> ndarray [B,N,4+nc]`` (float32).

    Usable as the ``predict`` of :func:`yoloq.eval.evaluate`. Batches larger than the engine's
    maximum are split; a fixed-batch engine gets short batches padded (padding rows are dropped).
    """

    def __init__(self, engine_path: str | os.PathLike, device: int = 0, verbose: bool = False):
        self.path = str(engine_path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"TensorRT engine not found: {self.path}")
        _require_gpu()
        trt = import_tensorrt()
        self.device = torch.device("cuda", device)
        torch.cuda.set_device(self.device)
        self.logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(self.path).read_bytes())
        if self.engine is None:
            raise TrtBuildError(f"{self.path}: TensorRT {trt.__version__} cannot load this engine (engines are "
                                "tied to the TensorRT version and GPU that built them; rebuild it here)")
        self.context = self.engine.create_execution_context()
        io_cls = _TensorIO if hasattr(self.engine, "num_io_tensors") else _BindingIO
        self.io = io_cls(trt, self.engine, self.context)
        if len(self.io.inputs) != 1:
            raise ValueError(f"{self.path}: expected one image input, engine has {self.io.inputs}")
        self.input_name = self.io.inputs[0]
        self.output_name = self._pick_output()
        self.min_batch, self.max_batch = self.io.batch_range(self.input_name)
        shape = self.io.shapes[self.input_name]
        self.img_size = shape[2] if shape[2] > 0 and shape[2] == shape[3] else None
        self.input_dtype = self.io.dtypes[self.input_name]
        self.stream = torch.cuda.Stream(self.device)

    def _pick_output(self) -> str:
        outs = self.io.outputs
        if len(outs) == 1:
            return outs[0]
        if "outputs" in outs:
            return "outputs"
        raise ValueError(f"{self.path}: engine outputs {outs}; COCO evaluation needs the single [B,N,4+nc] "
                         "output (export without the NMS plugin)")

    def run_device(self, x: torch.Tensor) -> torch.Tensor:
        """One engine call on a CUDA tensor whose batch fits the profile; returns the CUDA output."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))   # x may come from another stream
        with torch.cuda.stream(self.stream):
            x = x.to(self.device, self.input_dtype).contiguous()
            outs = self.io.bind(self.input_name, x)
            self.io.execute(self.stream)
        self.stream.synchronize()
        return outs[self.output_name]

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        if self.img_size is not None and tuple(images.shape[2:]) != (self.img_size, self.img_size):
            raise ValueError(f"{self.path}: engine input is {self.img_size}x{self.img_size}, got images of "
                             f"{images.shape[2]}x{images.shape[3]} (set --img-size {self.img_size})")
        results = []
        for start in range(0, images.shape[0], self.max_batch):
            chunk = images[start:start + self.max_batch]
            n = chunk.shape[0]
            if n < self.min_batch:        # fixed-batch engine: pad with zeros, drop those rows after
                pad = chunk.new_zeros((self.min_batch - n,) + tuple(chunk.shape[1:]))
                chunk = torch.cat((chunk, pad), 0)
            results.append(self.run_device(chunk)[:n].float().cpu())
        return torch.cat(results, 0).numpy()


def evaluate_engine(engine_path: str | os.PathLike, data_cfg, eval_cfg, img_size: Optional[int] = None, **kwargs):
    """COCO evaluation of an engine through :func:`yoloq.eval.coco_eval.evaluate` (same protocol as
    PyTorch and onnxruntime). ``img_size`` defaults to the engine's fixed input size."""
    from ..eval.coco_eval import evaluate

    predictor = TrtPredictor(engine_path)
    size = img_size or predictor.img_size
    if not size:
        raise ValueError(f"{engine_path}: engine input size is dynamic; pass img_size")
    result = evaluate(predictor, data_cfg, eval_cfg, size, **kwargs)
    result.extra["engine"] = str(engine_path)
    return result


# --------------------------------------------------------------------------- benchmark
@dataclass
class BenchResult:
    batch: int
    median_ms: Optional[float] = None
    p90_ms: Optional[float] = None
    mean_ms: Optional[float] = None
    throughput: Optional[float] = None      # images / s at the median latency
    iters: int = 0
    skipped: Optional[str] = None


def benchmark(engine_path: str | os.PathLike, batch_sizes: Sequence[int] = (1, 32), warmup: int = 50,
              iters: int = 200, img_size: Optional[int] = None,
              predictor: Optional[TrtPredictor] = None) -> list[BenchResult]:
    """GPU latency of the engine alone (device-resident random input, no host copies), timed with
    CUDA events per call after ``warmup`` calls: median / p90 (ms) and throughput (img/s).
    A batch size outside the engine's profile is reported as skipped."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got {iters} / {warmup}")
    pred = predictor or TrtPredictor(engine_path)
    shape = pred.io.shapes[pred.input_name]
    size = pred.img_size or img_size
    if not size:
        raise ValueError(f"{engine_path}: engine input size is dynamic; pass img_size")
    results = []
    for batch in batch_sizes:
        if not pred.min_batch <= batch <= pred.max_batch:
            results.append(BenchResult(batch, skipped=f"engine batch range is {pred.min_batch}..{pred.max_batch}"))
            continue
        gen = torch.Generator(device=pred.device).manual_seed(0)
        x = torch.rand((batch, shape[1], size, size), generator=gen, device=pred.device).to(pred.input_dtype)
        with torch.cuda.stream(pred.stream):
            outputs = pred.io.bind(pred.input_name, x)    # keep the output buffers alive while timing
        for _ in range(warmup):
            pred.io.execute(pred.stream)
        pred.stream.synchronize()
        times = []
        for _ in range(iters):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(pred.stream)
            pred.io.execute(pred.stream)
            end.record(pred.stream)
            end.synchronize()
            times.append(begin.elapsed_time(end))
        del outputs
        t = np.asarray(times)
        median = float(np.median(t))
        results.append(BenchResult(batch, median, float(np.percentile(t, 90)), float(t.mean()),
                                   batch * 1000.0 / median, iters))
    return results


def format_bench_table(results: Sequence[BenchResult], title: str = "") -> str:
    lines = ([f"**{title}**", ""] if title else []) + [
        "| batch | median ms | p90 ms | img/s |", "|---|---|---|---|"]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.batch} | skipped: {r.skipped} | | |")
        else:
            lines.append(f"| {r.batch} | {r.median_ms:.3f} | {r.p90_ms:.3f} | {r.throughput:.1f} |")
    return "\n".join(lines)


def bench_to_dict(results: Sequence[BenchResult]) -> list[dict]:
    return [asdict(r) for r in results]
