"""One call from a quantized checkpoint to a deployable ONNX file, in one of its variants.

- ``trt``: Q/DQ on conv inputs and weights (TensorRT explicit quantization; ``export_onnx``);
- ``ort``: the onnxruntime CPU fast path (Q/DQ also on conv outputs, pre-activation zero points from
  train images; not numerically identical on models with HardSwish / SiLU);
- ``ort-exact``: the fast path with only the rewrites that keep the numbers;
- ``fp32`` / ``fp16``: the same fused model as a float graph (``fp16``: FP16 between FP32 I/O).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from yoloq.config import ExportConfig, load_config
from yoloq.data import load_data_config
from yoloq.quant.checkpoint import QuantCheckpointError, load_quantized
from yoloq.runtime.onnx_export import ExportError, ExportInfo, count_qdq, export_onnx

VARIANTS = ("trt", "ort", "ort-exact")


@dataclass
class DeployRequest:
    """What to export (the defaults of an experiment config's ``export`` section apply first)."""
    variant: str = "trt"
    img_size: Optional[int] = None          # default: the checkpoint's model.img_size
    batch: Optional[int] = 1                # None = dynamic batch
    opset: int = 13
    simplify: bool = True
    nms: Optional[str] = None
    offset_mode: str = "subadd"
    fp32: bool = False
    fp16: bool = False
    score_threshold: float = 0.25
    iou_threshold: float = 0.45
    max_det: int = 100
    cfg: Optional[str] = None               # experiment config: train images for --variant ort
    calib_images: int = 32


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, req: DeployRequest) -> tuple[ExportInfo, dict, int]:
    """Export a quantized checkpoint (``quant.pt`` of ptq / qat). Returns (info, checkpoint meta, img_size)."""
    if req.variant not in VARIANTS:
        raise ExportError(f"variant must be one of {VARIANTS}, got '{req.variant}'")
    if req.variant != "trt" and (req.fp32 or req.fp16 or req.nms):
        raise ExportError(f"--variant {req.variant} rewrites the INT8 Q/DQ graph; it does not combine "
                          f"with --fp32, --fp16 or --nms")
    try:
        model, meta = load_quantized(ckpt)
    except QuantCheckpointError as err:
        raise ExportError(str(err)) from err
    img_size = req.img_size or model.cfg.img_size
    info = export_onnx(model, out, img_size=img_size, batch=req.batch, opset=req.opset, simplify=req.simplify,
                       nms=req.nms, offset_mode=req.offset_mode if req.variant == "trt" else "zero_point",
                       fp32=req.fp32, fp16=req.fp16, score_threshold=req.score_threshold,
                       iou_threshold=req.iou_threshold, max_det=req.max_det)
    if req.variant != "trt":
        info = _ort_fast(info, req, img_size)
    return info, meta, img_size


def export_float_weights(cfg_path: str, weights: Optional[str], out: str | os.PathLike,
                         req: DeployRequest) -> tuple[ExportInfo, dict, int]:
    """The FP32 (or FP16) graph of a plain checkpoint (``--cfg`` + ``--weights``), fused as the
    quantized exports are: the float baseline for TensorRT / onnxruntime."""
    from yoloq.models import load_model
    if not (req.fp32 or req.fp16) or req.variant != "trt":
        raise ExportError(f"--weights exports the float graph: add --fp32 or --fp16. An INT8 graph needs a quantized "
                          f"checkpoint: run `yoloq ptq --cfg {cfg_path} --weights {weights}` (or `yoloq qat --cfg "
                          f"{cfg_path} --weights {weights}`) and export its runs/ptq/<name>/quant.pt with --ckpt")
    cfg = load_config(cfg_path)
    model = load_model(cfg.model, weights)
    img_size = req.img_size or cfg.model.img_size
    info = export_onnx(model, out, img_size=img_size, batch=req.batch, opset=req.opset, simplify=req.simplify,
                       nms=req.nms, fp32=req.fp32, fp16=req.fp16, score_threshold=req.score_threshold,
                       iou_threshold=req.iou_threshold, max_det=req.max_det)
    return info, {"name": cfg.model.name}, img_size


def export_defaults(cfg_path: Optional[str]) -> ExportConfig:
    return load_config(cfg_path).export if cfg_path else ExportConfig()


def _ort_fast(info: ExportInfo, req: DeployRequest, img_size: int) -> ExportInfo:
    """Rewrite the TensorRT-variant file just written into the onnxruntime fast path, in place."""
    import onnx
    from yoloq.runtime.ort_fast import make_ort_fast
    calib = None
    if req.variant == "ort":
        if not req.cfg:
            raise ExportError("--variant ort needs --cfg (its dataset's train images set the pre-activation "
                              "zero points); or use --variant ort-exact")
        from yoloq.data.coco import calibration_loader
        data_cfg = load_data_config(load_config(req.cfg).data)
        calib = [images for images, _ in calibration_loader(data_cfg, req.calib_images, img_size, 8, 0)]
    fast = make_ort_fast(info.path, info.path, calib, pre_act="consumer" if req.variant == "ort" else "float")
    info.notes += [f"ort fast path: {note}" for note in fast.notes]
    if fast.pre_activation:
        info.notes.append(f"ort fast path: NOT numerically identical to the fake-quant model ({fast.pre_activation} "
                          "convs before HardSwish/SiLU got a new quantizer; on YOLOv6-Lite that costs 5-7 mAP): "
                          "check it with eval --onnx, or export --variant ort-exact")
    info.notes.append(f"ort fast path: {fast.relu_exact} conv->Relu, {fast.already_fused} conv->Q, "
                      f"{fast.pre_activation} pre-activation Q/DQ, {len(fast.left_float)} convs float "
                      f"({fast.folded_weights} with constant dequantized weights)")
    info.n_quantize, info.n_dequantize = count_qdq(onnx.load(info.path))
    return info


def scale_summary(path: str | os.PathLike) -> str:
    """One line on the Q/DQ scales of an ONNX file (activation and weight ranges)."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    act, weight = [], []
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[1] in inits:
            s = numpy_helper.to_array(inits[n.input[1]])
            (weight if s.ndim else act).append(s.ravel())
    parts = []
    for name, vals in (("activation", act), ("weight", weight)):
        if vals:
            v = np.concatenate(vals)
            parts.append(f"{name} scales {v.min():.3g}..{v.max():.3g} ({len(vals)} Q)")
    return "; ".join(parts) or "no Q/DQ"
