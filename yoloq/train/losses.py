"""YOLOv6 v3 detection loss: varifocal classification, IoU box loss, distribution focal loss.

    loss, parts = DetectionLoss(model_cfg, loss_cfg)(head_outputs, targets, epoch)

- ``head_outputs``: per level ``(cls_logits [B, nc, H, W], reg)``, as ``model.detect.forward_raw``
  returns them: ``reg`` is ``[B, 4 * (reg_max + 1), H, W]`` DFL bin logits when the model uses DFL,
  else the ltrb distances ``[B, 4, H, W]`` (in strides).
- ``targets``: ``[M, 6]`` rows ``(image index in batch, class, x1, y1, x2, y2)`` in input pixels.
- ``epoch``: ATSS assignment while ``epoch < loss_cfg.atss_warmup_epochs``, then task-aligned.

Terms (every one normalised by the sum of the soft class targets, at least 1):
- varifocal loss (VarifocalNet, Zhang et al. 2021) on sigmoid scores p with target q:
  ``-q (q log p + (1 - q) log(1 - p))`` for the assigned class of a foreground anchor,
  ``-alpha p^gamma log(1 - p)`` elsewhere (alpha 0.75, gamma 2);
- IoU loss ``1 - GIoU`` or ``1 - SIoU`` on foreground anchors, weighted by their target score;
- DFL (GFL, Li et al. 2020), with DFL only: for a target distance y between bins i and i + 1,
  ``-((i + 1 - y) log S_i + (y - i) log S_{i+1})``, mean over the 4 sides, same weights.
Total ``cls_weight * cls + iou_weight * iou + dfl_weight * dfl`` (1.0 / 2.5 / 0.5 in YOLOv6).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from yoloq.config import ConfigError, LossConfig, ModelConfig
from yoloq.train.assigners import ATSSAssigner, TaskAlignedAssigner
from yoloq.train.boxes import IOU_FUNCTIONS, ltrb_to_xyxy, make_anchor_points, xyxy_to_ltrb

DEFAULT_STRIDES = (8, 16, 32)


def varifocal_loss(logits: torch.Tensor, target_scores: torch.Tensor, labels_one_hot: torch.Tensor,
                   alpha: float = 0.75, gamma: float = 2.0) -> torch.Tensor:
    """Summed varifocal loss; ``labels_one_hot`` marks the (anchor, class) pairs that are positive."""
    logits = logits.float()
    p = logits.sigmoid()
    weight = alpha * p.pow(gamma) * (1 - labels_one_hot) + target_scores * labels_one_hot
    bce = F.binary_cross_entropy_with_logits(logits, target_scores, reduction="none")
    return (bce * weight).sum()


def distribution_focal_loss(bin_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``bin_logits [N, 4, bins]``, ``target [N, 4]`` in ``[0, bins - 1)`` -> per anchor ``[N]``
    (mean over the four sides)."""
    left = target.floor().long()
    right = left + 1
    w_left = right.float() - target
    w_right = target - left.float()
    log_p = F.log_softmax(bin_logits.float(), -1)
    loss = -(log_p.gather(-1, left.unsqueeze(-1)).squeeze(-1) * w_left
             + log_p.gather(-1, right.unsqueeze(-1)).squeeze(-1) * w_right)
    return loss.mean(-1)


