"""ONNX export of a quantized (or FP32) yoloq model with QuantizeLinear/DequantizeLinear.

``export_onnx(model_or_ckpt, path, img_size=...)`` deep-copies the prepared model, replaces every
quantizer (pytorch-quantization ``TensorQuantizer``, PACT, LSQ+ activation / weight) by an
:class:`ExportQDQ` built from its :class:`~yoloq.quant.scheme.QDQSpec`, and traces it with the
TorchScript exporter. ``torch.fake_quantize_per_{tensor,channel}_affine`` with the int8 range
-128..127 exports as one QuantizeLinear + DequantizeLinear pair, so the graph is TensorRT's
explicit-quantization form:

- conv inputs: per-tensor Q/DQ, scale = amax / 127, zero point 0; shared quantizer objects stay one
  ``ExportQDQ`` object, so every use reads the same scale initializer (concat inputs are equal);
- conv weights: per-channel Q/DQ on the weight initializer (axis 0; ConvTranspose axis 1);
- skipped layers and DFL / head parts that ``prepare`` left in float: no Q/DQ;
- LSQ+ offset quantizers: ``offset_mode="subadd"`` -> Sub(b) -> Q/DQ(zp 0) -> Add(b) (TensorRT; the
  Sub/Add cost one elementwise op each, TensorRT cannot take a zero point) or
  ``"zero_point"`` -> Q/DQ with the int8 zero point -round(beta/s) (onnxruntime).

Exactness: the exported graph computes what the fake-quant model computes. Activation quantizers
use the int8 levels -128..127 in PyTorch too (``prepare.activation_descriptor``, PACT, LSQ+), as
QuantizeLinear and TensorRT do. Weights are fake-quantized on -127..127 with round(w * (127 / amax));
QuantizeLinear computes round(w / scale), which picks the other level at a rounding tie, so the
exporter stores the fake-quantized weight (``_snap_weight``): it re-quantizes to the same levels.
The remaining difference is float rounding of x * (127 / amax) vs x / scale on activations (one
ulp, a level flip only on an exact tie). Runtimes may still change the numbers: onnxruntime's
``WeightBiasQuantization`` rounds conv biases to int32 (``yoloq.runtime.ort.ort_session``).

End-to-end NMS (optional): ``nms="trt"`` appends TensorRT's ``EfficientNMS_TRT`` plugin node
(outputs num_dets, det_boxes, det_scores, det_classes); ``nms="onnx"`` appends ONNX
``NonMaxSuppression`` (per-class, multi-label) so onnxruntime runs it, output ``detections``
[M, 7] = (batch index, x1, y1, x2, y2, score, class).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from yoloq.errors import YoloqError
from yoloq.quant.learnable import LSQActQuantizer
from yoloq.quant import backend
from yoloq.quant.scheme import ACT_RANGE, QDQSpec, TensorQuantizer, export_spec
from yoloq.quant.state import Slot, has_quant_state, quant_state, quantizer_slots, replace_quantizers
from yoloq.config import NMSKind, choices
from yoloq.io import atomic_write_bytes

INT8_MIN, INT8_MAX = ACT_RANGE          # QuantizeLinear's int8 range
OFFSET_MODES = ("subadd", "zero_point")
NMS_KINDS = choices(NMSKind)
INPUT_NAME = "images"
OUTPUT_NAME = "outputs"
SLIM_SKIP = ["FusionConvMul"]


class ExportError(YoloqError, ValueError):
    """The model or checkpoint cannot be exported; the message names the file / quantizer."""


@dataclass
class ExportInfo:
    path: str
    n_quantize: int
    n_dequantize: int
    input_name: str
    output_names: list[str]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- export modules


class ExportQDQ(nn.Module):
    """One quantizer in deploy form: y = DQ(Q(x - offset; scale, zp)) + offset, int8 -128..127."""

    def __init__(self, spec: QDQSpec, offset_mode: str = "subadd"):
        super().__init__()
        scale = spec.scale.detach().float().cpu()
        self.axis = spec.axis
        if self.axis is None:
            scale = scale.reshape(())
            zp = torch.zeros((), dtype=torch.int32)
        else:
            scale = scale.flatten()
            zp = torch.zeros(scale.shape, dtype=torch.int32)
        offset = spec.offset
        if spec.zero_point is not None and self.axis is None:
            zp = spec.zero_point.detach().to(torch.int32).reshape(())
        if offset_mode == "zero_point" and offset is not None:
            # offset = s * z with integer z (LSQ+ rounds it): the same Q/DQ as zero point -z
            zp = -torch.round(offset.detach().float().cpu().reshape(()) / scale).to(torch.int32)
            offset = None
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zp)
        self.register_buffer("offset", None if offset is None else offset.detach().float().cpu().reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset is not None:
            x = x - self.offset
        if self.axis is None:
            y = torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, INT8_MIN, INT8_MAX)
        else:
            y = torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis,
                                                       INT8_MIN, INT8_MAX)
        if self.offset is not None:
            y = y + self.offset
        return y


def _quantizer_names(model: nn.Module) -> dict[int, str]:
    """id(quantizer) -> how error messages name it: its site, else its first module path."""
    names = {k: f"site '{v}'" for k, v in quant_state(model).site_names().items()} if has_quant_state(model) else {}
    for slot in quantizer_slots(model):
        names.setdefault(id(slot.quantizer), f"'{slot.path}'")
    return names


def _spec_of(q: nn.Module, where: str, offset_mode: str) -> Optional[QDQSpec]:
    """QDQSpec of an enabled quantizer, None for a disabled one; ExportError if uncalibrated."""
    if isinstance(q, TensorQuantizer):
        if not backend.is_enabled(q):
            return None
        if backend.get_amax(q) is None:
            raise ExportError(f"quantizer {where} has no amax: the model is not calibrated")
    elif not getattr(q, "enabled", True):
        return None
    try:
        if isinstance(q, LSQActQuantizer):
            return q.export_spec(zero_point=offset_mode == "zero_point")
        return export_spec(q)
    except ValueError as err:
        raise ExportError(f"quantizer {where}: {err}") from err


@torch.no_grad()
def _snap_weight(conv: nn.Module, quantizer: nn.Module) -> None:
    """Replace the (constant) weight by its fake-quantized value, so that ONNX re-quantizes it to
    exactly the integer levels the PyTorch model used. Two things would differ otherwise:
    pytorch-quantization computes round(w * (127 / amax)) while QuantizeLinear computes
    round(w / scale) -- at a rounding tie (QAT leaves many weights oscillating right there) the two
    pick different levels; and weights are fake-quantized on the narrow range -127..127 while
    QuantizeLinear has a -128 level. w' = k * amax / 127 re-quantizes to k with no tie."""
    w = conv.weight
    w.copy_(quantizer(w))


