"""The cost model of the default PTQ run: stage times per image, fixed costs and peak memory of
`yoloq ptq --cfg <model>` (its defaults), extrapolated to COCO val2017 (5,000 eval images, 256
calibration images), with the ratio "default run / one FP32 evaluation" (limit 6x).

    yoloq bench-cost                                            # Lite-S/M/L at 320, yolov6n/s/m/l at 640
    yoloq bench-cost --models yolov6lite_s yolov6s_repvgg --out runs/bench_cost.json
    yoloq bench-cost --from-json runs/bench_cost.json           # the tables again, from recorded timings
    yoloq bench-cost --models yolov6lite_s --eval-images 4 8 --calib-images 8 16 \\
        -- --transform-images 8 --auto-images 8                 # a quick look (NOT the default's cost)

Per model, two `yoloq ptq` child processes with the default settings, differing only in their
image counts (--eval-images SMALL LARGE, --calib-images SMALL LARGE); the large run skips the
sensitivity and diagnosis stages, which use a fixed count of calibration images and are measured
by the small one. Each stage of report.json's timings is fitted as fixed + per-image x images
(eval images for the FP32 / INT8 evaluations, calibration images for loading them and
calibrating) or taken as fixed; a fixed stage that grows between the runs is reported. Peak RSS
is the child's (wait4). Models without trained weights (yolov6n/s/m/l) get seeded random weights
whose head carries the class prior (bias -log(99)), so NMS sees a realistic number of boxes.
Arguments after a bare `--` go to both `yoloq ptq` runs. Measure on a quiet machine: the table
is only as good as the machine is idle (the load average is recorded with each run).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from yoloq.cli.common import parser, positive_int

DEFAULT_MODELS = ["yolov6lite_s", "yolov6lite_m", "yolov6lite_l",
                  "yolov6n_repvgg", "yolov6s_repvgg", "yolov6m_repvgg", "yolov6l"]


def build_parser(prog: str = "yoloq bench-cost"):
    p = parser(prog, __doc__)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, metavar="CFG[:SIZE]",
                   help="configs (shipped names or paths), each with an optional input size (default: %(default)s)")
    p.add_argument("--eval-images", type=positive_int, nargs=2, default=[16, 48], metavar=("SMALL", "LARGE"),
                   help="val images evaluated by the small and the large run (default: %(default)s)")
    p.add_argument("--calib-images", type=positive_int, nargs=2, default=[64, 128], metavar=("SMALL", "LARGE"),
                   help="calibration images of the two runs; SMALL must be >= the default's fixed counts "
                        "(transform_images 64) for the fixed stages to cost what they cost (default: %(default)s)")
    p.add_argument("--full", type=positive_int, nargs=2, default=[5000, 256], metavar=("EVAL", "CALIB"),
                   help="the scale extrapolated to (default: COCO val2017, %(default)s)")
    p.add_argument("--data", help="dataset YAML for every model (default: each config's data)")
    p.add_argument("--device", help="passed to `yoloq ptq --device` (default: not given, ptq's own default)")
    p.add_argument("--threads", type=positive_int, help="OMP_NUM_THREADS of the runs (default: inherited)")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights with the head prior for every model, trained ones too")
    p.add_argument("--out", help="write the measurements and fits here (JSON; the tables go beside it as .md)")
    p.add_argument("--keep-runs", type=Path, metavar="DIR", help="keep the ptq run folders and logs in DIR")
    p.add_argument("--from-json", metavar="FILE", help="print the tables of an earlier --out file; runs nothing")
    p.add_argument("--no-progress", action="store_true")
    return p


def split_passthrough(argv: Sequence[str]) -> tuple[list, list]:
    """(bench-cost's arguments, the `yoloq ptq` arguments after a bare `--`)."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def render(costs, full) -> str:
    from yoloq.bench.cost import findings, stage_table, summary_table
    parts = [summary_table(costs, full), *[stage_table(c, full) for c in costs]]
    found = findings(costs, full)
    parts.append("findings:\n" + ("\n".join(f"- {f}" for f in found) if found else "- none: every model within "
                                                                                      "the limit, no fixed stage grew"))
    notes = [f"- {c.model}: {n}" for c in costs for n in c.notes]
    return "\n\n".join(parts + (["notes:\n" + "\n".join(notes)] if notes else []))


def _load(path: str):
    import json
    from yoloq.bench.cost import CostError, Scale, model_cost_from_dict
    try:
        data = json.loads(Path(path).read_text())
        return [model_cost_from_dict(d) for d in data["models"]], Scale(**data["full"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CostError(f"--from-json {path}: not a bench-cost file ({type(err).__name__}: {err})") from None


def _save(path: str, costs, full, small, large, argv) -> None:
    from dataclasses import asdict
    from yoloq.io import atomic_write_text, to_json
    out = Path(path)
    atomic_write_text(out, to_json({"command": "yoloq bench-cost " + " ".join(argv), "full": asdict(full),
                                    "small": asdict(small), "large": asdict(large),
                                    "models": [c.to_dict() for c in costs]}))
    atomic_write_text(out.with_suffix(".md"), render(costs, full) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from yoloq.bench.cost import Scale
    argv = list(sys.argv[1:] if argv is None else argv)
    own, ptq_args = split_passthrough(argv)
    a = build_parser().parse_args(own)
    if a.from_json:
        costs, full = _load(a.from_json)
        print(render(costs, full))
        return 0
    from yoloq.bench.cost_run import run_bench
    from yoloq.io import check_output_file
    if a.out:
        check_output_file(a.out, "--out")
    small, large = Scale(a.eval_images[0], a.calib_images[0]), Scale(a.eval_images[1], a.calib_images[1])
    opts = argparse.Namespace(data=a.data, device=a.device, threads=a.threads, random_weights=a.random_weights,
                              ptq_args=ptq_args, keep_runs=a.keep_runs)
    full = Scale(*a.full)
    costs = run_bench(a.models, small, large, opts, progress=not a.no_progress)
    print(render(costs, full))
    if a.out:
        _save(a.out, costs, full, small, large, argv)
        print(f"wrote {a.out}")
    return 0
