"""Export a quantized checkpoint to ONNX with Q/DQ (TensorRT explicit INT8) or as plain FP32 / FP16.

    yoloq export --ckpt runs/ptq/yolov6lite_s_auto/quant.pt --out lite_s_int8.onnx --dynamic-batch
    yoloq eval --cfg yolov6lite_s --onnx lite_s_int8.onnx      # deployed mAP (onnxruntime)

Variants: trt (Q/DQ on conv inputs and weights), ort (onnxruntime CPU fast path: Q/DQ also on conv
outputs, pre-activation zero points from --calib-images train images), ort-exact (fast path
without the inexact pre-activation Q/DQ). The file is written atomically.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence

from yoloq.cli.common import parser, positive_int, unit_float
from yoloq.config import NMSKind, choices
from yoloq.errors import InputError
from yoloq.io import check_output_file


def build_parser(prog: str = "yoloq export"):
    from yoloq.runtime.deploy import VARIANTS
    from yoloq.runtime.onnx_export import OFFSET_MODES
    p = parser(prog, __doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="quantized checkpoint (runs/ptq/<name>/quant.pt or a QAT quant.pt)")
    src.add_argument("--weights", help="FP32 checkpoint (with --cfg and --fp32 / --fp16): the float graph")
    p.add_argument("--cfg", help="experiment config: defaults of its 'export' section (opset, batch, simplify, nms)")
    p.add_argument("--out", required=True, help="ONNX file to write")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=positive_int, help="fixed batch size (default 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="dynamic batch dimension")
    p.add_argument("--img-size", type=positive_int, help="square input size (default: the checkpoint's model.img_size)")
    p.add_argument("--opset", type=int)
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    p.add_argument("--nms", choices=choices(NMSKind), help="append end-to-end NMS: trt (EfficientNMS_TRT) | onnx")
    p.add_argument("--score-thres", type=unit_float, default=0.25, help="NMS score threshold (with --nms)")
    p.add_argument("--iou-thres", type=unit_float, default=0.45, help="NMS IoU threshold (with --nms)")
    p.add_argument("--max-det", type=positive_int, default=100, help="NMS max detections (with --nms)")
    p.add_argument("--offset-mode", choices=OFFSET_MODES, default="subadd",
                   help="LSQ+ offset quantizers: subadd (TensorRT) | zero_point (onnxruntime; always for --variant ort*)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp32", action="store_true", help="plain FP32 graph of the same fused model (no Q/DQ)")
    precision.add_argument("--fp16", action="store_true",
                           help="that graph in FP16 with FP32 input/output and box decode (TensorRT 11 builds "
                                "FP16 engines only from such files; onnxruntime runs it too)")
    p.add_argument("--variant", choices=VARIANTS, default="trt",
                   help="trt: Q/DQ on conv inputs and weights (TensorRT); ort: onnxruntime CPU fast path; "
                        "ort-exact: fast path without the inexact pre-activation Q/DQ")
    p.add_argument("--calib-images", type=positive_int, default=32, help="train images for --variant ort (needs --cfg)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from yoloq.runtime.deploy import (DeployRequest, export_checkpoint, export_defaults, export_float_weights,
                                      scale_summary)
    from yoloq.runtime.tensorrt.trtexec import trtexec_hint
    a = build_parser().parse_args(argv)
    check_output_file(a.out, "--out", inputs={"--ckpt": a.ckpt, "--weights": a.weights,
                                              "--cfg": str(a.cfg) if a.cfg else None})
    defaults = export_defaults(a.cfg)
    batch = None if (a.dynamic_batch or (a.batch is None and defaults.dynamic_batch)) else (a.batch or 1)
    req = DeployRequest(variant=a.variant, img_size=a.img_size, batch=batch, opset=a.opset or defaults.opset,
                        simplify=defaults.simplify and not a.no_simplify, nms=a.nms or defaults.nms,
                        offset_mode=a.offset_mode, fp32=a.fp32, fp16=a.fp16, score_threshold=a.score_thres,
                        iou_threshold=a.iou_thres, max_det=a.max_det, cfg=a.cfg, calib_images=a.calib_images)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        if a.ckpt:
            info, meta, img_size = export_checkpoint(a.ckpt, a.out, req)
        else:
            if not a.cfg:
                raise InputError("--weights needs --cfg (the model the checkpoint is for)")
            info, meta, img_size = export_float_weights(a.cfg, a.weights, a.out, req)
    size = Path(info.path).stat().st_size / 2 ** 20
    kind = "FP32" if a.fp32 else "FP16" if a.fp16 else "INT8 Q/DQ"
    print(f"wrote {info.path} ({size:.2f} MiB): {meta.get('name', '?')} {img_size}x{img_size}, "
          f"batch {'dynamic' if batch is None else batch}, {kind}")
    print(f"  QuantizeLinear {info.n_quantize}, DequantizeLinear {info.n_dequantize}; {scale_summary(info.path)}")
    print(f"  input {info.input_name}, outputs {', '.join(info.output_names)}")
    for note in info.notes:
        print(f"  note: {note}")
    if a.variant == "trt":
        print(f"  TensorRT: {trtexec_hint(info.path, 'fp16' if a.fp32 or a.fp16 else 'int8', img_size=img_size)}")
    if not a.nms:
        print(f"  onnxruntime mAP: yoloq eval --cfg <config> --onnx {info.path}")
    return 0