def to_export_model(model: nn.Module, offset_mode: str = "subadd", fp32: bool = False) -> nn.Module:
    """Deep copy of a prepared model with every quantizer replaced by ``ExportQDQ`` (``fp32``: by
    Identity). Shared quantizer objects map to one shared export module."""
    if offset_mode not in OFFSET_MODES:
        raise ExportError(f"offset_mode must be one of {OFFSET_MODES}, got '{offset_mode}'")
    model = copy.deepcopy(model).cpu().eval()
    names = _quantizer_names(model)

    def make(q: nn.Module, slot: Slot) -> nn.Module:
        spec = None if fp32 else _spec_of(q, names.get(id(q), f"'{slot.path}'"), offset_mode)
        if spec is not None and slot.is_weight:
            _snap_weight(slot.holder, q)
        return nn.Identity() if spec is None else ExportQDQ(spec, offset_mode)

    replace_quantizers(model, make)
    return model


class HalfPrecision(nn.Module):
    """The network in FP16 between an FP32 input and output (the form ModelOpt AutoCast writes with
    ``keep_io_types``): the graph TensorRT 11, which builds strongly typed and has no FP16 flag,
    turns into an FP16 engine. The box decode stays FP32 (pixel coordinates up to 640 would keep
    only 0.25-0.5 px steps in FP16). Callers feed and read FP32 as with the FP32 export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        from yoloq.models.detector import Decode
        self.model = model.half()
        for module in self.model.modules():
            if isinstance(module, Decode):
                module.register_forward_pre_hook(lambda _, args: _cast_floats(args, torch.float32))

    def forward(self, x):
        return self.model(x.half()).float()


def _cast_floats(value, dtype: torch.dtype):
    """``value`` with every floating-point tensor in it (nested lists / tuples) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


# --------------------------------------------------------------------------- input checks


