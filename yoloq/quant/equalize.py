"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization
and Bias Correction"), exact, on a deploy-form FP32 model.

Scaling output channel c of a conv (weight row and bias) by 1/s_c and every conv that reads the
result by s_c on input channel c leaves the network's output unchanged wherever the path between
them is *positively homogeneous per channel*: f(x / s) = f(x) / s for s > 0. That holds for ReLU /
LeakyReLU, max / average pooling, nearest upsampling, identity-like modules, and an element-wise
product with a tensor the scaling does not change (the squeeze-excite gate: the SE's first conv is
one of the compensated readers, so the gate is computed from unchanged values). It does not hold
for HardSwish, SiLU, sigmoid, BN, adds or concats: a pair is only formed when *every* use of the
scaled tensor is covered, so an output is never silently changed.

``find_pairs(model)`` derives the pairs from the fx graph (``yoloq.quant.placement.trace``; no
layer names), ``equalize(model)`` applies Nagel's rule per channel, s_c = sqrt(r1_c / r2_c) with
r1_c the range of the producer's output channel c and r2_c the largest range of input channel c
over the readers, iterated because pairs chain (SE conv1 reads one pair and produces the next).
In YOLOv6-Lite: depthwise conv (BN folded, no activation) -> SE -> 1x1 conv, depthwise -> 1x1
(LiteBlockS2 path A) and SE conv1 -> ReLU -> SE conv2; in YOLOv6 every ReLU pair of the fused
RepVGG / QARepVGG / RepOpt blocks (after ``fold_remaining_bn``).
"""
from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from yoloq.quant.placement import TracedGraph, trace

# Positively homogeneous per channel, single data input (the rest of the args are not tensors).
HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                       nn.AdaptiveMaxPool2d, nn.Identity, nn.Dropout)
HOMOGENEOUS_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.max_pool2d, torch.max_pool2d, F.avg_pool2d,
                         F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
HOMOGENEOUS_METHODS = {"relu", "contiguous"}
SPATIAL_REDUCTIONS = {"mean", "amax", "sum"}              # homogeneous when over H, W only
MUL_FUNCTIONS = {operator.mul, torch.mul}
MUL_METHODS = {"mul", "__mul__"}


@dataclass
class ScalePair:
    """A producer conv whose output channels may be divided by s and the convs whose input
    channels are then multiplied by s (``readers``) so every output stays the same."""
    producer: str
    readers: list[str]
    path: list[str] = field(default_factory=list)       # fx nodes between them (report)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- graph analysis


def _is_homogeneous(g: TracedGraph, node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in SPATIAL_REDUCTIONS:
        return _spatial_only(node)
    return g.is_one_of(node, HOMOGENEOUS_MODULES, HOMOGENEOUS_FUNCTIONS, HOMOGENEOUS_METHODS)


def _spatial_only(node: fx.Node) -> bool:
    """x.mean / amax / sum over spatial axes only, keeping dims (channel c stays channel c)."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None or not node.kwargs.get("keepdim", len(node.args) > 2 and node.args[2]):
        return False
    dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
    return all(isinstance(d, int) and d % 4 in (2, 3) for d in dims)


def _is_mul(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in MUL_FUNCTIONS)
            or (node.op == "call_method" and node.target in MUL_METHODS))


def compensable(conv: nn.Module) -> bool:
    """Can input channel c of this conv absorb a factor s_c exactly? Plain dense Conv2d (groups 1)
    and depthwise Conv2d (one filter per input channel)."""
    if not isinstance(conv, nn.modules.conv._ConvNd) or conv.transposed or conv.weight.dim() != 4:
        return False
    return conv.groups == 1 or conv.groups == conv.in_channels == conv.out_channels


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), out.append)
    return out


