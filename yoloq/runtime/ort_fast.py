"""onnxruntime CPU INT8 fast path: rewrite a TensorRT-style Q/DQ graph so onnxruntime forms integer kernels.

Why. The TensorRT variant (``export_onnx``) quantizes conv *inputs* and weights only; TensorRT fuses
the rest. onnxruntime 1.32's QDQ transformer (``qdq_selector_action_transformer.cc``) only replaces
a Conv by ``QLinearConv`` for the exact unit ``DQ(x), DQ(w)[, DQ(b)] -> Conv -> Q`` (the Conv's only
consumer a QuantizeLinear); otherwise it runs a float Conv on dequantized tensors, which is slower
than FP32 (docs/results.md, onnxruntime CPU latency: 1.4x FP32 for YOLOv6-N/S, 1.9-2.4x for Lite).
Other units it fuses: ``DQ -> {GlobalAveragePool, AveragePool, LeakyRelu, Sigmoid, Softmax} -> Q``
(QLinear* with lookup tables), ``DQ,DQ -> {Add, Mul} -> Q``,
``DQ.. -> Concat -> Q`` (QLinearConcat), and it drops Q/DQ around MaxPool, Resize, Reshape,
Transpose, Slice, ... when scales match. ``Relu -> Q`` is folded only when the Q's zero point is the
type minimum (uint8 0 / int8 -128) — never for our symmetric int8 (zero point 0) quantizers — and
nothing handles HardSwish / HardSigmoid·x / SiLU. On x86 it converts int8 activation Q/DQ pairs
to uint8 with zero point + 128 (exact) to use the U8S8 kernels, but not every site (step 6).

What :func:`make_ort_fast` changes (in this order), and what each costs in accuracy:

1. **Q pushed up through data-movement ops** (exact): ``X -> {Concat, MaxPool, Resize(nearest),
   Reshape, Transpose, Flatten, Squeeze, Unsqueeze} -> Q(s)`` gets ``Q(s)/DQ`` on the op's data
   inputs too, since ``Q(op(x)) == op(Q(x))`` for these ops with one scale (positive scale). Concat
   inputs then read DQ and the Concat becomes QLinearConcat, MaxPool/Resize run on 8-bit data.
2. **Conv -> Q** already fused: left as is.
3. **Conv -> Relu -> Q(s, zp)** becomes ``Conv -> Q(s, zp) -> Clip(min=zp)``: onnxruntime forms
   ``QLinearConv`` and applies the ReLU to the 8-bit codes. Exact: ``Q(relu(y)) == max(Q(y), zp)``
   (Q is monotone, Q(0) = zp), the consumer's own scale. (An earlier form, ``Q/DQ -> LeakyRelu(0) ->
   Q``, gave ``QLinearLeakyRelu``, a 256-entry lookup per value, which the 8-bit Clip is much cheaper
   than.)
4. **Conv -> HardSwish / SiLU (``y * gate(y)``) -> Q(s)**: a *new* pre-activation ``Q/DQ`` on the conv
   output on the consumer's grid (scale ``s``; zero point <= 0 shifted to cover the calibrated
   minimum when ``calib_images`` are given). onnxruntime then runs QLinearConv and the activation in
   float between DQ and Q. NOT exact: for |y| < 3 the activation is applied to ``y`` rounded to the
   grid, then rounded again, so a share of the consumer's codes move by one step; what that costs in
   mAP is the "fast" column of docs/results.md's onnxruntime table (Deployment). ``pre_act="minmax"``
   / ``"symmetric"`` (the conv output's own calibrated range) lost more than the consumer's grid.
5. Convs whose output is not self-gated (SE input read by GlobalAveragePool + Mul, SE gate conv,
   residual add) stay float by default (``other="float"``: exact; clipping them on a consumer's
   grid is wrong because ``y * gate`` may be far smaller than ``y``); ``other="minmax"`` gives them a
   min/max Q/DQ. Convs reaching no quantizer (head prediction convs -> DFL / decode) stay float.
6. Activation Q/DQ int8 -> uint8 with zero point + 128 (exact); see :func:`_activations_to_uint8`.
7. **Float convs get their dequantized weights as constants** (exact): a conv that will not become a
   ``QLinearConv`` reads ``DQ(Q(W))`` — onnxruntime keeps weight DQs out of constant folding (for its
   QDQ fusions), so it re-dequantized every such weight on every run and used the slow unpacked conv
   path. ``DQ(Q(W))`` is computed once at export (the same float32 values: ``(round(W/s) - zp) * s``)
   and the conv gets prepacked weights, blocked layout and its activation fused. Measured (with
   step 3's Clip): YOLOv6Lite-S exact variant 2.4-2.6x -> 1.7-2.0x FP32, YOLOv6-N exact 0.50x -> 0.42x.
   Those convs also keep a float bias (onnxruntime's int32 bias rounding only applies to convs with
   DQ weights).

**Integer kernels on x86 CPUs without VNNI.** onnxruntime's uint8 x int8 kernels there (AVX2, or AVX-512
without VNNI) add each pair of products into int16 with saturation, so a ``QLinearConv`` reading large codes
with large weights is not exact: a plain onnxruntime session changed 96,580 of the tiny test net's 98,304
outputs. yoloq's sessions (``yoloq.runtime.ort.ort_session``) set ``session.x64quantprecision`` on exactly
those CPUs (``u8s8_saturates``): onnxruntime then runs such weights as uint8 with its exact uint8 x uint8
kernels, and every rule above keeps its accuracy on every CPU. Anyone running these files in their own
onnxruntime session on such a CPU must set that entry too (the files give each weight its own zero-point
initializer, which onnxruntime's conversion needs to load them).

Measured alternatives that do not help on onnxruntime 1.32 CPU (x86, AVX512-VNNI, 2 threads):
ConvInteger (int32 out) + Cast/Mul/Add float requantization keeps numerics exact but ran 8x slower
than FP32 on Lite-S; a 256-entry Gather lookup for HardSwish was slower than DQ/HardSigmoid/Mul/Q.
For HardSwish networks (YOLOv6-Lite) the fast path is therefore neither faster than FP32 nor
faithful; for ReLU networks (YOLOv6 RepVGG) rules 1-3 and 6 are exact and only the SiLU head stems
take rule 4.

``make_ort_fast(...) -> OrtFastInfo`` with counts per rule, the calibrated sites and notes; the
output is written atomically and passes ``onnx.checker``.
"""
from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import onnx
from onnx import helper