def _resolve_model(model_or_ckpt) -> tuple[nn.Module, str]:
    if isinstance(model_or_ckpt, nn.Module):
        return model_or_ckpt, "model"
    from yoloq.quant.checkpoint import QuantCheckpointError, load_quantized
    path = Path(model_or_ckpt)
    try:
        model, _ = load_quantized(path)
    except QuantCheckpointError as err:
        raise ExportError(str(err)) from err
    return model, str(path)


def _check_quantized(model: nn.Module, where: str, fp32: bool, offset_mode: str) -> None:
    if fp32 and not has_quant_state(model):
        return                                  # a plain FP32 model: exported as the float graph
    if not has_quant_state(model):
        raise ExportError(f"{where}: not a quantized model (no quantizer placement; run yoloq.quant.prepare "
                          f"and calibrate, or pass a quantized checkpoint from yoloq ptq / yoloq qat)")
    if fp32:
        return
    names = _quantizer_names(model)
    enabled = [q for q in {id(s.quantizer): s.quantizer for s in quantizer_slots(model)}.values()
               if _spec_of(q, f"{names[id(q)]} of {where}", offset_mode) is not None]
    if not enabled:
        raise ExportError(f"{where}: no enabled, calibrated quantizer (nothing to export as Q/DQ; "
                          f"use fp32=True for a float graph)")


# --------------------------------------------------------------------------- graph helpers


def count_qdq(model) -> tuple[int, int]:
    """(QuantizeLinear count, DequantizeLinear count) of an ``onnx.ModelProto``."""
    ops = [n.op_type for n in model.graph.node]
    return ops.count("QuantizeLinear"), ops.count("DequantizeLinear")


def _simplify(model, notes: list[str]):
    try:
        import onnxslim
    except ImportError:
        notes.append("onnxslim not installed: graph not simplified")
        return model
    before = count_qdq(model)
    try:
        # Conv -> Mul folding would have to re-quantize a DequantizeLinear weight (onnxslim crashes
        # on one); the per-channel input-scaling Mul of yoloq.quant.channel_scale stays as written
        slim = onnxslim.slim(copy.deepcopy(model), skip_fusion_patterns=SLIM_SKIP)
    except Exception as err:  # noqa: BLE001 - onnxslim raises assorted errors; the raw graph is still valid
        msg = f"onnxslim failed ({type(err).__name__}: {str(err)[:200]}); kept the unsimplified graph"
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
        return model
    after = count_qdq(slim)
    if after != before:
        msg = f"onnxslim changed the Q/DQ count {before} -> {after}; kept the unsimplified graph"
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
        return model
    notes.append(f"simplified with onnxslim {onnxslim.__version__}: {len(model.graph.node)} -> "
                 f"{len(slim.graph.node)} nodes, Q/DQ kept")
    return slim


def _const(name: str, array):
    from onnx import numpy_helper
    return numpy_helper.from_array(array, name)


def _split_boxes_scores(graph, output: str) -> tuple[str, str]:
    """Slice [B,N,4+nc] into boxes [B,N,4] and scores [B,N,nc] nodes appended to ``graph``."""
    import numpy as np
    from onnx import helper
    graph.initializer.extend([_const("nms_axis", np.array([2], np.int64)),
                              _const("nms_zero", np.array([0], np.int64)),
                              _const("nms_four", np.array([4], np.int64)),
                              _const("nms_end", np.array([np.iinfo(np.int64).max], np.int64))])
    graph.node.extend([
        helper.make_node("Slice", [output, "nms_zero", "nms_four", "nms_axis"], ["nms_boxes"], name="nms_boxes"),
        helper.make_node("Slice", [output, "nms_four", "nms_end", "nms_axis"], ["nms_scores"], name="nms_scores"),
    ])
    return "nms_boxes", "nms_scores"


