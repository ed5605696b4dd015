"""YOLOv6 v3/v4 detectors (N, S, M, L and the RepOpt S models) with swappable Rep blocks.

Structure and parameter names follow upstream exactly, so upstream checkpoints load with strict
key matching (train form: ``build_yolov6(cfg)``; deploy form: ``build_yolov6(cfg).fuse()``):

- backbone ``EfficientRep``: a 3x3 stride-2 stem, four stages (3x3 stride-2 block, then a stage of
  repeated blocks: ``RepBlock`` for N/S, CSP ``BepC3`` for M/L, i.e. upstream's CSPBepBackbone),
  and an SPPF / CSPSPPF on the last stage. Returns C2 (when ``fuse_p2``), C3, C4, C5.
- neck ``RepBiFPANNeck`` (v3: BiFusion of three scales; RepBlock or BepC3 stages, the latter being
  upstream's CSPRepBiFPANNeck) or ``RepPANNeck`` (v2-style PAN with transposed-conv upsampling,
  used by the RepOpt models). Returns P3, P4, P5.
- head ``Detect``: efficient decoupled head, per level a 1x1 stem, 3x3 cls and reg convs (SiLU)
  and 1x1 predictions; optional DFL.
"""
from __future__ import annotations

import difflib
from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from yoloq.config import ConfigError, ModelConfig
from yoloq.models.blocks import (BASIC_BLOCKS, BepC3, BiFusion, ConvBNReLU, ConvBNSiLU, CSPSPPF, RepBlock, SPPF,
                     Transpose)
from yoloq.models.common import make_divisible, scale_depth
from yoloq.models.detector import Detector

BACKBONE_CHANNELS = [64, 128, 256, 512, 1024]
BACKBONE_REPEATS = [1, 6, 12, 18, 6]
NECK_CHANNELS = [256, 128, 128, 256, 256, 512]
NECK_REPEATS = [12, 12, 12, 12]
STRIDES = [8, 16, 32]
# Upstream's Detect always holds 17 DFL bins in proj / proj_conv, even when DFL is off.
DEFAULT_DFL_BINS = 17

Stage = Callable[[int, int, int], nn.Module]   # (in_channels, out_channels, repeats) -> module


def _named(name: str, module: nn.Module) -> nn.Sequential:
    """Hold ``module`` under ``name`` (upstream wraps SPPF as ``.sppf`` and CSPSPPF as ``.cspsppf``)."""
    return nn.Sequential(OrderedDict({name: module}))


class EfficientRep(nn.Module):
    """Backbone: stem, ERBlock_2..5 (downsampling block + stage), SPPF/CSPSPPF after ERBlock_5."""

    def __init__(self, channels: Sequence[int], repeats: Sequence[int], block: Callable[..., nn.Module],
                 stage: Stage, fuse_p2: bool, cspsppf: bool):
        super().__init__()
        self.fuse_p2 = fuse_p2
        merge_conv = ConvBNSiLU if block is ConvBNSiLU else ConvBNReLU
        self.stem = block(3, channels[0], 3, 2)
        self.ERBlock_2 = nn.Sequential(block(channels[0], channels[1], 3, 2), stage(channels[1], channels[1], repeats[1]))
        self.ERBlock_3 = nn.Sequential(block(channels[1], channels[2], 3, 2), stage(channels[2], channels[2], repeats[2]))
        self.ERBlock_4 = nn.Sequential(block(channels[2], channels[3], 3, 2), stage(channels[3], channels[3], repeats[3]))
        merge = (_named("cspsppf", CSPSPPF(channels[4], channels[4], merge_conv)) if cspsppf
                 else _named("sppf", SPPF(channels[4], channels[4], merge_conv)))
        self.ERBlock_5 = nn.Sequential(block(channels[3], channels[4], 3, 2),
                                       stage(channels[4], channels[4], repeats[4]), merge)

    def forward(self, x):
        outputs = []
        c2 = self.ERBlock_2(self.stem(x))
        if self.fuse_p2:
            outputs.append(c2)
        c3 = self.ERBlock_3(c2)
        c4 = self.ERBlock_4(c3)
        c5 = self.ERBlock_5(c4)
        return outputs + [c3, c4, c5]


