"""Box geometry for the losses and assigners: anchor points, ltrb <-> xyxy, IoU variants.

Anchor points follow :class:`yoloq.models.detector.Decode` exactly: per level, cell centres
``((x + 0.5) * stride, (y + 0.5) * stride)`` in input pixels, row-major, levels in order; a box is
``anchor -/+ ltrb * stride``.

The IoU functions clamp widths and heights at zero. A head without DFL regresses ltrb freely, so
early in training a predicted box can be inverted (x2 < x1); unclamped formulas (torchvision's
included) then give areas of the wrong sign and IoUs outside [0, 1].
"""
from __future__ import annotations

from typing import Sequence

import torch

EPS = 1e-7


def make_anchor_points(shapes: Sequence[tuple[int, int]], strides: Sequence[int], device=None,
                       dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Anchor points ``[A, 2]`` (x, y pixels), their strides ``[A]`` and the count per level."""
    points, stride_of, counts = [], [], []
    for (h, w), stride in zip(shapes, strides):
        ys = torch.arange(h, device=device, dtype=dtype) + 0.5
        xs = torch.arange(w, device=device, dtype=dtype) + 0.5
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((gx, gy), -1).reshape(-1, 2) * stride)
        stride_of.append(torch.full((h * w,), float(stride), device=device, dtype=dtype))
        counts.append(h * w)
    return torch.cat(points), torch.cat(stride_of), counts


def ltrb_to_xyxy(ltrb: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Distances ``[..., 4]`` (same units as ``points [..., 2]``) -> boxes x1, y1, x2, y2."""
    return torch.cat((points - ltrb[..., :2], points + ltrb[..., 2:]), -1)


def xyxy_to_ltrb(boxes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Boxes ``[..., 4]`` -> distances from ``points`` to the left, top, right, bottom sides."""
    return torch.cat((points - boxes[..., :2], boxes[..., 2:] - points), -1)


def _wh(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0), (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _inter_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union areas of broadcastable box tensors ``[..., 4]``."""
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    wa, ha = _wh(a)
    wb, hb = _wh(b)
    inter = iw * ih
    return inter, wa * ha + wb * hb - inter


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of broadcastable box tensors ``[..., 4]`` (elementwise after broadcasting)."""
    inter, union = _inter_union(a, b)
    return inter / (union + EPS)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [B, G, 4]``, ``b [B, A, 4]`` -> IoU ``[B, G, A]``."""
    return box_iou(a.unsqueeze(2), b.unsqueeze(1))


def _enclosing_wh(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cw = torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0])
    ch = torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])
    return cw, ch


def giou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Generalised IoU (Rezatofighi et al. 2019): ``IoU - (C - U) / C``, C the enclosing box area."""
    inter, union = _inter_union(pred, target)
    cw, ch = _enclosing_wh(pred, target)
    enclosing = cw * ch + EPS
    return inter / (union + EPS) - (enclosing - union) / enclosing


def siou(pred: torch.Tensor, target: torch.Tensor, theta: float = 4.0) -> torch.Tensor:
    """SIoU (Gevorgyan 2022) as a similarity: ``IoU - (distance cost + shape cost) / 2``, so the
    loss is ``1 - siou``.

    Angle cost ``Lambda = 1 - 2 sin^2(arcsin(|dy| / sigma) - pi/4)`` equals ``sin(2 alpha)``
    (alpha the angle of the centre offset), i.e. ``2 |dx| |dy| / sigma^2``, which is also what
    the paper's switch to ``beta = pi/2 - alpha`` above 45 degrees gives.
    Distance cost ``sum_{x,y} 1 - exp(-gamma rho)``, ``rho_x = (dx / c_w)^2``, ``gamma = 2 - Lambda``,
    ``c_w, c_h`` the enclosing box; shape cost ``sum_{w,h} (1 - exp(-omega))^theta``,
    ``omega_w = |w - w_gt| / max(w, w_gt)``.
    """
    inter, union = _inter_union(pred, target)
    iou = inter / (union + EPS)
    dx = (target[..., 0] + target[..., 2] - pred[..., 0] - pred[..., 2]) / 2
    dy = (target[..., 1] + target[..., 3] - pred[..., 1] - pred[..., 3]) / 2
    angle = 2 * dx.abs() * dy.abs() / (dx * dx + dy * dy + EPS)
    gamma = 2 - angle
    cw, ch = _enclosing_wh(pred, target)
    rho_x = (dx / (cw + EPS)) ** 2
    rho_y = (dy / (ch + EPS)) ** 2
    distance = (1 - torch.exp(-gamma * rho_x)) + (1 - torch.exp(-gamma * rho_y))
    wp, hp = _wh(pred)
    wt, ht = _wh(target)
    omega_w = (wp - wt).abs() / (torch.maximum(wp, wt) + EPS)
    omega_h = (hp - ht).abs() / (torch.maximum(hp, ht) + EPS)
    shape = (1 - torch.exp(-omega_w)) ** theta + (1 - torch.exp(-omega_h)) ** theta
    return iou - (distance + shape) / 2


IOU_FUNCTIONS = {"giou": giou, "siou": siou}


def points_inside_boxes(points: torch.Tensor, boxes: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """``points [A, 2]``, ``boxes [B, G, 4]`` -> ``[B, G, A]``: point strictly inside the box."""
    p = points.view(1, 1, -1, 2)
    b = boxes.unsqueeze(2)
    d = torch.cat((p - b[..., :2], b[..., 2:] - p), -1)
    return d.amin(-1) > eps

