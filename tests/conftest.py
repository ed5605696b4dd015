"""Shared test paths, skip markers and toy models.

``../shared`` may be a copy or a symlink: every path is resolved, so comparisons work either way.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import yaml

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

# Under pytest-xdist (pyproject's addopts: two workers) each worker computes with one thread, and so
# do the commands the tests start: two workers with two threads each on two cores made the heavy
# checks 3-4x slower (oversubscribed OpenMP). Tests that need a thread count set it themselves.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO.parent / "shared").resolve()
COCO = SHARED / "coco"
WEIGHTS = SHARED / "weights"
LITE_S_WEIGHTS = WEIGHTS / "yolov6lite_s.pt"
SPEC_KEYS = SHARED / "spec" / "yolov6_keys"
CONFIGS = REPO / "configs"
DATA_YAML = REPO / "data" / "coco_shared.yaml"
LITE_S_CFG = CONFIGS / "yolov6lite_s.yaml"

# The shared COCO subset as the tests read it: both image folders and the three annotation files
# (train boxes, the 500 val images, the 206 with official boxes). One marker for every test that
# reads it; needs_shared adds the real Lite-S weights.
COCO_FILES = (COCO / "train2017", COCO / "val2017", COCO / "annotations" / "instances_train2017.json",
              COCO / "annotations" / "instances_val2017.json",
              COCO / "annotations" / "instances_val2017_official.json")
HAVE_COCO = all(p.exists() for p in COCO_FILES)
needs_coco = pytest.mark.skipif(not HAVE_COCO, reason=f"shared COCO subset not found at {COCO}")
needs_shared = pytest.mark.skipif(not (HAVE_COCO and LITE_S_WEIGHTS.is_file()),
                                  reason=f"shared weights / COCO subset not found under {SHARED}")


def assert_one_line_usage_error(tool: str, args: list, out: Path, message: str) -> None:
    """``tools/<tool>`` with ``args --out out`` exits 2 with exactly ``message`` on stderr and
    writes nothing under ``out``."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / tool), *args, "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [message]
    assert list(out.iterdir()) == []


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


def tiny_coco(root: Path) -> Path:
    """6 images with rectangles of 3 classes; a COCO file with the 80 COCO category ids, as the
    evaluator expects; train and val are different folders with the same kind of images."""
    rng = np.random.default_rng(0)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    cat_ids = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
    for split in ("train", "val"):
        (root / split).mkdir()
        images, anns = [], []
        for i in range(1, 7):
            image = np.full((64, 80, 3), 60, np.uint8)
            c = int(rng.integers(0, 3))
            x, y = int(rng.integers(0, 40)), int(rng.integers(0, 30))
            w, h = int(rng.integers(20, 38)), int(rng.integers(20, 32))
            cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), colours[c], -1)
            cv2.imwrite(str(root / split / f"{i:012d}.png"), image)
            images.append({"id": i, "file_name": f"{i:012d}.png", "width": 80, "height": 64})
            anns.append({"id": i, "image_id": i, "category_id": cat_ids[c], "bbox": [x, y, w, h], "area": w * h,
                         "iscrowd": 0})
        (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": [
            {"id": i, "name": str(i)} for i in cat_ids]}))
    unlabelled = {"images": json.loads((root / "train.json").read_text())["images"], "annotations": [],
                  "categories": [{"id": i, "name": str(i)} for i in cat_ids]}
    (root / "unlabelled.json").write_text(json.dumps(unlabelled))
    for name, ann in (("data", "train.json"), ("nolabels", "unlabelled.json")):
        (root / f"{name}.yaml").write_text(yaml.safe_dump({
            "train_images": "train", "train_ann": ann, "val_images": "val", "val_ann": "val.json", "nc": 80}))
    return root / "data.yaml"


def read_spec(name: str) -> list[tuple[str, tuple]]:
    """An upstream key list (``SPEC_KEYS/<name>``) as (state-dict key, shape) rows; skips the test
    when the file is not there."""
    path = SPEC_KEYS / name
    if not path.is_file():
        pytest.skip(f"upstream key list {path} not available")
    rows = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#") and not line.startswith("deploy keys"):
            key, shape = line.split(" ", 1)
            rows.append((key, tuple(ast.literal_eval(shape))))
    return rows
