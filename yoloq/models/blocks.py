"""Building blocks of the YOLOv6 v3/v4 models, each with its fusion to the deploy form.

Every block that changes between training and deployment has ``fuse() -> nn.Module`` (the fusion
protocol of ``yoloq.models.common``). The deploy form keeps upstream's deploy layout exactly, so
deploy checkpoints load into it:

- ``ConvBNReLU`` / ``ConvBNSiLU`` (``common.ConvBNAct``): BN folded into the conv (``block.conv.{weight,bias}``).
- ``RepVGGBlock``: three branches -> one 3x3 conv (``rbr_reparam``).
- ``QARepVGGBlock`` / ``QARepVGGBlockV2``: branches -> one 3x3 conv (``rbr_reparam``); the
  post-add BN (``bn``) stays a separate module, as upstream keeps it (for QAT).
- ``RealVGGBlock`` (RepOpt target) and ``LinearAddBlock`` (RepOpt hyper-search): unchanged;
  upstream deploys them as they are (conv + BN).

BatchNorms that survive ``fuse()`` (QARepVGG post-BN, RepOpt BN) can be folded as well, for
inference and quantization, with ``fold_bn() -> nn.Module`` on those blocks or
``common.fold_remaining_bn(model)``. After that every Rep block is a single conv (+ bias) and activation,
which is what TensorRT runs; the state dict then no longer matches upstream's deploy lists, so load
checkpoints before folding.

The RepOpt helpers at the end (gradient masks, re-initialisation) turn a trained hyper-search
model's scales into what the RepOpt optimizer and target model need.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from yoloq.models.common import ConvBN, ConvBNAct, conv_with, fold_bn, fold_bn_into, make_bn

# --------------------------------------------------------------------------- kernel helpers


def pad_1x1_to_3x3(kernel: torch.Tensor) -> torch.Tensor:
    """[O,I,1,1] -> [O,I,3,3] with the 1x1 value at the centre."""
    return F.pad(kernel, [1, 1, 1, 1])


def identity_kernel_3x3(channels: int, like: torch.Tensor) -> torch.Tensor:
    """3x3 kernel of ``x -> x``: 1 at the centre of the channel diagonal."""
    kernel = torch.zeros(channels, channels, 3, 3, device=like.device, dtype=like.dtype)
    kernel[torch.arange(channels), torch.arange(channels), 1, 1] = 1
    return kernel


def avg_kernel_3x3(channels: int, like: torch.Tensor) -> torch.Tensor:
    """3x3 kernel of a 3x3 stride-1 average pool (zero padding counted): 1/9 on the diagonal."""
    kernel = torch.zeros(channels, channels, 3, 3, device=like.device, dtype=like.dtype)
    kernel[torch.arange(channels), torch.arange(channels)] = 1.0 / 9.0
    return kernel


# --------------------------------------------------------------------------- conv + BN modules


class ConvBNReLU(ConvBNAct):
    """conv -> BN -> ReLU (upstream ConvBNReLU; SimConv in 0.3.0 checkpoints)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, act=nn.ReLU)


class ConvBNSiLU(ConvBNAct):
    """conv -> BN -> SiLU (upstream ConvBNSiLU; the basic block of YOLOv6-L and of every head)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, act=nn.SiLU)


# --------------------------------------------------------------------------- Rep blocks


class ConvMaybeBNReLU(nn.Module):
    """``relu([bn](conv(x)))`` with the conv held under ``conv_attr``; ``fold_bn()`` folds the BN
    into the conv in place (outputs unchanged in eval mode). ``fuse()`` keeps the block: upstream
    deploys it as it is."""

    conv_attr = "conv"

    def forward(self, x):
        x = getattr(self, self.conv_attr)(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)

    def fuse(self) -> nn.Module:
        return self

    def fold_bn(self) -> nn.Module:
        if self.bn is not None:
            setattr(self, self.conv_attr, fold_bn_into(getattr(self, self.conv_attr), self.bn))
            self.bn = None
        return self


class RepConv(ConvMaybeBNReLU):
    """Deploy form of the RepVGG-style blocks: ``relu([bn](rbr_reparam(x)))``.

    ``bn`` is present only for QARepVGG (upstream keeps its post-add BN in the deploy form).
    """

    conv_attr = "rbr_reparam"

    def __init__(self, conv: nn.Conv2d, post_bn: Optional[nn.BatchNorm2d] = None):
        super().__init__()
        self.bn = post_bn          # registered first: upstream's deploy key order is bn, rbr_reparam
        self.rbr_reparam = conv
        self.act = nn.ReLU()


class RepVGGBlock(nn.Module):
    """``relu(BN(conv3x3(x)) + BN(conv1x1(x)) [+ BN(x)])``; identity branch when in == out, stride 1.

    ``fuse()`` -> ``RepConv``: the three branches as one 3x3 conv.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        assert kernel_size == 3, "Rep blocks are 3x3"
        self.rbr_identity = make_bn(in_channels) if in_channels == out_channels and stride == 1 else None
        self.rbr_dense = ConvBN(in_channels, out_channels, 3, stride)
        self.rbr_1x1 = ConvBN(in_channels, out_channels, 1, stride)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            y = y + self.rbr_identity(x)
        return self.act(y)

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        w, b = self.rbr_dense.folded()
        w1, b1 = self.rbr_1x1.folded()
        w, b = w + pad_1x1_to_3x3(w1), b + b1
        if self.rbr_identity is not None:
            wid, bid = fold_bn(identity_kernel_3x3(w.shape[0], w), None, self.rbr_identity)
            w, b = w + wid, b + bid
        return RepConv(conv_with(w, b, self.rbr_dense.conv))


