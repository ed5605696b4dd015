"""Reconstruction units ("blocks") of a prepared model, and a runner that feeds them their inputs.

Blocks come from the module tree, checked against the torch.fx graph -- no layer names:
a block is a module (never the root, never a ModuleList / ModuleDict) holding at most
``max_convs`` quantized convs that the forward calls exactly once as a whole. The search starts at
the root's children and splits any candidate that holds too many convs, is called more or less
than once, or whose insides are called from outside it. ``max_convs=1`` gives AdaRound's layers
(the smallest module around each conv: Lite's conv + BN + Hardswish); the default 12 gives
YOLOv6-Lite's LiteBlockS1 / S2, CSPBlock, DPBlock and head convs, and YOLOv6's RepBlocks,
BepC3 stages and head branches.

``BlockWalk`` runs the traced graph (blocks are leaves) over a set of images in *two*
environments at once: the FP32 model and the quantized one. Every value is computed once for
all images (chunked through modules) and freed after its last use, so the cost is about one
forward of each model, whatever the number of blocks. At each block node a callback gets the
block's inputs in both models and returns the block's outputs in both.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from yoloq.errors import YoloqError
from yoloq.quant.placement import PlacementTracer
from yoloq.quant.state import quant_state

CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


class ReconstructionError(YoloqError, RuntimeError):
    """The model or data cannot be reconstructed; the message names the module / value."""


@dataclass
class Block:
    name: str            # module path
    layers: list[str]    # quantized convs inside, model order


# --------------------------------------------------------------------------- discovery


class _BlockTracer(PlacementTracer):
    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def _inside(path: str, parent: str) -> bool:
    return path.startswith(parent + ".")


def _layers_under(path: str, layers: list[str]) -> list[str]:
    return [n for n in layers if n == path or _inside(n, path)]


def _children_with_layers(model: nn.Module, path: str, layers: list[str]) -> list[str]:
    module = model.get_submodule(path)
    out = []
    for name, _ in module.named_children():
        child = f"{path}.{name}" if path else name
        if _layers_under(child, layers):
            out.append(child)
    return out


def _initial_candidates(model: nn.Module, path: str, layers: list[str], max_convs: int) -> list[str]:
    module = model.get_submodule(path)
    inside = _layers_under(path, layers)
    if path and len(inside) <= max_convs and not isinstance(module, CONTAINERS):
        return [path]
    out = []
    for child in _children_with_layers(model, path, layers):
        out += _initial_candidates(model, child, layers, max_convs)
    return out


def _misfits(graph: fx.Graph, candidates: list[str]) -> set[str]:
    """Candidates not called exactly once as a unit."""
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    bad = {c for c in candidates if calls[c] != 1}
    for target in calls:
        bad.update(c for c in candidates if _inside(target, c))
    return bad


def find_blocks(model: nn.Module, max_convs: int = 12) -> tuple[list[Block], fx.Graph]:
    """The reconstruction blocks of a prepared model, in execution order, and the fx graph in
    which they are leaves. Every quantized conv is in exactly one block."""
    if max_convs < 1:
        raise ValueError(f"max_convs must be >= 1, got {max_convs}")
    layers = list(quant_state(model).placement.layers)
    if not layers:
        raise ReconstructionError(f"{type(model).__name__} has no quantized convs to reconstruct")
    candidates = _initial_candidates(model, "", layers, max_convs)
    while True:
        graph = _BlockTracer(set(candidates)).trace(model)
        bad = _misfits(graph, candidates)
        if not bad:
            break
        refined = []
        for c in candidates:
            if c not in bad:
                refined.append(c)
                continue
            children = _children_with_layers(model, c, layers)
            if not children:
                raise ReconstructionError(f"reconstruction: quantized conv '{c}' is not called exactly once per "
                                          f"forward; each conv must run once to be reconstructed")
            refined += children
        candidates = refined
    order = [n.target for n in graph.nodes if n.op == "call_module" and n.target in set(candidates)]
    return [Block(name, _layers_under(name, layers)) for name in order], graph


# --------------------------------------------------------------------------- running


def _batch_size(args: Any) -> int:
    sizes = {t.shape[0] for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise ReconstructionError(f"block inputs must share one batch size, got {sorted(sizes)}")
    return sizes.pop()


def run_chunked(fn: Callable, args: tuple, kwargs: dict, chunk: int) -> Any:
    """``fn(*args, **kwargs)`` over the leading (image) dimension in pieces of ``chunk``."""
    n = _batch_size((args, kwargs))
    pieces = []
    for start in range(0, n, chunk):
        cut = lambda v: v[start:start + chunk] if isinstance(v, torch.Tensor) and v.dim() > 0 else v  # noqa: E731
        pieces.append(fn(*tree_map(cut, args), **tree_map(cut, kwargs)))
    flat0, spec = tree_flatten(pieces[0])
    flats = [tree_flatten(p)[0] for p in pieces]
    joined = [torch.cat([f[i] for f in flats]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
              for i, v in enumerate(flat0)]
    return tree_unflatten(joined, spec)


BlockVisit = Callable[[Block, tuple, dict, tuple, dict], tuple[Any, Any]]


class BlockWalk:
    """Runs the block graph of ``qmodel`` on images in the FP32 and the quantized model."""

    def __init__(self, graph: fx.Graph, blocks: list[Block], qmodel: nn.Module, fp32: nn.Module, chunk: int):
        self.graph, self.qmodel, self.fp32, self.chunk = graph, qmodel, fp32, chunk
        self.blocks = {b.name: b for b in blocks}
        self.nodes = self._needed_nodes()
        position = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((position[u] for u in n.users if u in position), default=position[n])
                         for n in self.nodes}

    def _needed_nodes(self) -> list[fx.Node]:
        """Block nodes and everything they depend on, in graph order."""
        needed: set[fx.Node] = set()
        stack = [n for n in self.graph.nodes if n.op == "call_module" and n.target in self.blocks]
        while stack:
            node = stack.pop()
            if node not in needed:
                needed.add(node)
                stack.extend(node.all_input_nodes)
        return [n for n in self.graph.nodes if n in needed]

    def _module(self, model: nn.Module, target: str) -> nn.Module:
        try:
            return model.get_submodule(target)
        except AttributeError:
            raise ReconstructionError(f"the FP32 model has no module '{target}' (it must be the model that was "
                                      f"prepared, same structure)") from None

    def _eval(self, node: fx.Node, model: nn.Module, env: dict) -> Any:
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op == "get_attr":
            obj = model
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return run_chunked(self._module(model, node.target), args, kwargs, self.chunk)
        raise ReconstructionError(f"unexpected graph node {node.op} {node.target}")

    @torch.no_grad()
    def run(self, images: torch.Tensor, visit: BlockVisit) -> None:
        env_q: dict[fx.Node, Any] = {}
        env_fp: dict[fx.Node, Any] = {}
        for i, node in enumerate(self.nodes):
            if node.op == "placeholder":
                env_q[node] = env_fp[node] = images
            elif node.op == "call_module" and node.target in self.blocks:
                q_args = fx.node.map_arg((node.args, node.kwargs), env_q.__getitem__)
                fp_args = fx.node.map_arg((node.args, node.kwargs), env_fp.__getitem__)
                env_q[node], env_fp[node] = visit(self.blocks[node.target], *q_args, *fp_args)
            else:
                env_q[node] = self._eval(node, self.qmodel, env_q)
                env_fp[node] = self._eval(node, self.fp32, env_fp)
            for env in (env_q, env_fp):
                for done in [n for n in env if self.last_use[n] <= i]:
                    del env[done]
