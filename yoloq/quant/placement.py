"""Where TensorRT wants activation quantizers, derived from the torch.fx graph of a model.

``analyze(model)`` traces the deploy-form FP32 model (``Decode`` is a leaf) and returns a
``Placement``: the activation-quantizer *sites* and which layers read each one. No layer names are
hard-coded; every decision follows from the graph and the TensorRT rules below (NVIDIA's TensorRT
Developer Guide on explicit quantization: Q/DQ on the inputs of quantizable layers, one scale where
tensors are joined; the deploy-time scheme is yoloq.quant.scheme and docs/ARCHITECTURE.md,
"Deployment semantics"):

1. Every Conv2d / ConvTranspose2d input gets a quantizer (weights: per channel, set in prepare).
2. One tensor, one quantizer: convs reading the same tensor share one quantizer object, and so do
   tensors joined by ops that commute with symmetric per-tensor quantization (``IDENTITY_*``
   below: max pooling, nearest upsampling, view/reshape/transpose/flatten/unflatten, chunk /
   split / slicing). TensorRT moves Q/DQ through these ops, so they must carry one scale.
3. Concat: all inputs and the output share one quantizer (else TensorRT re-quantizes).
4. Residual add: when exactly one operand of an add is a conv branch (a conv followed only by
   pointwise activations), the *other* operand (the residual) is quantized so TensorRT can fuse
   conv + add. When both operands are conv branches (YOLOv6-Lite's P6 = DP(R5) + DP(P5)) nothing
   is inserted: the add runs in float and its output is quantized by the convs that read it;
   a quantizer there would only add rounding error on a stride-64 map. After ``fuse()`` the Rep
   blocks (RepVGG / QARepVGG / RepOpt) contain no add at all, so the rule only concerns BottleRep
   residuals (YOLOv6-M/L: ``conv2(conv1(x)) + alpha * x``, quantizing ``alpha * x``).
5. A conv that reads softmax probabilities (the DFL ``proj_conv``: fixed bins 0..reg_max) stays
   a float conv with a float input; it is listed in ``Placement.float_layers``.
6. Element-wise products (Lite SE gate), Hardswish / sigmoid outputs etc. get nothing of their
   own: they are quantized only where a conv reads them (rule 1).
"""
from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from yoloq.errors import InputError
from yoloq.models.detector import Decode
from yoloq.quant.backend import INPUT_QUANTIZER

# --------------------------------------------------------------------------- TensorRT rules as data

QUANTIZABLE_LAYERS = (nn.Conv2d, nn.ConvTranspose2d)

# Ops that commute with per-tensor symmetric quantization: Q/DQ moves through them, so the
# tensors on both sides must carry one scale.
IDENTITY_MODULES = (nn.MaxPool2d, nn.Identity, nn.Dropout, nn.Flatten, nn.Unflatten,
                    nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle, nn.ZeroPad2d)
IDENTITY_FUNCTIONS = {F.max_pool2d, torch.max_pool2d, torch.flatten, torch.reshape, torch.transpose,
                      torch.permute, torch.chunk, torch.split, torch.squeeze, torch.unsqueeze,
                      torch.narrow, torch.unflatten, torch.channel_shuffle, F.pixel_shuffle,
                      F.pixel_unshuffle, operator.getitem}
IDENTITY_METHODS = {"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "flatten",
                    "unflatten", "contiguous", "chunk", "split", "squeeze", "unsqueeze", "narrow"}
CONCAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_", "__add__"}
SOFTMAX_FUNCTIONS = {F.softmax, torch.softmax}
# Single-input pointwise ops TensorRT fuses into the conv before them (conv-branch detection).
POINTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.GELU, nn.Mish,
                     nn.BatchNorm2d, nn.Identity)
POINTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.silu, F.hardswish, F.leaky_relu, F.gelu, F.mish}
POINTWISE_METHODS = {"relu", "relu_"}

DFL_REASON = "reads softmax probabilities (DFL expectation, fixed bins): kept in float"