class QARepVGGBlock(nn.Module):
    """Quantization-aware RepVGG (V1): ``relu(bn(BN(conv3x3(x)) + conv1x1(x) [+ x]))``.

    The 1x1 branch has no BN and the identity no BN, so the fused kernel keeps a well-behaved
    weight distribution; a single BN after the add normalises the sum.
    ``fuse()`` -> ``RepConv`` with kernel fold(dense, BN) + pad(1x1) + identity, bias of the dense
    branch, and the post-add ``bn`` kept as it is (upstream's deploy layout).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        assert kernel_size == 3, "Rep blocks are 3x3"
        self.has_identity = in_channels == out_channels and stride == 1
        self.rbr_dense = ConvBN(in_channels, out_channels, 3, stride)
        self.rbr_1x1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
        self.bn = make_bn(out_channels)
        self.act = nn.ReLU()

    def shortcut(self, x):
        """The parameter-free branches (identity; V2 adds an average pool)."""
        return x

    def shortcut_kernel(self, like: torch.Tensor) -> torch.Tensor:
        return identity_kernel_3x3(like.shape[0], like)

    def forward(self, x):
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.has_identity:
            y = y + self.shortcut(x)
        return self.act(self.bn(y))

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        w, b = self.rbr_dense.folded()
        w = w + pad_1x1_to_3x3(self.rbr_1x1.weight.float())
        if self.has_identity:
            w = w + self.shortcut_kernel(w)
        return RepConv(conv_with(w, b, self.rbr_dense.conv), post_bn=self.bn)


class QARepVGGBlockV2(QARepVGGBlock):
    """QARepVGG V2: V1 plus a 3x3 stride-1 average-pool branch where the identity is (same keys)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride)
        self.rbr_avg = nn.AvgPool2d(3, 1, 1) if self.has_identity else None

    def shortcut(self, x):
        return x + self.rbr_avg(x)

    def shortcut_kernel(self, like: torch.Tensor) -> torch.Tensor:
        return identity_kernel_3x3(like.shape[0], like) + avg_kernel_3x3(like.shape[0], like)


