"""Deployment fidelity: COCO mAP of the fake-quantized PyTorch model vs its exported Q/DQ ONNX in onnxruntime.

    yoloq bench-fidelity --cfg yolov6lite_s \\
        --ckpt runs/ptq/yolov6lite_s_auto/quant.pt runs/qat/yolov6lite_s_auto_lsqplus_offset/quant.pt
    yoloq bench-fidelity --cfg yolov6lite_s --ckpt runs/ptq/yolov6lite_s_auto/quant.pt --noise 3

For each quantized checkpoint: the fake-quant model's mAP, then the TensorRT-variant export
(``export_onnx``; LSQ+ offset checkpoints in both offset forms, Sub/Add and zero point) run by
onnxruntime as written (float conv biases) and, for comparison, with onnxruntime's default int32 bias
rounding (``WeightBiasQuantization``, which a TensorRT-style graph does not need).

``--noise N`` evaluates both the fake-quant model and the (Sub/Add) ONNX file, as written, again on N
seeds of Gaussian input noise (``--noise-std``, default 1e-4, i.e. 1/40 of one 8-bit pixel step;
both see the same noise). The mAP range over the seeds shows how much the number moves under
perturbations far below anything that matters; the mean of the N + 1 paired differences (the
unperturbed one included) and its standard error is the fidelity estimate with that noise averaged
down: a faithful export has a mean near 0, a wrong scale or placement shifts every pair alike.
Below mAP, the raw detector outputs of both are compared on the first ``--output-images`` val images
(default 16): mean |difference| of each anchor's best class score, the share of anchors whose score
differs by more than 0.05, and the mean |difference| of the box coordinates in pixels; and, as the
scale to read them against, the same three for the fake-quant model against itself on the same
images plus ``--noise-std`` input noise (seed 0).
The checkpoint's own model is used; ``--cfg`` gives the dataset and evaluation settings.
"""
from __future__ import annotations

from typing import Optional, Sequence

from yoloq.cli.common import CFG_HELP, parser, positive_float, positive_int


def build_parser(prog: str = "yoloq bench-fidelity"):
    p = parser(prog, __doc__)
    p.add_argument("--cfg", required=True, help=CFG_HELP + " (its dataset and eval settings)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", nargs="+", help="quantized checkpoints (yoloq ptq / yoloq qat quant.pt)")
    src.add_argument("--weights", help="FP32 weights are not compared here: the error says which yoloq ptq command "
                                       "makes the quant.pt to pass as --ckpt")
    p.add_argument("--images", type=positive_int, help="first N val images (default: all)")
    p.add_argument("--noise", type=int, default=0, metavar="N",
                   help="also evaluate fake-quant and onnxruntime on N seeds of the same input noise (paired)")
    p.add_argument("--noise-std", type=positive_float, default=1e-4,
                   help="std of the Gaussian input noise on 0..1 pixels (default 1e-4: 1/40 of an 8-bit step)")
    p.add_argument("--output-images", type=int, default=16, metavar="N",
                   help="compare raw outputs (scores, boxes) on the first N val images (0: skip)")
    p.add_argument("--threads", type=positive_int, help="onnxruntime intra-op threads (default: onnxruntime's)")
    p.add_argument("--device", default="auto",
                   help="where the fake-quant model runs: auto (cuda when available), cpu, cuda or cuda:N; "
                        "onnxruntime runs on the CPU")
    p.add_argument("--out", help="also write the rows as JSON here")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from yoloq.bench.fidelity import run
    from yoloq.errors import InputError
    args = build_parser().parse_args(argv)
    if args.weights:
        raise InputError(f"--weights {args.weights}: bench-fidelity compares a quantized model with its exported "
                         f"ONNX; quantize the weights first (yoloq ptq --cfg {args.cfg} --weights {args.weights}) and "
                         f"pass the run's quant.pt (runs/ptq/<name>/quant.pt) as --ckpt")
    return run(args)
