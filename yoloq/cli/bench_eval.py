"""Evaluation throughput (images/s through loading, letterbox, model, NMS, box mapping) and the
per-image pre-process / inference / NMS milliseconds.

    yoloq bench-eval                                   # Lite-S at 320, YOLOv6-S at 640
    yoloq bench-eval --models yolov6lite_s:320 --images 100
    yoloq bench-eval --device cuda --batch-size 32 --workers 8

Each entry is ``config[:img_size]``. A config whose weights are missing runs with random
weights (throughput only; its mAP means nothing) and the table says so.
"""
from __future__ import annotations

from typing import Optional, Sequence

from yoloq.cli.common import non_negative_int, parser, positive_int
from yoloq.bench.eval import DEFAULT_MODELS


def build_parser(prog: str = "yoloq bench-eval"):
    p = parser(prog, __doc__)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="config[:img_size] entries (--set applies to each)")
    p.add_argument("--images", type=positive_int, default=64, help="val images per model (first N by id)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per batch (default %(default)s)")
    p.add_argument("--workers", type=non_negative_int, default=2,
                   help="loader processes (0: load in the main process; default %(default)s)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--ann", default="val_ann", choices=["val_ann", "val_ann_official"])
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from yoloq.bench.eval import run
    from yoloq.device import resolve_device
    args = build_parser().parse_args(argv)
    args.device = resolve_device(args.device)
    return run(args)