class RealVGGBlock(ConvMaybeBNReLU):
    """RepOpt target block: ``relu(BN(conv3x3(x)))``, a plain VGG layer.

    Upstream deploys it unchanged (``fuse()`` returns self); ``fold_bn()`` folds the BN into the conv.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        assert kernel_size == 3, "Rep blocks are 3x3"
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn = make_bn(out_channels)
        self.act = nn.ReLU()


class ScaleLayer(nn.Module):
    """Per-channel scale ``x * weight[c]`` (RepOpt hyper-search; no bias)."""

    def __init__(self, num_features: int, scale_init: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((num_features,), float(scale_init)))

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)


class LinearAddBlock(nn.Module):
    """RepOpt hyper-search block: ``relu(BN(s3*conv3x3(x) + s1*conv1x1(x) [+ sid*x]))``.

    The trained scales s3, s1, sid give the RepOpt gradient masks (``repopt_grad_mask``). Upstream
    deploys the block unchanged (``fuse()`` returns self); ``fold_bn()`` returns the equivalent
    ``RealVGGBlock`` with one biased conv.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 conv_scale_init: float = 1.0):
        super().__init__()
        assert kernel_size == 3, "Rep blocks are 3x3"
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.scale_conv = ScaleLayer(out_channels, conv_scale_init)
        self.conv_1x1 = nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False)
        self.scale_1x1 = ScaleLayer(out_channels, conv_scale_init)
        if in_channels == out_channels and stride == 1:
            self.scale_identity = ScaleLayer(out_channels, 1.0)
        else:
            self.scale_identity = None
        self.bn = make_bn(out_channels)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.scale_conv(self.conv(x)) + self.scale_1x1(self.conv_1x1(x))
        if self.scale_identity is not None:
            y = y + self.scale_identity(x)
        return self.act(self.bn(y))

    def fuse(self) -> nn.Module:
        return self

    @torch.no_grad()
    def equivalent_kernel(self) -> torch.Tensor:
        """The single 3x3 kernel of the pre-BN sum (also the RepOpt re-init of the target conv)."""
        sid = self.scale_identity.weight if self.scale_identity is not None else None
        return repopt_reinit_kernel(self.conv.weight, self.conv_1x1.weight,
                                    self.scale_conv.weight, self.scale_1x1.weight, sid)

    @torch.no_grad()
    def fold_bn(self) -> nn.Module:
        folded = RealVGGBlock(self.in_channels, self.out_channels, 3, self.stride)
        folded.to(device=self.conv.weight.device, dtype=self.conv.weight.dtype)
        w, b = fold_bn(self.equivalent_kernel(), None, self.bn)
        folded.conv = conv_with(w, b, self.conv)
        folded.bn = None
        return folded


# --------------------------------------------------------------------------- stages


class RepBlock(nn.Module):
    """``n`` basic blocks in sequence: ``conv1`` (in -> out), then ``block`` (n - 1 more, out -> out)."""

    def __init__(self, in_channels: int, out_channels: int, n: int, block: Callable[..., nn.Module]):
        super().__init__()
        self.conv1 = block(in_channels, out_channels)
        self.block = nn.Sequential(*(block(out_channels, out_channels) for _ in range(n - 1))) if n > 1 else None

    def forward(self, x):
        x = self.conv1(x)
        if self.block is not None:
            x = self.block(x)
        return x


class BottleRep(nn.Module):
    """Two basic blocks with a learnable-weight residual: ``conv2(conv1(x)) + alpha * x``."""

    def __init__(self, in_channels: int, out_channels: int, basic_block: Callable[..., nn.Module]):
        super().__init__()
        self.conv1 = basic_block(in_channels, out_channels)
        self.conv2 = basic_block(out_channels, out_channels)
        self.shortcut = in_channels == out_channels
        self.alpha = nn.Parameter(torch.ones(1))

    def forward(self, x):
        y = self.conv2(self.conv1(x))
        if self.shortcut:
            y = y + self.alpha * x
        return y


class BepC3(nn.Module):
    """CSP stage (CSPStackRep): ``cv3(cat(m(cv1(x)), cv2(x)))``.

    ``m`` is a RepBlock of ``n // 2`` BottleReps on ``int(out * e)`` channels. The 1x1 convs use
    SiLU when the basic block is ConvBNSiLU (YOLOv6-L), ReLU otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int, n: int, e: float,
                 basic_block: Callable[..., nn.Module]):
        super().__init__()
        hidden = int(out_channels * e)
        conv = ConvBNSiLU if basic_block is ConvBNSiLU else ConvBNReLU
        self.cv1 = conv(in_channels, hidden, 1, 1)
        self.cv2 = conv(in_channels, hidden, 1, 1)
        self.cv3 = conv(2 * hidden, out_channels, 1, 1)
        self.m = RepBlock(hidden, hidden, max(n // 2, 1), partial(BottleRep, basic_block=basic_block))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max pools, concatenated, then a 1x1 conv.

    With ConvBNReLU this is upstream's SimSPPF, with ConvBNSiLU its SPPF.
    """

    def __init__(self, in_channels: int, out_channels: int, conv: type = ConvBNReLU, kernel_size: int = 5):
        super().__init__()
        hidden = in_channels // 2
        self.cv1 = conv(in_channels, hidden, 1, 1)
        self.cv2 = conv(hidden * 4, out_channels, 1, 1)
        self.m = nn.MaxPool2d(kernel_size, 1, kernel_size // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class CSPSPPF(nn.Module):
    """CSP version of SPPF: pooled path ``cv6(cv5(pools(cv4(cv3(cv1(x))))))`` next to ``cv2(x)``.

    With ConvBNReLU this is upstream's SimCSPSPPF, with ConvBNSiLU its CSPSPPF.
    """

    def __init__(self, in_channels: int, out_channels: int, conv: type = ConvBNReLU,
                 kernel_size: int = 5, e: float = 0.5):
        super().__init__()
        hidden = int(out_channels * e)
        self.cv1 = conv(in_channels, hidden, 1, 1)
        self.cv2 = conv(in_channels, hidden, 1, 1)
        self.cv3 = conv(hidden, hidden, 3, 1)
        self.cv4 = conv(hidden, hidden, 1, 1)
        self.m = nn.MaxPool2d(kernel_size, 1, kernel_size // 2)
        self.cv5 = conv(4 * hidden, hidden, 1, 1)
        self.cv6 = conv(hidden, hidden, 3, 1)
        self.cv7 = conv(2 * hidden, out_channels, 1, 1)

    def forward(self, x):
        x1 = self.cv4(self.cv3(self.cv1(x)))
        y0 = self.cv2(x)
        y1 = self.m(x1)
        y2 = self.m(y1)
        y3 = self.cv6(self.cv5(torch.cat((x1, y1, y2, self.m(y2)), 1)))
        return self.cv7(torch.cat((y0, y3), 1))


class Transpose(nn.Module):
    """2x upsampling by a learned 2x2 stride-2 transposed conv (with bias)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.upsample_transpose = nn.ConvTranspose2d(in_channels, out_channels, 2, 2, bias=True)

    def forward(self, x):
        return self.upsample_transpose(x)


class BiFusion(nn.Module):
    """Fuse three scales at the middle one: ``cv3(cat(up(top), cv1(mid), down(cv2(bottom))))``.

    Input ``[top (coarser, already out_channels), mid, bottom (finer)]``.
    """

    def __init__(self, in_channels: tuple[int, int], out_channels: int):
        super().__init__()
        self.cv1 = ConvBNReLU(in_channels[0], out_channels, 1, 1)
        self.cv2 = ConvBNReLU(in_channels[1], out_channels, 1, 1)
        self.cv3 = ConvBNReLU(out_channels * 3, out_channels, 1, 1)
        self.upsample = Transpose(out_channels, out_channels)
        self.downsample = ConvBNReLU(out_channels, out_channels, 3, 2)

    def forward(self, x):
        top = self.upsample(x[0])
        mid = self.cv1(x[1])
        bottom = self.downsample(self.cv2(x[2]))
        return self.cv3(torch.cat((top, mid, bottom), 1))


# --------------------------------------------------------------------------- registry

BASIC_BLOCKS: dict[str, Callable[..., nn.Module]] = {
    "repvgg": RepVGGBlock,
    "qarepvgg": QARepVGGBlock,
    "qarepvggv2": QARepVGGBlockV2,
    "repopt": RealVGGBlock,
    "hyper_search": LinearAddBlock,
    "conv_silu": ConvBNSiLU,
}


# --------------------------------------------------------------------------- RepOpt helpers


def repopt_grad_mask(scale_3x3: torch.Tensor, scale_1x1: torch.Tensor, in_channels: int,
                     has_identity: bool) -> torch.Tensor:
    """Gradient multiplier for a RepOpt target 3x3 weight ``[O, I, 3, 3]``.

    ``M = s3^2`` everywhere, ``M[:, :, 1, 1] += s1^2``, and with an identity branch
    ``M[i, i, 1, 1] += 1``. The optimizer multiplies the weight's gradient by M before momentum
    and weight decay.
    """
    out_channels = scale_3x3.shape[0]
    s3 = scale_3x3.detach().reshape(-1, 1, 1, 1)
    s1 = scale_1x1.detach().reshape(-1, 1)
    mask = (s3 ** 2).expand(out_channels, in_channels, 3, 3).clone()
    mask[:, :, 1, 1] += s1 ** 2
    if has_identity:
        idx = torch.arange(out_channels, device=mask.device)
        mask[idx, idx, 1, 1] += 1.0
    return mask


def repopt_reinit_kernel(weight_3x3: torch.Tensor, weight_1x1: torch.Tensor, scale_3x3: torch.Tensor,
                         scale_1x1: torch.Tensor, scale_identity: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RepOpt re-initialisation: ``W * s3 + pad(W1x1) * s1 [+ identity * sid]`` (scales per output channel)."""
    w = weight_3x3.detach() * scale_3x3.detach().reshape(-1, 1, 1, 1)
    w = w + pad_1x1_to_3x3(weight_1x1.detach()) * scale_1x1.detach().reshape(-1, 1, 1, 1)
    if scale_identity is not None:
        w = w + identity_kernel_3x3(w.shape[0], w) * scale_identity.detach().reshape(-1, 1, 1, 1)
    return w
