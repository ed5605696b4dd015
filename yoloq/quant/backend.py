"""The one boundary to NVIDIA pytorch-quantization (2.1.3): every use of its classes and internals.

yoloq's quantization code (placement, calibration statistics, transforms, reconstruction,
checkpoints, export) talks about quantizers in this module's words only; this is where the
library's private attributes are read and written:

- construction: :func:`tensor_quantizer` (a ``TensorQuantizer`` from bits / axis / narrow range),
  :func:`quant_conv` (a ``QuantConv2d`` / ``QuantConvTranspose2d`` holding a conv's parameters);
- the conv's quantizers: :func:`input_quantizer`, :func:`weight_quantizer` and their setters
  (pytorch-quantization keeps them as ``_input_quantizer`` / ``_weight_quantizer``; placement
  records which attribute of which module holds a shared site quantizer, ``INPUT_QUANTIZER``);
- on / off: :func:`is_enabled`, :func:`set_enabled` (``_disabled``);
- ranges: :func:`get_amax`, :func:`set_amax` (the ``_amax`` buffer), :func:`channel_max`;
- calibration mode: :func:`collecting` hands a quantizer yoloq's own collector as its
  ``_calibrator`` with ``_if_calib`` on and ``_if_quant`` off (the float path), and
  :func:`fake_quant_off` lets a weight quantizer pass weights through; both put every flag back;
- :func:`percentile_amax`: the library's percentile rule (``_compute_amax_percentile``) on a
  histogram yoloq collected;
- :func:`retype`: the class swap that turns a prepared ``QuantConv2d`` into a subclass that only
  adds a step to ``forward`` (``yoloq.quant.channel_scale.InputScaledConv2d`` divides the input by
  a per-channel scale first). The object stays the same, so its parameters, its shared quantizers
  and its module path stay exactly as ``prepare`` made them; allowed only for a subclass that adds
  no parameters and registers what it needs itself (``input_scale`` buffer);
- :func:`quiet`: the library logs one line per quantizer for every enable / disable / amax load.

A second backend (NVIDIA ModelOpt, ``nvidia-modelopt``, the library's maintained successor: its
``TensorQuantizer`` has public ``amax``, ``enable()`` / ``disable()`` and ``enable_calib()``, and its
quantized convs hold ``input_quantizer`` / ``weight_quantizer``) would provide these same functions;
nothing above this module names a pytorch-quantization attribute
(``tests/test_quant_backend.py`` checks it).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np
import torch
from absl import logging as absl_logging
from torch import nn

with warnings.catch_warnings():       # pytorch-quantization 2.1.3 uses torch.jit.script at import
    warnings.simplefilter("ignore", FutureWarning)
    from pytorch_quantization import nn as quant_nn
    from pytorch_quantization.calib import MaxCalibrator
    from pytorch_quantization.calib.histogram import _compute_amax_percentile
    from pytorch_quantization.nn import QuantConv2d, QuantConvTranspose2d, TensorQuantizer
    from pytorch_quantization.tensor_quant import QuantDescriptor

NAME = "pytorch-quantization"
INPUT_QUANTIZER = "_input_quantizer"          # attribute of a quantized conv holding its input quantizer
WEIGHT_QUANTIZER = "_weight_quantizer"
QUANT_CONV_TYPES = (QuantConv2d, QuantConvTranspose2d)

__all__ = ["INPUT_QUANTIZER", "NAME", "QUANT_CONV_TYPES", "QuantConv2d", "QuantConvTranspose2d", "TensorQuantizer",
           "WEIGHT_QUANTIZER", "channel_max", "collecting", "descriptor", "fake_quant_off", "get_amax",
           "input_quantizer", "is_enabled", "percentile_amax", "quant_conv", "quiet", "retype", "set_amax",
           "set_enabled", "set_input_quantizer", "set_weight_quantizer", "tensor_quantizer", "version",
           "weight_quantizer"]


def version() -> str:
    import pytorch_quantization
    return getattr(pytorch_quantization, "__version__", "?")


@contextmanager
def quiet() -> Iterator[None]:
    """Silence the library's per-quantizer log lines for the block."""
    old = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(old)


# --------------------------------------------------------------------------- construction


def descriptor(num_bits: int, axis: Optional[int], narrow_range: bool) -> QuantDescriptor:
    """Signed, symmetric, max-calibrated (yoloq computes every range itself)."""
    return QuantDescriptor(num_bits=num_bits, axis=None if axis is None else (axis,), unsigned=False,
                           narrow_range=narrow_range, calib_method="max")


def tensor_quantizer(num_bits: int, axis: Optional[int], narrow_range: bool, disabled: bool = False) -> TensorQuantizer:
    return TensorQuantizer(descriptor(num_bits, axis, narrow_range), disabled=disabled)


