"""What a COCOeval result says beyond its 12 summary numbers: AP per class (as upstream's verbose
evaluation prints it) and the overall precision-recall curves, read from ``COCOeval.eval``.

``eval["precision"]`` has shape ``[T, R, K, A, M]``: 10 IoU thresholds (0.50:0.95), 101 recall
points, K categories, 4 area ranges (all, small, medium, large), 3 max-detection limits (1, 10,
100); -1 marks a (category, ...) cell without ground truth. AP of class k is the mean of its cells
over T and R at area "all" and 100 detections, AP50 the same at T = 0 only: exactly how
``COCOeval.summarize`` forms the overall AP / AP50 over all classes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

AREA_ALL, MAX_DETS_100 = 0, -1
RECALL_POINTS = 101


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def per_class_ap(evaluator, categories: Sequence[dict], gt_counts: Optional[dict] = None) -> list[dict]:
    """One row per category of ``evaluator.params.catIds``: ``{"category_id", "name", "AP", "AP50",
    "gt"}`` (AP as a fraction, -1 for a class without ground truth among the evaluated images)."""
    precision = np.asarray(evaluator.eval["precision"])
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    rows = []
    for k, cat_id in enumerate(evaluator.params.catIds):
        cells = precision[:, :, k, AREA_ALL, MAX_DETS_100]
        rows.append({"category_id": int(cat_id), "name": names.get(int(cat_id), str(cat_id)),
                     "AP": _mean_valid(cells), "AP50": _mean_valid(cells[0]),
                     "gt": int((gt_counts or {}).get(int(cat_id), 0))})
    return rows


def pr_curves(evaluator) -> dict:
    """Overall precision at the 101 recall points: ``AP50`` (IoU 0.5) and ``AP`` (mean over the ten
    IoU thresholds), each averaged over the classes that have ground truth (-1 cells left out)."""
    precision = np.asarray(evaluator.eval["precision"])[:, :, :, AREA_ALL, MAX_DETS_100]   # [T, R, K]
    recall = np.asarray(evaluator.params.recThrs, dtype=float)

    def average(cells: np.ndarray) -> list:          # cells [..., R, K] -> [R]
        masked = np.where(cells > -1, cells, np.nan)
        moved = np.moveaxis(masked, -2, 0).reshape(len(recall), -1)
        with np.errstate(invalid="ignore"):
            counts = np.sum(~np.isnan(moved), 1)
            sums = np.nansum(moved, 1)
        return [float(s / c) if c else 0.0 for s, c in zip(sums, counts)]

    return {"recall": recall.tolist(), "AP50": average(precision[0]), "AP": average(precision)}


def ground_truth_counts(gt: dict, image_ids: Optional[Sequence[int]] = None) -> dict:
    """Non-crowd ground-truth boxes per category id (over ``image_ids`` if given)."""
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    counts: dict = {}
    for ann in gt.get("annotations", []):
        if ann.get("iscrowd", 0) or (wanted is not None and int(ann["image_id"]) not in wanted):
            continue
        counts[int(ann["category_id"])] = counts.get(int(ann["category_id"]), 0) + 1
    return counts
