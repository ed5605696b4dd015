"""Benchmark: the channel-scaling migration strength α, judged on labelled train images held out
from calibration (never chosen on val).

    yoloq bench-alpha --cfg yolov6lite_l                          # α 0.5 / 0.65 / 0.8 / 0.9 / 1.0
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

from yoloq.cli.common import non_negative_int, parser, positive_int


def build_parser(prog: str = "yoloq bench-alpha"):
    p = parser(prog, __doc__)
    p.add_argument("--cfg", required=True, help="experiment config (a shipped name such as yolov6lite_l, or a YAML)")
    p.add_argument("--weights", help="FP32 checkpoint (default: model.weights of the config)")
    p.add_argument("--data", help="dataset YAML (default: data of the config)")
    p.add_argument("--alphas", type=float, nargs="+", metavar="A",
                   help="candidate α in [0, 1] (default: quant.transforms.channel_scale_alphas); the config's "
                        "own α is added when missing")
    p.add_argument("--val", action="store_true", help="also evaluate each α on val (a diagnostic, never a choice)")
    p.add_argument("--held-out-images", type=positive_int, metavar="N",
                   help="use only N of the held-out labelled train images (default: all of them)")
    p.add_argument("--bootstrap", type=non_negative_int, default=1000, metavar="N",
                   help="paired-bootstrap resamples of each interval (0: none; default %(default)s)")
    p.add_argument("--max-images", type=positive_int, help="with --val: evaluate only the first N val images")
    p.add_argument("--workers", type=non_negative_int, help="data loader workers")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--thread-invariant", action="store_true",
                   help="PyTorch's own conv kernels: the same numbers with any thread count (slower)")
    p.add_argument("--name", help="run name (default <model>_alpha)")
    p.add_argument("--out", default="runs/bench_alpha", help="output root (default %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from yoloq.bench.alpha import render_markdown, run_alpha_bench
    a = build_parser().parse_args(argv)
    summary = run_alpha_bench(a.cfg, alphas=a.alphas, val=a.val, held_out_images=a.held_out_images,
                              bootstrap=a.bootstrap, max_images=a.max_images,
                              weights=a.weights, data=a.data, workers=a.workers, device=a.device,
                              thread_invariant=a.thread_invariant, out=a.out, name=a.name,
                              progress=not a.no_progress)
    print(render_markdown(summary))
    print(f"wrote {summary['out_dir']}/ in {summary['seconds']:.0f} s")
    return 0
