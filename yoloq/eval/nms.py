"""Multi-label, class-aware non-maximum suppression (YOLOv6 evaluation protocol), a whole batch at
once on the predictions' device."""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import nms


def _as_tensor(preds) -> torch.Tensor:
    if isinstance(preds, np.ndarray):
        preds = torch.from_numpy(preds)
    if not isinstance(preds, torch.Tensor) or preds.ndim != 3 or preds.shape[-1] < 5:
        shape = tuple(preds.shape) if hasattr(preds, "shape") else type(preds).__name__
        raise ValueError(f"non_max_suppression: expected predictions [B, N, 4+nc], got {shape}")
    return preds.detach().float()


def _cap_candidates(image: torch.Tensor, scores: torch.Tensor, batch: int, max_candidates: int) -> torch.Tensor:
    """Indices of the candidates kept: all of them, except that an image with more than
    ``max_candidates`` keeps only its best ``max_candidates`` (rare: e.g. random weights)."""
    counts = torch.bincount(image, minlength=batch)
    if counts.numel() == 0 or int(counts.max()) <= max_candidates:
        return torch.arange(image.numel(), device=image.device)
    keep = []
    for b in range(batch):
        where = (image == b).nonzero(as_tuple=True)[0]
        if where.numel() > max_candidates:
            where = where[scores[where].topk(max_candidates).indices]
        keep.append(where)
    return torch.cat(keep).sort().values


def batched_detections(preds, conf_thres: float = 0.03, iou_thres: float = 0.65, max_det: int = 300,
                       max_candidates: int = 30000) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``preds [B, N, 4+nc]`` (x1, y1, x2, y2, class scores) -> ``(rows [K, 6], image [K], B)``:
    rows ``(x1, y1, x2, y2, score, class)`` grouped by image (in batch order), each image's rows by
    decreasing score, at most ``max_det`` per image; ``image`` is each row's index in the batch.

    Multi-label: every (box, class) pair with score > ``conf_thres`` is a candidate, so one box can
    be kept for several classes. Suppression is per image and class (IoU > ``iou_thres`` with a
    higher-scored box of the same image and class): one ``torchvision.ops.nms`` call for the batch,
    with each (image, class) group moved to its own region of the plane. The boxes are shifted in
    float64 so the shift costs no precision (in float32 a shift of 10^5 pixels would round the
    coordinates to 1/128 px). Only the ``max_candidates`` best pairs per image enter NMS, which
    bounds the cost when a model (e.g. random weights) scores everything high.
    """
    preds = _as_tensor(preds)
    batch, nc = preds.shape[0], preds.shape[2] - 4
    boxes, scores = preds[..., :4], preds[..., 4:]
    image, box, cls = (scores > conf_thres).nonzero(as_tuple=True)
    cand_scores = scores[image, box, cls]
    kept = _cap_candidates(image, cand_scores, batch, max_candidates)
    image, box, cls, cand_scores = image[kept], box[kept], cls[kept], cand_scores[kept]
    cand_boxes = boxes[image, box]
    if cand_boxes.numel() == 0:
        return preds.new_zeros((0, 6)), image, batch
    group = (image * nc + cls).double()
    span = cand_boxes.max().double() - cand_boxes.min().double() + 1.0
    shifted = cand_boxes.double() + (group * span)[:, None]
    keep = nms(shifted, cand_scores.double(), iou_thres)                  # by decreasing score
    keep = keep[torch.sort(image[keep], stable=True).indices]             # grouped by image, order kept
    keep = keep[_rank_within_image(image[keep], batch) < max_det]
    rows = torch.cat((cand_boxes[keep], cand_scores[keep, None], cls[keep, None].to(preds.dtype)), 1)
    return rows, image[keep], batch


def _rank_within_image(image: torch.Tensor, batch: int) -> torch.Tensor:
    """0, 1, 2, ... within each run of equal (sorted) image indices."""
    counts = torch.bincount(image, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(image.numel(), device=image.device) - starts[image]


def non_max_suppression(preds, conf_thres: float = 0.03, iou_thres: float = 0.65, max_det: int = 300,
                        max_candidates: int = 30000) -> list[torch.Tensor]:
    """:func:`batched_detections` split per image: a list of ``[k, 6]`` rows ``(x1, y1, x2, y2,
    score, class)``, sorted by decreasing score, ``k <= max_det``."""
    rows, image, batch = batched_detections(preds, conf_thres, iou_thres, max_det, max_candidates)
    counts = torch.bincount(image, minlength=batch).tolist()
    return list(rows.split(counts))
