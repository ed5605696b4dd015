"""The learnable pieces of block reconstruction: AdaRound weight rounding and learned activation
step sizes (with QDrop's random dropping of activation quantization).

AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").
With the per-channel weight scale fixed (s = amax / 127, levels -127..127), every weight w is
either rounded down or up: w~ = s * clip(floor(w / s) + h(V), -127, 127), where h is the rectified
sigmoid h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1. V starts
where h(V) equals the fractional part of w / s (so the soft weight starts at the float weight);
the regularizer f_reg(V) = sum(1 - |2 h(V) - 1|^beta), beta annealed from 20 to 2 after a
warm-up, pushes every h to 0 or 1. The hard result rounds up where h >= 0.5, i.e. V >= 0.

Activations: ``LearnedStepQuantizer`` is the per-tensor symmetric INT8 quantizer (levels
-128..127) with a trainable step s and LSQ's gradients (Esser et al. 2020): dy/dx = 1 inside the
range, 0 where clipped; dy/ds = round(x/s) - x/s inside, -128 or 127 where clipped (LSQ's
gradient scale is left out: Adam, which trains it, normalises it away). The deployed
amax is 127 * s. With ``drop_prob`` p > 0 and ``dropping`` on, each element passes unquantized
with probability p (QDrop, Wei et al. 2022): y = x there, dy/dx = 1, dy/ds = 0. Both are one
autograd function (``DroppableFakeQuant``) that touches each activation element as few times as
it can: the element-wise passes over the activations, not the convs, dominate the cost of a
reconstruction step on CPU.

Both compute their levels exactly as pytorch-quantization does (x * (127 / amax), round, clamp,
divide), so the values they leave behind -- the rounded weights and 127 * s -- are reproduced
bit for bit by the ordinary ``TensorQuantizer`` fake quantization.
"""
from __future__ import annotations

import torch
from torch import nn

from yoloq.quant.scheme import ACT_RANGE, QMAX, WEIGHT_RANGE

ZETA, GAMMA = 1.1, -0.1          # rectified sigmoid stretch (AdaRound paper)
BETA_START, BETA_END = 20.0, 2.0  # regularizer exponent, annealed linearly after the warm-up


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """V with rectified_sigmoid(V) == h for h in [0, 1)."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


def annealed_beta(step: int, total: int, warmup: float) -> float | None:
    """Regularizer exponent at ``step``: None during the warm-up (no regularizer), then linear
    from 20 down to 2 at the last step."""
    start = int(warmup * total)
    if step < start:
        return None
    frac = (step - start) / max(1, total - start - 1)
    return BETA_START + (BETA_END - BETA_START) * min(1.0, frac)


def level_multiplier(amax: torch.Tensor) -> torch.Tensor:
    """127 / amax, computed as pytorch-quantization's ``_tensor_quant`` does (float32)."""
    return torch.tensor(float(QMAX), device=amax.device) / amax.float()


