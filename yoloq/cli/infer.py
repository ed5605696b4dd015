"""Detections drawn on an image, a folder of images, or a video, from FP32 weights, a quantized
quant.pt, an ONNX file or a TensorRT engine; class names from the dataset YAML.

    yoloq infer --cfg yolov6lite_s --source bus.jpg                        # config's weights
    yoloq infer --cfg yolov6lite_s --source images/ --save-txt --save-conf
    yoloq infer --cfg yolov6lite_s --source street.mp4 --device cuda
    yoloq infer --cfg yolov6lite_s --ckpt runs/ptq/yolov6lite_s_auto/quant.pt --source images/
    yoloq infer --cfg yolov6lite_s --onnx lite_s_int8.onnx --source images/
    yoloq infer --cfg yolov6lite_s --engine lite_s_int8.engine --source street.mp4   # needs TensorRT

Output: <out>/<name>/ (default runs/infer/<source name>) with the drawn images (same format as
the input), videos as .mp4, and with --save-txt labels/<image>.txt in YOLO format (class cx cy w
h, normalized; --save-conf adds the score; video frames are <video>_<frame>.txt). The folder is
written under a hidden name and renamed when complete.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from yoloq.cli.common import parser, positive_int
from yoloq.errors import InputError


def build_parser(prog: str = "yoloq infer"):
    from yoloq.runtime.layouts import LAYOUTS
    p = parser(prog, __doc__)
    p.add_argument("--cfg", required=True, help="experiment config (a shipped name such as yolov6lite_s.yaml, or a path)")
    p.add_argument("--source", required=True, help="an image, a folder of images / videos, or a video file")
    model = p.add_argument_group("model (default: the config's FP32 weights)")
    model.add_argument("--weights", help="FP32 checkpoint (every form yoloq reads)")
    model.add_argument("--ckpt", help="quantized checkpoint (quant.pt of ptq / qat), run fake-quantized")
    model.add_argument("--onnx", help="ONNX file, run with onnxruntime on the CPU")
    model.add_argument("--onnx-layout", choices=LAYOUTS, default="auto", help="with --onnx: its output layout")
    model.add_argument("--engine", help="TensorRT engine (needs TensorRT and a GPU)")
    p.add_argument("--data", help="dataset YAML for the class names (default: data of the config)")
    p.add_argument("--device", default="auto", help="PyTorch models: auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--img-size", type=positive_int, help="square input size (default: ONNX / engine input, else model.img_size)")
    p.add_argument("--conf-thres", type=float, default=0.4, help="draw detections above this score (default %(default)s)")
    p.add_argument("--iou-thres", type=float, default=0.45, help="NMS IoU threshold (default %(default)s)")
    p.add_argument("--max-det", type=positive_int, default=300, help="at most this many detections per image")
    p.add_argument("--save-txt", action="store_true", help="also write YOLO labels (labels/<image>.txt)")
    p.add_argument("--save-conf", action="store_true", help="with --save-txt: the score as a sixth column")
    p.add_argument("--out", default="runs/infer", help="output root (default %(default)s)")
    p.add_argument("--name", help="run folder name (default: the source's name)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _predictor(a, cfg, nc: int, device):
    """(predict, input size, device for its input)."""
    if a.onnx:
        from yoloq.runtime.ort import OnnxPredictor
        predictor = OnnxPredictor(a.onnx, layout=a.onnx_layout, nc=nc)
        return predictor, a.img_size or predictor.img_size or cfg.model.img_size, None
    if a.engine:
        from yoloq.runtime.tensorrt.runner import TrtPredictor
        predictor = TrtPredictor(a.engine)
        return predictor, a.img_size or predictor.img_size or cfg.model.img_size, None
    if a.ckpt:
        from yoloq.quant.checkpoint import load_quantized
        model, _ = load_quantized(a.ckpt)
        return model.to(device).eval(), a.img_size or model.cfg.img_size, device
    from yoloq.models import load_model
    model = load_model(cfg.model)
    return model.to(device).eval(), a.img_size or cfg.model.img_size, device


def main(argv: Optional[Sequence[str]] = None) -> int:
    from yoloq.config import load_config
    from yoloq.data import load_data_config
    from yoloq.device import resolve_device
    from yoloq.io import check_run_folder
    from yoloq.recipes.common import align_classes
    from yoloq.runtime.infer import InferOptions, list_sources, run_infer
    a = build_parser().parse_args(argv)
    if sum(bool(x) for x in (a.ckpt, a.onnx, a.engine)) > 1:
        raise InputError("--ckpt, --onnx and --engine: give one model")
    if a.save_conf and not a.save_txt:
        raise InputError("--save-conf needs --save-txt")
    device = resolve_device(a.device)
    list_sources(a.source)                        # a missing or unsupported source fails before the model loads
    cfg = load_config(a.cfg).with_overrides(data=a.data, model=dict(weights=a.weights),
                                            eval=dict(conf_thres=a.conf_thres, iou_thres=a.iou_thres, max_det=a.max_det))
    if not cfg.data:
        raise InputError(f"{a.cfg} has no 'data' and no --data was given (it names the classes)")
    data_cfg = load_data_config(cfg.data)
    cfg = align_classes(cfg, data_cfg)
    inputs = {"--source": a.source, "--weights": a.weights, "--ckpt": a.ckpt, "--onnx": a.onnx, "--engine": a.engine}
    out_dir = check_run_folder(a.out, a.name or Path(a.source).stem or "source", "infer", inputs=inputs)
    predict, img_size, input_device = _predictor(a, cfg, data_cfg.nc, device)
    names = list(data_cfg.names) or [str(i) for i in range(data_cfg.nc)]
    opts = InferOptions(img_size=img_size, eval_cfg=cfg.eval, nc=data_cfg.nc, names=names, device=input_device,
                        save_txt=a.save_txt, save_conf=a.save_conf, progress=not a.no_progress)
    result = run_infer(predict, a.source, out_dir, opts)
    print(f"{result.images} image(s), {result.detections} detection(s) above {a.conf_thres}: wrote {result.out_dir}/")
    return 0
