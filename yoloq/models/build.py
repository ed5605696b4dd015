"""``build_model(cfg.model)`` -> a YOLOv6 detector (train form); ``load_model`` adds weights and fusion."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from yoloq.config import ConfigError, ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "lite":
        from yoloq.models.lite import build_lite
        return build_lite(cfg)
    if cfg.arch == "yolov6":
        from yoloq.models.yolov6 import build_yolov6
        return build_yolov6(cfg)
    raise ConfigError(f"model.arch: unknown architecture '{cfg.arch}'; expected 'yolov6' or 'lite'")


NO_WEIGHTS_HINT = ("pass --weights PATH (or set model.weights in the config), or --random-weights for a "
                   "smoke test whose numbers mean nothing")


def load_model(cfg: ModelConfig, weights: Optional[str | os.PathLike] = None, fuse: bool = True,
               random_weights: bool = False, seed: int = 0) -> nn.Module:
    """Build the model of ``cfg``, load ``weights`` (default ``cfg.weights``; every checkpoint form
    ``yoloq.weights`` reads) and, with ``fuse``, convert it to deploy form (exact up to float
    rounding). ``random_weights``: seeded random initialisation instead (smoke tests). Eval mode."""
    from yoloq.weights import load_weights
    weights = weights or cfg.weights
    if random_weights:
        torch.manual_seed(seed)
        model = build_model(cfg)
    elif not weights:
        raise ConfigError(f"model '{cfg.name}': no weights: {NO_WEIGHTS_HINT}")
    else:
        model = build_model(cfg)
        load_weights(model, weights)
    return (model.fuse() if fuse else model).eval()
