"""Label assignment: which anchor points learn which ground-truth box, and with what class target.

Both assigners take padded ground truth per image (``gt_boxes [B, G, 4]`` xyxy pixels,
``gt_labels [B, G]``, ``gt_mask [B, G]`` True for real boxes) and anchor points from
:func:`yoloq.train.boxes.make_anchor_points`, and return an :class:`Assignment`.

- :class:`TaskAlignedAssigner` (TOOD, Feng et al. 2021; YOLOv6 v3 after the warm-up epochs):
  alignment ``t = s^alpha * u^beta`` (s: predicted score of the gt's class, u: IoU of the predicted
  box with the gt), candidates are anchor points inside the gt, the ``topk`` largest ``t`` become
  positives; an anchor claimed by several gts keeps the one with the highest IoU. The class target
  is ``t`` normalised per gt so that its largest value equals the largest IoU among that gt's
  positives: ``t * max_iou / max_t``.
- :class:`ATSSAssigner` (Zhang et al. 2020; YOLOv6's warm-up): anchor boxes of ``cell_size``
  strides around each point; per level the ``topk`` anchors nearest to the gt centre are
  candidates; positives are candidates whose IoU with the gt is at least mean + standard deviation
  (unbiased) of the candidates' IoUs and whose point lies inside the gt; ties between gts go to the
  highest IoU. The class target is 1, or (VarifocalNet's IoU-aware target) the IoU of the
  predicted box with its gt when predicted boxes are given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from yoloq.train.boxes import box_iou, pairwise_iou, points_inside_boxes


@dataclass
class Assignment:
    labels: torch.Tensor         # [B, A] class index of the assigned gt (0 where background)
    boxes: torch.Tensor          # [B, A, 4] assigned gt box (zeros where background)
    scores: torch.Tensor         # [B, A, C] soft class targets (zeros where background)
    foreground: torch.Tensor     # [B, A] bool
    gt_index: torch.Tensor       # [B, A] index of the assigned gt (0 where background)


def _background(batch: int, anchors: int, classes: int, like: torch.Tensor) -> Assignment:
    return Assignment(labels=torch.zeros(batch, anchors, dtype=torch.long, device=like.device),
                      boxes=like.new_zeros(batch, anchors, 4),
                      scores=like.new_zeros(batch, anchors, classes),
                      foreground=torch.zeros(batch, anchors, dtype=torch.bool, device=like.device),
                      gt_index=torch.zeros(batch, anchors, dtype=torch.long, device=like.device))


def keep_best_gt(positive: torch.Tensor, ious: torch.Tensor) -> torch.Tensor:
    """``positive [B, G, A]``: where an anchor is positive for several gts, keep only the gt
    (among those) with the highest IoU."""
    multiple = positive.sum(1, keepdim=True) > 1                         # [B, 1, A]
    best = torch.where(positive, ious, torch.full_like(ious, -1.0)).argmax(1)   # [B, A]
    best_mask = F.one_hot(best, positive.shape[1]).permute(0, 2, 1).bool()      # [B, G, A]
    return torch.where(multiple, best_mask & positive, positive)


def _gather_targets(positive: torch.Tensor, gt_labels: torch.Tensor, gt_boxes: torch.Tensor):
    """Per anchor: foreground flag, gt index, label and box of its (single) positive gt."""
    foreground = positive.any(1)                                         # [B, A]
    gt_index = positive.float().argmax(1)                                # [B, A]
    labels = gt_labels.long().gather(1, gt_index) * foreground
    boxes = gt_boxes.gather(1, gt_index.unsqueeze(-1).expand(-1, -1, 4)) * foreground.unsqueeze(-1)
    return foreground, gt_index * foreground, labels, boxes


class TaskAlignedAssigner:
    """Task-aligned assignment (TOOD); YOLOv6 v3 uses ``topk=13, alpha=1, beta=6``."""

    def __init__(self, topk: int = 13, alpha: float = 1.0, beta: float = 6.0, eps: float = 1e-9):
        self.topk, self.alpha, self.beta, self.eps = topk, alpha, beta, eps

    @torch.no_grad()
    def __call__(self, pred_scores: torch.Tensor, pred_boxes: torch.Tensor, anchor_points: torch.Tensor,
                 gt_labels: torch.Tensor, gt_boxes: torch.Tensor, gt_mask: torch.Tensor) -> Assignment:
        """``pred_scores [B, A, C]`` (sigmoid probabilities), ``pred_boxes [B, A, 4]`` pixels."""
        batch, anchors, classes = pred_scores.shape
        if gt_boxes.shape[1] == 0 or not gt_mask.any():
            return _background(batch, anchors, classes, pred_boxes)
        pred_scores, pred_boxes, gt_boxes = pred_scores.float(), pred_boxes.float(), gt_boxes.float()
        ious = pairwise_iou(gt_boxes, pred_boxes)                                   # [B, G, A]
        label_index = gt_labels.long().clamp(0, classes - 1).unsqueeze(-1).expand(-1, -1, anchors)
        scores = pred_scores.transpose(1, 2).gather(1, label_index)                 # [B, G, A]
        alignment = scores.pow(self.alpha) * ious.pow(self.beta)
        candidate = points_inside_boxes(anchor_points, gt_boxes) & gt_mask.unsqueeze(-1)
        metric = torch.where(candidate, alignment, torch.full_like(alignment, -1.0))
        top = metric.topk(min(self.topk, anchors), dim=-1).indices                  # [B, G, k]
        in_top = torch.zeros_like(candidate).scatter_(-1, top, True)
        positive = keep_best_gt(in_top & candidate, ious)

        foreground, gt_index, labels, boxes = _gather_targets(positive, gt_labels, gt_boxes)
        aligned = alignment * positive
        max_alignment = aligned.amax(-1, keepdim=True)                              # [B, G, 1]
        max_iou = (ious * positive).amax(-1, keepdim=True)
        normalised = (aligned * max_iou / (max_alignment + self.eps)).amax(1)       # [B, A]
        target = F.one_hot(labels, classes).float() * (normalised * foreground).unsqueeze(-1)
        return Assignment(labels, boxes, target, foreground, gt_index)


class ATSSAssigner:
    """Adaptive training sample selection; YOLOv6 uses ``topk=9`` and anchor boxes of 5 strides."""

    def __init__(self, topk: int = 9, cell_size: float = 5.0):
        self.topk, self.cell_size = topk, cell_size

    def anchor_boxes(self, anchor_points: torch.Tensor, anchor_strides: torch.Tensor) -> torch.Tensor:
        half = (self.cell_size * anchor_strides / 2).unsqueeze(-1)
        return torch.cat((anchor_points - half, anchor_points + half), -1)

    def _candidates(self, distances: torch.Tensor, level_counts: Sequence[int]) -> torch.Tensor:
        """``[B, G, A]`` True for the ``topk`` nearest anchors of each level."""
        chosen, start = [], 0
        for count in level_counts:
            d = distances[..., start:start + count]
            idx = d.topk(min(self.topk, count), dim=-1, largest=False).indices
            chosen.append(torch.zeros_like(d, dtype=torch.bool).scatter_(-1, idx, True))
            start += count
        return torch.cat(chosen, -1)

    @torch.no_grad()
    def __call__(self, anchor_points: torch.Tensor, anchor_strides: torch.Tensor, level_counts: Sequence[int],
                 gt_labels: torch.Tensor, gt_boxes: torch.Tensor, gt_mask: torch.Tensor, num_classes: int,
                 pred_boxes: Optional[torch.Tensor] = None) -> Assignment:
        batch, anchors = gt_boxes.shape[0], anchor_points.shape[0]
        like = anchor_points if pred_boxes is None else pred_boxes
        if gt_boxes.shape[1] == 0 or not gt_mask.any():
            return _background(batch, anchors, num_classes, like.float())
        gt_boxes = gt_boxes.float()
        boxes = self.anchor_boxes(anchor_points.float(), anchor_strides.float())
        ious = pairwise_iou(gt_boxes, boxes.unsqueeze(0).expand(batch, -1, -1))     # [B, G, A]
        centres = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
        distances = (centres.unsqueeze(2) - anchor_points.float().view(1, 1, -1, 2)).norm(dim=-1)
        candidate = self._candidates(distances, level_counts)
        n = candidate.sum(-1, keepdim=True).float()
        mean = (ious * candidate).sum(-1, keepdim=True) / n
        std = (((ious - mean) ** 2 * candidate).sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        positive = (candidate & (ious >= mean + std) & points_inside_boxes(anchor_points, gt_boxes)
                    & gt_mask.unsqueeze(-1))
        positive = keep_best_gt(positive, ious)

        foreground, gt_index, labels, target_boxes = _gather_targets(positive, gt_labels, gt_boxes)
        quality = foreground.float()
        if pred_boxes is not None:
            quality = box_iou(pred_boxes.float().detach(), target_boxes) * foreground
        target = F.one_hot(labels, num_classes).float() * quality.unsqueeze(-1)
        return Assignment(labels, target_boxes, target, foreground, gt_index)
