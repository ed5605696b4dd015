"""Benchmark: how well RepVGG, QARepVGG (V2) and RepOpt-VGG yolov6n models quantize (PTQ), trained
with one identical recipe: the central claim of the QARepVGG and RepOpt papers, at this budget.

    yoloq bench-backbones --runs runs/overfit                      # train what is missing, then PTQ
    yoloq bench-backbones --runs runs/overfit --no-train --seeds 0 --pipelines plain   # quick

Training (only for a backbone whose run is missing or unfinished; ``--resume`` of an interrupted one
is automatic): docs/training.md's overfit recipe (150 epochs, batch 4, the first 16 labelled train
images at 256 px, evaluated on those images), written to ``<runs>/<backbone>/`` by ``yoloq train``'s
code; RepOpt-VGG as its three steps (``hs`` hyper-search run, ``hs/scales.pt``, ``repopt`` with the
RepOptimizer). A finished run (``best.pt``; ``last.pt`` absent or at the last epoch) is used as it is.

PTQ: each FP32 model is evaluated on the images it was evaluated on while training (its
``train_subset.json``; a generated data YAML, kept in the output's data/ folder, makes them the val
split and every other train image the calibration split), then quantized by two pipelines for each
calibration seed: ``default`` (calibration auto, channel scaling on all convs with α chosen on
calibration images, bias correction: the recipe the Lite configs ship) and ``plain`` (no
transforms, ``--plain-calib`` ranges, default max). The table gives FP32 AP, INT8 AP and the drop
with its paired-bootstrap 95% interval over the evaluation images, the drop's range over the seeds,
each backbone's drop minus RepVGG's (paired, averaged over the seeds), and the output SQNR of every
INT8 model against FP32 on the evaluation images. ``--set`` takes eval.* and quant.* keys (e.g.
quant.calibration.num_bins=1024); a key a pipeline fixes (above) keeps the pipeline's value.
``--eval-split val`` measures runs trained on a full train split (e.g. training.md's GPU commands,
with ``--no-train``) on the dataset's val split.
Writes <out>/<name>/backbones.md, backbones.json, data/<backbone>.yaml, detections/*.json.
"""
from __future__ import annotations

from typing import Optional, Sequence

from yoloq.cli.common import non_negative_int, parser, positive_int


def build_parser(prog: str = "yoloq bench-backbones"):
    from yoloq.bench.backbone_runs import BACKBONES, OverfitRecipe
    from yoloq.bench.backbones import PIPELINES, PLAIN_METHODS
    r = OverfitRecipe()
    p = parser(prog, __doc__)
    p.add_argument("--runs", default="runs/overfit",
                   help="folder of the training runs, one sub-folder per backbone (default %(default)s)")
    p.add_argument("--data", help="dataset YAML the runs train on and calibration draws from (default: the "
                                  "yolov6n configs' data, the shared COCO subset)")
    p.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES),
                   help="backbones to measure (default: all; RepOpt trains its hyper-search run 'hs' when needed)")
    p.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=list(PIPELINES),
                   help="PTQ pipelines (default: both)")
    p.add_argument("--plain-calib", choices=PLAIN_METHODS, default="max",
                   help="activation range rule of the plain pipeline (default %(default)s)")
    p.add_argument("--seeds", nargs="+", type=non_negative_int, default=[0, 1, 2],
                   help="calibration seeds: each draws its own calibration images (default 0 1 2; the main "
                        "table's interval is the first one's)")
    p.add_argument("--calib-images", type=positive_int, default=256, help="calibration images (default %(default)s)")
    p.add_argument("--resamples", type=positive_int, default=1000,
                   help="bootstrap resamples of the evaluation images (default %(default)s)")
    p.add_argument("--no-train", action="store_true",
                   help="never train: a missing or unfinished run is an error (training all four takes ~2 CPU hours)")
    p.add_argument("--epochs", type=positive_int, default=r.epochs, help="recipe: epochs (default %(default)s)")
    p.add_argument("--train-images", type=positive_int, default=r.train_images,
                   help="recipe: first N labelled train images, also the evaluation images (default %(default)s)")
    p.add_argument("--img-size", type=positive_int, default=r.img_size,
                   help="recipe: training, calibration and evaluation size (default %(default)s)")
    p.add_argument("--eval-split", choices=("train", "val"), default=r.eval_split,
                   help="recipe: evaluate on each run's training images (train, the overfit check: its "
                        "train_subset.json) or on the dataset's val split (val: runs trained on the full train "
                        "split, e.g. training.md's GPU commands) (default %(default)s)")
    p.add_argument("--sqnr-images", type=positive_int, default=64,
                   help="output SQNR on the first N evaluation images (default %(default)s)")
    p.add_argument("--workers", type=non_negative_int, default=0,
                   help="DataLoader processes for calibration and evaluation (default 0: 16 images need none)")
    p.add_argument("--device", default="auto", help="training and PTQ: auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--name", default="yolov6n_backbones", help="output folder name inside --out (default %(default)s)")
    p.add_argument("--out", default="runs/bench_backbones", help="output root (default %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    import dataclasses
    from pathlib import Path
    from yoloq.bench.backbone_runs import OverfitRecipe, Runs
    from yoloq.bench.backbones import Settings, run
    a = build_parser().parse_args(argv)
    recipe = dataclasses.replace(OverfitRecipe(), epochs=a.epochs, train_images=a.train_images, img_size=a.img_size,
                                 eval_split=a.eval_split)
    runs = Runs(Path(a.runs), recipe, data=a.data, device=a.device, progress=not a.no_progress,
                allow_training=not a.no_train)
    settings = Settings(backbones=tuple(dict.fromkeys(a.backbones)), pipelines=tuple(dict.fromkeys(a.pipelines)),
                        plain_method=a.plain_calib, seeds=tuple(dict.fromkeys(a.seeds)), calib_images=a.calib_images,
                        resamples=a.resamples, sqnr_images=a.sqnr_images, workers=a.workers, settings=list(a.settings), device=a.device,
                        progress=not a.no_progress)
    return run(runs, settings, a.out, a.name)
