"""From calibrated TensorQuantizers to learnable ones (QAT) and back.

``swap_quantizers`` replaces the pytorch-quantization ``TensorQuantizer``s of a calibrated model
(``yoloq.quant.prepare``) by PACT / LSQ+ quantizers (``yoloq.quant.learnable``), keeping shared
quantizer objects shared; the LSQ+ scale / offset can start from an MSE search on calibration
images (``lsq_init``). ``freeze_quantizers`` turns every quantizer with a symmetric deploy form
back into a ``TensorQuantizer`` with ``amax = 127 * scale`` (the same Q/DQ), which is what
``yoloq.quant.checkpoint.save_quantized`` stores and the exporter reads.
"""
from __future__ import annotations

import copy
import math
from typing import Iterable, Optional

import torch
from torch import nn

from yoloq.quant.learnable import (KINDS, LEARNABLE, LSQ_MODES, PACT_VARIANTS, ZMAX, ZMIN, LSQActQuantizer,
                                   LSQWeightQuantizer, PACTQuantizer)
from yoloq.quant import backend
from yoloq.quant.backend import set_amax
from yoloq.quant.batches import hooks_attached, image_batch
from yoloq.quant.scheme import (ACT_RANGE, QMAX, TensorQuantizer, is_enabled, new_input_quantizer,
                                new_weight_quantizer, quantizers_off)
from yoloq.quant.state import Slot, has_quant_state, quant_state, quantizer_slots, replace_quantizers


# --------------------------------------------------------------------------- initialisation


