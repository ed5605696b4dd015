"""The detector both model families share (backbone -> neck -> head -> decode) and the box decode.

``Decode`` turns per-level head outputs into boxes and class scores; it is its own module so graph
tracing (torch.fx) can treat it as a leaf: anchor generation depends on the input shape, and
nothing inside it is ever quantized.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from yoloq.models.common import fold_remaining_bn, fuse_blocks


PRIOR_PROB = 0.01           # initial class probability of a fresh head (the focal-loss prior)


@torch.no_grad()
def init_head_biases(detect: nn.Module, prior_prob: float = PRIOR_PROB) -> None:
    """A fresh head, as upstream initialises it: the prediction convs start at zero weights, the class
    bias so that every score is ``prior_prob`` (no flood of false positives in the first steps), the
    box bias 1 (one stride each side; with DFL, uniform bins)."""
    for conv in detect.cls_preds:
        conv.weight.zero_()
        conv.bias.fill_(-math.log((1 - prior_prob) / prior_prob))
    for conv in detect.reg_preds:
        conv.weight.zero_()
        conv.bias.fill_(1.0)


class Decode(nn.Module):
    """[(cls_logits [B,nc,H,W], ltrb [B,4,H,W]) per level] -> [B, N, 4 + nc].

    Boxes are x1, y1, x2, y2 in input pixels; scores are sigmoid class probabilities.
    Anchor points are cell centres (+0.5); ltrb distances are in units of the level's stride.
    Levels are concatenated in order, each row-major.
    """

    def __init__(self, strides: Sequence[int]):
        super().__init__()
        self.strides = list(strides)

    def forward(self, outputs):
        boxes, scores = [], []
        for (cls_logits, ltrb), stride in zip(outputs, self.strides):
            h, w = ltrb.shape[2:]
            ys = torch.arange(h, device=ltrb.device, dtype=ltrb.dtype) + 0.5
            xs = torch.arange(w, device=ltrb.device, dtype=ltrb.dtype) + 0.5
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            anchors = torch.stack((gx, gy), 0).reshape(1, 2, h * w)
            d = ltrb.flatten(2)  # no explicit batch size: keeps exported ONNX batch-dynamic
            xy1 = (anchors - d[:, :2]) * stride
            xy2 = (anchors + d[:, 2:]) * stride
            boxes.append(torch.cat((xy1, xy2), 1))
            scores.append(cls_logits.flatten(2).sigmoid())
        return torch.cat((torch.cat(boxes, 2), torch.cat(scores, 2)), 1).permute(0, 2, 1)


class Detector(nn.Module):
    """Detector: ``forward(x [B,3,H,W] in 0..1) -> [B, N, 4 + nc]`` (xyxy pixels, sigmoid scores).

    The model families differ only in their parts; ``fuse()`` converts every block to its deploy
    form through the blocks' own ``fuse()`` (``yoloq.models.common``).
    """

    def __init__(self, cfg, backbone: nn.Module, neck: nn.Module, detect: nn.Module, strides: Sequence[int]):
        super().__init__()
        self.cfg = cfg
        self.nc = detect.nc
        self.strides = list(strides)
        self.backbone = backbone
        self.neck = neck
        self.detect = detect
        self.decode = Decode(self.strides)

    def forward(self, x):
        return self.decode(self.detect(self.neck(self.backbone(x))))

    def fuse(self) -> "Detector":
        """Convert every block to upstream's deploy form, in place (outputs unchanged in eval mode)."""
        return fuse_blocks(self)

    def fold_bn(self) -> "Detector":
        """Deploy form with every remaining BN folded too (QARepVGG post-BN, RepOpt blocks): one
        conv + bias + activation per block, for inference and quantization. Keys then differ from
        upstream's deploy lists; load checkpoints first."""
        return fold_remaining_bn(self.fuse())