def append_trt_nms(model, batch, score_threshold: float, iou_threshold: float, max_det: int):
    """Replace the output by TensorRT's EfficientNMS_TRT plugin (TensorRT's documented attributes)."""
    from onnx import TensorProto, helper
    graph = model.graph
    out = graph.output[0].name
    boxes, scores = _split_boxes_scores(graph, out)
    graph.node.append(helper.make_node(
        "EfficientNMS_TRT", [boxes, scores], ["num_dets", "det_boxes", "det_scores", "det_classes"],
        name="EfficientNMS_TRT", domain="TRT", plugin_version="1", background_class=-1,
        max_output_boxes=int(max_det), score_threshold=float(score_threshold),
        iou_threshold=float(iou_threshold), score_activation=0, box_coding=0))
    b = batch if batch is not None else "batch"
    del graph.output[:]
    graph.output.extend([
        helper.make_tensor_value_info("num_dets", TensorProto.INT32, [b, 1]),
        helper.make_tensor_value_info("det_boxes", TensorProto.FLOAT, [b, max_det, 4]),
        helper.make_tensor_value_info("det_scores", TensorProto.FLOAT, [b, max_det]),
        helper.make_tensor_value_info("det_classes", TensorProto.INT32, [b, max_det]),
    ])
    model.opset_import.append(helper.make_opsetid("TRT", 1))
    return model


def append_onnx_nms(model, score_threshold: float, iou_threshold: float, max_det: int):
    """Replace the output by ONNX NonMaxSuppression (per class) -> ``detections`` [M, 7] rows of
    (batch index, x1, y1, x2, y2, score, class). ``max_det`` caps boxes per class and image."""
    import numpy as np
    from onnx import TensorProto, helper
    graph = model.graph
    out = graph.output[0].name
    boxes, scores = _split_boxes_scores(graph, out)
    graph.initializer.extend([
        _const("nms_max_per_class", np.array([max_det], np.int64)),
        _const("nms_iou", np.array([iou_threshold], np.float32)),
        _const("nms_score", np.array([score_threshold], np.float32)),
        _const("nms_col0", np.array([0], np.int64)), _const("nms_col1", np.array([1], np.int64)),
        _const("nms_col2", np.array([2], np.int64)), _const("nms_col3", np.array([3], np.int64)),
        _const("nms_one", np.array([1], np.int64)),
    ])
    n = helper.make_node
    graph.node.extend([
        n("Transpose", [scores], ["nms_scores_bcn"], perm=[0, 2, 1], name="nms_scores_bcn"),
        n("NonMaxSuppression", [boxes, "nms_scores_bcn", "nms_max_per_class", "nms_iou", "nms_score"],
          ["nms_selected"], center_point_box=0, name="NonMaxSuppression"),
        # selected rows are (batch, class, box): gather boxes [M,4] and scores [M]
        n("Slice", ["nms_selected", "nms_col0", "nms_col1", "nms_one"], ["nms_b"], name="nms_b"),
        n("Slice", ["nms_selected", "nms_col1", "nms_col2", "nms_one"], ["nms_c"], name="nms_c"),
        n("Slice", ["nms_selected", "nms_col2", "nms_col3", "nms_one"], ["nms_i"], name="nms_i"),
        n("Concat", ["nms_b", "nms_i"], ["nms_bi"], axis=1, name="nms_bi"),
        n("GatherND", [boxes, "nms_bi"], ["nms_sel_boxes"], name="nms_sel_boxes"),
        n("Concat", ["nms_b", "nms_i", "nms_c"], ["nms_bic"], axis=1, name="nms_bic"),
        n("GatherND", [scores, "nms_bic"], ["nms_sel_scores"], name="nms_sel_scores"),
        n("Unsqueeze", ["nms_sel_scores", "nms_one"], ["nms_sel_scores2"], name="nms_sel_scores2"),
        n("Cast", ["nms_b"], ["nms_bf"], to=TensorProto.FLOAT, name="nms_bf"),
        n("Cast", ["nms_c"], ["nms_cf"], to=TensorProto.FLOAT, name="nms_cf"),
        n("Concat", ["nms_bf", "nms_sel_boxes", "nms_sel_scores2", "nms_cf"], ["detections"], axis=1,
          name="detections"),
    ])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["num_detections", 7]))
    return model


def set_variant(model, variant: str) -> None:
    """Record which export variant a graph is (ONNX metadata ``yoloq.variant``): onnxruntime runs the
    fast-path variants with integer kernels, every other graph exactly as written (OnnxPredictor)."""
    from yoloq.runtime.ort import VARIANT_KEY
    for prop in list(model.metadata_props):
        if prop.key == VARIANT_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key, entry.value = VARIANT_KEY, variant


