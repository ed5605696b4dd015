"""Benchmark: the channel-scaling migration strength α, judged on labelled train images held out
from calibration (never chosen on val).

    yoloq bench-alpha --cfg yolov6lite_l                          # the search's candidates: α 0.5 / 0.65 / 0.8 / 0.9
    yoloq bench-alpha --cfg yolov6lite_l --alphas 0.8 0.9 --val   # two candidates, val as a diagnostic

Each α quantizes with the config's quant section exactly as ``yoloq ptq --channel-scale-alpha A``
does. Per α: the score ``--channel-scale-alpha auto`` ranks by (output SQNR, proxy calibration),
the SQNR of the model the run builds, the AP on the labelled train images that are not calibration
images with the drop's paired-bootstrap interval, and the AP difference to the config's α with its
own paired interval; ``--val`` adds the val drop as a diagnostic. Writes <out>/<name>/bench.md and
bench.json (staged: an interrupted run leaves nothing).
"""
from __future__ import annotations

from typing import Optional, Sequence

from yoloq.cli.common import add_model_bench_arguments, model_bench_options, parser, positive_int


def build_parser(prog: str = "yoloq bench-alpha"):
    p = parser(prog, __doc__)
    add_model_bench_arguments(p, "<model>_alpha", "runs/bench_alpha",
                              max_images_help="with --val: evaluate only the first N val images")
    p.add_argument("--alphas", type=float, nargs="+", metavar="A",
                   help="candidate α in [0, 1] (default: quant.transforms.channel_scale_alphas); the config's "
                        "own α is added when missing")
    p.add_argument("--val", action="store_true", help="also evaluate each α on val (a diagnostic, never a choice)")
    p.add_argument("--held-out-images", type=positive_int, metavar="N",
                   help="use only N of the held-out labelled train images (default: all of them)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from yoloq.bench.alpha import render_markdown, run_alpha_bench
    a = build_parser().parse_args(argv)
    summary = run_alpha_bench(a.cfg, alphas=a.alphas, val=a.val, held_out_images=a.held_out_images,
                              **model_bench_options(a))
    print(render_markdown(summary))
    print(f"wrote {summary['out_dir']}/ in {summary['seconds']:.0f} s")
    return 0
