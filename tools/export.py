"""Export a quantized checkpoint to ONNX with Q/DQ (TensorRT explicit INT8) or as plain FP32.

    python tools/export.py --ckpt runs/ptq/yolov6lite_s_auto/quant.pt --out lite_s_int8.onnx --dynamic-batch
    python tools/eval.py --cfg configs/yolov6lite_s.yaml --onnx lite_s_int8.onnx      # deployed mAP (onnxruntime)
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yoloq.config import ExportConfig, load_config  # noqa: E402
from yoloq.export.onnx import NMS_KINDS, OFFSET_MODES, ExportError, count_qdq, export_onnx  # noqa: E402
from yoloq.export.tensorrt import trtexec_hint  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="quantized checkpoint (runs/ptq/<name>/quant.pt or a QAT quant.pt)")
    p.add_argument("--cfg", help="experiment config: defaults of its 'export' section (opset, batch, simplify, nms)")
    p.add_argument("--out", required=True, help="ONNX file to write")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, help="fixed batch size (default 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="dynamic batch dimension")
    p.add_argument("--img-size", type=int, help="square input size (default: the checkpoint's model.img_size)")
    p.add_argument("--opset", type=int)
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    p.add_argument("--nms", choices=NMS_KINDS, help="append end-to-end NMS: trt (EfficientNMS_TRT) | onnx")
    p.add_argument("--score-thres", type=float, default=0.25, help="NMS score threshold (with --nms)")
    p.add_argument("--iou-thres", type=float, default=0.45, help="NMS IoU threshold (with --nms)")
    p.add_argument("--max-det", type=int, default=100, help="NMS max detections (with --nms)")
    p.add_argument("--offset-mode", choices=OFFSET_MODES, default="subadd",
                   help="LSQ+ offset quantizers: subadd (TensorRT) | zero_point (onnxruntime; always for --variant ort*)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp32", action="store_true", help="plain FP32 graph of the same fused model (no Q/DQ)")
    precision.add_argument("--fp16", action="store_true",
                           help="that graph in FP16 with FP32 input/output and box decode (TensorRT 11 builds "
                                "FP16 engines only from such files; onnxruntime runs it too)")
    p.add_argument("--variant", choices=("trt", "ort", "ort-exact"), default="trt",
                   help="trt: Q/DQ on conv inputs and weights (TensorRT); ort: onnxruntime CPU fast path "
                        "(Q/DQ also on conv outputs, see yoloq/export/ort_fast.py; pre-activation zero points "
                        "from --calib-images train images); ort-exact: fast path without the inexact "
                        "pre-activation Q/DQ (convs before HardSwish/SiLU stay float)")
    p.add_argument("--calib-images", type=int, default=32, help="train images for --variant ort (needs --cfg)")
    return p.parse_args(argv)


def scale_summary(path: str) -> str:
    import onnx
    from onnx import numpy_helper
    model = onnx.load(path)
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


def _ort_fast(info, args, img_size: int):
    """Rewrite the TensorRT-variant file just written into the onnxruntime fast path, in place."""
    from yoloq.export.ort_fast import make_ort_fast
    calib = None
    if args.variant == "ort":
        if not args.cfg:
            raise ExportError("--variant ort needs --cfg (its dataset's train images set the pre-activation "
                              "zero points); or use --variant ort-exact")
        from yoloq.config import load_data_config
        from yoloq.data.coco import calibration_loader
        data_cfg = load_data_config(load_config(args.cfg).data)
        calib = [images for images, _ in calibration_loader(data_cfg, args.calib_images, img_size, 8, 0)]
    fast = make_ort_fast(info.path, info.path, calib, pre_act="consumer" if args.variant == "ort" else "float")
    for note in fast.notes:
        info.notes.append(f"ort fast path: {note}")
    if fast.pre_activation:
        info.notes.append(f"ort fast path: NOT numerically identical to the fake-quant model ({fast.pre_activation} "
                          "convs before HardSwish/SiLU got a new quantizer; on YOLOv6-Lite that costs 5-7 mAP): "
                          "check it with tools/eval.py --onnx, or export --variant ort-exact")
    info.notes.append(f"ort fast path: {fast.relu_exact} conv->Relu, {fast.already_fused} conv->Q, "
                      f"{fast.pre_activation} pre-activation Q/DQ, {len(fast.left_float)} convs float "
                      f"({fast.folded_weights} with constant dequantized weights)")
    import onnx
    info.n_quantize, info.n_dequantize = count_qdq(onnx.load(info.path))
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    defaults = load_config(args.cfg).export if args.cfg else ExportConfig()
    batch = None if (args.dynamic_batch or (args.batch is None and defaults.dynamic_batch)) else (args.batch or 1)
    try:
        from yoloq.quant.qcheckpoint import QuantCheckpointError, load_quantized
        try:
            model, meta = load_quantized(args.ckpt)
        except QuantCheckpointError as err:
            raise ExportError(str(err)) from err
        img_size = args.img_size or model.cfg.img_size
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            info = export_onnx(model, args.out, img_size=img_size, batch=batch, opset=args.opset or defaults.opset,
                               simplify=defaults.simplify and not args.no_simplify,
                               nms=args.nms or defaults.nms, offset_mode=args.offset_mode if args.variant == "trt" else "zero_point", fp32=args.fp32,
                               fp16=args.fp16,
                               score_threshold=args.score_thres, iou_threshold=args.iou_thres,
                               max_det=args.max_det)
        if args.variant != "trt":
            if args.fp32 or args.fp16 or args.nms:
                raise ExportError(f"--variant {args.variant} rewrites the INT8 Q/DQ graph; it does not combine "
                                  f"with --fp32, --fp16 or --nms")
            info = _ort_fast(info, args, img_size)
    except (ExportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = Path(info.path).stat().st_size / 2 ** 20
    print(f"wrote {info.path} ({size:.2f} MiB): {meta.get('name', model.cfg.name)} {img_size}x{img_size}, "
          f"batch {'dynamic' if batch is None else batch}, {'FP32' if args.fp32 else 'FP16' if args.fp16 else 'INT8 Q/DQ'}")
    print(f"  QuantizeLinear {info.n_quantize}, DequantizeLinear {info.n_dequantize}; {scale_summary(info.path)}")
    print(f"  input {info.input_name}, outputs {', '.join(info.output_names)}")
    for note in info.notes:
        print(f"  note: {note}")
    if args.variant == "trt":
        precision = "fp16" if args.fp32 or args.fp16 else "int8"
        print(f"  TensorRT: {trtexec_hint(info.path, precision, img_size=img_size)}")
    if not args.nms:
        print(f"  onnxruntime mAP: python tools/eval.py --cfg <config> --onnx {info.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
