"""Learnable INT8 quantizers for QAT: PACT (clip value) and LSQ / LSQ+ (scale and offset).

Both are ``torch.autograd.Function``s with explicit backward passes, so the gradients are exactly
the formulas below (unit-tested against them and against finite differences).

PACT (activations). ``s = alpha / 127``, lower clip ``lo = -128 * s`` (signed) or 0 (unsigned) and
    signed:   y = s * round(clip(x, lo, alpha) / s)              levels -128..127
    unsigned: y = s * round(clip(x,  0, alpha) / s)              levels    0..127
dy/dx = 1 inside the clip range (STE), 0 outside; dy/dalpha = 1 above alpha, -128/127 below lo
(signed), 0 inside -- the PACT paper's clip gradient, with the int8 -128 level that ONNX
QuantizeLinear and TensorRT have (a clip at -alpha would make deployment differ from training).
With ``quant_error=True`` the in-range term of the exact derivative, (round(v) - v) / 127 with
v = y / s, is added (LSQ-style; off by default).
Deployment: both variants are the symmetric int8 Q/DQ with scale alpha/127 (TensorRT needs zero
point 0). The unsigned variant equals that Q/DQ only for non-negative inputs, so
``swap_quantizers`` picks it only for sites whose calibration minimum is >= 0 (ReLU outputs);
its negative half of the int8 range is simply unused.

LSQ / LSQ+ (activations, per tensor). v = (x - b) / s and
    y = s * clamp(round(v), n, p) + b
dy/dx = [n <= v <= p] (STE); dy/ds = round(v) - v inside, n below, p above;
dy/db = 0 inside, 1 outside. Both s and b gradients are multiplied by the LSQ gradient scale
g = 1 / sqrt(N * p), N = elements of one sample of x (per-channel weights: elements of a channel).
Modes:
    symmetric  b = 0 (not learned), n = -128, p = 127: the TensorRT-native Q/DQ with scale s.
    offset     b = s * z, z = round(beta / s) (clamped to -127..128 so -z is an int8 zero point),
               n = -128, p = 127: exactly ONNX QuantizeLinear/DequantizeLinear with zero point -z,
               or Sub(b) -> Q/DQ(s) -> Add(b) for TensorRT. The rounding is in the forward, so
               training and export agree. Backward: db/dbeta = 1 (STE through the rounding) and
               db/ds = z (exact: z is piecewise constant), so dy/ds = n + z below, p + z above.
Weights: LSQ symmetric per output channel (``LSQWeightQuantizer``), b = 0, levels -127..127.

``yoloq.quant.swap`` puts these in place of a calibrated model's quantizers, and back.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from yoloq.config import LSQMode, QATQuantizer, choices
from yoloq.errors import YoloqError
from yoloq.quant.scheme import ACT_RANGE, QMAX, QDQSpec, LearnableQuantizer
from yoloq.quant.state import named_quantizers

# activations (PACT, both LSQ modes) use scheme.ACT_RANGE = (-128, 127), as QuantizeLinear / TensorRT
PACT_LO = -ACT_RANGE[0] / QMAX  # signed PACT clips below at -alpha * 128/127 (the -128 level)
ZMIN, ZMAX = -127, 128          # z = beta / s such that the zero point -z fits int8
KINDS = choices(QATQuantizer)
LSQ_MODES = choices(LSQMode)
PACT_VARIANTS = ("auto", "signed", "unsigned")
MIN_SCALE = 1e-8                # scales / clips at or below this are "collapsed"


class QuantizerDivergenceError(YoloqError, RuntimeError):
    """A learnable quantizer's parameters became non-finite, non-positive or exploded."""


# --------------------------------------------------------------------------- autograd functions