class RepBiFPANNeck(nn.Module):
    """YOLOv6 v3 neck: top-down with BiFusion (C5 -> P4 -> P3, each also fed the finer scale),
    then bottom-up PAN (P3 -> P4 -> P5). ``ch`` is upstream's 11-entry channel list."""

    def __init__(self, ch: Sequence[int], repeats: Sequence[int], stage: Stage):
        super().__init__()
        self.reduce_layer0 = ConvBNReLU(ch[4], ch[5], 1, 1)
        self.Bifusion0 = BiFusion((ch[3], ch[2]), ch[5])
        self.Rep_p4 = stage(ch[5], ch[5], repeats[0])
        self.reduce_layer1 = ConvBNReLU(ch[5], ch[6], 1, 1)
        self.Bifusion1 = BiFusion((ch[2], ch[1]), ch[6])
        self.Rep_p3 = stage(ch[6], ch[6], repeats[1])
        self.downsample2 = ConvBNReLU(ch[6], ch[7], 3, 2)
        self.Rep_n3 = stage(ch[6] + ch[7], ch[8], repeats[2])
        self.downsample1 = ConvBNReLU(ch[8], ch[9], 3, 2)
        self.Rep_n4 = stage(ch[5] + ch[9], ch[10], repeats[3])

    def forward(self, features):
        c2, c3, c4, c5 = features
        fpn_out0 = self.reduce_layer0(c5)
        f_out0 = self.Rep_p4(self.Bifusion0([fpn_out0, c4, c3]))
        fpn_out1 = self.reduce_layer1(f_out0)
        p3 = self.Rep_p3(self.Bifusion1([fpn_out1, c3, c2]))
        p4 = self.Rep_n3(torch.cat((self.downsample2(p3), fpn_out1), 1))
        p5 = self.Rep_n4(torch.cat((self.downsample1(p4), fpn_out0), 1))
        return [p3, p4, p5]


class RepPANNeck(nn.Module):
    """PAN neck with transposed-conv upsampling (no BiFusion; the RepOpt YOLOv6-S models)."""

    def __init__(self, ch: Sequence[int], repeats: Sequence[int], stage: Stage):
        super().__init__()
        self.Rep_p4 = stage(ch[3] + ch[5], ch[5], repeats[0])
        self.Rep_p3 = stage(ch[2] + ch[6], ch[6], repeats[1])
        self.Rep_n3 = stage(ch[6] + ch[7], ch[8], repeats[2])
        self.Rep_n4 = stage(ch[5] + ch[9], ch[10], repeats[3])
        self.reduce_layer0 = ConvBNReLU(ch[4], ch[5], 1, 1)
        self.upsample0 = Transpose(ch[5], ch[5])
        self.reduce_layer1 = ConvBNReLU(ch[5], ch[6], 1, 1)
        self.upsample1 = Transpose(ch[6], ch[6])
        self.downsample2 = ConvBNReLU(ch[6], ch[7], 3, 2)
        self.downsample1 = ConvBNReLU(ch[8], ch[9], 3, 2)

    def forward(self, features):
        c3, c4, c5 = features
        fpn_out0 = self.reduce_layer0(c5)
        f_out0 = self.Rep_p4(torch.cat((self.upsample0(fpn_out0), c4), 1))
        fpn_out1 = self.reduce_layer1(f_out0)
        p3 = self.Rep_p3(torch.cat((self.upsample1(fpn_out1), c3), 1))
        p4 = self.Rep_n3(torch.cat((self.downsample2(p3), fpn_out1), 1))
        p5 = self.Rep_n4(torch.cat((self.downsample1(p4), fpn_out0), 1))
        return [p3, p4, p5]


