"""RepOpt step 2: extract the trained scales of a hyper-search model into a scales file.

    yoloq repopt-scales --cfg yolov6n_hs \\
        --weights runs/train/yolov6n_hs/best.pt --out runs/train/yolov6n_hs/scales.pt

The file holds, per LinearAddBlock (by module path), the per-channel scales of its 3x3, 1x1 and
identity branches. ``yoloq train --cfg yolov6n_repopt --scales <file>`` checks it
against the target model, re-initialises the target's kernels from it and trains with the
RepOptimizer (gradient masks from the scales). See docs/training.md.
"""
from __future__ import annotations

from typing import Optional, Sequence

from yoloq.cli.common import parser
from yoloq.config import ConfigError, load_config
from yoloq.io import check_output_file


def build_parser(prog: str = "yoloq repopt-scales"):
    p = parser(prog, __doc__)
    p.add_argument("--cfg", required=True, help="the hyper-search model's config (block: hyper_search)")
    p.add_argument("--weights", help="its trained weights (default: model.weights of the config)")
    p.add_argument("--out", required=True, help="scales file to write")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from yoloq.models.blocks import LinearAddBlock
    from yoloq.models.build import build_model, load_weights
    from yoloq.train.repopt import extract_scales, save_scales
    a = build_parser().parse_args(argv)
    check_output_file(a.out, "--out", inputs={"--weights": a.weights, "--cfg": str(a.cfg)})
    cfg = load_config(a.cfg)
    weights = a.weights or cfg.model.weights
    if not weights:
        raise ConfigError(f"{a.cfg}: no --weights and no model.weights: the scales come from a trained "
                          "hyper-search model")
    model = build_model(cfg.model)
    load_weights(model, weights)
    path = save_scales(extract_scales(model, source=str(weights)), a.out)
    print(f"wrote {path} ({sum(isinstance(m, LinearAddBlock) for m in model.modules())} blocks)")
    return 0
