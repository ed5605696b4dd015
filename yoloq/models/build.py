"""build_model(cfg.model) -> a YOLOv6 detector (train form; call .fuse() for the deploy form)."""
from __future__ import annotations

from torch import nn

from ..config import ConfigError, ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "lite":
        from .lite import build_lite
        return build_lite(cfg)
    if cfg.arch == "yolov6":
        from .yolov6 import build_yolov6
        return build_yolov6(cfg)
    raise ConfigError(f"model.arch: unknown architecture '{cfg.arch}'; expected 'yolov6' or 'lite'")
