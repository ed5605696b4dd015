#!/usr/bin/env python
"""RepOpt step 2: extract the trained scales of a hyper-search model into a scales file.

    python tools/repopt_scales.py --cfg configs/yolov6n_hs.yaml \\
        --weights runs/train/yolov6n_hs/best.pt --out runs/train/yolov6n_hs/scales.pt

The file holds, per LinearAddBlock (by module path), the per-channel scales of its 3x3, 1x1 and
identity branches. ``tools/train.py --cfg configs/yolov6n_repopt.yaml --scales <file>`` checks it
against the target model, re-initialises the target's kernels from it and trains with the
RepOptimizer (gradient masks from the scales). See docs/training.md.
"""
from __future__ import annotations

import argparse
import sys

from yoloq.checkpoint import CheckpointError, load_weights
from yoloq.config import ConfigError, load_config
from yoloq.models.build import build_model
from yoloq.train import TrainError
from yoloq.train.repopt import extract_scales, save_scales


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, help="the hyper-search model's config (block: hyper_search)")
    p.add_argument("--weights", help="its trained weights (default: model.weights of the config)")
    p.add_argument("--out", required=True, help="scales file to write")
    a = p.parse_args(argv)
    cfg = load_config(a.cfg)
    weights = a.weights or cfg.model.weights
    if not weights:
        raise ConfigError(f"{a.cfg}: no --weights and no model.weights: the scales come from a trained "
                          "hyper-search model")
    model = build_model(cfg.model)
    load_weights(model, weights)
    path = save_scales(extract_scales(model, source=str(weights)), a.out)
    print(f"wrote {path} ({sum(1 for _ in model.modules() if type(_).__name__ == 'LinearAddBlock')} blocks)")
    return 0


def cli(argv=None) -> int:
    """``main`` with user errors (bad config, data, scales, checkpoint; NaN loss) as one line on
    stderr and exit status 2."""
    try:
        return main(argv)
    except (ConfigError, CheckpointError, TrainError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
