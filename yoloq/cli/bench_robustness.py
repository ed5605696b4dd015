"""Benchmark: how much the default PTQ result depends on its calibration images.

    yoloq bench-robustness --cfg yolov6lite_s                      # 3 disjoint sets of 128; 32 / 64 / 256 images
    yoloq bench-robustness --cfg yolov6lite_l --sizes --sets 3     # the disjoint sets only
    yoloq bench-robustness --cfg yolov6lite_s --max-images 50 --sets 2 --set-images 16 --sizes 16 --no-alpha-search

Each row quantizes with the config's quant section on its own calibration (train) images exactly as
``yoloq ptq`` does, and evaluates on the same val images against one FP32 evaluation: INT8 AP, the
drop with its paired-bootstrap interval, and (unless --no-alpha-search) the α that
``--channel-scale-alpha auto`` picks on that set, with the drop at that α where it differs.
Disjoint sets: consecutive slices of the train images in the order ``yoloq ptq`` draws them, each
written as a data YAML (``calib_set_K.yaml``, ``train_files``) so that ``yoloq ptq --data
<out>/<name>/calib_set_K.yaml --calib-images N`` reproduces its row; sizes: ``yoloq ptq --calib-images N``.
Writes <out>/<name>/bench.md and bench.json (staged: an interrupted run leaves no half-written
folder). Each finished row is kept in <out>/.<name>.rows.json until the folder is complete:
--resume continues an interrupted run with the same settings (a rerun without it is refused while
the file is there).
"""
from __future__ import annotations

from typing import Optional, Sequence

from yoloq.cli.common import add_model_bench_arguments, model_bench_options, non_negative_int, parser, positive_int


def build_parser(prog: str = "yoloq bench-robustness"):
    p = parser(prog, __doc__)
    add_model_bench_arguments(p, "<model>_robustness", "runs/bench_robustness")
    p.add_argument("--sets", type=non_negative_int, default=3, help="disjoint calibration sets (default %(default)s)")
    p.add_argument("--set-images", type=positive_int, default=128, help="images per disjoint set (default %(default)s)")
    p.add_argument("--sizes", type=positive_int, nargs="*", default=[32, 64, 256],
                   help="calibration set sizes, the first N train images as yoloq ptq draws them "
                        "(default: %(default)s; none: --sizes alone)")
    p.add_argument("--no-alpha-search", action="store_true",
                   help="skip the α choice (--channel-scale-alpha auto) on each set")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: take its finished rows (<out>/.<name>.rows.json), "
                        "compute the rest; refused when a setting differs")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from yoloq.bench.robustness import render_markdown, run_robustness
    a = build_parser().parse_args(argv)
    summary = run_robustness(a.cfg, sets=a.sets, set_images=a.set_images, sizes=a.sizes,
                             alpha_search=not a.no_alpha_search, resume=a.resume, **model_bench_options(a))
    print(render_markdown(summary))
    print(f"wrote {summary['out_dir']}/ in {summary['seconds']:.0f} s")
    return 0