def _call_counts(graph: fx.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def scaled_region(g: TracedGraph, start: fx.Node, calls: dict[str, int]) -> Optional[tuple[list[str], list[str]]]:
    """Follow every use of ``start`` (whose channels are to be divided by s) through positively
    homogeneous ops. Returns (reader convs that absorb s, nodes on the way) or None when some use
    cannot be compensated (non-homogeneous op, a product of two scaled tensors, a graph output,
    a conv called more than once or of a kind that cannot absorb the factor)."""
    scaled = {start}
    readers: list[str] = []
    path: list[str] = []
    products: list[fx.Node] = []
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for user in node.users:
            if user in scaled or user.target in readers:
                continue
            kind = _classify_use(g, user, calls)
            if kind is None:
                return None
            if kind == "reader":
                readers.append(user.target)
                continue
            if kind == "product":
                products.append(user)
            scaled.add(user)
            path.append(user.name)
            frontier.append(user)
    # x/s * g == (x * g)/s only when g itself is unchanged: exactly one operand scaled (a gate
    # computed through a compensated conv, as in squeeze-excite), never x/s * f(x/s)
    if any(sum(a in scaled for a in _tensor_args(p)) != 1 for p in products):
        return None
    return (readers, path) if readers else None


def _classify_use(g: TracedGraph, user: fx.Node, calls: dict[str, int]) -> Optional[str]:
    """'reader' (a conv absorbing the scale), 'scaled' (output scaled too), 'product' (scaled
    too, if the other operand is unchanged: checked once the walk is complete) or None (blocked)."""
    args = _tensor_args(user)
    if g.is_conv(user):
        conv = g.module(user)
        ok = compensable(conv) and calls.get(user.target, 0) == 1 and len(args) == 1
        return "reader" if ok else None
    if _is_homogeneous(g, user):
        return "scaled" if len(args) == 1 else None
    if _is_mul(user):
        return "product" if len(args) == 2 else "scaled"      # x * tensor, or x * constant
    return None


def find_pairs(model: nn.Module) -> list[ScalePair]:
    """Every (producer conv, readers) pair of ``model`` (deploy form, FP32) that can be equalized
    exactly, in graph order."""
    graph = trace(model)
    g = TracedGraph(model, graph)
    calls = _call_counts(graph)
    pairs = []
    for node in graph.nodes:
        if not g.is_conv(node) or calls.get(node.target, 0) != 1:
            continue
        conv = g.module(node)
        if isinstance(conv, nn.ConvTranspose2d) or conv.out_channels < 2:
            continue
        region = scaled_region(g, node, calls)
        if region is not None:
            pairs.append(ScalePair(producer=node.target, readers=region[0], path=region[1]))
    return pairs


# --------------------------------------------------------------------------- applying scales


@torch.no_grad()
def scale_output_channels(conv: nn.Conv2d, scale: torch.Tensor) -> None:
    """Output channel c of ``conv`` (weight row and bias) divided by s_c."""
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    conv.weight.div_(scale.to(conv.weight).view(shape))
    if conv.bias is not None:
        conv.bias.div_(scale.to(conv.bias))


@torch.no_grad()
def scale_input_channels(conv: nn.Conv2d, scale: torch.Tensor) -> None:
    """Input channel c of ``conv`` multiplied by s_c: column c of a dense conv, filter c of a
    depthwise one."""
    s = scale.to(conv.weight)
    if conv.groups == 1:
        conv.weight.mul_(s.view(1, -1, *([1] * (conv.weight.dim() - 2))))
    else:
        conv.weight.mul_(s.view(-1, *([1] * (conv.weight.dim() - 1))))


def output_ranges(conv: nn.Conv2d) -> torch.Tensor:
    """max |W| per output channel."""
    return conv.weight.detach().abs().flatten(1).amax(1)


def input_ranges(conv: nn.Conv2d) -> torch.Tensor:
    """max |W| per input channel (column of a dense conv, filter of a depthwise one)."""
    w = conv.weight.detach().abs()
    return w.amax(0).flatten(1).amax(1) if conv.groups == 1 else w.flatten(1).amax(1)


def nagel_scale(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """s_c = sqrt(r1_c / r2_c): both ranges become sqrt(r1_c r2_c). Channels with a zero range on
    either side keep s = 1."""
    ok = (r1 > 0) & (r2 > 0)
    s = torch.ones_like(r1)
    s[ok] = torch.sqrt(r1[ok] / r2[ok])
    return s


def equalize_pair(model: nn.Module, pair: ScalePair) -> float:
    """Equalize one pair in place; returns max |log s| (how much it still moved)."""
    producer = model.get_submodule(pair.producer)
    readers = [model.get_submodule(r) for r in pair.readers]
    r2 = torch.stack([input_ranges(r).float() for r in readers]).amax(0)
    s = nagel_scale(output_ranges(producer).float(), r2)
    scale_output_channels(producer, s)
    for r in readers:
        scale_input_channels(r, s)
    return float(s.log().abs().max())


def equalize(model: nn.Module, pairs: Optional[list[ScalePair]] = None, max_sweeps: int = 10,
             tol: float = 1e-3) -> dict:
    """Cross-layer equalization of ``model`` in place (FP32, deploy form, eval). Pairs sharing a
    conv are revisited until no scale moves by more than ``tol`` (log) or ``max_sweeps`` passes.
    Returns a record: pairs, sweeps, last movement."""
    pairs = find_pairs(model) if pairs is None else pairs
    moved, sweeps = 0.0, 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # hundreds of tiny reductions: thread hand-offs cost more than they save
    try:
        for sweeps in range(1, max_sweeps + 1):
            moved = max((equalize_pair(model, p) for p in pairs), default=0.0)
            if moved < tol:
                break
    finally:
        torch.set_num_threads(threads)
    return {"pairs": len(pairs), "readers": sum(len(p.readers) for p in pairs), "sweeps": sweeps,
            "last_max_log_scale": moved, "layers": [p.to_dict() for p in pairs]}