class Detect(nn.Module):
    """Efficient decoupled head. ``forward(features)`` -> per level ``(cls_logits, ltrb)``.

    ``ltrb`` are distances from the cell centre in units of the level's stride: with DFL, the
    expectation over ``reg_max + 1`` bins (softmax, then the fixed 1x1 ``proj_conv`` holding
    0..reg_max); without DFL, the regression output as it is.
    """

    def __init__(self, nc: int, in_channels: Sequence[int], use_dfl: bool, reg_max: int):
        super().__init__()
        self.nc, self.use_dfl, self.reg_max = nc, use_dfl, reg_max
        bins = reg_max + 1 if use_dfl else DEFAULT_DFL_BINS
        self.register_buffer("proj", torch.linspace(0, bins - 1, bins))
        self.proj_conv = nn.Conv2d(bins, 1, 1, bias=False)
        with torch.no_grad():
            self.proj_conv.weight.copy_(self.proj.view(1, bins, 1, 1))
        self.proj_conv.weight.requires_grad_(False)     # fixed 0..reg_max, never trained
        self.stems = nn.ModuleList(ConvBNSiLU(c, c, 1, 1) for c in in_channels)
        self.cls_convs = nn.ModuleList(ConvBNSiLU(c, c, 3, 1) for c in in_channels)
        self.reg_convs = nn.ModuleList(ConvBNSiLU(c, c, 3, 1) for c in in_channels)
        self.cls_preds = nn.ModuleList(nn.Conv2d(c, nc, 1) for c in in_channels)
        self.reg_preds = nn.ModuleList(nn.Conv2d(c, 4 * (reg_max + 1), 1) for c in in_channels)

    def forward(self, features):
        outputs = []
        for i, x in enumerate(features):
            cls_logits, ltrb = self._level_raw(i, x)
            if self.use_dfl:
                ltrb = self.distribution_to_distance(ltrb)
            outputs.append((cls_logits, ltrb))
        return outputs

    def forward_raw(self, features):
        """Per level ``(cls_logits [B,nc,H,W], reg [B,4*(reg_max+1),H,W])`` before DFL: the bin
        logits the training losses need (without DFL, ``reg`` is the ltrb output itself)."""
        return [self._level_raw(i, x) for i, x in enumerate(features)]

    def _level_raw(self, i: int, x):
        x = self.stems[i](x)
        return self.cls_preds[i](self.cls_convs[i](x)), self.reg_preds[i](self.reg_convs[i](x))

    def distribution_to_distance(self, reg):
        """[B, 4*(reg_max+1), H, W] bin logits -> [B, 4, H, W] expected distances."""
        bins = self.reg_max + 1
        prob = F.softmax(reg.unflatten(1, (4, bins)), dim=2)          # [B, 4, bins, H, W]
        prob = prob.transpose(1, 2).flatten(2, 3)                     # [B, bins, 4*H, W]
        return self.proj_conv(prob).unflatten(2, (4, -1)).squeeze(1)  # [B, 4, H, W]


class YOLOv6(Detector):
    """YOLOv6 v3/v4 detector (see :class:`Detector` for the forward contract)."""

    def __init__(self, cfg: ModelConfig, backbone: nn.Module, neck: nn.Module, detect: Detect,
                 strides: Sequence[int] = STRIDES):
        super().__init__(cfg, backbone, neck, detect, strides)


# --------------------------------------------------------------------------- builder

_BACKBONES = ("EfficientRep", "CSPBepBackbone")
_NECKS = ("RepBiFPANNeck", "CSPRepBiFPANNeck", "RepPANNeck")


def _choice(field: str, value: str, valid: Sequence[str]) -> str:
    if value not in valid:
        close = difflib.get_close_matches(value, list(valid), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"model.{field}: unknown value '{value}'{hint}; expected one of {', '.join(valid)}")
    return value


def build_yolov6(cfg: ModelConfig) -> YOLOv6:
    """Build a YOLOv6 v3/v4 model (train form) from ``cfg``; ``.fuse()`` gives the deploy form."""
    block = BASIC_BLOCKS[_choice("block", cfg.block, list(BASIC_BLOCKS))]
    _choice("backbone", cfg.backbone, _BACKBONES)
    _choice("neck", cfg.neck, _NECKS)
    bifpn = cfg.neck != "RepPANNeck"
    if cfg.fuse_p2 != bifpn:
        raise ConfigError(f"model.fuse_p2 must be {bifpn} with neck {cfg.neck} "
                          f"({'BiFPAN necks fuse C2' if bifpn else 'RepPANNeck takes C3..C5 only'})")
    if cfg.use_dfl != (cfg.reg_max > 0):
        raise ConfigError(f"model.use_dfl={cfg.use_dfl} needs reg_max {'> 0 (16 upstream)' if cfg.use_dfl else '= 0'}, "
                          f"got {cfg.reg_max}")

    channels = [make_divisible(c * cfg.width_multiple) for c in BACKBONE_CHANNELS + NECK_CHANNELS]
    backbone_repeats = [scale_depth(n, cfg.depth_multiple) for n in BACKBONE_REPEATS]
    neck_repeats = [scale_depth(n, cfg.depth_multiple) for n in NECK_REPEATS]

    def rep_stage(c_in, c_out, n):
        return RepBlock(c_in, c_out, n, block)

    def csp_stage(c_in, c_out, n):
        return BepC3(c_in, c_out, n, cfg.csp_e, block)

    backbone = EfficientRep(channels[:5], backbone_repeats, block,
                            csp_stage if cfg.backbone == "CSPBepBackbone" else rep_stage,
                            cfg.fuse_p2, cfg.cspsppf)
    neck_cls = RepPANNeck if cfg.neck == "RepPANNeck" else RepBiFPANNeck
    neck = neck_cls(channels, neck_repeats, csp_stage if cfg.neck == "CSPRepBiFPANNeck" else rep_stage)
    detect = Detect(cfg.nc, [channels[6], channels[8], channels[10]], cfg.use_dfl, cfg.reg_max)
    return YOLOv6(cfg, backbone, neck, detect)
