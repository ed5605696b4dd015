"""YOLOv6-Lite (S / M / L): a mobile detector of depthwise blocks, 4 output levels (strides 8..64).

Structure and parameter names follow upstream exactly (``../shared/spec/yolov6_lite.md``), so the
upstream / converted checkpoints load with strict key matching:

- backbone ``LiteBackbone`` (upstream Lite_EffiBackbone): a 3x3 stride-2 stem, then four stages,
  each a stride-2 ``LiteBlockS2`` followed by stride-1 ``LiteBlockS1`` blocks (shuffle-net style).
- neck ``LiteNeck`` (upstream Lite_EffiNeck): 1x1 reductions to 96 channels, a PAN of ``CSPBlock``
  stages, and an extra stride-64 level P6.
- head ``LiteDetect``: per level a depthwise-separable stem, cls / reg branches, 1x1 predictions;
  no DFL, no objectness.

``fuse()`` folds every BatchNorm into the conv before it (in place). Activations are not in place,
so fx tracing and quantizer hooks see every tensor.
"""
from __future__ import annotations

import difflib
from typing import Optional, Sequence

import torch
from torch import nn

from yoloq.config import ConfigError, ModelConfig
from yoloq.models.common import ConvBNAct, fold_bn_into, make_bn
from yoloq.models.detector import Detector, init_head_biases

BASE_CHANNELS = [24, 32, 64, 128, 256]     # stem, stages 1..4 (before the width multiplier)
STAGE_REPEATS = [1, 3, 7, 3]               # same for S, M and L (no depth multiplier)
STEM_CHANNELS = 24                         # upstream overrides the scaled stem width
NECK_CHANNELS = 96                         # "unified" neck / head width at every level
STRIDES = [8, 16, 32, 64]


