"""Small building pieces shared by every YOLOv6 model family."""
from __future__ import annotations

import math

import torch
from torch import nn

# Upstream sets every BatchNorm to these after construction (not stored in the state dict).
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def make_bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def make_divisible(x: float, divisor: int = 8) -> int:
    """Upstream channel rounding: ceil(x / divisor) * divisor."""
    return int(math.ceil(x / divisor) * divisor)


def scale_depth(n: int, depth: float) -> int:
    """Upstream repeat scaling: max(round(n * depth), 1) if n > 1 else n."""
    return max(round(n * depth), 1) if n > 1 else n


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Fold an eval-mode BatchNorm into the conv before it (the conv's own bias is kept)."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True,
                      padding_mode=conv.padding_mode).to(conv.weight.device)
    w, b = fold_bn(conv.weight, conv.bias, bn)
    fused.weight.copy_(w)
    fused.bias.copy_(b)
    return fused


@torch.no_grad()
def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d):
    """Return (weight, bias) of conv(weight, bias) followed by ``bn`` in eval mode."""
    std = torch.sqrt(bn.running_var.float() + bn.eps)
    scale = bn.weight.float() / std
    w = weight.float() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b0 = bias.float() if bias is not None else torch.zeros_like(bn.running_mean, dtype=torch.float32)
    b = (b0 - bn.running_mean.float()) * scale + bn.bias.float()
    return w, b
