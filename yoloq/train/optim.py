"""Optimizer pieces of the trainer: parameter groups, warm-up + cosine schedule, EMA, custom L2.

- Groups (as YOLOv6): conv / linear weights with weight decay; BatchNorm weights and all biases
  without. With ``weight_decay_mode: custom_l2`` the Rep blocks' branch kernels leave the decayed
  group and :func:`custom_l2` is added to the loss instead (RepVGG paper, Sec. 3.3: plain L2 on
  a branch kernel is not L2 on the kernel the block deploys; the paper penalises the equivalent
  kernel). QARepVGG's paper trains with plain weight decay, so ``plain`` is the default.
- Schedule, per optimizer step ``i`` and epoch ``e``: cosine ``lr0 * f(e)`` with
  ``f(e) = 1 + (lrf - 1) (1 - cos(pi e / epochs)) / 2``; during warm-up (``i < W``) the learning
  rate rises linearly from 0 (biases: falls from ``warmup_bias_lr``) to that value and momentum
  rises from ``warmup_momentum``. A pure function of (i, e): resume needs no scheduler state.
- EMA: ``torch.optim.swa_utils.AveragedModel`` with decay ``d * (1 - exp(-n / tau))`` after n
  updates (YOLOv5 / YOLOv6's ramp); buffers (BN statistics) follow the model.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from yoloq.config import ConfigError, TrainConfig, WeightDecayMode, choices
from yoloq.models.blocks import QARepVGGBlock, RepVGGBlock

WEIGHT_DECAY_MODES = choices(WeightDecayMode)


# --------------------------------------------------------------------------- custom L2 (RepVGG)


def _branch_scale(bn: Optional[nn.BatchNorm2d], like: torch.Tensor) -> torch.Tensor:
    """Per output channel gamma / sigma of a branch BN (1 without BN), detached."""
    if bn is None:
        return torch.ones(like.shape[0], 1, 1, 1, device=like.device, dtype=like.dtype)
    return (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().reshape(-1, 1, 1, 1)


def rep_branch_kernels(model: nn.Module):
    """(3x3 weight, its BN, 1x1 weight, its BN or None) of every RepVGG / QARepVGG block."""
    for m in model.modules():
        if isinstance(m, RepVGGBlock):
            yield m.rbr_dense.conv.weight, m.rbr_dense.bn, m.rbr_1x1.conv.weight, m.rbr_1x1.bn
        elif isinstance(m, QARepVGGBlock):
            yield m.rbr_dense.conv.weight, m.rbr_dense.bn, m.rbr_1x1.weight, None


def custom_l2(model: nn.Module) -> torch.Tensor:
    """RepVGG's L2 on the equivalent kernel: plain L2 on the 3x3 ring (only the 3x3 branch
    has weights there); at the centre, the squared equivalent value ``(K3c t3 + K1 t1)^2``
    divided by ``t3^2 + t1^2`` (t = BN gamma / sigma of each branch, treated as constants) so its
    strength matches plain L2. Add ``weight_decay / 2 * custom_l2(model)`` to the loss."""
    total = None
    for k3, bn3, k1, bn1 in rep_branch_kernels(model):
        t3, t1 = _branch_scale(bn3, k3), _branch_scale(bn1, k1)
        ring = (k3 ** 2).sum() - (k3[:, :, 1:2, 1:2] ** 2).sum()
        centre = k3[:, :, 1:2, 1:2] * t3 + k1 * t1
        term = ring + (centre ** 2 / (t3 ** 2 + t1 ** 2)).sum()
        total = term if total is None else total + term
    if total is None:
        raise ConfigError("train.weight_decay_mode: custom_l2 is the RepVGG L2 of Rep blocks, and the model has no "
                          "RepVGG / QARepVGG block; use weight_decay_mode: plain")
    return total


# --------------------------------------------------------------------------- groups and schedule


def parameter_groups(model: nn.Module, weight_decay: float, mode: str = "plain",
                     own_groups: Sequence[dict] = ()) -> list[dict]:
    """``decay`` (conv weights), ``no_decay`` (BN weights, other 1-d parameters), ``bias`` groups,
    then ``own_groups`` (e.g. QAT's quantizer parameters with their own learning rate: each a
    ``{"name", "params", ...}`` dict whose parameters leave the three). Every trainable parameter
    lands in exactly one group; the three are always there (a checkpoint's optimizer state maps
    group by group)."""
    if mode not in WEIGHT_DECAY_MODES:
        raise ConfigError(f"train.weight_decay_mode: unknown value '{mode}'; expected one of {WEIGHT_DECAY_MODES}")
    custom = {id(p) for k3, _, k1, _ in rep_branch_kernels(model) for p in (k3, k1)} if mode == "custom_l2" else set()
    seen = {id(p) for g in own_groups for p in g["params"]}
    decay, no_decay, bias = [], [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if name == "bias":
                bias.append(p)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) or p.dim() <= 1 or id(p) in custom:
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"name": "decay", "params": decay, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
            {"name": "bias", "params": bias, "weight_decay": 0.0}, *[g for g in own_groups if g["params"]]]


def cosine_factor(epoch: int, epochs: int, lrf: float) -> float:
    return 1 + (lrf - 1) * (1 - math.cos(math.pi * epoch / max(epochs, 1))) / 2


def set_learning_rate(opt: torch.optim.Optimizer, tcfg: TrainConfig, step: int, epoch: int,
                      warmup_steps: int) -> None:
    """Set lr (and momentum during warm-up) of every group for optimizer step ``step``."""
    target = tcfg.lr0 * cosine_factor(epoch, tcfg.epochs, tcfg.lrf)
    for group in opt.param_groups:
        if step < warmup_steps:
            start = tcfg.warmup_bias_lr if group.get("name") == "bias" else 0.0
            group["lr"] = float(np.interp(step, [0, warmup_steps], [start, target]))
            if "momentum" in group:
                group["momentum"] = float(np.interp(step, [0, warmup_steps], [tcfg.warmup_momentum, tcfg.momentum]))
        else:
            group["lr"] = target
            if "momentum" in group:
                group["momentum"] = tcfg.momentum


def warmup_steps(tcfg: TrainConfig, steps_per_epoch: int) -> int:
    if tcfg.warmup_epochs <= 0:
        return 0
    return max(round(tcfg.warmup_epochs * steps_per_epoch), tcfg.warmup_min_steps)


# --------------------------------------------------------------------------- EMA


def make_ema(model: nn.Module, decay: float, tau: float) -> AveragedModel:
    """Exponential moving average of ``model``'s parameters with YOLOv6's decay ramp."""
    def average(avg: torch.Tensor, current: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        d = decay * (1 - math.exp(-float(count) / tau))
        return avg * d + current * (1 - d)
    ema = AveragedModel(model, avg_fn=average, use_buffers=False)
    ema.eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema
