"""RepOpt-VGG (Ding et al. 2022, "Re-parameterizing Your Optimizers rather than Architectures").

Pipeline:
1. train the hyper-search model (``block: hyper_search``: LinearAddBlock, trainable scales);
2. ``extract_scales(hs_model)`` -> ``save_scales(file)``: per block s3, s1 (and sid with identity);
3. build the target (``block: repopt``: RealVGGBlock, a plain 3x3 conv + BN + ReLU) and
   ``reinit_from_scales(target, scales)``: each 3x3 kernel becomes ``W3 s3 + pad(W1) s1 [+ I sid]``
   from fresh random W3 (the target's own) and W1;
4. train the target with :class:`RepOptimizer`: SGD whose gradient of each target kernel is
   multiplied by ``M = s3^2 (+ s1^2 at the centre) (+ 1 on the identity diagonal's centre)``
   (``yoloq.models.blocks.repopt_grad_mask``) before weight decay and momentum.

Why it is exact: let the multi-branch block be ``s3 * conv(x, W3) + s1 * conv(x, W1) + sid * x``
with s3, s1 constant and W3, W1, sid trained, and ``W' = s3 W3 + s1 pad(W1) + sid I``. With G the
gradient w.r.t. W', an SGD step changes W3 by ``-lr s3 G``, W1 by ``-lr s1 G_centre`` and sid by
``-lr G_diag-centre``, so W' moves by ``-lr (s3^2 G + s1^2 G_centre + G_diag-centre) = -lr M G``.
Momentum buffers and L2 weight decay are linear and map the same way (the buffer of W' is the
same combination of the branch buffers; decay ``lambda * W3`` etc. sums to ``lambda * W'``), so
SGD with momentum, Nesterov and weight decay stays exact when the mask is applied to the raw
gradient before them. It stops being exact when the scales s3, s1 themselves are trained (the
hyper-search stage), with Adam-like per-element normalisation, with gradient-norm clipping (the
two parameterisations have different gradient norms), or when weight decay differs between the
branch weights and the scales. The BN after the sum is the same module in both models.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from yoloq.models.blocks import LinearAddBlock, RealVGGBlock, repopt_grad_mask, repopt_reinit_kernel
from yoloq.train.errors import ScalesMismatchError
from yoloq.io import atomic_torch_save
from yoloq.safe_load import CheckpointError, load_plain

SCALES_FORMAT = "yoloq-repopt-scales"
MAX_LISTED = 5


# --------------------------------------------------------------------------- the optimizer


class RepOptimizer(torch.optim.SGD):
    """SGD that multiplies the gradient of each masked parameter by its RepOpt mask first.

    ``masks`` maps parameters (the target's 3x3 kernels) to tensors of their shape. Weight decay,
    momentum and Nesterov then act on the masked gradient, as the equivalence requires.
    """

    def __init__(self, params, masks: dict[nn.Parameter, torch.Tensor], **sgd_kwargs):
        super().__init__(params, **sgd_kwargs)
        optimised = {id(p) for g in self.param_groups for p in g["params"]}
        missing = [tuple(p.shape) for p in masks if id(p) not in optimised]
        if missing:
            raise ValueError(f"RepOptimizer: {len(missing)} masked parameter(s) are not optimised, e.g. {missing[0]}")
        for p, m in masks.items():
            if m.shape != p.shape:
                raise ValueError(f"RepOptimizer: mask {tuple(m.shape)} for a parameter of shape {tuple(p.shape)}")
        self.masks = {id(p): m.to(p.device, p.dtype) for p, m in masks.items()}
        self._masked = list(masks)

    @torch.no_grad()
    def step(self, closure=None):
        for p in self._masked:
            if p.grad is not None:
                p.grad.mul_(self.masks[id(p)])
        return super().step(closure)


def target_masks(target: nn.Module, scales: dict) -> dict[nn.Parameter, torch.Tensor]:
    """Gradient masks keyed by the target's RealVGGBlock kernels (``scales`` checked to fit)."""
    check_scales(target, scales)
    blocks = dict(_real_vgg_blocks(target))
    masks = {}
    for name, s in scales["blocks"].items():
        conv = blocks[name].conv
        masks[conv.weight] = repopt_grad_mask(s["scale_conv"], s["scale_1x1"], conv.in_channels,
                                              s["scale_identity"] is not None).to(conv.weight)
    return masks


# --------------------------------------------------------------------------- scales file


def extract_scales(hs_model: nn.Module, source: str = "") -> dict:
    """The trained scales of every LinearAddBlock of a hyper-search model, by module path."""
    blocks = {}
    for name, m in hs_model.named_modules():
        if isinstance(m, LinearAddBlock):
            sid = m.scale_identity.weight.detach().cpu().clone() if m.scale_identity is not None else None
            blocks[name] = {"scale_conv": m.scale_conv.weight.detach().cpu().clone(),
                            "scale_1x1": m.scale_1x1.weight.detach().cpu().clone(),
                            "scale_identity": sid, "in_channels": m.in_channels,
                            "out_channels": m.out_channels, "stride": m.stride}
    if not blocks:
        raise ScalesMismatchError(f"{source or 'model'}: no LinearAddBlock found; scales come from a "
                                  "hyper-search model (block: hyper_search)")
    return {"format": SCALES_FORMAT, "version": 1, "source": source, "blocks": blocks}


def save_scales(scales: dict, path: str | os.PathLike) -> Path:
    return atomic_torch_save(scales, path)


def load_scales(path: str | os.PathLike) -> dict:
    """Read a scales file (``weights_only``: tensors and plain containers, no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise ScalesMismatchError(f"RepOpt scales file not found: {path}")
    try:
        data = load_plain(path)                  # TorchScript / foreign zips refused, torch's text shortened
    except CheckpointError as err:
        raise ScalesMismatchError(f"RepOpt scales file {str(err).replace('checkpoint', 'file')}") from None
    if not isinstance(data, dict) or data.get("format") != SCALES_FORMAT or not isinstance(data.get("blocks"), dict):
        raise ScalesMismatchError(f"{path}: not a RepOpt scales file (expected a dict with format "
                                  f"'{SCALES_FORMAT}'; write one with yoloq repopt-scales)")
    data["path"] = str(path)
    return data


def _real_vgg_blocks(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RealVGGBlock)]


def _listed(names) -> str:
    names = sorted(names)
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def check_scales(target: nn.Module, scales: dict) -> None:
    """The scales must name exactly the target's RealVGGBlocks, with matching channels, strides
    and identity branches; the error names the file, the block and what was expected."""
    where = scales.get("path", "scales")
    blocks = dict(_real_vgg_blocks(target))
    if not blocks:
        raise ScalesMismatchError(f"{where}: the model has no RealVGGBlock; RepOpt scales apply to a "
                                  "target model (block: repopt)")
    missing, extra = set(blocks) - set(scales["blocks"]), set(scales["blocks"]) - set(blocks)
    if missing or extra:
        raise ScalesMismatchError(f"{where}: does not match the model ({len(blocks)} RepOpt blocks, the file has "
                                  f"{len(scales['blocks'])})" + (f"; missing: {_listed(missing)}" if missing else "")
                                  + (f"; not in the model: {_listed(extra)}" if extra else "")
                                  + " (scales from another model size or structure?)")
    for name, block in blocks.items():
        s, conv = scales["blocks"][name], block.conv
        identity = conv.in_channels == conv.out_channels and conv.stride == (1, 1)
        expected = (conv.out_channels, conv.in_channels, conv.stride[0], identity)
        got = (int(s["scale_conv"].numel()), int(s["in_channels"]), int(s["stride"]), s["scale_identity"] is not None)
        if expected != got or s["scale_1x1"].numel() != conv.out_channels or (
                identity and s["scale_identity"].numel() != conv.out_channels):
            raise ScalesMismatchError(f"{where}: block '{name}' has (out, in, stride, identity) {got}; the model's "
                                      f"block is {expected}")


@torch.no_grad()
def reinit_from_scales(target: nn.Module, scales: dict, seed: Optional[int] = None) -> None:
    """RepOpt initialisation of every target kernel: ``W3 s3 + pad(W1) s1 [+ I sid]`` with W3 the
    kernel as initialised and W1 a fresh 1x1 conv with PyTorch's default initialisation."""
    check_scales(target, scales)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, block in _real_vgg_blocks(target):
        s, w = scales["blocks"][name], block.conv.weight
        w1 = torch.empty(w.shape[0], w.shape[1], 1, 1)
        bound = 1.0 / (w.shape[1] ** 0.5)          # kaiming_uniform(a=sqrt(5)) as nn.Conv2d's default
        w1.uniform_(-bound, bound, generator=gen)
        kernel = repopt_reinit_kernel(w.float().cpu(), w1, s["scale_conv"], s["scale_1x1"], s["scale_identity"])
        w.copy_(kernel.to(w))