def _trace_to_onnx(model: nn.Module, img_size: int, batch: Optional[int], opset: int):
    import io
    import onnx
    dummy = torch.rand(batch or 2, 3, img_size, img_size)  # 2 for dynamic: no batch-1 specialisation
    dynamic = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if batch is None else None
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.onnx.export(model, (dummy,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamic_axes=dynamic, do_constant_folding=True, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


# --------------------------------------------------------------------------- public API


def max_opset() -> int:
    """The newest opset torch's TorchScript-based exporter (the one yoloq uses) writes."""
    from torch.onnx import _constants
    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET))


def _check_img_size(img_size) -> None:
    """A square input the detector can run: a positive multiple of its largest concatenated stride."""
    from yoloq.config import IMG_SIZE_MULTIPLE
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < IMG_SIZE_MULTIPLE \
            or img_size % IMG_SIZE_MULTIPLE or img_size > 8192:
        raise ExportError(f"--img-size {img_size}: expected a multiple of {IMG_SIZE_MULTIPLE} (the model's "
                          f"largest stride) in {IMG_SIZE_MULTIPLE}..8192, e.g. 320 or 640")


def export_onnx(model_or_ckpt, path, *, img_size: int, batch: Optional[int] = 1, opset: int = 13,
                simplify: bool = True, nms: Optional[str] = None, offset_mode: str = "subadd",
                fp32: bool = False, fp16: bool = False, score_threshold: float = 0.25,
                iou_threshold: float = 0.45, max_det: int = 100) -> ExportInfo:
    """Export a prepared/calibrated model (or a quantized checkpoint path) to ONNX at ``path``.

    ``fp32``: the plain float graph of the same fused model (no Q/DQ); ``fp16``: that graph in FP16
    with FP32 input/output (:class:`HalfPrecision`; for TensorRT 11's FP16 engines).
    ``batch=None`` makes the batch dimension dynamic. Without ``nms`` the graph maps ``images``
    [B,3,S,S] to ``outputs`` [B,N,4+nc] (what ``OnnxPredictor`` / ``evaluate`` consume).
    ``score_threshold`` / ``iou_threshold`` / ``max_det`` only matter with ``nms``.
    """
    import onnx

    if opset < 13:
        raise ExportError(f"opset {opset}: per-channel QuantizeLinear needs opset >= 13")
    if opset > max_opset():
        raise ExportError(f"opset {opset}: this torch ({torch.__version__}) exports ONNX opsets 13..{max_opset()}")
    _check_img_size(img_size)
    if nms not in (None,) + NMS_KINDS:
        raise ExportError(f"nms must be None, 'trt' or 'onnx', got {nms!r}")
    if offset_mode not in OFFSET_MODES:
        raise ExportError(f"offset_mode must be one of {OFFSET_MODES}, got '{offset_mode}'")
    if batch is not None and batch < 1:
        raise ExportError(f"batch must be >= 1 or None (dynamic), got {batch}")
    if nms and not (0.0 <= score_threshold <= 1.0 and 0.0 < iou_threshold <= 1.0 and max_det >= 1):
        raise ExportError(f"NMS settings: score threshold {score_threshold} and IoU threshold {iou_threshold} must "
                          f"be in [0, 1] (IoU > 0), max detections {max_det} >= 1")
    plain = fp32 or fp16
    model, where = _resolve_model(model_or_ckpt)
    _check_quantized(model, where, plain, offset_mode)

    notes: list[str] = []
    export_model = to_export_model(model, offset_mode, plain)
    graph = _trace_to_onnx(HalfPrecision(export_model) if fp16 else export_model, img_size, batch, opset)
    if simplify:
        graph = _simplify(graph, notes)
    if nms == "trt":
        graph = append_trt_nms(graph, batch, score_threshold, iou_threshold, max_det)
        notes.append("EfficientNMS_TRT plugin appended: runs in TensorRT only, not in onnxruntime")
    elif nms == "onnx":
        graph = append_onnx_nms(graph, score_threshold, iou_threshold, max_det)
    graph.producer_name = "yoloq"
    set_variant(graph, "fp16" if fp16 else "fp32" if fp32 else "tensorrt")
    try:
        onnx.checker.check_model(graph)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"exported graph fails onnx.checker: {str(err).splitlines()[0]}") from err
    path = Path(path)
    atomic_write_bytes(path, graph.SerializeToString())      # never half-written
    n_q, n_dq = count_qdq(graph)
    return ExportInfo(path=str(path), n_quantize=n_q, n_dequantize=n_dq, input_name=graph.graph.input[0].name,
                      output_names=[o.name for o in graph.graph.output], notes=notes)