from yoloq.errors import YoloqError
from yoloq.runtime.ort import ort_session
from yoloq.io import atomic_write_bytes
from yoloq.quant.scheme import QMAX
from yoloq.runtime.onnx_export import set_variant
from yoloq.runtime.onnx_graph import (OnnxGraph, dequantized_weight, drop_dead_nodes, drop_unused_initializers,
                                     own_weight_zero_points, scalar_init)


# Ops with Q(op(x)) == op(Q(x)) for one positive scale: pure data movement, or monotone selection.
PASS_THROUGH = {"Concat", "MaxPool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"}
# How far (in float ops) a conv output may travel to a Q to count as "feeding a quantized consumer".
REACH_DEPTH = 4


class OrtFastError(YoloqError, ValueError):
    """The input is not a usable TensorRT-style Q/DQ ONNX file; the message names the file."""


@dataclass
class OrtFastInfo:
    path: str
    n_conv: int = 0
    already_fused: int = 0              # conv -> Q in the input graph
    relu_exact: int = 0                 # conv -> Relu -> Q, rewritten exactly
    pre_activation: int = 0             # new pre-activation Q/DQ (step 4)
    left_float: list = field(default_factory=list)   # conv names kept float (head outputs, skipped layers)
    propagated: int = 0                 # Q/DQ pairs pushed up through data-movement ops
    uint8: int = 0                      # activation Q/DQ nodes switched to uint8 (zero point + 128)
    folded_weights: int = 0             # float convs given their dequantized weights as constants (step 7)
    ranges: dict = field(default_factory=dict)       # tensor -> (min, max) of calibrated sites
    notes: list = field(default_factory=list)