def _reduce_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a broadcast gradient back to the shape of ``like`` (scalar or per-channel)."""
    if like.dim() == 0:
        return grad.sum().reshape(())
    dims = [d for d in range(grad.dim()) if like.shape[d] == 1 and grad.shape[d] != 1]
    return grad.sum(dim=dims, keepdim=True) if dims else grad


class PACTFunction(torch.autograd.Function):
    """y = (alpha/127) * round(clip(x, lo, alpha) * 127 / alpha), lo = -alpha*128/127 (signed) or 0."""

    @staticmethod
    def forward(ctx, x, alpha, signed: bool, quant_error: bool):
        # computed as pytorch-quantization does (x * (127 / amax), then / (127 / amax)) so the frozen
        # TensorQuantizer with amax = alpha gives bit-identical outputs
        inv = torch.full_like(alpha, QMAX) / alpha         # true division (int / tensor is reciprocal*int)
        lo = -alpha * PACT_LO if signed else torch.zeros_like(alpha)
        v = torch.minimum(torch.maximum(x, lo), alpha) * inv
        q = torch.round(v)
        ctx.save_for_backward(x, alpha, v, q)
        ctx.signed, ctx.quant_error = signed, quant_error
        return q / inv

    @staticmethod
    def backward(ctx, grad):
        x, alpha, v, q = ctx.saved_tensors
        above = x > alpha
        below = x < -alpha * PACT_LO if ctx.signed else x < 0
        inside = ~(above | below)
        grad_x = grad * inside
        d_alpha = above.to(grad.dtype)
        if ctx.signed:
            d_alpha = d_alpha - PACT_LO * below.to(grad.dtype)
        if ctx.quant_error:
            d_alpha = d_alpha + inside * (q - v) / QMAX
        return grad_x, _reduce_to(grad * d_alpha, alpha), None, None


class LSQFunction(torch.autograd.Function):
    """y = s * clamp(round((x - b) / s), n, p) + b with the LSQ / LSQ+ gradients (module docstring).

    ``beta`` may be None (symmetric). ``round_offset``: b = s * clamp(round(beta / s), ZMIN, ZMAX).
    ``grad_scale`` multiplies the gradients of s and beta.
    """

    @staticmethod
    def forward(ctx, x, s, beta, n: int, p: int, grad_scale: float, round_offset: bool):
        z = None
        if beta is None:
            b = torch.zeros_like(s)
        elif round_offset:
            z = torch.round(beta / s).clamp(ZMIN, ZMAX)
            b = s * z
        else:
            b = beta
        # v = (x - b) / s evaluated as pytorch-quantization does with amax = 127 * s, so the frozen
        # TensorQuantizer (freeze_quantizers) reproduces the symmetric forward bit for bit
        inv = torch.full_like(s, QMAX) / (s * QMAX)
        v = (x - b) * inv
        q = torch.round(v).clamp(n, p)
        ctx.save_for_backward(s, v, q, z if z is not None else torch.zeros_like(s))
        ctx.has_beta, ctx.n, ctx.p, ctx.g = beta is not None, n, p, grad_scale
        ctx.beta_shape = None if beta is None else beta.shape
        return q / inv + b

    @staticmethod
    def backward(ctx, grad):
        s, v, q, z = ctx.saved_tensors
        below, above = v < ctx.n, v > ctx.p
        outside = below | above
        grad_x = grad * ~outside
        # inside: round(v) - v; outside: q (= n or p) + z (z = 0 unless the offset is rounded)
        d_s = torch.where(outside, q + z, q - v)
        grad_s = _reduce_to(grad * d_s, s) * ctx.g
        grad_beta = None
        if ctx.has_beta:
            grad_beta = _reduce_to(grad * outside, s).reshape(ctx.beta_shape) * ctx.g
        return grad_x, grad_s, grad_beta, None, None, None, None


# --------------------------------------------------------------------------- modules


class _FlagsMixin:
    """Configuration flags live as Python attributes (fast forward) mirrored in buffers, so
    ``state_dict`` is self-describing (``from_checkpoint``) and ``load_state_dict`` restores them."""

    _flag_names: tuple = ()

    def _register_flags(self) -> None:
        for name in self._flag_names:
            self.register_buffer(f"flag_{name}", torch.tensor(bool(getattr(self, name))))

    def _set_flag(self, name: str, value: bool) -> None:
        object.__setattr__(self, name, bool(value))
        getattr(self, f"flag_{name}").fill_(bool(value))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for name in self._flag_names:
            object.__setattr__(self, name, bool(getattr(self, f"flag_{name}")))

    def enable(self) -> None:
        self._set_flag("enabled", True)

    def disable(self) -> None:
        self._set_flag("enabled", False)


class PACTQuantizer(_FlagsMixin, LearnableQuantizer):
    """Per-tensor PACT activation quantizer with a learnable clip ``alpha`` (module docstring)."""

    _flag_names = ("signed", "quant_error", "enabled")

    def __init__(self, alpha: float | torch.Tensor = 1.0, signed: bool = True, quant_error: bool = False,
                 enabled: bool = True):
        super().__init__()
        alpha = torch.as_tensor(alpha, dtype=torch.float32).detach().clone().reshape(())
        if not (torch.isfinite(alpha) and alpha > 0):
            raise ValueError(f"PACT alpha must be finite and > 0, got {float(alpha)}")
        self.alpha = nn.Parameter(alpha)
        self.register_buffer("init_value", alpha.clone())
        self.signed, self.quant_error, self.enabled = bool(signed), bool(quant_error), bool(enabled)
        self._register_flags()

    @classmethod
    def from_checkpoint(cls, state: dict) -> "PACTQuantizer":
        q = cls(alpha=state["alpha"])
        q.load_state_dict(state)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return PACTFunction.apply(x, self.alpha.to(x.dtype), self.signed, self.quant_error)

    @property
    def scale(self) -> torch.Tensor:
        return self.alpha.detach() / QMAX

    def export_spec(self) -> QDQSpec:
        return QDQSpec(scale=self.scale.clone(), axis=None, enabled=self.enabled)

    def extra_repr(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        return f"alpha={float(self.alpha):.4f}, {kind}" + ("" if self.enabled else ", disabled")


class LSQActQuantizer(_FlagsMixin, LearnableQuantizer):
    """Per-tensor LSQ+ activation quantizer: learnable scale, and offset in ``offset`` mode."""

    _flag_names = ("offset_mode", "enabled")

    def __init__(self, scale: float | torch.Tensor = 1.0, offset: float | torch.Tensor = 0.0,
                 mode: str = "symmetric", enabled: bool = True):
        super().__init__()
        if mode not in LSQ_MODES:
            raise ValueError(f"LSQ mode must be one of {LSQ_MODES}, got '{mode}'")
        scale = torch.as_tensor(scale, dtype=torch.float32).detach().clone().reshape(())
        if not (torch.isfinite(scale) and scale > 0):
            raise ValueError(f"LSQ scale must be finite and > 0, got {float(scale)}")
        self.scale = nn.Parameter(scale)
        self.register_buffer("init_value", scale.clone())
        self.offset_mode, self.enabled = mode == "offset", bool(enabled)
        if self.offset_mode:
            self.beta = nn.Parameter(torch.as_tensor(offset, dtype=torch.float32).detach().clone().reshape(()))
        elif float(offset) != 0.0:
            raise ValueError("LSQ symmetric mode has no offset (beta is fixed at 0); use mode='offset'")
        self._register_flags()

    @classmethod
    def from_checkpoint(cls, state: dict) -> "LSQActQuantizer":
        offset = "beta" in state
        q = cls(scale=state["scale"], offset=state["beta"] if offset else 0.0,
                mode="offset" if offset else "symmetric")
        q.load_state_dict(state)
        return q

    @property
    def mode(self) -> str:
        return "offset" if self.offset_mode else "symmetric"

    @property
    def qrange(self) -> tuple[int, int]:
        return ACT_RANGE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        n, p = self.qrange
        g = 1.0 / math.sqrt(max(x[0].numel() if x.dim() > 0 else 1, 1) * p)
        beta = self.beta.to(x.dtype) if self.offset_mode else None
        return LSQFunction.apply(x, self.scale.to(x.dtype), beta, n, p, g, self.offset_mode)

    def zero_point_index(self) -> torch.Tensor:
        """z = round(beta / s) (clamped so -z is an int8 zero point); 0 in symmetric mode."""
        if not self.offset_mode:
            return torch.zeros(())
        s = self.scale.detach()
        return torch.round(self.beta.detach() / s).clamp(ZMIN, ZMAX)

    def export_spec(self, zero_point: bool = False) -> QDQSpec:
        """Symmetric: scale only. Offset: ``offset = s * z`` for Sub/Add around a zero-point-0 Q/DQ
        (TensorRT), or with ``zero_point=True`` the int8 zero point ``-z`` (onnxruntime)."""
        s = self.scale.detach().clone()
        if not self.offset_mode:
            return QDQSpec(scale=s, axis=None, enabled=self.enabled)
        z = self.zero_point_index()
        if zero_point:
            return QDQSpec(scale=s, axis=None, zero_point=(-z).to(torch.int8), enabled=self.enabled)
        return QDQSpec(scale=s, axis=None, offset=s * z, enabled=self.enabled)

    def extra_repr(self) -> str:
        text = f"scale={float(self.scale):.5f}, {self.mode}"
        if self.offset_mode:
            text += f", beta={float(self.beta):.4f}"
        return text + ("" if self.enabled else ", disabled")


class LSQWeightQuantizer(_FlagsMixin, LearnableQuantizer):
    """Symmetric per-channel LSQ weight quantizer: y = s_c * clamp(round(w / s_c), -127, 127)."""

    _flag_names = ("enabled",)

    def __init__(self, scale: torch.Tensor, axis: Optional[int] = 0, enabled: bool = True):
        super().__init__()
        scale = torch.as_tensor(scale, dtype=torch.float32).detach().clone()
        if scale.dim() != 1 and axis is not None:
            scale = scale.flatten()
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("LSQ weight scales must be finite and > 0 (fix dead channels first)")
        self.scale = nn.Parameter(scale if axis is not None else scale.reshape(()))
        self.register_buffer("init_value", self.scale.detach().clone())
        self.register_buffer("axis_index", torch.tensor(-1 if axis is None else int(axis)))
        self.axis = axis
        self.enabled = bool(enabled)
        self._register_flags()

    @classmethod
    def from_checkpoint(cls, state: dict) -> "LSQWeightQuantizer":
        axis = int(state["axis_index"])
        q = cls(scale=state["scale"], axis=None if axis < 0 else axis)
        q.load_state_dict(state)
        return q

    def _shaped_scale(self, w: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return self.scale
        shape = [1] * w.dim()
        shape[self.axis] = -1
        return self.scale.view(shape)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        per_scale = w.numel() // max(self.scale.numel(), 1)
        g = 1.0 / math.sqrt(per_scale * QMAX)
        return LSQFunction.apply(w, self._shaped_scale(w).to(w.dtype), None, -QMAX, QMAX, g, False)

    def export_spec(self) -> QDQSpec:
        return QDQSpec(scale=self.scale.detach().clone(), axis=self.axis, enabled=self.enabled)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}, axis={self.axis}" + ("" if self.enabled else ", disabled")


LEARNABLE = (PACTQuantizer, LSQActQuantizer, LSQWeightQuantizer)






# --------------------------------------------------------------------------- finding quantizers




def learnable_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    return named_quantizers(model, LEARNABLE)


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of every learnable quantizer, each once (shared quantizers counted once)."""
    params, seen = [], set()
    for q in learnable_quantizers(model).values():
        for p in q.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def pact_alpha_l2(model: nn.Module) -> torch.Tensor:
    """Sum of alpha^2 over the (enabled) PACT quantizers, each shared object once. The trainer
    adds ``alpha_decay * pact_alpha_l2(model)`` to the loss (PACT's L2 on the clip value)."""
    terms = [q.alpha.square() for q in named_quantizers(model, (PACTQuantizer,)).values() if q.enabled]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