def quant_conv(conv: nn.Module, act: QuantDescriptor, weight_axis_of) -> nn.Module:
    """A quantized conv with ``conv``'s geometry holding its Parameters (not copies).
    ``weight_axis_of(conv) -> QuantDescriptor`` gives the weight descriptor."""
    if isinstance(conv, nn.ConvTranspose2d):
        q = quant_nn.QuantConvTranspose2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                          conv.padding, conv.output_padding, conv.groups, conv.bias is not None,
                                          conv.dilation, conv.padding_mode, quant_desc_input=act,
                                          quant_desc_weight=weight_axis_of(conv))
    elif isinstance(conv, nn.Conv2d):
        q = quant_nn.QuantConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                 conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                                 quant_desc_input=act, quant_desc_weight=weight_axis_of(conv))
    else:
        raise TypeError(f"cannot quantize {type(conv).__name__}; expected Conv2d or ConvTranspose2d")
    q.weight = conv.weight
    q.bias = conv.bias
    q.train(conv.training)
    return q


def retype(module: nn.Module, cls: type) -> None:
    """The documented class swap (module docstring): ``module`` becomes an instance of ``cls``, a
    subclass of its own class that only adds a forward step."""
    if not issubclass(cls, type(module)):
        raise TypeError(f"retype: {cls.__name__} is not a subclass of {type(module).__name__}")
    module.__class__ = cls


# --------------------------------------------------------------------------- a conv's quantizers


def input_quantizer(conv: nn.Module) -> nn.Module:
    return getattr(conv, INPUT_QUANTIZER)


def weight_quantizer(conv: nn.Module) -> nn.Module:
    return getattr(conv, WEIGHT_QUANTIZER)


def set_input_quantizer(conv: nn.Module, quantizer: nn.Module) -> None:
    setattr(conv, INPUT_QUANTIZER, quantizer)


def set_weight_quantizer(conv: nn.Module, quantizer: nn.Module) -> None:
    setattr(conv, WEIGHT_QUANTIZER, quantizer)


# --------------------------------------------------------------------------- state of one quantizer


def is_enabled(q: TensorQuantizer) -> bool:
    return not q._disabled


def set_enabled(q: TensorQuantizer, enabled: bool) -> None:
    """On (quantizes) or off (passes values through), without a log line per call."""
    q._disabled = not enabled


def get_amax(q: TensorQuantizer) -> Optional[torch.Tensor]:
    """The quantizer's range (a tensor: scalar per tensor, ``[C, 1, 1, 1]`` per channel), or None
    before calibration."""
    amax = getattr(q, "_amax", None)
    return amax if isinstance(amax, torch.Tensor) else None


def set_amax(q: TensorQuantizer, amax, device: Optional[torch.device] = None) -> None:
    """Set (or create) the ``_amax`` buffer, float32, in place when the shape is unchanged (so
    references to the buffer stay valid). It lives on ``device`` when given, else where the old
    buffer was, else where ``amax`` is (a quantizer holds no other tensor to follow)."""
    amax = torch.as_tensor(amax, dtype=torch.float32).detach().clone()
    old = get_amax(q)
    if device is not None or old is not None:
        amax = amax.to(device if device is not None else old.device)
    if old is not None and old.device == amax.device and old.shape == amax.shape:
        with torch.no_grad():
            old.copy_(amax)
        return
    if "_amax" in q._buffers:
        del q._buffers["_amax"]
    q.register_buffer("_amax", amax)


@torch.no_grad()
def channel_max(q: TensorQuantizer, weight: torch.Tensor) -> torch.Tensor:
    """Max |w| per channel of ``q``'s axis (the library's max calibrator, shaped as its amax)."""
    cal = MaxCalibrator(q.num_bits, q.axis, q.unsigned)
    cal.collect(weight.detach())
    return cal.compute_amax()


# --------------------------------------------------------------------------- calibration mode


@contextmanager
def collecting(quantizers: dict, collectors: dict) -> Iterator[None]:
    """Each quantizer of ``quantizers`` (name -> TensorQuantizer) hands its input to
    ``collectors[name].collect(x)`` and passes it on unquantized; every flag is put back after."""
    saved = {n: (q._calibrator, q._if_calib, q._if_quant, q._disabled) for n, q in quantizers.items()}
    try:
        for name, q in quantizers.items():
            q._calibrator, q._if_calib, q._if_quant, q._disabled = collectors[name], True, False, False
        yield
    finally:
        for name, q in quantizers.items():
            q._calibrator, q._if_calib, q._if_quant, q._disabled = saved[name]


@contextmanager
def fake_quant_off(quantizers) -> Iterator[None]:
    """The quantizers pass their inputs through unchanged for the block (the float path), keeping
    their enabled / disabled state."""
    saved = [(q, q._if_quant) for q in quantizers]
    try:
        for q, _ in saved:
            q._if_quant = False
        yield
    finally:
        for q, flag in saved:
            q._if_quant = flag


def percentile_amax(hist: torch.Tensor, edges: torch.Tensor, percentile: float) -> float:
    """The library's percentile rule: the lower edge of the bin where the CDF reaches ``percentile``."""
    return float(_compute_amax_percentile(np.asarray(hist.double().numpy()), np.asarray(edges.double().numpy()),
                                          percentile))
