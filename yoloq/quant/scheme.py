"""The INT8 scheme TensorRT runs, in one place: levels, scales, descriptors and the deploy-time
description of one quantizer.

- Activations: per tensor, symmetric, scale = amax / 127, zero point 0, levels -128..127 (the full
  int8 range: what ONNX QuantizeLinear and TensorRT compute for a zero-point-0 Q/DQ, so the
  fake-quant model is the deployed one; a narrow -127 floor would differ wherever calibration
  clips negative values).
- Weights: per output channel, symmetric, scale = amax / 127, levels -127..127 (narrow range).
- Every quantizer type (pytorch-quantization's TensorQuantizer, PACT, LSQ+) reduces to a
  :class:`QDQSpec` at export time: y = DQ(Q(x - offset; scale, zero_point)) + offset. TensorRT
  takes only zero_point == 0 and offset == None; onnxruntime also takes an integer zero point.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from yoloq.quant import backend
from yoloq.quant.backend import TensorQuantizer

NUM_BITS = 8
QMAX = 127                        # scale = amax / QMAX for activations and weights
ACT_RANGE = (-128, 127)           # activation levels
WEIGHT_RANGE = (-QMAX, QMAX)      # weight levels (narrow range)
# Smallest amax handed to TensorRT: pytorch-quantization treats amax <= 2**-24 as "zero" and
# TensorRT needs scale = amax / 127 > 0. A dead channel quantizes to exactly 0 either way.
DEAD_AMAX = 1e-4


def activation_descriptor():
    """Activations: per tensor, full int8 range (-128..127)."""
    return backend.descriptor(NUM_BITS, None, narrow_range=False)


def weight_descriptor(axis: Optional[int]):
    """Weights: per output channel along ``axis`` (None: per tensor), narrow range (-127..127)."""
    return backend.descriptor(NUM_BITS, axis, narrow_range=True)


def new_input_quantizer(disabled: bool = False) -> TensorQuantizer:
    return backend.tensor_quantizer(NUM_BITS, None, narrow_range=False, disabled=disabled)


def new_weight_quantizer(axis: Optional[int]) -> TensorQuantizer:
    return backend.tensor_quantizer(NUM_BITS, axis, narrow_range=True)



def fake_quant(x: torch.Tensor, amax: torch.Tensor, qmin: float = WEIGHT_RANGE[0]) -> torch.Tensor:
    """Symmetric INT8 fake quantization (scale amax / 127, levels qmin..127); ``amax`` broadcasts
    against ``x``. Weights use -127, activations ``ACT_RANGE[0]`` = -128."""
    scale = amax.clamp(min=1e-12) / QMAX
    return torch.clamp(torch.round(x / scale), qmin, QMAX) * scale


class LearnableQuantizer(nn.Module):
    """Base class of yoloq's trainable quantizers (PACT, LSQ+); each defines ``export_spec()``."""

    def export_spec(self) -> "QDQSpec":
        raise NotImplementedError


QUANTIZER_TYPES = (TensorQuantizer, LearnableQuantizer)


def is_quantizer(module: nn.Module) -> bool:
    return isinstance(module, QUANTIZER_TYPES)


@contextmanager
def quantizers_off(model: nn.Module) -> Iterator[None]:
    """Every quantizer of ``model`` passes values through (the FP32 network) for the block."""
    saved = [(m, is_enabled(m)) for m in {id(m): m for m in model.modules() if isinstance(m, QUANTIZER_TYPES)}.values()]
    try:
        for m, _ in saved:
            set_enabled(m, False)
        yield
    finally:
        for m, enabled in saved:
            set_enabled(m, enabled)


@dataclass
class QDQSpec:
    scale: torch.Tensor                       # > 0; scalar (per-tensor) or [C] (per-channel)
    axis: Optional[int] = None                # None = per-tensor; channel axis otherwise
    zero_point: Optional[torch.Tensor] = None # int8 zero point (onnxruntime only); None = 0
    offset: Optional[torch.Tensor] = None     # LSQ+ beta, exported as Sub/Add around the Q/DQ
    enabled: bool = True

    def __post_init__(self):
        if not torch.all(self.scale > 0):
            raise ValueError("QDQSpec: every scale must be > 0 (fix dead channels before export)")


def tensor_quantizer_spec(q: TensorQuantizer) -> QDQSpec:
    """QDQSpec of a calibrated pytorch-quantization TensorQuantizer: scale = amax / 127."""
    amax = backend.get_amax(q)
    if amax is None:
        raise ValueError("TensorQuantizer has no amax: calibrate it first")
    axis = q.axis[0] if isinstance(q.axis, (tuple, list)) else q.axis
    return QDQSpec(scale=(amax.detach().flatten() if axis is not None else amax.detach().reshape(())) / QMAX,
                   axis=axis, enabled=backend.is_enabled(q))


def export_spec(q: nn.Module) -> QDQSpec:
    """Deploy description of any quantizer this project uses."""
    if isinstance(q, TensorQuantizer):
        return tensor_quantizer_spec(q)
    if isinstance(q, LearnableQuantizer):
        return q.export_spec()
    raise TypeError(f"not a quantizer: {type(q).__name__}")


def is_enabled(q: nn.Module) -> bool:
    return backend.is_enabled(q) if isinstance(q, TensorQuantizer) else bool(getattr(q, "enabled", True))


def set_enabled(q: nn.Module, enabled: bool) -> None:
    """Any quantizer on or off (pytorch-quantization's through the backend, learnable ones by flag)."""
    if isinstance(q, TensorQuantizer):
        backend.set_enabled(q, enabled)
    elif hasattr(q, "enabled"):
        q.enabled = bool(enabled)