class _Samples:
    """Min / max and a bounded, deterministic subsample of every tensor one quantizer sees."""

    def __init__(self, per_batch: int = 16384, limit: int = 262144):
        self.per_batch, self.limit = per_batch, limit
        self.lo, self.hi = math.inf, -math.inf
        self.values: list[torch.Tensor] = []
        self.count = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().float().flatten().cpu()
        if flat.numel() == 0:
            return
        self.lo, self.hi = min(self.lo, float(flat.min())), max(self.hi, float(flat.max()))
        if self.count < self.limit:
            step = max(1, flat.numel() // self.per_batch)      # strided: deterministic, spread out
            part = flat[::step][: self.limit - self.count]
            self.values.append(part)
            self.count += part.numel()

    def tensor(self) -> torch.Tensor:
        return torch.cat(self.values) if self.values else torch.zeros(0)


@torch.no_grad()
def collect_activation_samples(model: nn.Module, batches: Iterable, quantizers: dict[int, nn.Module]
                               ) -> dict[int, _Samples]:
    """FP32 inputs of the given TensorQuantizers (by id) over ``batches`` (quantizers switched off
    meanwhile, as in calibration). Batches are tensors or ``(images, ...)`` tuples."""
    samples = {key: _Samples() for key in quantizers}
    hooks = [q.register_forward_pre_hook(lambda mod, args, key=key: samples[key].add(args[0]))
             for key, q in quantizers.items()]
    with hooks_attached(model, hooks) as device, quantizers_off(model):
        for batch in batches:
            model(image_batch(batch, "QAT initialisation").to(device))
    return samples


def _lsq_mse(x: torch.Tensor, s: float, beta: float, mode: str) -> float:
    n, p = ACT_RANGE
    if mode == "offset":
        beta = s * min(max(round(beta / s), ZMIN), ZMAX)
    xq = torch.round((x - beta) / s).clamp(n, p) * s + beta
    return float((xq - x).square().mean())


def lsq_init(x: torch.Tensor, lo: float, hi: float, mode: str, amax: Optional[float] = None,
             steps: int = 100, min_fraction: float = 0.1) -> tuple[float, float]:
    """(scale, beta) minimising the quantization MSE on samples ``x``: candidate ranges shrink the
    observed [lo, hi] towards 0 in ``steps`` steps down to ``min_fraction`` (symmetric mode:
    [-m, m] with m = max|x|); the calibrated ``amax`` is a candidate too, so the result is never
    worse (in MSE) than the PTQ range."""
    if mode not in LSQ_MODES:
        raise ValueError(f"LSQ mode must be one of {LSQ_MODES}, got '{mode}'")
    lo, hi = min(lo, 0.0), max(hi, 0.0)           # keep 0 representable (padding, ReLU zeros)
    candidates = []
    for c in torch.linspace(1.0, min_fraction, steps).tolist():
        if mode == "symmetric":
            m = c * max(-lo, hi)
            if m > 0:
                candidates.append((m / QMAX, 0.0))
        else:
            a, b = c * lo, c * hi
            if b > a:
                n, p = ACT_RANGE
                s = (b - a) / (p - n)
                candidates.append((s, a - n * s))
    if amax is not None and amax > 0:
        candidates.append((amax / QMAX, 0.0))
    if not candidates:
        return (amax / QMAX if amax else 1.0 / QMAX), 0.0
    if x.numel() == 0:
        return candidates[-1]
    errors = [_lsq_mse(x, s, beta, mode) for s, beta in candidates]
    return candidates[min(range(len(errors)), key=errors.__getitem__)]


# --------------------------------------------------------------------------- swapping


def _amax_of(q: TensorQuantizer, where: str) -> torch.Tensor:
    amax = backend.get_amax(q)
    if amax is None:
        raise ValueError(f"{where}: quantizer has no amax; calibrate the model before swap_quantizers")
    amax = amax.detach().float()
    if not torch.isfinite(amax).all() or (amax <= 0).any():
        raise ValueError(f"{where}: amax has zero / non-finite values; run prepare.fix_dead_channels first")
    return amax


def swap_quantizers(model: nn.Module, kind: str, mode: str = "symmetric", calib_batches: Optional[Iterable] = None,
                    pact_variant: str = "auto", pact_quant_error: bool = False) -> nn.Module:
    """Replace the calibrated TensorQuantizers of ``model`` by learnable ones, in place.

    kind ``pact``: activation quantizers -> PACTQuantizer (alpha = amax; unsigned for sites whose
    calibration minimum is >= 0 when ``pact_variant='auto'`` and ``calib_batches`` are given,
    signed otherwise); weights keep their fixed per-channel amax.
    kind ``lsqplus``: activations -> LSQActQuantizer (``mode`` symmetric|offset; scale/offset from
    an MSE search on ``calib_batches`` when given, else scale = amax / 127, beta = 0), weights ->
    LSQWeightQuantizer (scale = amax / 127 per channel: training starts at the PTQ model).
    kind ``fixed``: nothing is replaced (pytorch-quantization's fixed amax; QAT of weights only).
    A quantizer object held in several places is replaced by one new object everywhere; disabled
    quantizers (skipped layers) are left as they are. Returns ``model``.
    """
    if kind not in KINDS:
        raise ValueError(f"quantizer kind must be one of {KINDS}, got '{kind}'")
    if mode not in LSQ_MODES:
        raise ValueError(f"LSQ mode must be one of {LSQ_MODES}, got '{mode}'")
    if pact_variant not in PACT_VARIANTS:
        raise ValueError(f"PACT variant must be one of {PACT_VARIANTS}, got '{pact_variant}'")
    slots = [s for s in quantizer_slots(model, (TensorQuantizer,))]
    if not slots:
        raise ValueError("swap_quantizers: the model has no pytorch-quantization TensorQuantizer "
                         "(prepare and calibrate it first)")
    for slot in slots:                          # every enabled quantizer must be calibrated
        if is_enabled(slot.quantizer):
            _amax_of(slot.quantizer, slot.path)
    if kind != "fixed":
        samples = None
        if calib_batches is not None:
            act = {id(s.quantizer): s.quantizer for s in slots if is_enabled(s.quantizer) and not s.is_weight}
            samples = collect_activation_samples(model, calib_batches, act)

        def make(q: TensorQuantizer, slot: Slot) -> Optional[nn.Module]:
            if not is_enabled(q) or (slot.is_weight and kind != "lsqplus"):
                return None
            amax = _amax_of(q, slot.path)
            if slot.is_weight:
                axis = q.axis[0] if isinstance(q.axis, (tuple, list)) else q.axis
                new = LSQWeightQuantizer(amax.flatten() / QMAX if axis is not None else amax.max() / QMAX, axis=axis)
            else:
                stats = samples.get(id(q)) if samples else None
                new = _new_activation_quantizer(kind, mode, float(amax.max()), stats, pact_variant, pact_quant_error)
            return new.to(amax.device)

        replace_quantizers(model, make, (TensorQuantizer,))
    if has_quant_state(model):
        quant_state(model).qat_kind = kind if kind != "lsqplus" else f"lsqplus-{mode}"
    return model


def _new_activation_quantizer(kind: str, mode: str, amax: float, stats: Optional[_Samples],
                              pact_variant: str, pact_quant_error: bool) -> nn.Module:
    if kind == "pact":
        if pact_variant == "auto":
            signed = not (stats is not None and stats.count > 0 and stats.lo >= 0.0)
        else:
            signed = pact_variant == "signed"
        return PACTQuantizer(alpha=amax, signed=signed, quant_error=pact_quant_error)
    if stats is not None and stats.count > 0:
        s, beta = lsq_init(stats.tensor(), stats.lo, stats.hi, mode, amax=amax)
    else:
        s, beta = amax / QMAX, 0.0
    return LSQActQuantizer(scale=s, offset=beta if mode == "offset" else 0.0, mode=mode)


# --------------------------------------------------------------------------- back to TensorQuantizers


def _tensor_quantizer_like(q: nn.Module) -> TensorQuantizer:
    if isinstance(q, LSQWeightQuantizer):
        tq = new_weight_quantizer(q.axis)
        amax = q.scale.detach() * QMAX
        if q.axis is not None:
            shape = [1] * 4
            shape[q.axis] = -1
            amax = amax.reshape(shape)
    else:
        tq = new_input_quantizer()
        amax = q.alpha.detach().clone() if isinstance(q, PACTQuantizer) else q.scale.detach() * QMAX
    set_amax(tq, amax)
    backend.set_enabled(tq, bool(q.enabled))
    return tq


def freezable(q: nn.Module) -> bool:
    """True if ``q`` has a symmetric (zero point 0, no offset) deploy form."""
    return isinstance(q, (PACTQuantizer, LSQWeightQuantizer)) or (isinstance(q, LSQActQuantizer) and not q.offset_mode)


def freeze_quantizers(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every learnable quantizer that has a symmetric deploy form by a TensorQuantizer with
    ``amax = 127 * scale`` (PACT: amax = alpha) -- the same Q/DQ, now in the PTQ checkpoint format.
    LSQ+ offset-mode quantizers stay (saved by class + state). Sharing is preserved."""
    if not inplace:
        model = copy.deepcopy(model)
    replace_quantizers(model, lambda q, _: _tensor_quantizer_like(q) if freezable(q) else None, LEARNABLE)
    return model
