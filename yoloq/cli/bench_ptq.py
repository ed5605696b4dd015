"""Peer benchmark: yoloq PTQ vs onnxruntime's ``quantize_static`` on the same FP32 model and the
same calibration (train) images, evaluated through the same COCO pipeline.

    yoloq bench-ptq --cfg yolov6lite_s                        # 256 calib, all val
    yoloq bench-ptq --cfg yolov6lite_s --max-images 50 --calib-images 32   # quick

yoloq: TensorRT placement (Q/DQ on conv inputs and weights, shared scales), per-channel weights,
every calibration method from one statistics pass (its time = that pass + the method's amax search),
and ``auto`` (picks by detector-output SQNR on calibration images), all without PTQ transforms; and
``pipeline``: the config's whole quant section as ``yoloq ptq`` runs it (transforms, calibration,
reconstruction), evaluated fake-quantized and as its exported Q/DQ ONNX in onnxruntime
(``pipeline_onnx``). onnxruntime: the fused FP32
model exported with ``torch.onnx.export(..., dynamo=False)``, then ``quantize_static`` (QDQ,
per_channel=True) with MinMax / Entropy / Percentile (S8S8) and MinMax U8S8 over every op (ORT's
default), and MinMax / Entropy / Percentile S8S8 restricted to Conv (``_conv``: decode left float, a
fair like-for-like with TensorRT placement); run with onnxruntime CPU. Writes <out>/bench.md, bench.json and bench.png.
Peers (``--peers default`` or PEER:VARIANT; ``yoloq.bench.peers``): NNCF, AMD Quark, AIMET with
TensorRT-like settings and NVIDIA ModelOpt (its ONNX INT8 PTQ), each in a child process with its own
interpreter (``--peer-python nncf=/work/venvs/nncf/bin/python modelopt=/work/venvs/modelopt/bin/python``);
see docs/peers.md.
"""
from __future__ import annotations

from typing import Optional, Sequence

from yoloq.cli.common import non_negative_int, parser, positive_float, positive_int
from yoloq.bench.peers import DEFAULT_PEERS
from yoloq.bench.ptq import ORT_VARIANTS, YOLOQ_METHODS


def build_parser(prog: str = "yoloq bench-ptq"):
    p = parser(prog, __doc__)
    p.add_argument("--cfg", required=True)
    p.add_argument("--weights", help="FP32 checkpoint (default: model.weights of the config)")
    p.add_argument("--data", help="dataset YAML (default: data of the config)")
    p.add_argument("--calib-images", type=positive_int, default=256)
    p.add_argument("--max-images", type=positive_int, help="evaluate only the first N val images")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=non_negative_int)
    p.add_argument("--bootstrap", type=non_negative_int, default=1000, metavar="N",
                   help="paired-bootstrap resamples of each row's drop interval (0: none; default %(default)s)")
    p.add_argument("--device", default="auto",
                   help="where yoloq's rows run: auto (cuda when available), cpu, cuda or cuda:N; onnxruntime and the "
                        "peers run on the CPU")
    p.add_argument("--methods", nargs="+", default=list(YOLOQ_METHODS), help="yoloq rows (default: every range rule, auto and pipeline)")
    p.add_argument("--ort-variants", nargs="+", default=list(ORT_VARIANTS), choices=ORT_VARIANTS)
    p.add_argument("--skip-yoloq", action="store_true")
    p.add_argument("--skip-ort", action="store_true")
    # peers (yoloq.bench.peers): NNCF / AMD Quark / AIMET / ModelOpt, each in a child process with its own interpreter
    p.add_argument("--peers", nargs="+", default=[],
                   help="PEER or PEER:VARIANT, or 'default' for " + " ".join(DEFAULT_PEERS) +
                        " (all: yoloq.bench.peers.PEER_VARIANTS); none by default")
    p.add_argument("--peer-python", nargs="+", default=[], metavar="PEER=PYTHON",
                   help="interpreter per peer, e.g. nncf=/work/venvs/nncf/bin/python (default: this one)")
    p.add_argument("--peer-timeout", type=positive_float, default=3600.0, help="seconds per peer variant")
    p.add_argument("--peer-iterations", type=positive_int, default=1000, help="AdaRound / AdaQuant iterations per layer")
    p.add_argument("--peer-adaround-images", type=positive_int, default=64,
                   help="calibration images AdaRound / AdaQuant optimize on (ranges use all of them)")
    p.add_argument("--name")
    p.add_argument("--out", default="runs/bench_ptq")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from yoloq.bench.ptq import run
    return run(build_parser().parse_args(argv))
