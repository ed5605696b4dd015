"""A mutable view of an ONNX graph for rewrites (producers, consumers, initializers) and the Q/DQ
helpers the onnxruntime fast path (``yoloq.runtime.ort_fast``) needs."""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper


class OnnxGraph:
    """Producer / consumer maps and constant lookup over an ``onnx.GraphProto`` (kept in sync by callers)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.g = model.graph
        self._constants_to_initializers()
        self.inits = {t.name: t for t in self.g.initializer}
        self.outputs = {o.name for o in self.g.output}
        self.counter = 0
        self.refresh()

    def _constants_to_initializers(self) -> None:
        """torch.onnx emits Q/DQ scales as Constant nodes; initializers are easier to read and share."""
        keep = []
        for node in self.g.node:
            if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
                t = onnx.TensorProto()
                t.CopyFrom(node.attribute[0].t)
                t.name = node.output[0]
                self.g.initializer.append(t)
            else:
                keep.append(node)
        del self.g.node[:]
        self.g.node.extend(keep)

    def refresh(self) -> None:
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers = defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)

    def const(self, name: str) -> Optional[np.ndarray]:
        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def unique(self, base: str) -> str:
        self.counter += 1
        return f"{base}__ortfast{self.counter}"

    def add_init(self, name: str, array: np.ndarray) -> str:
        t = numpy_helper.from_array(array, name)
        self.g.initializer.append(t)
        self.inits[name] = t
        return name

    def qparams(self, q: onnx.NodeProto) -> tuple:
        """Hashable (scale bytes, zero-point bytes, dtype) of a per-tensor Q/DQ; None if not constant."""
        scale = self.const(q.input[1])
        zp = self.const(q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
        if scale is None or zp is None or scale.size != 1:
            return None
        return (scale.astype(np.float32).tobytes(), zp.tobytes(), zp.dtype.str)

    def insert_qdq(self, tensor: str, scale_name: str, zp_name: str, only_for: Optional[list] = None) -> str:
        """Q/DQ on ``tensor``; rewire ``only_for`` consumers (default all). Returns the DQ output name."""
        q_out, dq_out = self.unique(tensor + "_q"), self.unique(tensor + "_dq")
        targets = list(self.consumers[tensor]) if only_for is None else only_for
        q = helper.make_node("QuantizeLinear", [tensor, scale_name, zp_name], [q_out], name=self.unique("Q"))
        dq = helper.make_node("DequantizeLinear", [q_out, scale_name, zp_name], [dq_out], name=self.unique("DQ"))
        self.rewire(tensor, dq_out, targets)
        self.insert_after(tensor, [q, dq])
        return dq_out

    @staticmethod
    def rewire(tensor: str, new: str, nodes: Iterable) -> None:
        """Make ``nodes`` read ``new`` wherever they read ``tensor`` (call ``refresh`` afterwards)."""
        for node in nodes:
            for k, name in enumerate(node.input):
                if name == tensor:
                    node.input[k] = new

    def insert_after(self, tensor: str, nodes: list) -> None:
        """Insert ``nodes`` (in order) right after ``tensor``'s producer, which keeps the node list
        topologically sorted, and refresh the maps."""
        prod = self.producer.get(tensor)
        index = 0 if prod is None else list(self.g.node).index(prod) + 1
        for node in reversed(nodes):
            self.g.node.insert(index, node)
        self.refresh()


def dequantized_weight(g: OnnxGraph, dq: onnx.NodeProto) -> Optional[np.ndarray]:
    """float32 value of a constant weight ``DQ(Q(W))`` or ``DQ(W_int8)`` as onnxruntime computes it
    (ONNX semantics: round half to even, saturate, ``(q - zp) * scale`` in float32); None if not constant."""
    src = g.producer.get(dq.input[0])
    if src is None:
        codes = g.const(dq.input[0])                 # already integer (e.g. folded by onnxslim)
        if codes is None or codes.dtype not in (np.int8, np.uint8):
            return None
    elif src.op_type == "QuantizeLinear" and g.const(src.input[0]) is not None:
        scale, zp, axis = qdq_params(g, src)
        if scale is None or zp is None:
            return None
        w = g.const(src.input[0]).astype(np.float32)
        codes = np.round(w / along_axis(scale, w.ndim, axis)) + along_axis(zp, w.ndim, axis).astype(np.float32)
        codes = np.clip(codes, np.iinfo(zp.dtype).min, np.iinfo(zp.dtype).max).astype(zp.dtype)
    else:
        return None
    scale, zp, axis = qdq_params(g, dq)
    if scale is None or zp is None:
        return None
    centred = codes.astype(np.int32) - along_axis(zp, codes.ndim, axis).astype(np.int32)
    return centred.astype(np.float32) * along_axis(scale, codes.ndim, axis)


def qdq_params(g: OnnxGraph, node: onnx.NodeProto) -> tuple:
    """(scale as float32, zero point, axis) of a Q/DQ node; None for an input that is not a constant."""
    scale = g.const(node.input[1])
    zp = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)  # ONNX default
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    return (None if scale is None else scale.astype(np.float32), zp, axis)


def along_axis(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Per-tensor (scalar) or per-channel (1-D along ``axis``) Q/DQ parameter shaped to broadcast."""
    if values.size == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def drop_dead_nodes(g: OnnxGraph) -> None:
    """Remove nodes none of whose outputs reach a graph output (the weight Q/DQ left by step 7)."""
    live = set(g.outputs)
    keep = []
    for node in reversed(list(g.g.node)):
        if any(o in live for o in node.output):
            keep.append(node)
            live.update(i for i in node.input if i)
    del g.g.node[:]
    g.g.node.extend(reversed(keep))
    g.refresh()


