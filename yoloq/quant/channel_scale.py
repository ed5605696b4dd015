"""Per-channel input scaling before quantization (the SmoothQuant idea, applied to convs).

A conv's input quantizer sees ``x / s`` (one factor per input channel) and the conv's weight holds
``w * s``: in float the product is unchanged (zero padding stays zero), while the per-tensor
activation scale no longer has to cover the widest channel. The difficulty moves into the weights:

- **depthwise** convs take it for free: filter c is multiplied by s_c and its per-output-channel
  weight scale absorbs that exactly, so the per-tensor activation scale effectively becomes
  per-channel (s = r, the per-channel input absmax);
- **dense** convs quantize each output row over all input channels, so ``s = r^a / w^(1-a)``
  (r: per-channel input absmax on calibration images, w: per-input-channel weight absmax over
  the dense readers, a: migration strength) balances both sides.

Every conv reading one tensor (one fx node) gets the same s, so deployment needs one per-channel
``Mul`` per tensor, in front of its ``QuantizeLinear`` (the exported graph has it; TensorRT may
fuse it into the producing layer's pointwise epilogue, not measured here). A tensor is scaled
only when every conv reading it can absorb s (dense or depthwise ``Conv2d``, quantized: the DFL
conv reading softmax stays untouched). Tensors of one concat / sharing group read at different
nodes get their own s each; their shared per-tensor quantizer then sees all of them. Scales are
normalised so the scaled tensor keeps its largest channel range (max_c r_c / s_c = max_c r_c), so
a shared quantizer's range stays meaningful for the unscaled tensors of its group.

No per-channel *shift* is applied: a 3x3 / 5x5 conv zero-pads its input, and ``conv(x - b) +
conv(b)`` differs from ``conv(x)`` on the border wherever padding meets the shift, so it is not
exact there.

The scaled convs are :class:`InputScaledConv2d` (a ``QuantConv2d`` with a non-persistent
``input_scale`` buffer); ``input_scales(model)`` / ``set_input_scales(...)`` read and restore them
(``yoloq.quant.checkpoint`` stores them next to the weights).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import torch
from torch import nn

from yoloq.quant.backend import QuantConv2d, retype
from yoloq.quant.batches import hooks_attached
from yoloq.quant.equalize import compensable, input_ranges, scale_input_channels
from yoloq.quant.placement import TracedGraph, trace
from yoloq.quant.state import quant_state

MODES = ("off", "depthwise", "all")
RANGE_FLOOR = 1e-5          # ranges below this fraction of the largest one count as dead channels


class InputScaledConv2d(QuantConv2d):
    """``QuantConv2d`` whose input is divided per channel by ``input_scale`` before its input
    quantizer (exported as one ``Mul`` by 1/s before ``QuantizeLinear``). The weight holds w * s."""

    def forward(self, input):
        return super().forward(scaled_input(self, input))


def scaled_input(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``conv``'s input quantizer sees: ``x`` divided by the conv's per-channel input scale
    when it has one, else ``x`` itself."""
    scale = getattr(conv, "input_scale", None)
    return x if scale is None else x * scale.reciprocal().view(1, -1, 1, 1)


def is_depthwise(conv: nn.Module) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


# --------------------------------------------------------------------------- which tensors


@dataclass
class ScaleGroup:
    """One tensor (fx node) and the quantized convs reading it; ``skip`` says why it is not scaled."""
    node: str
    readers: list[str]
    depthwise: list[str] = field(default_factory=list)
    skip: Optional[str] = None

    @property
    def dense(self) -> list[str]:
        return [r for r in self.readers if r not in self.depthwise]

    def to_dict(self) -> dict:
        return asdict(self)


def scale_groups(model: nn.Module, quantized_layers: Iterable[str]) -> list[ScaleGroup]:
    """Group the convs of a deploy-form model by the tensor they read, in graph order. A group is
    marked ``skip`` when a reader cannot absorb a per-channel factor or is not a quantized layer
    (DFL), or when the tensor is the network input (RGB in [0, 1]: nothing to even out)."""
    graph = trace(model)
    g = TracedGraph(model, graph)
    quantized = set(quantized_layers)
    by_node: dict[str, ScaleGroup] = {}
    for node in graph.nodes:
        if not g.is_conv(node):
            continue
        src = g.data_input(node)
        if src is None:
            continue
        group = by_node.setdefault(src.name, ScaleGroup(node=src.name, readers=[]))
        conv = g.module(node)
        group.readers.append(node.target)
        if is_depthwise(conv):
            group.depthwise.append(node.target)
        reason = _why_not(node, conv, src, quantized)
        if reason and not group.skip:
            group.skip = reason
    return list(by_node.values())


def _why_not(node, conv: nn.Module, src, quantized: set) -> Optional[str]:
    if src.op == "placeholder":
        return "network input"
    if node.target not in quantized:
        return f"{node.target} is not quantized"
    if not compensable(conv):
        return f"{node.target} cannot absorb a per-channel input factor (grouped or transposed)"
    return None


def selected(groups: list[ScaleGroup], mode: str, float_layers: Iterable[str] = ()) -> list[ScaleGroup]:
    """The groups ``mode`` scales: ``depthwise`` those with a depthwise reader, ``all`` every one;
    never a tensor only float layers read (``float_layers``: skipped, e.g. SE convs in float)."""
    if mode not in MODES:
        raise ValueError(f"channel scaling mode must be one of {MODES}, got '{mode}'")
    if mode == "off":
        return []
    floats = set(float_layers)
    return [g for g in groups if not g.skip and (mode == "all" or g.depthwise)
            and not all(r in floats for r in g.readers)]


