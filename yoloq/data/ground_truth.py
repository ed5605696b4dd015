"""Checks on COCO ground truth when it is read, so a broken file is an error, not a quiet score.

What pycocotools assumes and never checks: an ``annotations`` list; every annotation with a known
``image_id``, a known ``category_id`` and a numeric ``bbox`` ``[x, y, w, h]`` with ``w, h >= 0``;
every image listed once. Violations raise ``GroundTruthError`` naming the file, the image id and
the annotation id. A zero-width or zero-height box can never be matched (any score it gets is
lost recall); it is kept, as COCOeval scores it, with a warning naming it (the shared val file has
one such box: image 361919, see ../shared/coco/README.md).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from yoloq.errors import InputError

MAX_NAMED = 5
_warned_zero_size: set[str] = set()


class GroundTruthError(InputError):
    """Ground-truth annotations that COCO evaluation cannot score correctly."""


def validate_ground_truth(data: dict, ann_file: str | Path) -> None:
    """Raise ``GroundTruthError`` for what would give a silently wrong mAP; warn about boxes that
    can never be matched."""
    if "annotations" not in data or not isinstance(data["annotations"], list):
        raise GroundTruthError(f"{ann_file}: no 'annotations' list: this file has no ground truth to evaluate "
                               f"against (an image-info file?); expected a COCO instances JSON")
    image_ids = _unique_image_ids(data, ann_file)
    categories = {c.get("id") for c in data.get("categories", []) if isinstance(c, dict)}
    degenerate, ann_ids = [], set()
    for ann in data["annotations"]:
        where = f"{ann_file}: annotation {ann.get('id', '?')!s:.40} (image {ann.get('image_id', '?')!s:.40})" \
            if isinstance(ann, dict) else f"{ann_file}: annotation {ann!r:.80}"
        if not isinstance(ann, dict):
            raise GroundTruthError(f"{where}: expected an object")
        ann_id = ann.get("id")
        if not _hashable(ann_id):
            raise GroundTruthError(f"{where}: id must be a number")
        if ann_id is not None and ann_id in ann_ids:
            raise GroundTruthError(f"{where}: annotation id listed twice (the box would be counted twice)")
        ann_ids.add(ann_id)
        if not _hashable(ann.get("image_id")) or ann.get("image_id") not in image_ids:
            raise GroundTruthError(f"{where}: image_id is not in the 'images' list")
        if not _hashable(ann.get("category_id")) or ann.get("category_id") not in categories:
            raise GroundTruthError(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
        x, y, w, h = _bbox(ann.get("bbox"), where)
        if w < 0 or h < 0:
            raise GroundTruthError(f"{where}: bbox {ann['bbox']} has a negative width or height; "
                                   f"expected [x, y, w, h] with w, h >= 0")
        if w == 0 or h == 0:
            degenerate.append(f"annotation {ann.get('id')} (image {ann['image_id']}, bbox {ann['bbox']})")
    message = (f"{ann_file}: {len(degenerate)} zero-size box(es) can never be matched and cost recall: "
               f"{'; '.join(degenerate[:MAX_NAMED])}")
    if degenerate and message not in _warned_zero_size:      # once per dataset, not on every evaluation
        _warned_zero_size.add(message)
        warnings.warn(message, stacklevel=3)


def _unique_image_ids(data: dict, ann_file: str | Path) -> set:
    images = data.get("images")
    if not isinstance(images, list):
        raise GroundTruthError(f"{ann_file}: no 'images' list; is this a COCO instances file?")
    ids, names = set(), set()
    for entry in images:
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            raise GroundTruthError(f"{ann_file}: image entry without 'id'/'file_name': {entry!r:.200}")
        if entry["id"] in ids:
            raise GroundTruthError(f"{ann_file}: image id {entry['id']} is listed twice (it would be evaluated twice)")
        if entry["file_name"] in names:
            raise GroundTruthError(f"{ann_file}: image file {entry['file_name']} is listed twice "
                                   f"(second time as id {entry['id']})")
        ids.add(entry["id"])
        names.add(entry["file_name"])
    return ids


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _bbox(value: Any, where: str) -> tuple[float, float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise GroundTruthError(f"{where}: bbox must be a list [x, y, w, h], got {value!r:.80}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise GroundTruthError(f"{where}: bbox {value!r:.80} must hold 4 finite numbers")
    return tuple(float(v) for v in value)
