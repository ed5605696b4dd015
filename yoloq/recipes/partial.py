"""The selection set of partial quantization: COCO AP on labeled *train* images.

``quant.partial.max_drop`` searches the fewest float layers whose AP drop on a selection set of
labeled train images (disjoint from the calibration images where the split has enough) is <= the
target, and ``quant.sensitivity.metric: map`` confirms the top of the ranking with that AP
(``yoloq.quant.partial`` does both; this module only measures). Validation images are never used
here, so the number of float layers is not tuned on the images the report scores.
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Optional, Sequence

from torch import nn

from yoloq.config import DataConfig, EvalConfig, QuantConfig
from yoloq.errors import InputError
from yoloq.eval.coco_eval import evaluate_model


def selection_data(data_cfg: DataConfig, calib_files: Sequence[str], n: Optional[int], seed: int,
                   tmp_dir: Path, held_out: bool = False) -> tuple[DataConfig, dict]:
    """A DataConfig whose "val" is ``n`` *labeled train* images (calibration images last resort),
    with a filtered annotation file in ``tmp_dir``: the set the ``max_drop`` search measures on.
    ``held_out``: only images that are not calibration images (``n`` None: all of them)."""
    from yoloq.data.coco import read_coco_json
    from yoloq.data.yolo import train_ground_truth
    train_ann = data_cfg.train_ann or train_ground_truth(data_cfg)      # YOLO labels: built on demand
    if not train_ann or not Path(train_ann).is_file():
        raise InputError(f"{data_cfg.path}: train_ann is needed for --max-drop / --sensitivity map "
                         f"(mAP on labeled train images), got {data_cfg.train_ann!r}")
    gt = read_coco_json(train_ann)
    unlabeled = set(gt.get("unlabeled_image_ids", []))
    labeled_ids = {a["image_id"] for a in gt.get("annotations", [])}
    images = [im for im in sorted(gt["images"], key=lambda e: e["id"])
              if im["id"] not in unlabeled and im["id"] in labeled_ids]
    calib = set(calib_files)
    fresh = [im for im in images if im["file_name"] not in calib]
    reused = [im for im in images if im["file_name"] in calib]
    random.Random(seed).shuffle(fresh)
    random.Random(seed).shuffle(reused)
    chosen = (fresh if held_out else fresh + reused)[:n]
    if not chosen:
        raise InputError(f"{train_ann}: no labeled train image for the selection set"
                         + (" outside the calibration images" if held_out else ""))
    ids = {im["id"] for im in chosen}
    sub = {k: v for k, v in gt.items() if k not in ("images", "annotations")}
    sub["images"] = sorted(chosen, key=lambda e: e["id"])
    sub["annotations"] = [a for a in gt["annotations"] if a["image_id"] in ids]
    ann = tmp_dir / "selection_ann.json"
    ann.write_text(json.dumps(sub))
    sel = dataclasses.replace(data_cfg, val_images=data_cfg.train_images, val_ann=str(ann), val_ann_official=None,
                              val_files=None)
    info = {"images": len(chosen), "disjoint_from_calibration": sum(im["file_name"] not in calib for im in chosen),
            "source": train_ann}
    return sel, info


class Selection:
    """mAP on labeled train images (never val): what ``max_drop`` and ``sensitivity: map`` measure."""

    def __init__(self, fp32: nn.Module, data_cfg: DataConfig, calib_files: Sequence[str], qcfg: QuantConfig,
                 eval_cfg: EvalConfig, img_size: int, scratch: Path):
        self.data, self.info = selection_data(data_cfg, calib_files, qcfg.partial.select_images, qcfg.seed, scratch)
        self.eval_cfg = dataclasses.replace(eval_cfg, val_ann="val_ann")
        self.img_size = img_size
        self.fp32_ap = self.ap(fp32)

    def ap(self, model: nn.Module) -> float:
        return evaluate_model(model, self.data, self.eval_cfg, self.img_size, progress=False).stats["AP"]

    def drop(self, qmodel: nn.Module) -> float:
        return (self.fp32_ap - self.ap(qmodel)) * 100.0
