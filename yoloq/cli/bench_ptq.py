"""Peer benchmark: yoloq PTQ vs onnxruntime's ``quantize_static`` on the same FP32 model and the
same calibration (train) images, evaluated through the same COCO pipeline.

    yoloq bench-ptq --cfg configs/yolov6lite_s.yaml                        # 256 calib, all val
    yoloq bench-ptq --cfg configs/yolov6lite_s.yaml --max-images 50 --calib-images 32   # quick

yoloq: TensorRT placement (Q/DQ on conv inputs and weights, shared scales), per-channel weights,
every calibration method from one statistics pass (its time = that pass + the method's amax search),
and ``auto`` (picks by detector-output SQNR on calibration images). onnxruntime: the fused FP32
model exported with ``torch.onnx.export(..., dynamo=False)``, then ``quantize_static`` (QDQ,
per_channel=True) with MinMax / Entropy / Percentile (S8S8) and MinMax U8S8 over every op (ORT's
default), and MinMax / Entropy / Percentile S8S8 restricted to Conv (``_conv``: decode left float, a
fair like-for-like with TensorRT placement); run with onnxruntime CPU. Writes <out>/bench.md, bench.json and bench.png.
"""
from __future__ import annotations

from typing import Optional, Sequence

from yoloq.cli.common import parser
from yoloq.bench.ptq import ORT_VARIANTS, YOLOQ_METHODS


def build_parser(prog: str = "yoloq bench-ptq"):
    p = parser(prog, __doc__)
    p.add_argument("--cfg", required=True)
    p.add_argument("--weights", help="FP32 checkpoint (default: model.weights of the config)")
    p.add_argument("--data", help="dataset YAML (default: data of the config)")
    p.add_argument("--calib-images", type=int, default=256)
    p.add_argument("--max-images", type=int, help="evaluate only the first N val images")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--methods", nargs="+", default=list(YOLOQ_METHODS), help="yoloq methods (default: all + auto)")
    p.add_argument("--ort-variants", nargs="+", default=list(ORT_VARIANTS), choices=ORT_VARIANTS)
    p.add_argument("--skip-yoloq", action="store_true")
    p.add_argument("--skip-ort", action="store_true")
    p.add_argument("--name")
    p.add_argument("--out", default="runs/bench_ptq")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from yoloq.bench.ptq import run
    return run(build_parser().parse_args(argv))