class AdaRoundWeight(nn.Module):
    """Stands in for a conv's per-channel weight quantizer while its rounding is learned.

    ``forward(weight)`` ignores its argument (the float weight is fixed and stored here) and
    returns the soft-rounded weight (``hard=False``) or the hard-rounded one.
    """

    def __init__(self, weight: torch.Tensor, amax: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        amax = amax.detach().float().reshape(amax.shape if amax.dim() == w.dim() else
                                             (-1,) + (1,) * (w.dim() - 1))
        self.register_buffer("multiplier", level_multiplier(amax))   # 127 / amax, per channel
        scaled = w * self.multiplier
        self.register_buffer("floor", torch.floor(scaled))
        # the levels the calibrated fake quantization used: the starting point and the yardstick
        self.register_buffer("nearest", torch.clamp(torch.round(scaled), *WEIGHT_RANGE))
        rest = (scaled - self.floor).clamp(0.0, 1.0 - 1e-6)
        self.v = nn.Parameter(inverse_rectified_sigmoid(rest))
        self.hard = False

    def soft_levels(self) -> torch.Tensor:
        return self.floor + rectified_sigmoid(self.v)

    def hard_levels(self) -> torch.Tensor:
        return torch.clamp(self.floor + (self.v >= 0).to(self.floor.dtype), *WEIGHT_RANGE)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        levels = self.hard_levels() if self.hard else torch.clamp(self.soft_levels(), *WEIGHT_RANGE)
        return (levels / self.multiplier).to(weight.dtype)

    def regularizer(self, beta: float) -> torch.Tensor:
        """sum(1 - |2 h(V) - 1|^beta): 0 when every h is exactly 0 or 1."""
        h = rectified_sigmoid(self.v)
        return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()

    @torch.no_grad()
    def undecided_fraction(self, tol: float = 1e-3) -> float:
        """Share of weights whose soft h is not yet (within ``tol``) 0 or 1."""
        h = rectified_sigmoid(self.v)
        return float(((h > tol) & (h < 1 - tol)).float().mean())

    @torch.no_grad()
    def changed_fraction(self) -> float:
        """Share of weights whose learned level differs from round-to-nearest."""
        return float((self.hard_levels() != self.nearest).float().mean())

    @torch.no_grad()
    def rounded_weight(self) -> torch.Tensor:
        """The hard-rounded weight in float: level / (127 / amax), which the per-channel
        fake quantization with the same amax maps onto itself."""
        return self.hard_levels() / self.multiplier


class DroppableFakeQuant(torch.autograd.Function):
    """y = lerp(q(x), x, keep), q(x) = clamp(round(x * m), n, p) / m, m = 127 / (127 * scale);
    ``keep`` is a float 0/1 mask (or None). Float masks and arithmetic instead of ``torch.where`` /
    ``masked_fill``: on CPU those boolean-mask kernels are ~10x slower than a multiply."""

    @staticmethod
    def forward(ctx, x, scale, keep, n: int, p: int):
        inv = torch.full_like(scale, float(QMAX)) / (scale * QMAX)     # pytorch-quantization's 127 / amax
        v = x * inv
        y = torch.round(v).clamp_(n, p).div_(inv)
        if keep is not None:
            y = torch.lerp(y, x, keep)           # exactly x where keep == 1, exactly q(x) where 0
        ctx.save_for_backward(v, keep if keep is not None else v.new_empty(0))
        ctx.n, ctx.p, ctx.has_keep = n, p, keep is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        v, keep = ctx.saved_tensors
        inside = ((v >= ctx.n) & (v <= ctx.p)).to(v.dtype)
        d_scale = torch.round(v).clamp_(ctx.n, ctx.p).sub_(v * inside)   # round(v) - v inside, n / p outside
        if ctx.has_keep:
            d_scale.mul_(1.0 - keep)
            inside = torch.maximum(inside, keep)
        grad_scale = (grad * d_scale).sum().reshape(())
        return grad * inside, grad_scale, None, None, None


class LearnedStepQuantizer(nn.Module):
    """Per-tensor symmetric INT8 activation quantizer with step ``scale`` (amax = 127 * scale),
    trainable when ``learn`` and randomly dropped (QDrop) while ``dropping``."""

    def __init__(self, amax: torch.Tensor, learn: bool, drop_prob: float = 0.0):
        super().__init__()
        scale = (amax.detach().float().reshape(()) / QMAX).clone()
        self.scale = nn.Parameter(scale, requires_grad=learn)
        self.drop_prob = float(drop_prob)
        self.dropping = False
        self.generator: torch.Generator | None = None

    def amax(self) -> torch.Tensor:
        return self.scale.detach() * QMAX

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = None
        if self.dropping and self.drop_prob > 0:
            keep = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype).lt_(self.drop_prob)
        return DroppableFakeQuant.apply(x, self.scale.to(x.dtype), keep, *ACT_RANGE)