def scalar_init(g: OnnxGraph, name: str) -> str:
    """``name`` if that initializer is a scalar, else a scalar copy of its single value."""
    value = g.const(name)
    if value is None or value.shape == ():
        return name
    return g.add_init(g.unique(name + "_scalar"), value.reshape(()))


def drop_unused_initializers(g: OnnxGraph) -> None:
    used = {i for n in g.g.node for i in n.input} | {o.name for o in g.g.output}
    keep = [t for t in g.g.initializer if t.name in used]
    del g.g.initializer[:]
    g.g.initializer.extend(keep)


def own_weight_zero_points(model: onnx.ModelProto) -> int:
    """Give every integer-conv weight zero point (of a weight DequantizeLinear, or a QLinearConv's
    ``w_zero_point``) its own initializer; returns how many were copied. Exporters share equal constants,
    but onnxruntime's uint8-weight conversion (``session.x64quantprecision``) adds ``<zero point>_s8_2_u8``
    once per conv and refuses to load a graph where two convs share one ("Attempt to replace the existing
    tensor")."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    taken = set(inits) | {o for n in model.graph.node for o in n.output}
    seen, copied = set(), 0
    for node in model.graph.node:
        if node.op_type == "QLinearConv" and len(node.input) > 5:
            slot = 5
        elif node.op_type == "DequantizeLinear" and len(node.input) > 2:
            src = producer.get(node.input[0])
            weight = node.input[0] in inits or (src is not None and src.op_type == "QuantizeLinear"
                                                 and src.input[0] in inits)
            if not weight:
                continue
            slot = 2
        else:
            continue
        zp = node.input[slot]
        if zp not in inits:
            continue
        if zp in seen:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[zp])
            copy.name = next(f"{zp}_own{i}" for i in range(copied, copied + len(taken) + 1) if f"{zp}_own{i}" not in taken)
            taken.add(copy.name)
            model.graph.initializer.append(copy)
            node.input[slot] = copy.name
            copied += 1
        seen.add(zp)
    return copied
