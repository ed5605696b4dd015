"""Pieces every YOLOv6 model family shares: BN settings, channel rounding, conv + BN modules and
the one fusion protocol.

Fusion protocol: a block that changes between training and deployment defines ``fuse()``, which
returns the module to use in the deploy form (a new module, or ``self`` changed in place);
``fuse_blocks(model)`` replaces every such child by what its ``fuse()`` returns. BatchNorms that
upstream keeps in its deploy layout (QARepVGG post-add BN, RepOpt blocks) are folded by the same
walk with ``fold_bn()`` (``fold_remaining_bn``).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Optional

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
def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d):
    """Return (weight, bias) of conv(weight, bias) followed by ``bn`` in eval mode."""
    std = torch.sqrt(bn.running_var.float() + bn.eps)
    scale = bn.weight.float() / std
    w = weight.float() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b0 = bias.float() if bias is not None else torch.zeros_like(bn.running_mean, dtype=torch.float32)
    b = (b0 - bn.running_mean.float()) * scale + bn.bias.float()
    return w, b


def conv_with(weight: torch.Tensor, bias: torch.Tensor, like: nn.Conv2d) -> nn.Conv2d:
    """A biased conv with ``like``'s geometry, device and dtype holding ``weight`` / ``bias``."""
    conv = nn.Conv2d(like.in_channels, like.out_channels, like.kernel_size, like.stride, like.padding,
                     like.dilation, like.groups, bias=True, padding_mode=like.padding_mode,
                     device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


def fold_bn_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """The biased conv equal to ``bn(conv(x))`` in eval mode."""
    return conv_with(*fold_bn(conv.weight, conv.bias, bn), like=conv)


# --------------------------------------------------------------------------- conv + BN modules


class ConvBN(nn.Sequential):
    """conv (no bias) -> BN, no activation: a branch of the Rep blocks (keys ``conv``, ``bn``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups,
                           bias=False),
            bn=make_bn(out_channels),
        ))

    def folded(self):
        """(weight, bias) of the single conv equal to this branch in eval mode."""
        return fold_bn(self.conv.weight, self.conv.bias, self.bn)


class ConvBNAct(nn.Module):
    """conv (no bias) -> BN [-> activation]: upstream's ConvModule inside a wrapper, so the keys are
    ``block.conv`` / ``block.bn`` (upstream ConvBNReLU, ConvBNSiLU, ConvBNHS and Lite's ConvBN).

    ``act``: an activation class, or None for none. ``fuse()`` folds the BN into the conv in place
    (``block.conv.{weight,bias}`` remain) and returns ``self``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, act: Optional[Callable[[], nn.Module]] = nn.ReLU):
        super().__init__()
        layers = OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups,
                           bias=False),
            bn=make_bn(out_channels),
        )
        if act is not None:
            layers["act"] = act()
        self.block = nn.Sequential(layers)

    def forward(self, x):
        return self.block(x)

    def fuse(self) -> nn.Module:
        if hasattr(self.block, "bn"):
            self.block.conv = fold_bn_into(self.block.conv, self.block.bn)
            del self.block.bn
        return self


# --------------------------------------------------------------------------- tree walkers


def _replace_children(module: nn.Module, method: str) -> None:
    """Depth first, replace every child that has ``method`` with what ``child.method()`` returns."""
    for name, child in module.named_children():
        convert = getattr(child, method, None)
        if callable(convert):
            setattr(module, name, convert())
        else:
            _replace_children(child, method)


def fuse_blocks(model: nn.Module) -> nn.Module:
    """Convert every block of ``model`` to its deploy form in place (upstream's deploy layout)."""
    _replace_children(model, "fuse")
    return model


def fold_remaining_bn(model: nn.Module) -> nn.Module:
    """After ``fuse_blocks``: fold the BNs upstream keeps in deploy form (QARepVGG post-BN,
    RepOpt blocks) into their convs, in place. Outputs are unchanged (eval mode); keys are not."""
    _replace_children(model, "fold_bn")
    return model
