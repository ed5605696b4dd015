"""Why INT8 hurts a layer: weight / activation range statistics and quantization SQNR.

The QARepVGG analysis (Chu et al., 2022): re-parameterised kernels can have a few output channels
whose range dwarfs the others (large per-channel amax spread), heavy-tailed weights (outliers far
beyond a few sigma) and activations whose per-channel ranges differ by orders of magnitude. With
per-tensor INT8 those layers collapse: the small channels round to zero. This module measures, for
every quantized conv of a calibrated model (fused, BN folded as ``prepare`` left it):

- weights: std, max|w|, outlier share (|w - mean| > ``outlier_sigma`` x std), per-output-channel
  range spread (max / min of the non-zero per-channel amax), INT8 SQNR (mean over output channels)
  with per-channel scales (what TensorRT runs) and with one per-tensor scale (what the spread
  would cost without per-channel scales);
- input activations (one float pass over a few calibration batches): the amax of the layer's input
  quantizer, per-channel range spread, and INT8 SQNR with that amax, all of what the quantizer
  sees (a channel-scaled conv's input divided by its per-channel scale).

Layers are flagged when a SQNR is below ``sqnr_db`` or a spread exceeds ``spread``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from yoloq.quant.channel_scale import scaled_input
from yoloq.quant.metrics import power_ratio_db
from yoloq.quant.prepare import quant_layers, set_layers_quantized
from yoloq.device import module_device
from yoloq.quant import backend
from yoloq.quant.scheme import ACT_RANGE, fake_quant
from yoloq.quant.state import quant_state

@dataclass
class Thresholds:
    sqnr_db: float = 20.0          # INT8 SQNR below this: the layer loses most of its signal
    spread: float = 100.0          # per-channel amax max/min above this: per-tensor INT8 collapses
    outlier_sigma: float = 6.0     # |w - mean| beyond this many std counts as an outlier
    outlier_ratio: float = 1e-2    # flag when more than this share of weights are outliers


def channel_spread(channel_amax: torch.Tensor) -> float:
    """max / min of per-channel amax, ignoring dead channels (amax ~ 0: they cost nothing)."""
    c = channel_amax.flatten().double()
    top = float(c.max()) if c.numel() else 0.0
    alive = c[c > top * 1e-6]
    if top <= 0 or alive.numel() == 0:
        return 1.0
    return float(alive.max() / alive.min())


def _out_axis(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.ConvTranspose2d) else 0


@torch.no_grad()
def weight_stats(weight: torch.Tensor, out_axis: int = 0, outlier_sigma: float = 6.0) -> dict:
    w = weight.detach().double()
    dims = [d for d in range(w.dim()) if d != out_axis]
    per_channel = w.abs().amax(dim=dims, keepdim=True)
    std = float(w.std()) if w.numel() > 1 else 0.0
    outliers = float(((w - w.mean()).abs() > outlier_sigma * std).double().mean()) if std > 0 else 0.0
    return {"w_std": std, "w_absmax": float(w.abs().max()), "w_outlier_ratio": outliers,
            "w_channel_spread": channel_spread(per_channel),
            "w_sqnr_db": channel_sqnr_db(w, fake_quant(w, per_channel), out_axis),
            "w_sqnr_per_tensor_db": channel_sqnr_db(w, fake_quant(w, w.abs().max()), out_axis)}


def channel_sqnr_db(w: torch.Tensor, wq: torch.Tensor, out_axis: int = 0) -> float:
    """Mean over output channels of each channel's SQNR (dB): every output channel feeds the next
    layer on its own, so a small channel rounded to nothing must count even when a huge channel
    holds most of the tensor's energy. Dead channels (no signal) are left out."""
    dims = [d for d in range(w.dim()) if d != out_axis]
    signal = (w ** 2).sum(dim=dims)
    noise = ((wq - w) ** 2).sum(dim=dims)
    values = [power_ratio_db(float(s), float(n)) for s, n in zip(signal, noise) if s > 0]
    return sum(values) / len(values) if values else 200.0


