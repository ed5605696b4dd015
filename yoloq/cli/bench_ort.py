"""onnxruntime CPU latency (and optionally COCO mAP) of FP32 vs INT8 exports of one quantized model.

    yoloq bench-ort --cfg yolov6lite_s --ckpt runs/ptq/yolov6lite_s_auto/quant.pt
    yoloq bench-ort --cfg yolov6lite_s --ckpt runs/ptq/yolov6lite_s_auto/quant.pt --map 100
    yoloq bench-ort --cfg yolov6n_repvgg --random-weights      # 640, no trained weights

Exports four ONNX files (``export_onnx``): FP32, the TensorRT Q/DQ variant, and the onnxruntime
fast path (``make_ort_fast``; "exact": convs before HardSwish/SiLU stay float; default: they get a
pre-activation Q/DQ on the consumer's scale, zero point from train images), then times each
with onnxruntime (CPUExecutionProvider, ORT_ENABLE_ALL, ``--threads`` intra-op threads; onnxruntime's
int32 bias rounding only for the fast-path files, which need it for integer kernels): warm-up,
then ``--iters`` runs taken round-robin over the variants in ``--rounds`` blocks (so a noisy, shared
machine slows all variants alike), each block after 2 untimed runs (the first run after a switch
pays for cold caches and the previous session's spinning threads). Prints median / p90 ms and the
ratio to FP32 (median over blocks of the per-block ratio); ``--repeat R`` repeats all that R times
and adds the range of the ratio. ``--map N`` adds the COCO mAP of each variant and of the fake-quant
PyTorch model on the first N val images; ``--profile N`` the time per op type of each variant
(onnxruntime's profiler over N runs), and of its convs by kind (depthwise or dense, kernel size;
float or integer): where the INT8 graphs spend what FP32 does not.
``--random-weights``: random init, PTQ-calibrated (max) in memory on ``--calib-images`` train images —
for latency only (its mAP is meaningless). ``--hardswish-as-relu`` (with ``--random-weights``) swaps
every HardSwish for ReLU first: the fast path then makes every gated conv an exact integer conv with
its activation on the 8-bit codes and no Q/DQ between integer convs: how fast an all-integer
YOLOv6-Lite runs on onnxruntime (a reference for the Lite latency target, not a model anyone deploys).
"""
from __future__ import annotations

from typing import Optional, Sequence

from yoloq.cli.common import CFG_HELP, non_negative_int, parser, positive_int


def build_parser(prog: str = "yoloq bench-ort"):
    p = parser(prog, __doc__)
    p.add_argument("--cfg", required=True, help=CFG_HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="quantized checkpoint (quant.pt of yoloq ptq / yoloq qat)")
    src.add_argument("--weights", help="FP32 checkpoint, max-calibrated on --calib-images train images")
    src.add_argument("--random-weights", action="store_true",
                     help="random weights, max-calibrated on --calib-images train images (latency only)")
    p.add_argument("--hardswish-as-relu", action="store_true",
                   help="with --random-weights: replace HardSwish by ReLU (latency of an all-integer graph of the architecture)")
    p.add_argument("--img-size", type=positive_int, help="input size (default: model.img_size)")
    p.add_argument("--threads", type=positive_int, default=2, help="onnxruntime intra-op threads (default 2)")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--iters", type=positive_int, default=60, help="timed runs per variant (default 60)")
    p.add_argument("--warmup", type=non_negative_int, default=10)
    p.add_argument("--rounds", type=positive_int, default=6, help="round-robin blocks over the variants")
    p.add_argument("--repeat", type=positive_int, default=1,
                   help="repeat the whole timing N times and show the range of the ratio to FP32 (shared "
                        "machines drift between slower and faster phases that last longer than a block)")
    p.add_argument("--calib-images", type=positive_int, default=32,
                   help="train images calibrating the fast path's pre-activation ranges (and --random-weights)")
    p.add_argument("--pre-act", choices=("consumer", "minmax", "symmetric"), default="consumer",
                   help="scale of the fast path's new pre-activation Q/DQ (default: the consumer quantizer's)")
    p.add_argument("--other", choices=("float", "minmax"), default="float",
                   help="convs whose output is not self-gated (SE input, residual add): keep float (exact, "
                        "default) or give them a min/max-calibrated Q/DQ")
    p.add_argument("--map", type=positive_int, metavar="N", help="also COCO mAP on the first N val images")
    p.add_argument("--profile", type=positive_int, metavar="N",
                   help="also profile N runs of each variant (onnxruntime profiler) and print ms per op type and per conv kind")
    p.add_argument("--out", help="folder for the ONNX files (default /tmp/bench_ort/<model>)")
    p.add_argument("--workers", type=non_negative_int, default=0)
    return p


def parse_args(argv: Optional[Sequence[str]] = None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.hardswish_as_relu and not args.random_weights:
        p.error("--hardswish-as-relu changes the architecture; it needs --random-weights (latency only)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    from yoloq.bench.ort import run
    return run(parse_args(argv))
