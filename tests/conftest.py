"""Shared test paths, skip markers and toy models.

``../shared`` may be a copy or a symlink: every path is resolved, so comparisons work either way.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO.parent / "shared").resolve()
COCO = SHARED / "coco"
WEIGHTS = SHARED / "weights"
LITE_S_WEIGHTS = WEIGHTS / "yolov6lite_s.pt"
SPEC_KEYS = SHARED / "spec" / "yolov6_keys"
CONFIGS = REPO / "configs"
DATA_YAML = REPO / "data" / "coco_shared.yaml"
LITE_S_CFG = CONFIGS / "yolov6lite_s.yaml"

needs_coco = pytest.mark.skipif(not (COCO / "annotations").is_dir(), reason=f"shared COCO data not found at {COCO}")
needs_shared = pytest.mark.skipif(not (LITE_S_WEIGHTS.is_file() and (COCO / "train2017").is_dir()),
                                  reason=f"shared weights / COCO data not found under {SHARED}")


def toy_convnet(sensitive: bool = True) -> nn.Sequential:
    """Four convs; with ``sensitive``, conv '2' gets one huge weight per output channel on an
    input channel that is almost dead. In float that weight barely matters, but it sets every
    per-channel scale of conv 2, so INT8 rounds all its other weights to zero."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    if sensitive:
        with torch.no_grad():
            m[0].weight[0].mul_(1e-4)
            m[0].bias[0] = 0.0
            m[2].weight[:, 0, 1, 1] = 50.0
    return m