def _quantizer_amax(q: nn.Module) -> Optional[torch.Tensor]:
    amax = getattr(q, "amax", None)
    if amax is None:
        return None
    return torch.as_tensor(amax).detach().float().flatten().max()


class _InputStats:
    """Forward pre-hook on one layer: per-channel |x| max, and INT8 signal / noise with ``amax``."""

    def __init__(self, amax: Optional[torch.Tensor]):
        self.amax = amax
        self.channel_max: Optional[torch.Tensor] = None
        self.signal = 0.0
        self.noise = 0.0

    def __call__(self, module, args):
        x = scaled_input(module, args[0].detach())
        cmax = x.abs().transpose(0, 1).flatten(1).amax(1).double()
        self.channel_max = cmax if self.channel_max is None else torch.maximum(self.channel_max, cmax)
        if self.amax is not None:
            xd = x.double()
            self.signal += float((xd ** 2).sum())
            self.noise += float(((fake_quant(xd, self.amax.double(), ACT_RANGE[0]) - xd) ** 2).sum())


@torch.no_grad()
def diagnose(qmodel: nn.Module, images: Sequence[torch.Tensor], thresholds: Optional[Thresholds] = None) -> dict:
    """Per-layer statistics and flags for a calibrated, prepared model.

    Returns ``{"thresholds": {...}, "layers": [row per quantized layer, model order]}``; each row
    has ``layer``, the weight and activation numbers above, ``skipped`` and ``flags`` (list of str).
    The model's skip set is restored afterwards.
    """
    th = thresholds or Thresholds()
    state = quant_state(qmodel)
    layers = quant_layers(qmodel)
    amax = {name: _quantizer_amax(state.quantizers[state.placement.site_of(name).name]) for name in layers}
    hooks = {name: _InputStats(amax[name]) for name in layers}
    handles = [m.register_forward_pre_hook(hooks[name]) for name, m in layers.items()]
    saved_skips = list(state.skip_layers)
    qmodel.eval()
    try:
        with backend.quiet():
            set_layers_quantized(qmodel, list(layers), False)     # float pass: the real activations
            for x in images:
                qmodel(x.to(module_device(qmodel)))
    finally:
        for h in handles:
            h.remove()
        with backend.quiet():
            set_layers_quantized(qmodel, list(layers), True)
            if saved_skips:
                set_layers_quantized(qmodel, saved_skips, False)

    rows = []
    for name, module in layers.items():
        row = {"layer": name, "skipped": name in saved_skips,
               **weight_stats(module.weight, _out_axis(module), th.outlier_sigma)}
        st = hooks[name]
        row["act_amax"] = None if st.amax is None else float(st.amax)
        row["act_absmax"] = None if st.channel_max is None else float(st.channel_max.max())
        row["act_channel_spread"] = None if st.channel_max is None else channel_spread(st.channel_max)
        row["act_sqnr_db"] = power_ratio_db(st.signal, st.noise) if st.amax is not None and st.signal > 0 else None
        row["flags"] = _flags(row, th)
        rows.append(_rounded(row))
    return {"thresholds": asdict(th), "images": int(sum(x.shape[0] for x in images)), "layers": rows}


def _rounded(row: dict) -> dict:
    """Statistics to 9 significant digits: the float64 sums behind them are split by the thread
    count, which moves their last bits (1 vs 2 threads gave different reports); 9 digits keep every
    value far below what it means and the report the same with any thread count."""
    return {k: float(f"{v:.9g}") if isinstance(v, float) else v for k, v in row.items()}


def _flags(row: dict, th: Thresholds) -> list[str]:
    flags = []
    if row["w_sqnr_db"] < th.sqnr_db:
        flags.append("weight SQNR low")
    if row.get("act_sqnr_db") is not None and row["act_sqnr_db"] < th.sqnr_db:
        flags.append("activation SQNR low")
    if row["w_channel_spread"] > th.spread:
        flags.append("weight channel spread")
    if (row.get("act_channel_spread") or 0) > th.spread:
        flags.append("activation channel spread")
    if row["w_outlier_ratio"] > th.outlier_ratio:
        flags.append("weight outliers")
    return flags