# --------------------------------------------------------------------------- graph helpers
def _quantized_conv(g: OnnxGraph, conv: onnx.NodeProto) -> bool:
    """A Conv reading a DQ activation and DQ weights (an onnxruntime QLinearConv candidate)."""
    if len(conv.input) < 2:
        return False
    x, w = (g.producer.get(conv.input[0]), g.producer.get(conv.input[1]))
    return (x is not None and x.op_type == "DequantizeLinear" and w is not None
            and w.op_type == "DequantizeLinear")


def _all_q_same(g: OnnxGraph, nodes: list) -> Optional[tuple]:
    """Common qparams when every node is a QuantizeLinear with identical per-tensor scale and zero point."""
    if not nodes or any(n.op_type != "QuantizeLinear" for n in nodes):
        return None
    params = {g.qparams(n) for n in nodes}
    return params.pop() if len(params) == 1 and None not in params else None


def _reached_q_scales(g: OnnxGraph, tensor: str, depth: int = REACH_DEPTH) -> list:
    """Scales of the per-tensor QuantizeLinear nodes that ``tensor`` feeds within ``depth`` float ops
    (empty: it reaches no quantized consumer, e.g. a head prediction conv feeding decode)."""
    if depth < 0:
        return []
    found = []
    for node in g.consumers[tensor]:
        if node.op_type == "QuantizeLinear":
            scale = g.const(node.input[1])
            if scale is not None and scale.size == 1:
                found.append(float(scale))
        elif node.op_type != "Shape":
            for out in node.output:
                found += _reached_q_scales(g, out, depth - 1)
    return found


# --------------------------------------------------------------------------- passes
def _propagate_q_up(g: OnnxGraph) -> int:
    """Step 1: copy a Q/DQ pair from a pass-through op's output to its data inputs (exact)."""
    inserted, changed = 0, True
    while changed:
        changed = False
        for op in list(g.g.node):
            if op.op_type not in PASS_THROUGH or len(op.output) != 1 or op.output[0] in g.outputs:
                continue
            if op.op_type == "Resize" and not _nearest(op):
                continue
            qs = g.consumers[op.output[0]]
            params = _all_q_same(g, qs)
            if params is None:
                continue
            data_inputs = list(op.input) if op.op_type == "Concat" else [op.input[0]]
            for tensor in data_inputs:
                prod = g.producer.get(tensor)
                if prod is not None and prod.op_type == "DequantizeLinear" and g.qparams(prod) == params:
                    continue                         # already reads the same quantized values
                if tensor in g.inits or prod is None:
                    continue                         # constant or graph input: leave to the consumer
                g.insert_qdq(tensor, qs[0].input[1], qs[0].input[2], only_for=[op])
                inserted += 1
                changed = True
    return inserted


def _activations_to_uint8(g: OnnxGraph) -> int:
    """Step 6: int8 activation Q/DQ -> uint8 with zero point + 128 (exact: same grid, shifted codes).

    onnxruntime's own QDQS8ToU8 pass does this only for a Q feeding exactly one DQ, and it runs after
    the pass that duplicates shared DQs, so shared sites stayed int8 next to uint8 ones and the
    QLinearConv selector (same input/output type, uint8 on x86) rejected them. Weights stay int8 (U8S8)."""
    weight_q = {n.output[0] for n in g.g.node if n.op_type == "QuantizeLinear" and n.input[0] in g.inits}
    converted, done, retyped = 0, {}, set()
    for node in g.g.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        if node.input[0] in g.inits or node.input[0] in weight_q:
            continue                                   # weights (int8 per-channel) stay as they are
        zp = g.const(node.input[2])
        if zp is None or zp.dtype != np.int8 or zp.size != 1:
            continue
        name = node.input[2]
        if name not in done:
            done[name] = g.add_init(g.unique(name + "_u8"), (zp.astype(np.int16) + 128).astype(np.uint8))
        node.input[2] = done[name]
        if node.op_type == "QuantizeLinear":
            retyped.add(node.output[0])
        converted += 1
    for node in g.g.node:                              # step 3's ReLU on codes: min = the zero point
        if node.op_type == "Clip" and len(node.input) > 1 and node.input[1] in done:
            node.input[1] = done[node.input[1]]
    # Shape inference (onnxslim) may have recorded the old int8 type of those Q outputs.
    keep = [v for v in g.g.value_info if v.name not in retyped]
    del g.g.value_info[:]
    g.g.value_info.extend(keep)
    return converted