# --------------------------------------------------------------------------- results


@dataclass
class ResidualSlot:
    """A standalone quantizer on one operand of a residual add (rule 4).

    ``owner`` is the module whose ``forward`` holds the add; ``prepare`` re-traces that module and
    inserts ``owner.<attr>`` before operand ``operand`` of the ``add_index``-th add in it.
    ``fusing_layer`` is the conv TensorRT fuses with the add; the slot is quantized iff it is.
    """
    owner: str
    add_index: int
    operand: int
    attr: str
    fusing_layer: str


@dataclass
class QuantSite:
    """One activation quantizer object and everything that reads it."""
    name: str                     # module path of the quantizer (its first holder)
    consumers: list[str]          # quantized layers whose input quantizer is this object
    reason: str                   # which rules formed the group
    group: int                    # sharing-group id (index in Placement.sites)
    tensors: list[str] = field(default_factory=list)          # fx nodes sharing the scale
    residuals: list[ResidualSlot] = field(default_factory=list)


@dataclass
class Placement:
    sites: list[QuantSite]
    layers: list[str]                                          # quantized conv layers, model order
    float_layers: dict[str, str] = field(default_factory=dict)  # conv kept in float -> why
    notes: list[str] = field(default_factory=list)

    def site_of(self, layer: str) -> QuantSite:
        """The site whose quantizer feeds ``layer``."""
        for site in self.sites:
            if layer in site.consumers:
                return site
        raise InputError(f"'{layer}' is not a quantized layer of this placement")

    def describe(self) -> str:
        """A fixed-width table: one row per quantizer (sharing group)."""
        rows = [("group", "quantizer", "reason", "consumers")]
        for s in self.sites:
            readers = list(s.consumers) + [f"{r.owner}(+residual)" for r in s.residuals]
            shown = ", ".join(readers[:3]) + (f" (+{len(readers) - 3} more)" if len(readers) > 3 else "")
            rows.append((str(s.group), s.name, s.reason, f"{len(readers)}: {shown}"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        summary = (f"{len(self.sites)} activation quantizers for {len(self.layers)} quantized layers; "
                   f"float layers: {', '.join(self.float_layers) or 'none'}")
        return "\n".join(lines + [summary] + [f"note: {n}" for n in self.notes])

    def to_dict(self) -> dict:
        """Plain containers (for quantized checkpoints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Placement":
        sites = [QuantSite(**{**s, "residuals": [ResidualSlot(**r) for r in s.get("residuals", [])]})
                 for s in data["sites"]]
        return cls(sites=sites, layers=list(data["layers"]), float_layers=dict(data.get("float_layers", {})),
                   notes=list(data.get("notes", [])))


# --------------------------------------------------------------------------- tracing


class PlacementTracer(fx.Tracer):
    """fx tracer with ``Decode`` (and anything in ``extra_leaves``) kept as a leaf."""

    def __init__(self, extra_leaves: tuple = ()):
        super().__init__()
        self.extra_leaves = (Decode,) + tuple(extra_leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.extra_leaves) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.Graph:
    try:
        return PlacementTracer().trace(model)
    except Exception as err:  # fx errors are long; say which model and why
        raise RuntimeError(f"quantizer placement: cannot fx-trace {type(model).__name__} "
                           f"(forward must have no data-dependent control flow): {err}") from err


# --------------------------------------------------------------------------- node classification


def is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in ADD_METHODS))



class TracedGraph:
    """Helpers over one traced graph and its model."""

    def __init__(self, model: nn.Module, graph: fx.Graph):
        self.modules = dict(model.named_modules())
        self.graph = graph

    def module(self, node: fx.Node) -> Optional[nn.Module]:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def is_conv(self, node: fx.Node) -> bool:
        return isinstance(self.module(node), QUANTIZABLE_LAYERS)

    def is_identity(self, node: fx.Node) -> bool:
        return self.is_one_of(node, IDENTITY_MODULES, IDENTITY_FUNCTIONS, IDENTITY_METHODS)

    def is_one_of(self, node: fx.Node, modules: tuple, functions, methods) -> bool:
        """Is ``node`` a call of one of these module types / functions / tensor methods? Nearest
        upsampling (module or ``F.interpolate``) counts with them: it only repeats values."""
        m = self.module(node)
        if m is not None:
            if isinstance(m, nn.Upsample):
                return m.mode == "nearest"
            return isinstance(m, modules)
        if node.op == "call_function":
            if node.target is F.interpolate:
                return node.kwargs.get("mode", "nearest") == "nearest"
            return node.target in functions
        return node.op == "call_method" and node.target in methods

    @staticmethod
    def is_concat(node: fx.Node) -> bool:
        return node.op == "call_function" and node.target in CONCAT_FUNCTIONS

    def is_softmax(self, node: fx.Node) -> bool:
        return (isinstance(self.module(node), nn.Softmax)
                or (node.op == "call_function" and node.target in SOFTMAX_FUNCTIONS)
                or (node.op == "call_method" and node.target == "softmax"))

    def is_pointwise(self, node: fx.Node) -> bool:
        m = self.module(node)
        if m is not None:
            return isinstance(m, POINTWISE_MODULES)
        return ((node.op == "call_function" and node.target in POINTWISE_FUNCTIONS)
                or (node.op == "call_method" and node.target in POINTWISE_METHODS))

    @staticmethod
    def data_input(node: fx.Node) -> Optional[fx.Node]:
        """The tensor an identity-like / pointwise op reads (its first node argument)."""
        first = node.args[0] if node.args else node.kwargs.get("input")
        return first if isinstance(first, fx.Node) else None

    def conv_branch(self, node: fx.Node) -> Optional[fx.Node]:
        """The conv node feeding ``node`` through single-input pointwise ops only, if any."""
        while isinstance(node, fx.Node):
            if self.is_conv(node):
                return node
            if not self.is_pointwise(node):
                return None
            node = self.data_input(node)
        return None

    def reads_softmax(self, node: fx.Node) -> bool:
        """Does ``node`` come from a softmax through identity-like ops only?"""
        while isinstance(node, fx.Node):
            if self.is_softmax(node):
                return True
            if not self.is_identity(node):
                return False
            node = self.data_input(node)
        return False


class _UnionFind:
    def __init__(self):
        self.parent: dict[fx.Node, fx.Node] = {}

    def find(self, x: fx.Node) -> fx.Node:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] is not root:
            root = self.parent[root]
        while self.parent[x] is not root:        # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self.parent[rb] = ra


def _owner(node: fx.Node) -> str:
    """Qualified name of the module whose own forward executes ``node`` ('' = the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack)) if stack else ""


def _flat_nodes(arg: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(arg, out.append)
    return out


# --------------------------------------------------------------------------- analysis


def analyze(model: nn.Module) -> Placement:
    """Derive the TensorRT activation-quantizer placement of a deploy-form FP32 model."""
    graph = trace(model)
    g = TracedGraph(model, graph)
    module_order = {name: i for i, name in enumerate(g.modules)}
    uf = _UnionFind()
    tags: dict[fx.Node, set[str]] = defaultdict(set)
    conv_inputs: dict[str, list[fx.Node]] = defaultdict(list)
    float_layers: dict[str, str] = {}
    notes: list[str] = []
    residual_nodes: list[tuple[fx.Node, ResidualSlot]] = []
    add_counts: dict[str, int] = defaultdict(int)

    for node in graph.nodes:
        if node.op == "placeholder":
            tags[node].add("network input")
        elif g.is_conv(node):
            src = g.data_input(node)
            if src is None:
                continue
            if g.reads_softmax(src):
                float_layers[node.target] = DFL_REASON
            else:
                conv_inputs[node.target].append(src)
        elif g.is_identity(node):
            src = g.data_input(node)
            if src is not None:
                uf.union(src, node)
                tags[node].add(_identity_tag(g, node))
        elif g.is_concat(node):
            inputs = _flat_nodes(node.args[0] if node.args else node.kwargs.get("tensors"))
            for t in inputs:
                uf.union(node, t)
            tags[node].add(f"concat({len(inputs)})")
        elif is_add(node):
            owner = _owner(node)
            index = add_counts[owner]
            add_counts[owner] += 1
            slot = _residual_slot(g, node, owner, index)
            if slot is not None:
                if owner == "":
                    notes.append(f"residual add {node.name} is in the root forward; no quantizer inserted")
                else:
                    residual_nodes.append((node.args[slot.operand], slot))

    for name, inputs in conv_inputs.items():          # a conv called twice has one input quantizer
        for t in inputs[1:]:
            uf.union(inputs[0], t)

    return _build_placement(graph, uf, tags, conv_inputs, residual_nodes, float_layers, notes, module_order)


def _identity_tag(g: TracedGraph, node: fx.Node) -> str:
    m = g.module(node)
    if isinstance(m, nn.MaxPool2d) or node.target in (F.max_pool2d, torch.max_pool2d):
        return "maxpool"
    if isinstance(m, nn.Upsample) or node.target is F.interpolate:
        return "upsample"
    if node.target in (operator.getitem, torch.chunk, torch.split, torch.narrow, "chunk", "split", "narrow"):
        return "slice/chunk"
    return "reshape/transpose"


def _residual_slot(g: TracedGraph, node: fx.Node, owner: str, index: int) -> Optional[ResidualSlot]:
    operands = list(node.args[:2])
    if len(operands) != 2 or not all(isinstance(a, fx.Node) for a in operands):
        return None
    branches = [g.conv_branch(a) for a in operands]
    if (branches[0] is None) == (branches[1] is None):
        return None           # both conv branches (Lite P6) or neither: nothing to fuse
    conv_side = 0 if branches[0] is not None else 1
    suffix = "" if index == 0 else f"_{index}"
    return ResidualSlot(owner=owner, add_index=index, operand=1 - conv_side,
                        attr=f"residual_quantizer{suffix}", fusing_layer=branches[conv_side].target)


def _build_placement(graph, uf, tags, conv_inputs, residual_nodes, float_layers, notes, module_order) -> Placement:
    order = {node: i for i, node in enumerate(graph.nodes)}
    consumers: dict[fx.Node, list[str]] = defaultdict(list)
    residuals: dict[fx.Node, list[ResidualSlot]] = defaultdict(list)
    for name, inputs in conv_inputs.items():
        consumers[uf.find(inputs[0])].append(name)
    for node, slot in residual_nodes:
        residuals[uf.find(node)].append(slot)
    members: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        members[uf.find(node)].append(node)

    roots = sorted(set(consumers) | set(residuals), key=lambda r: min(order[n] for n in members[r]))
    sites = []
    for gid, root in enumerate(roots):
        readers = sorted(consumers.get(root, []), key=module_order.__getitem__)
        slots = residuals.get(root, [])
        name = f"{readers[0]}.{INPUT_QUANTIZER}" if readers else f"{slots[0].owner}.{slots[0].attr}"
        group_tags = set().union(*(tags.get(n, set()) for n in members[root]))
        sites.append(QuantSite(name=name, consumers=readers, reason=_reason(readers, slots, group_tags),
                               group=gid, tensors=[n.name for n in members[root]], residuals=slots))
    layers = sorted(conv_inputs, key=module_order.__getitem__)
    return Placement(sites=sites, layers=layers, float_layers=float_layers, notes=notes)


def _reason(readers: list[str], slots: list[ResidualSlot], group_tags: set[str]) -> str:
    parts = []
    if readers:
        parts.append("conv input" if len(readers) == 1 else f"shared by {len(readers)} convs")
    parts += sorted(group_tags)
    parts += [f"residual add (fuses into {s.fusing_layer})" for s in slots]
    return "; ".join(parts)
