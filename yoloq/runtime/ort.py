"""onnxruntime: session settings for yoloq's ONNX files and a predictor for ``yoloq.eval.evaluate``."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch

from yoloq.errors import InputError


# onnxruntime graph optimizer (1.32 here; older releases lack it and ignore the name) that rounds each float Conv bias fed by Q/DQ inputs to int32 at
# scale s_input * s_weight. It is what lets onnxruntime form integer QLinearConv kernels (the fast
# path needs it), but on a graph whose convs stay float (the TensorRT variant) it only changes the
# numbers: the ONNX graph, the fake-quant model and TensorRT all add the bias in float. The change is
# at most half a step of the int32 accumulator, yet it moved the 500-image mAP of a Lite-S QAT model
# by -0.32 (a quantized detector's mAP moves by that much under any tiny perturbation; README).
BIAS_QUANTIZATION_OPTIMIZER = "WeightBiasQuantization"
VARIANT_KEY = "yoloq.variant"                     # ONNX metadata written by yoloq's exporters
INTEGER_KERNEL_VARIANTS = ("ort-fast", "ort-exact")
GRAPH_LEVELS = ("disable", "basic", "extended", "all")

# onnxruntime session entry (``kOrtSessionOptionsAvx2PrecisionMode``). onnxruntime's x86 uint8 x int8 integer
# kernels (MLAS) without VNNI multiply with ``vpmaddubsw``, which adds each pair of neighbouring products into
# int16 with saturation: 255*127 + 255*127 > 32767, so an integer conv whose large input codes meet large
# weights of one sign gets a clipped sum (issue 27: the exact fast path differed on 96,580 of 98,304 outputs
# of the test net on an AVX2-only EPYC). With this entry onnxruntime stores such weights as uint8 (zero point
# + 128) and runs its uint8 x uint8 kernels, which widen to 16 bits first: exact, slower. onnxruntime itself
# turns it on for every AVX2 CPU, VNNI or not, where VNNI's int8 kernels are exact and faster, so yoloq sets
# it only where :func:`u8s8_saturates` says the int8 kernels clip.
X64_QUANT_PRECISION = "session.x64quantprecision"
AVX512_CORE = ("avx512_f", "avx512_bw", "avx512_dq", "avx512_vl")


def u8s8_saturates(caps: Optional[Mapping] = None) -> bool:
    """Whether onnxruntime's uint8 x int8 integer kernels saturate on this CPU. ``caps``: a mapping like
    ``torch.cpu.get_capabilities()`` (CPUID through the cpuinfo library; default: this machine's).

    Follows MLAS's kernel choice (``onnxruntime/core/mlas/lib/platform.cpp``, 1.32): with AVX-512 core
    (F/BW/DQ/VL) the AVX-512 kernels, exact only with AVX512-VNNI; else with AVX2 the AVX2 kernels, exact only
    with AVX-VNNI; without AVX2 the SSE2 kernels, which widen to 16 bits (exact), except Windows builds' SSE4.1
    kernel (``pmaddubsw`` again). Other architectures (ARM's kernels widen or use dot products): False."""
    caps = torch.cpu.get_capabilities() if caps is None else caps
    if caps.get("architecture") not in ("x86_64", "x86"):
        return False
    if all(caps.get(flag, False) for flag in AVX512_CORE):
        return not caps.get("avx512_vnni", False)
    if caps.get("avx2", False):
        return not caps.get("avx_vnni", False)
    return sys.platform == "win32" and bool(caps.get("sse4_1", False))


def integer_kernel_note() -> str:
    """Which integer conv kernels yoloq's sessions run on this CPU (for benchmark headers)."""
    if u8s8_saturates():
        return "integer convs uint8 x uint8 (this CPU's uint8 x int8 kernels saturate: no VNNI)"
    return "integer convs uint8 x int8"


def onnx_variant(path: str | Path) -> Optional[str]:
    """The ``yoloq.variant`` metadata of an ONNX file (None for files yoloq did not write)."""
    import onnx
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:                      # noqa: BLE001 - protobuf DecodeError and friends
        raise InputError(f"{path}: not a readable ONNX file ({type(err).__name__}: {str(err)[:200]})") from None
    return next((p.value for p in model.metadata_props if p.key == VARIANT_KEY), None)


def wants_integer_kernels(path: str | Path) -> bool:
    """True for yoloq's onnxruntime fast-path files (run them with ``quantize_bias=True``)."""
    return onnx_variant(path) in INTEGER_KERNEL_VARIANTS


def _with_own_weight_zero_points(model: str | Path | bytes) -> str | Path | bytes:
    """``model`` with one zero-point initializer per integer-conv weight (see ``own_weight_zero_points``)."""
    import onnx
    from yoloq.runtime.onnx_graph import own_weight_zero_points
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    return proto.SerializeToString() if own_weight_zero_points(proto) else model


def ort_session(model: str | Path | bytes, threads: Optional[int] = None, quantize_bias: bool = False,
                level: str = "all", optimized_path: Optional[str] = None, profile_prefix: Optional[str] = None,
                exact_int8: Optional[bool] = None):
    """An onnxruntime CPU session. ``quantize_bias=False`` disables onnxruntime's int32 bias rounding
    (``BIAS_QUANTIZATION_OPTIMIZER``) so the session computes what the Q/DQ graph says; set it for
    graphs meant to run integer kernels (``make_ort_fast`` output). On CPUs whose uint8 x int8 kernels
    saturate (``u8s8_saturates``) the integer convs run onnxruntime's exact uint8 x uint8 kernels
    (``X64_QUANT_PRECISION``; ``exact_int8``: None = where ``u8s8_saturates``, True/False = force, e.g. to
    test that path on any x86 CPU). ``level``: graph optimizations.
    ``profile_prefix``: turn on onnxruntime's profiler (``session.end_profiling()`` returns the JSON)."""
    import onnxruntime as ort

    if level not in GRAPH_LEVELS:
        raise InputError(f"level must be one of {GRAPH_LEVELS}, got {level!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path:
        options.optimized_model_filepath = str(optimized_path)
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    options.log_severity_level = 3
    if u8s8_saturates() if exact_int8 is None else exact_int8:    # exact integer convs without VNNI (above)
        options.add_session_config_entry(X64_QUANT_PRECISION, "1")
        model = _with_own_weight_zero_points(model)
    disabled = [] if quantize_bias else [BIAS_QUANTIZATION_OPTIMIZER]
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


class OnnxPredictor:
    """Runs an ONNX detector with onnxruntime (CPU): ``[B,3,S,S]`` -> what ``yoloq.eval.evaluate``
    takes (``[B,N,4+nc]``, or the rows of a model with its own NMS).

    ``layout``: the output layout (``yoloq.runtime.layouts``; ``auto`` reads yoloq's and upstream
    YOLOv6's exports alike), ``nc`` the number of classes it predicts. A model exported with a
    fixed batch size of 1 is run image by image. ``img_size`` is the model's fixed input size, or
    None when its spatial dimensions are dynamic. ``quantize_bias`` (see :func:`ort_session`):
    None = only for yoloq's onnxruntime fast-path files, which need it to run integer kernels;
    every other graph is run as written.
    """

    def __init__(self, path: str | Path, threads: Optional[int] = None, quantize_bias: Optional[bool] = None,
                 layout: str = "auto", nc: int = 80):
        from yoloq.runtime.layouts import choose_layout
        self.path = str(path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        if quantize_bias is None:
            quantize_bias = wants_integer_kernels(self.path)
        self.quantize_bias = bool(quantize_bias)
        try:
            self.session = ort_session(self.path, threads, quantize_bias=self.quantize_bias)
        except Exception as err:                  # noqa: BLE001 - onnxruntime raises its own Fail / InvalidGraph types
            first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            raise InputError(f"{self.path}: onnxruntime cannot load this ONNX file ({first})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise InputError(f"{self.path}: expected one image input, found {[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        shape = inputs[0].shape
        if len(shape) != 4:
            raise InputError(f"{self.path}: input '{self.input_name}' has shape {shape}; expected [B,3,H,W]")
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.img_size = shape[2] if isinstance(shape[2], int) and shape[2] == shape[3] else None
        outputs = self.session.get_outputs()
        self.output_names = [o.name for o in outputs]
        self.output_name = self.output_names[0]
        self.layout = choose_layout(layout, self.output_names, [len(o.shape) if o.shape is not None else None
                                                                for o in outputs], self.path)
        self.nc = nc
        self.columns = outputs[0].shape[-1] if outputs[0].shape else None   # known when not symbolic
        self.one_by_one = False          # set when a "dynamic" batch turns out to work only as 1

    def _run(self, x: np.ndarray):
        from yoloq.runtime.layouts import convert
        values = self.session.run(self.output_names, {self.input_name: x})
        self.columns = values[0].shape[-1]
        return convert(self.layout, dict(zip(self.output_names, values)), x.shape[0], self.nc, self.path)

    @property
    def layout_name(self) -> str:
        """The layout read (a raw output's is known from its column count, once it is known)."""
        from yoloq.runtime.layouts import raw_layout
        if self.layout != "raw" or not isinstance(self.columns, int):
            return self.layout
        return raw_layout(self.columns, self.nc) or self.layout

    def __call__(self, images: torch.Tensor):
        from yoloq.runtime.layouts import merge
        x = images.detach().cpu().numpy().astype(np.float32, copy=False)
        if self.img_size is not None and x.shape[2:] != (self.img_size, self.img_size):
            raise InputError(f"{self.path}: model input is {self.img_size}x{self.img_size}, "
                             f"got images of {x.shape[2]}x{x.shape[3]} (set --img-size {self.img_size})")
        if self.fixed_batch == x.shape[0] or (self.fixed_batch is None and not self.one_by_one):
            try:
                return self._run(x)
            except InputError:
                raise
            except Exception as err:  # noqa: BLE001 - onnxruntime raises its own Fail/RuntimeException types
                if self.fixed_batch is not None or x.shape[0] == 1:
                    raise
                # Batch declared dynamic, but a shape was baked in at export (e.g. a Reshape with batch 1).
                warnings.warn(f"{self.path}: batch {x.shape[0]} failed ({str(err).splitlines()[0][:200]}); "
                              "running image by image", stacklevel=2)
                self.one_by_one = True
        elif self.fixed_batch not in (None, 1):
            raise InputError(f"{self.path}: model has a fixed batch of {self.fixed_batch}; "
                             f"use batch size {self.fixed_batch} or 1")
        return merge([self._run(x[i:i + 1]) for i in range(x.shape[0])], [1] * x.shape[0])