WEIGHT_SCALE_FLOOR = 0.1      # LSQ weight scales stay >= this x their max-calibrated start


@torch.no_grad()
def clamp_weight_scales(model: nn.Module, floor: float = WEIGHT_SCALE_FLOOR) -> int:
    """Keep every LSQ weight scale >= ``floor`` x its initial (per-channel max / 127) value; returns
    how many channels were clamped. Why: an SGD step is absolute, and near-dead channels start at
    scales of ~1e-6, so one step drives them <= 0 (seen on Lite-S within 50 steps at lr 1e-5);
    a weight scale below a tenth of the max range clips over 90% of it, never the MSE optimum."""
    clamped = 0
    for q in named_quantizers(model, (LSQWeightQuantizer,)).values():
        low = q.init_value * floor
        below = q.scale < low
        clamped += int(below.sum())
        q.scale.copy_(torch.where(below, low, q.scale))
    return clamped


def check_quantizers(model: nn.Module, max_growth: float = 1e3) -> None:
    """Raise ``QuantizerDivergenceError`` naming the first quantizer whose scale / clip / offset is
    non-finite, <= MIN_SCALE, or grew or shrank by more than ``max_growth`` from its initial value."""
    for name, q in learnable_quantizers(model).items():
        value = q.alpha if isinstance(q, PACTQuantizer) else q.scale
        what = "alpha" if isinstance(q, PACTQuantizer) else "scale"
        v = value.detach()
        if not torch.isfinite(v).all() or (isinstance(q, LSQActQuantizer) and q.offset_mode
                                           and not torch.isfinite(q.beta.detach()).all()):
            raise QuantizerDivergenceError(f"quantizer '{name}': {what} or offset is NaN/inf")
        if (v <= MIN_SCALE).any():
            raise QuantizerDivergenceError(f"quantizer '{name}': {what} collapsed to {float(v.min()):.3g} "
                                           f"(<= {MIN_SCALE}); lower the quantizer learning rate")
        ratio = (v / q.init_value.clamp_min(MIN_SCALE))
        if (ratio > max_growth).any() or (ratio < 1.0 / max_growth).any():
            raise QuantizerDivergenceError(
                f"quantizer '{name}': {what} moved from {float(q.init_value.max()):.4g} to {float(v.max()):.4g} "
                f"(more than x{max_growth:g}); scales are exploding -- lower the quantizer learning rate")
