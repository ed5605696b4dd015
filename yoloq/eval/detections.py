"""Detections in the COCO results format, stored compactly.

A full COCO val2017 run keeps up to 300 detections per image (1.5 million rows): as Python dicts
that is about 1 GB, as one float64 array of ``[image_id, x, y, w, h, score, category_id]`` rows it
is 84 MB, and it travels between processes as one pickle. :class:`CocoDetections` behaves like the
list of dicts the COCO evaluation server takes (``len``, iteration, indexing, ``==``) and turns into
that list only when asked (``to_list``: COCOeval, JSON files).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

COLUMNS = ("image_id", "x", "y", "w", "h", "score", "category_id")
BOX_DECIMALS, SCORE_DECIMALS = 3, 5          # upstream YOLOv6's predictions.json


class CocoDetections:
    """``[K, 7]`` float64 rows ``image_id, x, y, w, h, score, category_id`` (COCO pixels, box as
    x, y, width, height), in evaluation order: images in dataset order, each by decreasing score."""

    def __init__(self, rows: np.ndarray | None = None):
        rows = np.zeros((0, len(COLUMNS))) if rows is None else np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != len(COLUMNS):
            raise ValueError(f"CocoDetections: expected rows [K, {len(COLUMNS)}], got {rows.shape}")
        self.rows = rows

    @classmethod
    def concat(cls, parts: Sequence["CocoDetections | np.ndarray"]) -> "CocoDetections":
        arrays = [p.rows if isinstance(p, CocoDetections) else np.asarray(p, np.float64) for p in parts]
        arrays = [a for a in arrays if len(a)]
        return cls(np.concatenate(arrays) if arrays else None)

    def __len__(self) -> int:
        return len(self.rows)

    def _dict(self, row: np.ndarray) -> dict:
        return {"image_id": int(row[0]), "category_id": int(row[6]), "bbox": row[1:5].tolist(),
                "score": float(row[5])}

    def __getitem__(self, index: int) -> dict:
        return self._dict(self.rows[index])

    def __iter__(self) -> Iterator[dict]:
        return (self._dict(row) for row in self.rows)

    def to_list(self) -> list[dict]:
        """The COCO results list (what ``COCO.loadRes`` and the evaluation server take)."""
        return list(self)

    def image_ids(self) -> set[int]:
        return {int(i) for i in np.unique(self.rows[:, 0])}

    def __eq__(self, other) -> bool:
        if isinstance(other, CocoDetections):
            return np.array_equal(self.rows, other.rows)
        if isinstance(other, list):
            return self.to_list() == other
        return NotImplemented

    def __repr__(self) -> str:
        return f"CocoDetections({len(self)} rows, {len(self.image_ids())} images)"


def to_original(dets: torch.Tensor, image_index: torch.Tensor, metas: Sequence) -> torch.Tensor:
    """Letterboxed x1, y1, x2, y2 of NMS rows ``[K, >=4]`` (row k belongs to ``metas[image_index[k]]``)
    -> float64 CPU boxes in original image pixels: padding and ratio undone, clipped to the image."""
    dets = dets.detach().to("cpu", torch.float64)
    per_image = torch.tensor([[m.pad[0], m.pad[1], m.ratio, m.orig_w, m.orig_h] for m in metas],
                             dtype=torch.float64)[image_index.detach().cpu().long()]
    xyxy = (dets[:, :4] - per_image[:, :2].repeat(1, 2)) / per_image[:, 2:3]
    xyxy[:, 0::2] = torch.minimum(xyxy[:, 0::2].clamp(min=0), per_image[:, 3:4])
    xyxy[:, 1::2] = torch.minimum(xyxy[:, 1::2].clamp(min=0), per_image[:, 4:5])
    return xyxy


def batch_rows(dets: torch.Tensor, image_index: torch.Tensor, metas: Sequence, cat_ids: Sequence[int]) -> np.ndarray:
    """NMS rows of one batch -> COCO result rows, all images at once.

    ``dets [K, 6]`` (x1, y1, x2, y2 in letterboxed pixels, score, class index) and ``image_index
    [K]`` (position of each row's image in ``metas``) may live on any device. Boxes are mapped back
    to the original image (:func:`to_original`, float64) and rounded as upstream writes them (bbox
    3 decimals, score 5)."""
    if dets.shape[0] == 0:
        return np.zeros((0, len(COLUMNS)))
    xyxy = to_original(dets, image_index, metas)
    xywh = torch.cat((xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]), 1).numpy()
    dets = dets.detach().to("cpu", torch.float64)
    image_ids = np.asarray([m.image_id for m in metas], dtype=np.float64)[image_index.detach().cpu().long().numpy()]
    categories = np.asarray(cat_ids, dtype=np.float64)[dets[:, 5].long().numpy()]
    return np.column_stack((image_ids, np.round(xywh, BOX_DECIMALS), np.round(dets[:, 4].numpy(), SCORE_DECIMALS),
                            categories))