# --------------------------------------------------------------------------- statistics and scales


def absmax_hook(store: dict, name: str):
    """Forward pre-hook recording the running per-channel max |x| of a module's input."""
    def record(_module, args):
        r = args[0].detach().abs().amax(dim=(0, 2, 3)).float().cpu()
        store[name] = r if name not in store else torch.maximum(store[name], r)
    return record


@torch.no_grad()
def input_absmax(model: nn.Module, layers: Iterable[str], batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of each named conv's input over ``batches`` (FP32 forward)."""
    ranges: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(absmax_hook(ranges, n)) for n in layers]
    with hooks_attached(model, handles) as device:
        for batch in batches:
            model(batch.to(device))
    return ranges


def smooth_scale(r: torch.Tensor, w: Optional[torch.Tensor], alpha: float) -> torch.Tensor:
    """s = r^alpha / w^(1-alpha) (s = r without weights), normalised so max_c r_c / s_c = max_c r_c
    (the scaled tensor keeps the range of the original).

    A channel that never fired on the scaling images (r below ``RANGE_FLOOR`` of the largest) keeps
    s = 1, i.e. its raw values. Its range is unknown, not small: the SE convs' inputs (ReLU of one
    pooled value per channel and image) have channels that are exactly 0 on 64 images and fire on
    a few others, and a floored s (~1e-5^alpha) would blow those up ~10^4 x past every other
    channel, so the per-tensor amax grows with them and the live channels round to zero (measured
    on Lite-M: docs/results.md, PTQ section)."""
    r = r.float()
    dead = r <= float(r.max()) * RANGE_FLOOR
    r = r.clamp(min=float(r.max()) * RANGE_FLOOR + 1e-12)
    if w is None:
        s = r.clone()
    else:
        w = w.float().clamp(min=float(w.max()) * RANGE_FLOOR + 1e-12)
        s = r.pow(alpha) / w.pow(1.0 - alpha)
    s = s * (r / s).max() / r.max()
    return torch.where(dead, torch.ones_like(s), s)


def group_scale(model: nn.Module, group: ScaleGroup, r: torch.Tensor, alpha: float) -> torch.Tensor:
    """The factor of one tensor: depthwise readers only -> s = r; with dense readers the SmoothQuant
    balance against their largest weight per input channel."""
    dense = [model.get_submodule(n) for n in group.dense]
    w = torch.stack([input_ranges(c).float().cpu() for c in dense]).amax(0) if dense else None
    return smooth_scale(r, w, alpha)


# --------------------------------------------------------------------------- applying


def set_input_scale(model: nn.Module, layer: str, scale: torch.Tensor, fold_into_weight: bool = True) -> None:
    """Make quantized conv ``layer`` read ``x / scale`` (its input quantizer sees the scaled
    tensor). ``fold_into_weight``: multiply the weight by ``scale`` (a fresh transform); False when
    restoring from a checkpoint whose weights already hold it. Scaling twice multiplies."""
    conv = model.get_submodule(layer)
    if not isinstance(conv, QuantConv2d):
        raise TypeError(f"{layer}: channel scaling needs a prepared QuantConv2d, got {type(conv).__name__}")
    scale = scale.detach().to(conv.weight).flatten()
    if scale.numel() != conv.in_channels or not torch.isfinite(scale).all() or (scale <= 0).any():
        raise ValueError(f"{layer}: input scale needs {conv.in_channels} finite values > 0")
    if fold_into_weight:
        scale_input_channels(conv, scale)
    if isinstance(conv, InputScaledConv2d):
        scale = conv.input_scale * scale
    else:
        retype(conv, InputScaledConv2d)         # the documented class swap (yoloq.quant.backend)
    conv.register_buffer("input_scale", scale, persistent=False)


def input_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """Layer name -> input scale of every channel-scaled conv of a prepared model."""
    return {name: m.input_scale.detach().cpu().clone() for name, m in model.named_modules()
            if isinstance(m, InputScaledConv2d)}


def apply_channel_scaling(qmodel: nn.Module, fp32: nn.Module, batches: Iterable[torch.Tensor], mode: str,
                          alpha: float = 0.8, ranges: Optional[dict[str, torch.Tensor]] = None) -> dict:
    """Scale the inputs of ``qmodel`` (prepared, not yet calibrated) per ``mode`` with ranges from
    ``fp32`` (the same network in float, deploy form) on ``batches``. ``ranges`` (from
    ``input_absmax``) skips the data pass. Tensors only skipped layers read are left alone.
    Returns a record for the report."""
    state = quant_state(qmodel)
    groups = scale_groups(fp32, state.placement.layers)
    chosen = selected(groups, mode, state.skip_layers)
    if ranges is None:
        ranges = input_absmax(fp32, [g.readers[0] for g in chosen], batches)
    spread = []
    for g in chosen:
        r = ranges[g.readers[0]]
        s = group_scale(qmodel, g, r, alpha)
        for layer in g.readers:
            set_input_scale(qmodel, layer, s)
        spread.append(float(r.max() / r.clamp(min=float(r.max()) * RANGE_FLOOR).min()))
    return {"mode": mode, "alpha": alpha, "tensors": len(chosen), "layers": sum(len(g.readers) for g in chosen),
            "depthwise_layers": sum(len(g.depthwise) for g in chosen),
            "dense_layers": sum(len(g.dense) for g in chosen),
            "max_channel_spread": max(spread, default=None),
            "skipped": {g.node: g.skip for g in groups if g.skip},
            "groups": [g.to_dict() for g in chosen]}