def round_channels(value: float, divisor: int) -> int:
    """Upstream Lite rounding: nearest multiple of ``divisor`` (half up), never below ``divisor``,
    and one ``divisor`` more when that would lose more than 10 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


# --------------------------------------------------------------------------- conv blocks


def ConvBNHS(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
             groups: int = 1) -> ConvBNAct:
    """conv -> BN -> Hardswish (upstream ConvBNHS)."""
    return ConvBNAct(in_channels, out_channels, kernel_size, stride, groups, act=nn.Hardswish)


def ConvBNLinear(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1) -> ConvBNAct:
    """conv -> BN, no activation (upstream Lite's ConvBN: keys ``block.conv`` / ``block.bn``)."""
    return ConvBNAct(in_channels, out_channels, kernel_size, stride, groups, act=None)


class DPBlock(nn.Module):
    """Depthwise k x k conv -> BN -> Hardswish -> pointwise 1x1 conv -> BN -> Hardswish.

    Both convs carry their own bias upstream, besides the BN. ``fuse()`` folds ``bn_1`` / ``bn_2``
    into ``conv_dw_1`` / ``conv_pw_1`` and sets them to None (no keys in the state dict).
    """

    def __init__(self, channels: int, kernel_size: int = 5, stride: int = 1):
        super().__init__()
        self.conv_dw_1 = nn.Conv2d(channels, channels, kernel_size, stride, (kernel_size - 1) // 2,
                                   groups=channels)
        self.bn_1: Optional[nn.BatchNorm2d] = make_bn(channels)
        self.act_1 = nn.Hardswish()
        self.conv_pw_1 = nn.Conv2d(channels, channels, 1)
        self.bn_2: Optional[nn.BatchNorm2d] = make_bn(channels)
        self.act_2 = nn.Hardswish()

    def forward(self, x):
        x = self.conv_dw_1(x)
        if self.bn_1 is not None:       # structural, not data-dependent: fine for fx tracing
            x = self.bn_1(x)
        x = self.conv_pw_1(self.act_1(x))
        if self.bn_2 is not None:
            x = self.bn_2(x)
        return self.act_2(x)

    def fuse(self) -> "DPBlock":
        if self.bn_1 is not None:
            self.conv_dw_1, self.bn_1 = fold_bn_into(self.conv_dw_1, self.bn_1), None
        if self.bn_2 is not None:
            self.conv_pw_1, self.bn_2 = fold_bn_into(self.conv_pw_1, self.bn_2), None
        return self


class SEBlock(nn.Module):
    """Squeeze-excite: ``x * hardsigmoid(conv2(relu(conv1(avgpool(x)))))``, hidden width c // 4."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = channels // 4
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(hidden, channels, 1)
        self.hardsigmoid = nn.Hardsigmoid()

    def gate(self, x):
        return self.hardsigmoid(self.conv2(self.relu(self.conv1(self.avg_pool(x)))))

    def forward(self, x):
        return x * self.gate(x)


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Interleave ``groups`` channel groups: view channels as (groups, C/groups), swap, flatten."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class LiteBlockS2(nn.Module):
    """Stride-2 block (upstream Lite_EffiBlockS2): two downsampling paths, concat, dw + pw mix."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int):
        super().__init__()
        half_mid, half_out = mid_channels // 2, out_channels // 2
        # path A: depthwise stride-2 on the input, then 1x1
        self.conv_dw_1 = ConvBNLinear(in_channels, in_channels, 3, 2, groups=in_channels)
        self.conv_1 = ConvBNHS(in_channels, half_out)
        # path B: 1x1, depthwise stride-2, SE, 1x1
        self.conv_pw_2 = ConvBNHS(in_channels, half_mid)
        self.conv_dw_2 = ConvBNLinear(half_mid, half_mid, 3, 2, groups=half_mid)
        self.se = SEBlock(half_mid)
        self.conv_2 = ConvBNHS(half_mid, half_out)
        # merge
        self.conv_dw_3 = ConvBNHS(out_channels, out_channels, 3, 1, groups=out_channels)
        self.conv_pw_3 = ConvBNHS(out_channels, out_channels)

    def forward(self, x):
        a = self.conv_1(self.conv_dw_1(x))
        b = self.conv_2(self.se(self.conv_dw_2(self.conv_pw_2(x))))
        return self.conv_pw_3(self.conv_dw_3(torch.cat((a, b), 1)))


class LiteBlockS1(nn.Module):
    """Stride-1 block (upstream Lite_EffiBlockS1): keep the first channel half, transform the
    second (1x1, depthwise, SE, 1x1), concat and shuffle the two halves."""

    def __init__(self, channels: int, mid_channels: int):
        super().__init__()
        self.split = channels // 2
        self.conv_pw_1 = ConvBNHS(channels - self.split, mid_channels)
        self.conv_dw_1 = ConvBNLinear(mid_channels, mid_channels, 3, 1, groups=mid_channels)
        self.se = SEBlock(mid_channels)
        self.conv_1 = ConvBNHS(mid_channels, channels - self.split)

    def forward(self, x):
        kept, transformed = x[:, :self.split], x[:, self.split:]
        transformed = self.conv_1(self.se(self.conv_dw_1(self.conv_pw_1(transformed))))
        return channel_shuffle(torch.cat((kept, transformed), 1), 2)


class DarknetBlock(nn.Module):
    """1x1 ConvBNHS, then DPBlock (no shortcut)."""

    def __init__(self, channels: int, kernel_size: int = 5):
        super().__init__()
        self.conv_1 = ConvBNHS(channels, channels)
        self.conv_2 = DPBlock(channels, kernel_size, 1)

    def forward(self, x):
        return self.conv_2(self.conv_1(x))


class CSPBlock(nn.Module):
    """CSP stage of the neck: [DarknetBlock(1x1(x)), 1x1(x)] -> concat -> 1x1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, expansion: float = 0.5):
        super().__init__()
        mid = int(out_channels * expansion)
        self.conv_1 = ConvBNHS(in_channels, mid)
        self.conv_2 = ConvBNHS(in_channels, mid)
        self.conv_3 = ConvBNHS(2 * mid, out_channels)
        self.blocks = DarknetBlock(mid, kernel_size)

    def forward(self, x):
        return self.conv_3(torch.cat((self.blocks(self.conv_1(x)), self.conv_2(x)), 1))


# --------------------------------------------------------------------------- network


def lite_channels(width: float) -> tuple[list[int], list[int]]:
    """(stage output widths [stem, s1..s4], stage mid widths [s1..s4]) for a width multiplier."""
    out = [round_channels(c * width, 16) for c in BASE_CHANNELS]
    out[0] = STEM_CHANNELS
    mid = [round_channels(int(c / 2), 8) for c in out[1:]]
    return out, mid


class LiteBackbone(nn.Module):
    """Stem + four stages; returns the stage 2, 3, 4 outputs (strides 8, 16, 32)."""

    def __init__(self, channels: Sequence[int], mid_channels: Sequence[int], repeats: Sequence[int]):
        super().__init__()
        self.conv_0 = ConvBNHS(3, channels[0], 3, 2)
        for i, n in enumerate(repeats):
            blocks = [LiteBlockS2(channels[i], mid_channels[i], channels[i + 1])]
            blocks += [LiteBlockS1(channels[i + 1], mid_channels[i]) for _ in range(n - 1)]
            setattr(self, f"lite_effiblock_{i + 1}", nn.Sequential(*blocks))

    def forward(self, x):
        x = self.lite_effiblock_1(self.conv_0(x))
        c3 = self.lite_effiblock_2(x)
        c4 = self.lite_effiblock_3(c3)
        c5 = self.lite_effiblock_4(c4)
        return [c3, c4, c5]


class LiteNeck(nn.Module):
    """PAN over [C3, C4, C5] at a fixed width, plus P6 = DP(R5, s2) + DP(P5, s2).
    Returns [P3, P4, P5, P6] (strides 8, 16, 32, 64)."""

    def __init__(self, in_channels: Sequence[int], channels: int = NECK_CHANNELS, kernel_size: int = 5):
        super().__init__()
        c3, c4, c5 = in_channels
        self.reduce_layer0 = ConvBNHS(c5, channels)
        self.reduce_layer1 = ConvBNHS(c4, channels)
        self.reduce_layer2 = ConvBNHS(c3, channels)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.Csp_p4 = CSPBlock(2 * channels, channels, kernel_size)
        self.Csp_p3 = CSPBlock(2 * channels, channels, kernel_size)
        self.Csp_n3 = CSPBlock(2 * channels, channels, kernel_size)
        self.Csp_n4 = CSPBlock(2 * channels, channels, kernel_size)
        self.downsample2 = DPBlock(channels, kernel_size, 2)
        self.downsample1 = DPBlock(channels, kernel_size, 2)
        self.p6_conv_1 = DPBlock(channels, kernel_size, 2)
        self.p6_conv_2 = DPBlock(channels, kernel_size, 2)

    def forward(self, features):
        c3, c4, c5 = features
        r5 = self.reduce_layer0(c5)
        r4 = self.reduce_layer1(c4)
        r3 = self.reduce_layer2(c3)
        f4 = self.Csp_p4(torch.cat((self.upsample(r5), r4), 1))
        p3 = self.Csp_p3(torch.cat((self.upsample(f4), r3), 1))
        p4 = self.Csp_n3(torch.cat((self.downsample2(p3), f4), 1))
        p5 = self.Csp_n4(torch.cat((self.downsample1(p4), r5), 1))
        p6 = self.p6_conv_1(r5) + self.p6_conv_2(p5)
        return [p3, p4, p5, p6]


class LiteDetect(nn.Module):
    """Decoupled head: ``forward(features)`` -> per level ``(cls_logits, ltrb)``; ltrb are distances
    from the cell centre in units of the level's stride (used as they are: no DFL, no activation).
    Lists are registered by kind (all stems, then all cls_convs, ...), as upstream."""

    def __init__(self, nc: int, channels: int = NECK_CHANNELS, levels: int = 4, kernel_size: int = 5):
        super().__init__()
        self.nc = nc
        self.stems = nn.ModuleList(DPBlock(channels, kernel_size, 1) for _ in range(levels))
        self.cls_convs = nn.ModuleList(DPBlock(channels, kernel_size, 1) for _ in range(levels))
        self.reg_convs = nn.ModuleList(DPBlock(channels, kernel_size, 1) for _ in range(levels))
        self.cls_preds = nn.ModuleList(nn.Conv2d(channels, nc, 1) for _ in range(levels))
        self.reg_preds = nn.ModuleList(nn.Conv2d(channels, 4, 1) for _ in range(levels))
        self.initialize_biases()

    def initialize_biases(self) -> None:
        """Fresh-model init as upstream: class prior 0.01, box distance 1 cell."""
        init_head_biases(self)

    def forward(self, features):
        outputs = []
        for i, x in enumerate(features):
            x = self.stems[i](x)
            outputs.append((self.cls_preds[i](self.cls_convs[i](x)), self.reg_preds[i](self.reg_convs[i](x))))
        return outputs


class YOLOv6Lite(Detector):
    """YOLOv6-Lite detector (see :class:`Detector` for the forward contract)."""

    def __init__(self, cfg: ModelConfig, backbone: LiteBackbone, neck: LiteNeck, detect: LiteDetect,
                 strides: Sequence[int] = STRIDES):
        super().__init__(cfg, backbone, neck, detect, strides)


# --------------------------------------------------------------------------- builder


def _expect(field: str, value: str, valid: str) -> None:
    if value != valid:
        close = difflib.get_close_matches(value, [valid], n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"model.{field}: '{value}'{hint} is not available for arch 'lite'; expected '{valid}'")


def build_lite(cfg: ModelConfig) -> YOLOv6Lite:
    """Build a YOLOv6-Lite model (train form) from ``cfg``; ``.fuse()`` gives the deploy form.

    Only ``width_multiple`` (S 0.7, M 1.1, L 1.5) and ``nc`` vary; the other family fields must
    name the Lite modules (a yolov6 backbone/neck name here is almost surely a config mix-up).
    """
    _expect("backbone", cfg.backbone, "Lite_EffiBackbone")
    _expect("neck", cfg.neck, "Lite_EffiNeck")
    if cfg.use_dfl or cfg.reg_max != 0:
        raise ConfigError(f"model.use_dfl / reg_max: the Lite head has no DFL; got use_dfl={cfg.use_dfl}, "
                          f"reg_max={cfg.reg_max}")
    if cfg.width_multiple <= 0:
        raise ConfigError(f"model.width_multiple must be > 0, got {cfg.width_multiple}")
    if cfg.nc < 1:
        raise ConfigError(f"model.nc must be >= 1, got {cfg.nc}")
    channels, mid = lite_channels(cfg.width_multiple)
    backbone = LiteBackbone(channels, mid, STAGE_REPEATS)
    neck = LiteNeck([channels[2], channels[3], channels[4]])
    detect = LiteDetect(cfg.nc, NECK_CHANNELS, len(STRIDES))
    return YOLOv6Lite(cfg, backbone, neck, detect)
