"""``build_model(cfg.model)`` -> a YOLOv6 detector (train form); ``load_model`` adds weights and fusion."""
from __future__ import annotations

import os
from typing import Optional

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


def load_model(cfg: ModelConfig, weights: Optional[str | os.PathLike] = None, fuse: bool = True) -> nn.Module:
    """Build the model of ``cfg``, load ``weights`` (default ``cfg.weights``; every checkpoint form
    ``yoloq.weights`` reads) and, with ``fuse``, convert it to deploy form (exact up to float
    rounding). Returns it in eval mode."""
    from yoloq.weights import load_weights
    weights = weights or cfg.weights
    if not weights:
        raise ConfigError(f"model '{cfg.name}': no weights given (set model.weights in the config or pass --weights)")
    model = build_model(cfg)
    load_weights(model, weights)
    return (model.fuse() if fuse else model).eval()
