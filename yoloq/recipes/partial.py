"""Partial quantization: which layers stay in floating point, chosen on labeled *train* images.

``--skip-layers K`` keeps the K layers the fast sensitivity metric ranks worst in float;
``max_drop`` searches the smallest such K whose COCO AP drop on a selection set of labeled train
images (disjoint from the calibration images where the split has enough) is <= the target;
``sensitivity: map`` confirms the top of the ranking with that mAP. Validation images are never
used here, so the number of float layers is not tuned on the images the report scores.
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Optional, Sequence

from torch import nn
from tqdm import tqdm

from yoloq.config import DataConfig, EvalConfig, QuantConfig
from yoloq.errors import InputError
from yoloq.eval.coco_eval import evaluate_model
from yoloq.quant.prepare import set_layers_quantized
from yoloq.quant.sensitivity import search_skip_count
from yoloq.quant.state import quant_state


def selection_data(data_cfg: DataConfig, calib_files: Sequence[str], n: int, seed: int,
                   tmp_dir: Path) -> tuple[DataConfig, dict]:
    """A DataConfig whose "val" is ``n`` *labeled train* images (calibration images last resort),
    with a filtered annotation file in ``tmp_dir``: the set the ``max_drop`` search measures on."""
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
    chosen = (fresh + reused)[:n]
    if not chosen:
        raise InputError(f"{train_ann}: no labeled train image for the selection set")
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
        self.data, self.info = selection_data(data_cfg, calib_files, qcfg.select_images, qcfg.seed, scratch)
        self.eval_cfg = dataclasses.replace(eval_cfg, val_ann="val_ann")
        self.img_size = img_size
        self.fp32_ap = self.ap(fp32)

    def ap(self, model: nn.Module) -> float:
        return evaluate_model(model, self.data, self.eval_cfg, self.img_size, progress=False).stats["AP"]

    def drop(self, qmodel: nn.Module) -> float:
        return (self.fp32_ap - self.ap(qmodel)) * 100.0


def partial_quantization(qmodel: nn.Module, sensitivity: dict, selection: Optional[Selection],
                         qcfg: QuantConfig, skip_count: Optional[int], progress: bool) -> dict:
    """Keep the most sensitive layers in float: a fixed count (``skip_count``) or the smallest count
    whose AP drop on the selection set is <= ``qcfg.max_drop``. Layers named in ``skip_layers``
    stay in float throughout and are not counted."""
    explicit = set(quant_state(qmodel).skip_layers)
    ranked = [r["layer"] for r in sensitivity["ranking"] if r["layer"] not in explicit]

    def keep_in_float(layers: Sequence[str]) -> None:
        set_layers_quantized(qmodel, ranked, True)
        if layers:
            set_layers_quantized(qmodel, list(layers), False)

    if skip_count:
        keep_in_float(ranked[:skip_count])
        return {"mode": f"--skip-layers {skip_count} (most sensitive by the fast metric)", "k": skip_count}
    if qcfg.max_drop is None:
        return {"mode": None}

    def measure(layers: list[str]) -> float:
        keep_in_float(layers)
        return selection.drop(qmodel)

    k, trace = search_skip_count(ranked, measure, qcfg.max_drop, max_k=qcfg.max_skip, progress=progress)
    keep_in_float(ranked[:k])
    note = (f"searched on {selection.info['images']} labeled train images "
            f"({selection.info['disjoint_from_calibration']} not used for calibration), "
            f"FP32 AP there {selection.fp32_ap * 100:.2f}; never on val")
    if all(t["drop"] > qcfg.max_drop for t in trace):
        note += f"; target not reached: kept the {k} most sensitive layers in float"
    return {"mode": f"--max-drop {qcfg.max_drop}", "k": k, "search": trace,
            "metric": "AP drop (points) on labeled train images", "note": note}


def confirm_with_map(qmodel: nn.Module, sensitivity: dict, selection: Selection, top: int, progress: bool) -> None:
    """For the ``top`` most sensitive layers: selection-set AP drop with that layer alone in float
    (everything else as currently configured); stored as ``map_drop`` on the ranking rows."""
    current = list(quant_state(qmodel).skip_layers)
    base = selection.drop(qmodel)
    sensitivity["map_reference_drop"] = base
    for row in tqdm(sensitivity["ranking"][:top], desc="sensitivity (mAP)", disable=not progress):
        if row["layer"] in current:
            continue
        set_layers_quantized(qmodel, [row["layer"]], False)
        row["map_drop"] = selection.drop(qmodel)
        set_layers_quantized(qmodel, [row["layer"]], True)
    sensitivity["map_metric"] = ("AP drop (points) vs FP32 on labeled train images with this layer kept in float; "
                                 f"all layers quantized: {base:.2f}")