def targets_to_padded(targets: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[M, 6]`` rows -> ``labels [B, G]``, ``boxes [B, G, 4]``, ``mask [B, G]`` (G = most per image)."""
    device = targets.device
    if targets.numel() == 0:
        return (torch.zeros(batch, 0, dtype=torch.long, device=device), targets.new_zeros(batch, 0, 4),
                torch.zeros(batch, 0, dtype=torch.bool, device=device))
    image = targets[:, 0].long()
    counts = torch.bincount(image, minlength=batch)
    g = int(counts.max())
    labels = torch.zeros(batch, g, dtype=torch.long, device=device)
    boxes = targets.new_zeros(batch, g, 4)
    mask = torch.zeros(batch, g, dtype=torch.bool, device=device)
    order = torch.argsort(image, stable=True)
    image = image[order]
    slot = torch.arange(len(image), device=device) - (torch.cumsum(counts, 0) - counts)[image]
    labels[image, slot] = targets[order, 1].long()
    boxes[image, slot] = targets[order, 2:6].float()
    mask[image, slot] = True
    return labels, boxes, mask


class DetectionLoss:
    """The YOLOv6 v3 training loss for a head with ``nc`` classes (see the module docstring)."""

    def __init__(self, model_cfg: ModelConfig, loss_cfg: Optional[LossConfig] = None,
                 strides: Sequence[int] = DEFAULT_STRIDES):
        cfg = loss_cfg or LossConfig()
        if cfg.iou_type not in IOU_FUNCTIONS:
            raise ConfigError(f"loss.iou_type: unknown value '{cfg.iou_type}'; expected one of "
                              f"{', '.join(IOU_FUNCTIONS)}")
        self.cfg = cfg
        self.nc = model_cfg.nc
        self.use_dfl, self.reg_max = model_cfg.use_dfl, model_cfg.reg_max
        self.strides = list(strides)
        self.iou_fn = IOU_FUNCTIONS[cfg.iou_type]
        self.tal = TaskAlignedAssigner(cfg.tal_topk, cfg.tal_alpha, cfg.tal_beta)
        self.atss = ATSSAssigner(cfg.atss_topk, cfg.atss_cell_size)

    def _flatten(self, head_outputs):
        cls = torch.cat([c.flatten(2) for c, _ in head_outputs], 2).transpose(1, 2)     # [B, A, nc]
        reg = torch.cat([r.flatten(2) for _, r in head_outputs], 2).transpose(1, 2)     # [B, A, 4*(R+1)]
        shapes = [tuple(c.shape[2:]) for c, _ in head_outputs]
        return cls, reg, shapes

    def _distances(self, reg: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """ltrb in strides ``[B, A, 4]`` and, with DFL, the bin logits ``[B, A, 4, bins]``."""
        if not self.use_dfl:
            return reg.float(), None
        bins = reg.float().unflatten(-1, (4, self.reg_max + 1))
        proj = torch.arange(self.reg_max + 1, device=reg.device, dtype=torch.float32)
        return (bins.softmax(-1) * proj).sum(-1), bins

    def assign(self, cls, pred_boxes, points, point_strides, counts, targets, epoch):
        labels, boxes, mask = targets_to_padded(targets, cls.shape[0])
        if epoch is not None and epoch < self.cfg.atss_warmup_epochs:
            return self.atss(points, point_strides, counts, labels, boxes, mask, self.nc, pred_boxes.detach())
        return self.tal(cls.detach().float().sigmoid(), pred_boxes.detach(), points, labels, boxes, mask)

    def __call__(self, head_outputs, targets: torch.Tensor, epoch: Optional[int] = None):
        """-> ``(loss, parts)``: the weighted total (a scalar with gradient) and the unweighted
        terms ``{'cls', 'iou'[, 'dfl']}`` (detached), for logging and the NaN check."""
        if len(head_outputs) != len(self.strides):
            raise ValueError(f"DetectionLoss: {len(head_outputs)} head levels for strides {self.strides}")
        cls, reg, shapes = self._flatten(head_outputs)
        if cls.shape[-1] != self.nc:
            raise ValueError(f"DetectionLoss: head has {cls.shape[-1]} classes, the model config says {self.nc}")
        points, point_strides, counts = make_anchor_points(shapes, self.strides, cls.device)
        ltrb, bins = self._distances(reg)
        pred_boxes = ltrb_to_xyxy(ltrb * point_strides.view(1, -1, 1), points)          # pixels
        a = self.assign(cls, pred_boxes, points, point_strides, counts, targets.to(cls.device), epoch)

        score_sum = a.scores.sum().clamp(min=1.0)
        one_hot = F.one_hot(a.labels, self.nc).float() * a.foreground.unsqueeze(-1)
        loss_cls = varifocal_loss(cls, a.scores, one_hot, self.cfg.vfl_alpha, self.cfg.vfl_gamma) / score_sum
        fg = a.foreground
        if fg.any():
            weight = a.scores.sum(-1)[fg]
            loss_iou = ((1 - self.iou_fn(pred_boxes[fg], a.boxes[fg])) * weight).sum() / score_sum
        else:                                  # keep the regression branch in the graph (DDP)
            loss_iou = reg.sum() * 0.0
        parts = {"cls": loss_cls, "iou": loss_iou}
        total = self.cfg.cls_weight * loss_cls + self.cfg.iou_weight * loss_iou
        if self.use_dfl:
            if fg.any():
                stride = point_strides.view(1, -1, 1).expand_as(ltrb)[fg]
                target = xyxy_to_ltrb(a.boxes[fg], points.unsqueeze(0).expand(*fg.shape, 2)[fg]) / stride
                target = target.clamp(0, self.reg_max - 0.01)
                loss_dfl = (distribution_focal_loss(bins[fg], target) * weight).sum() / score_sum
            else:
                loss_dfl = reg.sum() * 0.0
            parts["dfl"] = loss_dfl
            total = total + self.cfg.dfl_weight * loss_dfl
        return total, {k: v.detach() for k, v in parts.items()}
