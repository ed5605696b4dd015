"""Squeeze-excite convs: found from the fx graph, kept in float on request, with their compute share.

An SE block's convs act on a globally pooled map (``[B, C, 1, 1]``): a few hundred MACs each, a
negligible share of the network, yet their inputs are among the hardest tensors to quantize per
tensor (YOLOv6-Lite: channel ranges of the pooled depthwise outputs spread widely). Keeping them in
float costs next to nothing at inference; ``pooled_map_convs`` finds them without layer names:
a tensor is *pooled* when it comes from a global pooling (adaptive pooling to 1x1, or a mean /
amax over both spatial axes with ``keepdim``) through ops whose tensor inputs are all pooled;
every conv reading a pooled tensor is an SE conv. A product with a full-size map is not pooled
(it broadcasts back), which is where the gate leaves the SE block.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from yoloq.quant.batches import hooks_attached
from yoloq.quant.placement import TracedGraph, trace

GLOBAL_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
GLOBAL_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d}


def _is_one(size) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and all(s == 1 for s in size))


def _is_global_pool(g: TracedGraph, node: fx.Node) -> bool:
    m = g.module(node)
    if isinstance(m, GLOBAL_POOL_MODULES):
        return _is_one(m.output_size)
    if node.op == "call_function" and node.target in GLOBAL_POOL_FUNCTIONS:
        return _is_one(node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size"))
    if node.op == "call_method" and node.target in ("mean", "amax"):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
        return set(d % 4 if isinstance(d, int) else d for d in dims) == {2, 3} and bool(node.kwargs.get("keepdim"))
    return False


def pooled_map_convs(model: nn.Module) -> list[str]:
    """Convs of ``model`` (deploy form) that read a globally pooled map, in graph order."""
    graph = trace(model)
    g = TracedGraph(model, graph)
    pooled: set[fx.Node] = set()
    convs = []
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        inputs: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), inputs.append)
        if g.is_conv(node) and inputs and inputs[0] in pooled:
            convs.append(node.target)
            pooled.add(node)
        elif _is_global_pool(g, node) or (inputs and all(i in pooled for i in inputs)):
            pooled.add(node)
    return convs


@torch.no_grad()
def conv_macs(model: nn.Module, img_size: int) -> dict[str, int]:
    """Multiply-accumulates per conv for one ``img_size`` image (one FP32 forward with hooks)."""
    macs: dict[str, int] = {}

    def hook(name):
        def count(module, _inputs, output):
            k = module.weight[0].numel()          # (in / groups) * kh * kw per output value
            macs[name] = macs.get(name, 0) + int(output[0].numel()) * int(k)
        return count

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, nn.modules.conv._ConvNd)]
    with hooks_attached(model, handles) as device:
        model(torch.zeros(1, 3, img_size, img_size, device=device, dtype=next(model.parameters()).dtype))
    return macs


def flop_share(macs: dict[str, int], layers: Iterable[str]) -> float:
    """Fraction of all conv MACs spent in ``layers``."""
    total = sum(macs.values())
    return sum(macs.get(n, 0) for n in layers) / total if total else 0.0
