"""Losses, IoU variants and assigners of yoloq.train on hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import generalized_box_iou

from yoloq.config import LossConfig, ModelConfig
from yoloq.models.detector import Decode
from yoloq.train.assigners import ATSSAssigner, TaskAlignedAssigner, keep_best_gt
from yoloq.train.boxes import giou, make_anchor_points, siou
from yoloq.train.losses import DetectionLoss, distribution_focal_loss, targets_to_padded, varifocal_loss


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# --------------------------------------------------------------------------- IoU variants


def test_giou_by_hand_and_against_torchvision():
    # [0,0,2,2] vs [1,1,3,3]: intersection 1, union 7, enclosing box 3x3 = 9
    assert giou(t(0, 0, 2, 2), t(1, 1, 3, 3)).item() == pytest.approx(1 / 7 - 2 / 9, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 50
    a = torch.cat((xy, xy + 1 + torch.rand(50, 2, generator=g) * 30), 1).double()
    xy = torch.rand(50, 2, generator=g) * 50
    b = torch.cat((xy, xy + 1 + torch.rand(50, 2, generator=g) * 30), 1).double()
    assert torch.allclose(giou(a, b), generalized_box_iou(a, b).diagonal(), atol=1e-6)


def paper_angle_cost(dx: float, dy: float) -> float:
    """SIoU paper: x = sin(alpha) (alpha the angle to the x axis), switched to beta = pi/2 - alpha
    above pi/4; Lambda = 1 - 2 sin^2(arcsin(x) - pi/4)."""
    alpha = math.atan2(abs(dy), abs(dx))
    x = math.sin(alpha if alpha <= math.pi / 4 else math.pi / 2 - alpha)
    return 1 - 2 * math.sin(math.asin(x) - math.pi / 4) ** 2


def test_siou_by_hand():
    # Diagonal offset, same size: IoU 1/7, Lambda = 1 -> gamma = 1, enclosing 3x3, rho = (1/3)^2 each,
    # shape cost 0 -> SIoU = 1/7 - (2 (1 - e^(-1/9))) / 2
    assert siou(t(0, 0, 2, 2), t(1, 1, 3, 3)).item() == pytest.approx(1 / 7 - (1 - math.exp(-1 / 9)), abs=1e-6)
    # Horizontal offset dx = 2: Lambda = 0 -> gamma = 2; enclosing 5x2 -> rho_x = (2/5)^2;
    # widths 2 vs 4 -> omega_w = 0.5; IoU = 2 / 10
    expected = 0.2 - ((1 - math.exp(-2 * 0.16)) + (1 - math.exp(-0.5)) ** 4) / 2
    assert siou(t(0, 0, 2, 2), t(1, 0, 5, 2)).item() == pytest.approx(expected, abs=1e-6)
    # The closed form sin(2 alpha) of the angle cost equals the paper's formula (dx = 1, dy = 2)
    pred, target = t(0, 0, 2, 2), t(1, 2, 3, 4)
    lam = paper_angle_cost(1, 2)
    assert lam == pytest.approx(0.8)
    gamma, cw, ch = 2 - lam, 3, 4
    distance = (1 - math.exp(-gamma * (1 / cw) ** 2)) + (1 - math.exp(-gamma * (2 / ch) ** 2))
    assert siou(pred, target).item() == pytest.approx(0.0 - distance / 2, abs=1e-6)


def test_inverted_prediction_gives_bounded_iou():
    pred = t(5, 5, 1, 1)                       # x2 < x1: an early no-DFL prediction
    assert 0 <= giou(pred, t(0, 0, 4, 4)).item() + 1 <= 2
    assert torch.isfinite(siou(pred, t(0, 0, 4, 4)))


# --------------------------------------------------------------------------- VFL, DFL


def test_varifocal_loss_by_hand():
    logits = torch.zeros(1, 2)                 # p = 0.5 for both classes
    q = torch.tensor([[0.8, 0.0]])
    positive = torch.tensor([[1.0, 0.0]])
    # positive: -q (q ln p + (1-q) ln(1-p)) = 0.8 ln 2;  negative: -alpha p^gamma ln(1-p) = 0.75 * 0.25 * ln 2
    expected = 0.8 * math.log(2) + 0.75 * 0.25 * math.log(2)
    assert varifocal_loss(logits, q, positive).item() == pytest.approx(expected, rel=1e-6)
    # gradient of the negative term follows the formula, p^gamma included: d/dz of -a p^2 ln(1-p)
    z = torch.tensor([[0.3]], requires_grad=True)
    varifocal_loss(z, torch.zeros(1, 1), torch.zeros(1, 1)).backward()
    p = 1 / (1 + math.exp(-0.3))
    dp = 0.75 * (-2 * p * math.log(1 - p) + p * p / (1 - p))
    assert z.grad.item() == pytest.approx(dp * p * (1 - p), rel=1e-5)


def test_distribution_focal_loss_by_hand():
    probs = torch.tensor([0.1, 0.1, 0.5, 0.2, 0.1])
    logits = probs.log().view(1, 1, 5).expand(1, 4, 5)
    target = torch.full((1, 4), 2.3)           # between bins 2 and 3: weights 0.7 and 0.3
    expected = -(0.7 * math.log(0.5) + 0.3 * math.log(0.2))
    assert distribution_focal_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- anchors, targets


def test_anchor_points_match_decode():
    shapes, strides = [(4, 6), (2, 3)], [8, 16]
    points, point_strides, counts = make_anchor_points(shapes, strides)
    outputs = [(torch.zeros(1, 1, h, w), torch.zeros(1, 4, h, w)) for h, w in shapes]
    boxes = Decode(strides)(outputs)[0, :, :4]            # ltrb 0 -> x1 = x2 = anchor point
    assert torch.equal(boxes[:, :2], points) and torch.equal(boxes[:, 2:], points)
    assert counts == [24, 6] and point_strides[23] == 8 and point_strides[24] == 16
    assert points[1].tolist() == [12.0, 4.0]              # row-major: second cell of the first row


def test_targets_to_padded():
    targets = torch.tensor([[2, 5, 0, 0, 4, 4], [0, 1, 1, 1, 2, 2], [2, 7, 3, 3, 9, 9.]])
    labels, boxes, mask = targets_to_padded(targets, 3)
    assert mask.tolist() == [[True, False], [False, False], [True, True]]
    assert labels[2].tolist() == [5, 7] and labels[0, 0] == 1
    assert boxes[2, 1].tolist() == [3, 3, 9, 9]


# --------------------------------------------------------------------------- assigners


def test_task_aligned_assigner_by_hand():
    # One level, stride 8, 4x4 grid; gt [0,0,16,16] class 1 contains the points (4,4), (12,4),
    # (4,12), (12,12) = anchors 0, 1, 4, 5.
    points, _, _ = make_anchor_points([(4, 4)], [8])
    scores = torch.full((1, 16, 3), 0.99)                 # outside the gt: high scores, must not matter
    boxes = torch.tensor([[40., 40, 50, 50]]).repeat(16, 1)
    for anchor, score, box in [(0, 0.2, [0, 0, 16, 16]),     # IoU 1     -> t = 0.2 * 1^2   = 0.2
                               (1, 0.9, [0, 0, 16, 8]),      # IoU 0.5   -> t = 0.9 * 0.25  = 0.225
                               (4, 0.8, [0, 0, 8, 8]),       # IoU 0.25  -> t = 0.8 / 16    = 0.05
                               (5, 0.04, [0, 0, 16, 16])]:   # IoU 1     -> t = 0.04
        scores[0, anchor, 1] = score
        boxes[anchor] = torch.tensor(box, dtype=torch.float)
    assigner = TaskAlignedAssigner(topk=2, alpha=1.0, beta=2.0)
    a = assigner(scores, boxes[None], points, torch.tensor([[1]]), torch.tensor([[[0., 0, 16, 16]]]),
                 torch.tensor([[True]]))
    assert a.foreground[0].nonzero().flatten().tolist() == [0, 1]          # top-2 alignment
    # normalised: t * max IoU of the positives (1) / max t (0.225)
    assert a.scores[0, 1, 1].item() == pytest.approx(1.0)
    assert a.scores[0, 0, 1].item() == pytest.approx(0.2 / 0.225)
    assert a.scores[0, :, [0, 2]].abs().sum() == 0 and a.scores[0, 2:].abs().sum() == 0
    assert a.labels[0, 0] == 1 and a.boxes[0, 1].tolist() == [0, 0, 16, 16]


def test_keep_best_gt_resolves_shared_anchors_by_iou():
    positive = torch.tensor([[[True, True, False], [False, True, True]]])   # anchor 1 claimed twice
    ious = torch.tensor([[[0.9, 0.3, 0.0], [0.0, 0.6, 0.8]]])
    kept = keep_best_gt(positive, ious)
    assert kept.tolist() == [[[True, False, False], [False, True, True]]]


def test_atss_assigner_by_hand():
    # Level 1: stride 8, 4x4 points, anchor boxes 8x8 (cell size 1). Level 2: stride 16, 2x2, 16x16.
    # gt [2,2,12,12] (area 100, centre (7,7)); topk 4 per level: the 4 nearest points of level 1
    # ((4,4), (12,4), (4,12), (12,12)) and all 4 of level 2. Their IoUs with the gt:
    ious = [36 / 128, 24 / 140, 24 / 140, 16 / 148,      # level 1
            100 / 256, 0.0, 0.0, 0.0]                    # level 2: only [0,0,16,16] overlaps
    mean = sum(ious) / 8
    std = math.sqrt(sum((v - mean) ** 2 for v in ious) / 7)   # unbiased, as ATSS's reference code
    assert mean + std == pytest.approx(0.28406, abs=1e-4)     # so 36/128 = 0.28125 just misses it
    points, strides, counts = make_anchor_points([(4, 4), (2, 2)], [8, 16])
    a = ATSSAssigner(topk=4, cell_size=1.0)(points, strides, counts, torch.tensor([[3]]),
                                            torch.tensor([[[2., 2, 12, 12]]]), torch.tensor([[True]]), num_classes=5)
    assert a.foreground[0].nonzero().flatten().tolist() == [16]      # level 2's first point (8,8)
    assert a.scores[0, 16].tolist() == [0, 0, 0, 1, 0] and a.labels[0, 16] == 3
    # with predicted boxes the class target is their IoU with the gt (VarifocalNet's q)
    pred = torch.zeros(1, 20, 4)
    pred[0, 16] = torch.tensor([2., 2, 12, 7])                       # half the gt: IoU 0.5
    a = ATSSAssigner(topk=4, cell_size=1.0)(points, strides, counts, torch.tensor([[3]]),
                                            torch.tensor([[[2., 2, 12, 12]]]), torch.tensor([[True]]), 5, pred)
    assert a.scores[0, 16, 3].item() == pytest.approx(0.5, abs=1e-6)


def test_assigners_without_ground_truth():
    points, strides, counts = make_anchor_points([(2, 2)], [8])
    empty = (torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool))
    a = TaskAlignedAssigner()(torch.rand(2, 4, 3), torch.rand(2, 4, 4), points, *empty)
    b = ATSSAssigner()(points, strides, counts, *empty, num_classes=3)
    for r in (a, b):
        assert not r.foreground.any() and r.scores.shape == (2, 4, 3) and r.scores.sum() == 0


# --------------------------------------------------------------------------- DetectionLoss


def _head(nc: int, shapes, reg_channels: int, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, nc, h, w, generator=g, requires_grad=True),
             torch.rand(2, reg_channels, h, w, generator=g).mul(3).requires_grad_()) for h, w in shapes]


@pytest.mark.parametrize("use_dfl", [False, True])
def test_detection_loss_parts_and_gradients(use_dfl):
    cfg = ModelConfig(nc=4, use_dfl=use_dfl, reg_max=16 if use_dfl else 0)
    shapes = [(8, 8), (4, 4), (2, 2)]
    head = _head(4, shapes, 4 * (cfg.reg_max + 1))
    targets = torch.tensor([[0, 1, 8, 8, 40, 30], [1, 3, 20, 10, 60, 60.]])
    loss_fn = DetectionLoss(cfg, LossConfig(atss_warmup_epochs=1))
    for epoch in (0, 1):                                             # ATSS, then task-aligned
        loss, parts = loss_fn(head, targets, epoch)
        assert set(parts) == ({"cls", "iou", "dfl"} if use_dfl else {"cls", "iou"})
        weights = {"cls": 1.0, "iou": 2.5, "dfl": 0.5}
        assert loss.item() == pytest.approx(sum(weights[k] * v.item() for k, v in parts.items()), rel=1e-5)
        grads = torch.autograd.grad(loss, [x for level in head for x in level])
        assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads[1::2])
    # no targets at all: only the classification term (all negatives), box terms 0 but in the graph
    loss, parts = loss_fn(head, torch.zeros(0, 6), 5)
    assert parts["iou"] == 0 and parts["cls"] > 0
    loss.backward()
    assert head[0][1].grad is not None


def test_detection_loss_box_terms_vanish_for_a_perfect_regression():
    cfg = ModelConfig(nc=2, use_dfl=False, reg_max=0)
    shapes = [(4, 4), (2, 2), (1, 1)]
    points, strides, _ = make_anchor_points(shapes, [8, 16, 32])
    gt = torch.tensor([4., 4, 28, 20])
    # every anchor predicts exactly the gt box: ltrb (in strides) = distances to its sides
    ltrb = torch.cat((points - gt[:2], gt[2:] - points), 1) / strides[:, None]
    head, start = [], 0
    for h, w in shapes:
        reg = ltrb[start:start + h * w].T.reshape(1, 4, h, w)
        head.append((torch.zeros(1, 2, h, w), reg))
        start += h * w
    loss, parts = DetectionLoss(cfg, LossConfig(atss_warmup_epochs=0))(head, torch.tensor([[0, 1, *gt]]), 0)
    assert parts["iou"].item() == pytest.approx(0.0, abs=1e-5)
    assert parts["cls"] > 0


def test_detection_loss_rejects_a_head_that_does_not_fit():
    loss_fn = DetectionLoss(ModelConfig(nc=3, use_dfl=False, reg_max=0))
    with pytest.raises(ValueError, match="4 classes, the model config says 3"):
        loss_fn(_head(4, [(2, 2), (1, 1), (1, 1)], 4), torch.zeros(0, 6), 0)
    with pytest.raises(Exception, match="iou_type"):
        DetectionLoss(ModelConfig(), LossConfig(iou_type="ciou"))
