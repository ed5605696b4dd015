"""Multi-label, class-aware non-maximum suppression (YOLOv6 evaluation protocol)."""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import batched_nms


def non_max_suppression(preds, conf_thres: float = 0.03, iou_thres: float = 0.65, max_det: int = 300,
                        max_candidates: int = 30000) -> list[torch.Tensor]:
    """``preds [B, N, 4+nc]`` (x1,y1,x2,y2, class scores) -> per image ``[k, 6]`` rows
    ``(x1, y1, x2, y2, score, class)``, sorted by decreasing score, ``k <= max_det``.

    Multi-label: every (box, class) pair with score > ``conf_thres`` is a candidate, so one box can
    be kept for several classes. Suppression is per class (IoU > ``iou_thres`` with a higher-scored
    box of the same class). Only the ``max_candidates`` best pairs enter NMS, which bounds the cost
    when a model (e.g. random weights) scores everything high; real models stay far below it.
    """
    if isinstance(preds, np.ndarray):
        preds = torch.from_numpy(preds)
    if not isinstance(preds, torch.Tensor) or preds.ndim != 3 or preds.shape[-1] < 5:
        shape = tuple(preds.shape) if hasattr(preds, "shape") else type(preds).__name__
        raise ValueError(f"non_max_suppression: expected predictions [B, N, 4+nc], got {shape}")
    preds = preds.detach().float()
    return [_nms_one(p, conf_thres, iou_thres, max_det, max_candidates) for p in preds]


def _nms_one(pred: torch.Tensor, conf_thres: float, iou_thres: float, max_det: int,
             max_candidates: int) -> torch.Tensor:
    boxes, scores = pred[:, :4], pred[:, 4:]
    box_idx, cls = (scores > conf_thres).nonzero(as_tuple=True)
    cand_scores = scores[box_idx, cls]
    if cand_scores.numel() > max_candidates:
        top = cand_scores.topk(max_candidates).indices
        box_idx, cls, cand_scores = box_idx[top], cls[top], cand_scores[top]
    cand_boxes = boxes[box_idx]
    keep = batched_nms(cand_boxes, cand_scores, cls, iou_thres)[:max_det]   # sorted by score
    return torch.cat((cand_boxes[keep], cand_scores[keep, None], cls[keep, None].to(pred.dtype)), 1)
