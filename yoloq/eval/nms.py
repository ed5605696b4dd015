"""Multi-label, class-aware non-maximum suppression (YOLOv6 evaluation protocol) for a whole batch,
on the predictions' device.

Candidates are picked for the whole batch at once. Suppression runs per (image, class) group: groups
are moved to disjoint regions of the plane and suppressed together by one ``torchvision.ops.nms``
call, but only up to a candidate budget per call (4,000 on the CPU, 20,000 on a GPU, the sizes at
which torchvision itself stops merging groups). NMS compares every kept box with every later one,
so one call over a whole batch would cost about batch-size times more than one call per image
(docs/results.md, Scale); consecutive images share a call while they fit the budget, and a
single image over it is suppressed class by class.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import nms

CALL_BUDGET = {"cpu": 4000, "cuda": 20000}


def _as_tensor(preds) -> torch.Tensor:
    if isinstance(preds, np.ndarray):
        preds = torch.from_numpy(preds)
    if not isinstance(preds, torch.Tensor) or preds.ndim != 3 or preds.shape[-1] < 5:
        shape = tuple(preds.shape) if hasattr(preds, "shape") else type(preds).__name__
        raise ValueError(f"non_max_suppression: expected predictions [B, N, 4+nc], got {shape}")
    return preds.detach().float()


def _cap_candidates(image: torch.Tensor, scores: torch.Tensor, counts: list, max_candidates: int) -> torch.Tensor:
    """Indices of the candidates kept: all of them, except that an image with more than
    ``max_candidates`` keeps only its best ``max_candidates`` (rare: e.g. random weights)."""
    if max(counts, default=0) <= max_candidates:
        return torch.arange(image.numel(), device=image.device)
    keep, start = [], 0
    for n in counts:
        where = torch.arange(start, start + n, device=image.device)
        keep.append(where[scores[where].topk(max_candidates).indices.sort().values] if n > max_candidates else where)
        start += n
    return torch.cat(keep)


def _shifted_nms(boxes: torch.Tensor, scores: torch.Tensor, group: torch.Tensor, iou_thres: float) -> torch.Tensor:
    """One nms call for several groups: each shifted by ``group * span`` in float64, where a float32
    shift of 10^5 px would round the coordinates to 1/128 px."""
    span = boxes.max().double() - boxes.min().double() + 1.0
    return nms(boxes.double() + (group.double() * span)[:, None], scores.double(), iou_thres)


def _group_by_group_nms(boxes, scores, group, iou_thres) -> torch.Tensor:
    """One nms call per group (an image with more candidates than one call should take)."""
    keep = [where[nms(boxes[where], scores[where], iou_thres)]
            for where in (torch.nonzero(group == g, as_tuple=True)[0] for g in torch.unique(group))]
    keep = torch.cat(keep)
    return keep[scores[keep].sort(descending=True, stable=True).indices]


def _suppress(boxes, scores, group, counts: list, iou_thres: float) -> torch.Tensor:
    """Kept candidate indices, call by call over runs of consecutive images within the budget."""
    budget = CALL_BUDGET["cuda" if boxes.is_cuda else "cpu"]
    keep, start, end, total = [], 0, 0, 0

    def flush(a: int, b: int) -> None:
        if b > a:
            run = slice(a, b)
            call = _shifted_nms if b - a <= budget else _group_by_group_nms
            keep.append(a + call(boxes[run], scores[run], group[run], iou_thres))

    for n in counts:
        if total and total + n > budget:
            flush(start, end)
            start, total = end, 0
        end += n
        total += n
    flush(start, end)
    return torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long, device=boxes.device)


def _rank_within_image(image: torch.Tensor, batch: int) -> torch.Tensor:
    """0, 1, 2, ... within each run of equal (sorted) image indices."""
    counts = torch.bincount(image, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(image.numel(), device=image.device) - starts[image]


def batched_detections(preds, conf_thres: float = 0.03, iou_thres: float = 0.65, max_det: int = 300,
                       max_candidates: int = 30000) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``preds [B, N, 4+nc]`` (x1, y1, x2, y2, class scores) -> ``(rows [K, 6], image [K], B)``:
    rows ``(x1, y1, x2, y2, score, class)`` grouped by image (in batch order), each image's rows by
    decreasing score, at most ``max_det`` per image; ``image`` is each row's index in the batch.

    Multi-label: every (box, class) pair with score > ``conf_thres`` is a candidate, so one box can
    be kept for several classes. Suppression is per image and class (IoU > ``iou_thres`` with a
    higher-scored box of the same image and class). Only the ``max_candidates`` best pairs per image
    enter NMS, which bounds the cost when a model (e.g. random weights) scores everything high.
    """
    preds = _as_tensor(preds)
    batch, nc = preds.shape[0], preds.shape[2] - 4
    boxes, scores = preds[..., :4], preds[..., 4:]
    image, box, cls = (scores > conf_thres).nonzero(as_tuple=True)        # image-major order
    cand_scores = scores[image, box, cls]
    counts = torch.bincount(image, minlength=batch).tolist()
    kept = _cap_candidates(image, cand_scores, counts, max_candidates)
    image, box, cls, cand_scores = image[kept], box[kept], cls[kept], cand_scores[kept]
    cand_boxes = boxes[image, box]
    if cand_boxes.numel() == 0:
        return preds.new_zeros((0, 6)), image, batch
    counts = [min(n, max_candidates) for n in counts]
    keep = _suppress(cand_boxes, cand_scores, image * nc + cls, counts, iou_thres)
    keep = keep[torch.sort(image[keep], stable=True).indices]              # grouped by image, score order kept
    keep = keep[_rank_within_image(image[keep], batch) < max_det]
    rows = torch.cat((cand_boxes[keep], cand_scores[keep, None], cls[keep, None].to(preds.dtype)), 1)
    return rows, image[keep], batch


def non_max_suppression(preds, conf_thres: float = 0.03, iou_thres: float = 0.65, max_det: int = 300,
                        max_candidates: int = 30000) -> list[torch.Tensor]:
    """:func:`batched_detections` split per image: a list of ``[k, 6]`` rows ``(x1, y1, x2, y2,
    score, class)``, sorted by decreasing score, ``k <= max_det``."""
    rows, image, batch = batched_detections(preds, conf_thres, iou_thres, max_det, max_candidates)
    counts = torch.bincount(image, minlength=batch).tolist()
    return list(rows.split(counts))