def _becomes_qlinear_conv(g: OnnxGraph, conv: onnx.NodeProto) -> bool:
    """onnxruntime's QLinearConv unit: DQ input, DQ weight, the conv's only consumer a QuantizeLinear."""
    users = g.consumers[conv.output[0]]
    return _quantized_conv(g, conv) and len(users) == 1 and users[0].op_type == "QuantizeLinear"


def _fold_float_weights(g: OnnxGraph) -> int:
    """Step 7: convs that stay float read their dequantized weights as a constant (exact)."""
    folded = 0
    for conv in [n for n in g.g.node if n.op_type == "Conv" and len(n.input) > 1]:
        dq = g.producer.get(conv.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or _becomes_qlinear_conv(g, conv):
            continue
        weight = dequantized_weight(g, dq)
        if weight is None:
            continue
        conv.input[1] = g.add_init(g.unique(conv.input[1] + "_dequantized"), weight)
        folded += 1
    drop_dead_nodes(g)
    return folded


def _nearest(node: onnx.NodeProto) -> bool:
    mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
    return mode == "nearest"


def _classify_convs(g: OnnxGraph, info: OrtFastInfo, other: str = "float") -> list:
    """Steps 2, 3 and 5; returns the conv outputs that need a calibrated pre-activation Q/DQ (step 4)."""
    pending = []
    for conv in [n for n in g.g.node if n.op_type == "Conv"]:
        y = conv.output[0]
        info.n_conv += 1
        users = g.consumers[y]
        if not _quantized_conv(g, conv) or y in g.outputs:
            info.left_float.append(conv.name)
            continue
        if _becomes_qlinear_conv(g, conv):
            info.already_fused += 1
            continue
        if len(users) == 1 and users[0].op_type == "Relu" and users[0].output[0] not in g.outputs:
            relu = users[0]
            qs = g.consumers[relu.output[0]]
            if (_all_q_same(g, qs) is not None and len(qs[0].input) > 2 and qs[0].input[2]
                    and not any(q.output[0] in g.outputs for q in qs)):
                _relu_on_codes(g, y, relu, qs)
                info.relu_exact += 1
                continue
        scales = _reached_q_scales(g, y)
        if scales and (_self_gated(g, y) or other == "minmax"):
            pending.append((conv.name, y, max(scales) if _self_gated(g, y) else None))
        else:
            info.left_float.append(conv.name)
    return pending


def _relu_on_codes(g: OnnxGraph, y: str, relu: onnx.NodeProto, qs: list) -> None:
    """Step 3: ``Conv -> Relu -> Q(s, zp)`` becomes ``Conv -> Q(s, zp) -> Clip(min=zp)``, the ReLU applied
    to the 8-bit codes. Exact: Q is monotone with Q(0) = zp, so Q(relu(y)) = max(Q(y), zp), and Q's own
    saturation gives the top. Every consumer of the old Q(s) (all with the same parameters) reads the
    clipped codes."""
    scale, zp = qs[0].input[1], scalar_init(g, qs[0].input[2])     # Clip's min must be a scalar
    q_out, codes = g.unique(y + "_q"), g.unique(y + "_relu_codes")
    q = helper.make_node("QuantizeLinear", [y, scale, zp], [q_out], name=g.unique("Q"))
    clip = helper.make_node("Clip", [q_out, zp], [codes], name=g.unique("ReluOnCodes"))
    for old_q in qs:
        g.rewire(old_q.output[0], codes, g.consumers[old_q.output[0]])
    for node in [relu, *qs]:
        g.g.node.remove(node)
    g.insert_after(y, [q, clip])


def _self_gated(g: OnnxGraph, y: str) -> bool:
    """``y * gate(y)`` (HardSwish = x·HardSigmoid(x), SiLU = x·Sigmoid(x)) or a HardSwish node: large
    values pass unchanged, so clipping ``y`` at the consumer's range is what the consumer does anyway."""
    users = g.consumers[y]
    if len(users) == 1 and users[0].op_type == "HardSwish":
        return True
    if len(users) != 2:
        return False
    gate = next((u for u in users if u.op_type in ("HardSigmoid", "Sigmoid")), None)
    mul = next((u for u in users if u.op_type == "Mul"), None)
    return gate is not None and mul is not None and set(mul.input) == {y, gate.output[0]}


def calibrate_ranges(model: onnx.ModelProto, tensors: list, calib_images: Iterable) -> dict:
    """Min / max of ``tensors`` over ``calib_images`` ([B,3,S,S] tensors or arrays, or (images, meta)
    batches as from ``calibration_loader``), running ``model`` with onnxruntime (CPU)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    for name in tensors:
        if name not in present:
            m.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort_session(m.SerializeToString(), level="basic")      # the graph as written (float biases)
    input_name = sess.get_inputs()[0].name
    lo = {t: np.inf for t in tensors}
    hi = {t: -np.inf for t in tensors}
    n = 0
    for batch in calib_images:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
        for i in range(x.shape[0]):      # one by one: the exported batch may be fixed at 1
            outs = sess.run(tensors, {input_name: x[i:i + 1].astype(np.float32)})
            for t, v in zip(tensors, outs):
                lo[t] = min(lo[t], float(v.min()))
                hi[t] = max(hi[t], float(v.max()))
            n += 1
    if n == 0:
        raise ValueError("calibrate_ranges: calib_images yielded no image")
    return {t: (lo[t], hi[t]) for t in tensors}


def qparams_for_range(lo: float, hi: float, mode: str = "minmax") -> tuple[np.float32, np.int8]:
    """int8 scale and zero point covering [lo, hi] (always including 0, as ONNX requires)."""
    if mode not in ("minmax", "symmetric"):
        raise ValueError(f"mode must be 'minmax' or 'symmetric', got {mode!r}")
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if mode == "symmetric":
        return np.float32(max(abs(lo), abs(hi), 1e-8) / QMAX), np.int8(0)
    scale = max(hi - lo, 1e-8) / 255.0
    return np.float32(scale), np.int8(np.clip(np.round(-128 - lo / scale), -128, 127))


def consumer_qparams(scale: float, lo: Optional[float] = None) -> tuple[np.float32, np.int8]:
    """Pre-activation Q on the consumer's grid: ``scale`` of the quantizer the activation feeds, zero
    point <= 0 shifting the int8 range up just enough to cover the calibrated minimum ``lo`` (codes
    -128..127 map to (-128-zp)*s .. (127-zp)*s, so the top always reaches the consumer's own clip
    at 127*s). Without ``lo``: zero point 0."""
    zp = 0 if lo is None or lo >= 0 else int(np.clip(np.ceil(-128 - lo / scale), -128, 0))
    return np.float32(scale), np.int8(zp)


def _insert_pre_activation(g: OnnxGraph, pending: list, ranges: Optional[dict], mode: str) -> None:
    for _, tensor, consumer_scale in pending:
        if mode == "consumer" and consumer_scale is not None:
            scale, zp = consumer_qparams(consumer_scale, None if ranges is None else ranges[tensor][0])
        else:
            scale, zp = qparams_for_range(*ranges[tensor], mode="symmetric" if mode == "symmetric" else "minmax")
        s_name = g.add_init(g.unique(tensor + "_scale"), np.array(scale, np.float32))
        z_name = g.add_init(g.unique(tensor + "_zp"), np.array(zp, np.int8))
        g.insert_qdq(tensor, s_name, z_name)


# --------------------------------------------------------------------------- API
def load_qdq_model(path: str | os.PathLike) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise OrtFastError(f"{path}: file not found (expected a TensorRT-variant Q/DQ ONNX from export_onnx)")
    try:
        model = onnx.load(str(path))
    except Exception as err:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise OrtFastError(f"{path}: not a readable ONNX file ({err})") from err
    ops = {n.op_type for n in model.graph.node}
    if "QuantizeLinear" not in ops or "DequantizeLinear" not in ops:
        raise OrtFastError(f"{path}: no QuantizeLinear/DequantizeLinear nodes — this is not a Q/DQ (INT8) "
                           "export; make one with yoloq export --variant ort from a quantized checkpoint")
    if len(model.graph.input) != 1:
        raise OrtFastError(f"{path}: expected one image input, found {[i.name for i in model.graph.input]}")
    return model


PRE_ACT_MODES = ("consumer", "minmax", "symmetric", "float")   # float: leave those convs float (exact)


def make_ort_fast(trt_onnx_path: str | os.PathLike, out_path: str | os.PathLike, calib_images: Optional[Iterable] = None,
                  *, pre_act: str = "consumer", other: str = "float", propagate: bool = True,
                  uint8: bool = True, fold_weights: bool = True) -> OrtFastInfo:
    """Rewrite the TensorRT-variant Q/DQ ONNX at ``trt_onnx_path`` into the onnxruntime fast-path variant
    at ``out_path`` (see the module docstring for the rules and their cost).

    ``calib_images``: train images ([B,3,S,S] in [0,1], or ``(images, meta)`` batches) measuring the
    pre-activation ranges: optional for ``pre_act="consumer"`` (they only set the zero point),
    required for ``"minmax"`` / ``"symmetric"`` (range from min/max; coarse, for comparison).
    ``pre_act="float"`` skips step 4 (those convs stay float): every rewrite is then exact."""
    if pre_act not in PRE_ACT_MODES:
        raise ValueError(f"pre_act must be one of {PRE_ACT_MODES}, got {pre_act!r}")
    model = load_qdq_model(trt_onnx_path)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)                # calibration runs the unmodified (fake-quant equivalent) graph
    g = OnnxGraph(model)
    info = OrtFastInfo(path=str(out_path))
    if propagate:
        info.propagated = _propagate_q_up(g)
    if other not in ("float", "minmax"):
        raise ValueError(f"other must be 'float' or 'minmax', got {other!r}")
    pending = _classify_convs(g, info, other)
    if pre_act == "float":                   # exact variant: convs before HardSwish / SiLU keep float
        info.left_float.extend(name for name, _, _ in pending)
        info.notes.append(f"{len(pending)} convs before HardSwish/SiLU left float (pre_act='float': exact)")
        pending = []
    if pending and calib_images is None and (pre_act != "consumer" or other == "minmax"):
        raise ValueError(f"pre_act={pre_act!r} / other={other!r} need calib_images (train images) to measure ranges")
    if pending:
        if calib_images is not None:
            info.ranges = calibrate_ranges(reference, [p[1] for p in pending], calib_images)
        _insert_pre_activation(g, pending, info.ranges or None, pre_act)
        info.pre_activation = len(pending)
        how = ("on the consumer quantizer's scale" + (", zero point from calibrated minimum" if info.ranges else ", zero point 0")
               if pre_act == "consumer" else f"{pre_act} range from calibrated min/max")
        info.notes.append(f"{len(pending)} pre-activation Q/DQ {how} (the only inexact rewrite)")
    if uint8:
        info.uint8 = _activations_to_uint8(g)
    if fold_weights:
        info.folded_weights = _fold_float_weights(g)
    drop_unused_initializers(g)
    own_weight_zero_points(model)        # loadable with session.x64quantprecision (CPUs without VNNI)
    set_variant(model, "ort-exact" if pre_act == "float" else "ort-fast")
    onnx.checker.check_model(model)
    atomic_write_bytes(Path(out_path), model.SerializeToString())
    return info


def optimized_op_counts(path: str | os.PathLike, threads: int = 1, quantize_bias: bool = True) -> dict:
    """Op-type counts of the graph onnxruntime actually runs (ORT_ENABLE_ALL, CPU), e.g. to check that
    QLinearConv nodes were formed (they need ``quantize_bias``; see ``yoloq.runtime.ort``)."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort_session(path, threads, quantize_bias=quantize_bias, optimized_path=str(optimized))
        counts: dict = defaultdict(int)
        for node in onnx.load(str(optimized)).graph.node:
            counts[node.op_type] += 1
    return dict(counts)
