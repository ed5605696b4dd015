"""The detection step of the training engine: YOLOv6's loss on labelled batches, YOLOv6's optimizer.

- loss: ``loss_fn(raw_head_outputs, targets, epoch) -> (loss, parts)``
  (:class:`~yoloq.train.losses.DetectionLoss`); with ``weight_decay_mode: custom_l2`` the RepVGG
  L2 of :func:`~yoloq.train.optim.custom_l2` is added (part ``l2``);
- optimizer: SGD (Nesterov) or, for RepOpt targets, :class:`~yoloq.train.repopt.RepOptimizer`, over
  the groups of :func:`~yoloq.train.optim.parameter_groups`, with warm-up + cosine set before every
  optimizer step; weight decay scaled by ``batch * world * accumulate / nominal_batch_size`` (YOLOv6);
- loop (:func:`train_loop`): gradients accumulate to ``nominal_batch_size`` images per optimizer step
  (over all processes), EMA of the weights (evaluated and saved as ``best.pt``, a plain checkpoint
  for ``yoloq eval --weights`` / ``model.weights``), AMP on CUDA, clipping at ``max_grad_norm``.

:mod:`yoloq.train.engine` runs it (resume, DDP, checkpoints, NaN stops, logs).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from yoloq.config import TrainConfig
from yoloq.train.engine import Loop, Optimization, Step
from yoloq.train.errors import TrainError
from yoloq.train.optim import custom_l2, parameter_groups, set_learning_rate, warmup_steps
from yoloq.train.repopt import RepOptimizer, target_masks


class RawHeadOutputs(nn.Module):
    """``images -> model.detect.forward_raw(model.neck(model.backbone(images)))``: what the losses
    take (DDP wraps this, so gradients of every part are synchronised)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        check_trainable(model)
        self.model = model

    def forward(self, images):
        m = self.model
        return m.detect.forward_raw(m.neck(m.backbone(images)))


def check_trainable(model: nn.Module, where: str = "") -> None:
    """Training needs the YOLOv6 Detect head (its ``forward_raw`` gives what the losses take)."""
    if not callable(getattr(getattr(model, "detect", None), "forward_raw", None)):
        name = getattr(getattr(model, "cfg", None), "name", type(model).__name__)
        raise TrainError(f"{where + ': ' if where else ''}'{name}' is not trainable here: training needs a head "
                         "with forward_raw() (the YOLOv6 Detect head; Lite models are not trainable yet)")


def train_loop(tcfg: TrainConfig, world: int = 1, close_mosaic_epochs: int = 0) -> Loop:
    """The engine settings of ``yoloq train``."""
    accumulate = max(1, round(tcfg.nominal_batch_size / (tcfg.batch_size * world)))
    return Loop(epochs=tcfg.epochs, accumulate=accumulate, max_grad_norm=tcfg.max_grad_norm, amp=tcfg.amp,
                ema=(tcfg.ema_decay, tcfg.ema_tau), eval_interval=tcfg.eval_interval,
                close_mosaic_epochs=close_mosaic_epochs, bn_momentum=tcfg.bn_momentum)


class DetectionStep(Step):
    """One batch ``(images, targets [M, 6])`` through the model and ``loss_fn``."""
    name = "train"

    def __init__(self, loss_fn: Callable, tcfg: TrainConfig, repopt_scales: Optional[dict] = None):
        self.loss_fn, self.tcfg, self.repopt_scales = loss_fn, tcfg, repopt_scales
        self.weight_decay = tcfg.weight_decay
        self.model: Optional[nn.Module] = None

    def network(self, model: nn.Module) -> nn.Module:
        return RawHeadOutputs(model)

    def optimization(self, model: nn.Module, loop: Loop, batches_per_epoch: int, world: int) -> Optimization:
        tcfg = self.tcfg
        self.model = model
        self.weight_decay = tcfg.weight_decay * tcfg.batch_size * world * loop.accumulate / tcfg.nominal_batch_size
        groups = parameter_groups(model, self.weight_decay, tcfg.weight_decay_mode)
        kwargs = dict(lr=tcfg.lr0, momentum=tcfg.momentum, nesterov=tcfg.momentum > 0)
        if self.repopt_scales is not None:
            opt = RepOptimizer(groups, target_masks(model, self.repopt_scales), **kwargs)
        else:
            opt = torch.optim.SGD(groups, **kwargs)
        steps_per_epoch = math.ceil(batches_per_epoch / loop.accumulate)
        warmup = warmup_steps(tcfg, steps_per_epoch)
        return Optimization(opt, set_lr=lambda o, step, epoch: set_learning_rate(o, tcfg, step, epoch, warmup))

    def losses(self, forward, images, targets, epoch):
        loss, parts = self.loss_fn(forward(images), targets, epoch)
        if self.tcfg.weight_decay_mode == "custom_l2":
            l2 = custom_l2(self.model)
            loss = loss + 0.5 * self.weight_decay * l2
            parts = {**parts, "l2": l2.detach()}
        return loss, parts

    def best_meta(self, model: nn.Module) -> dict:
        cfg = getattr(model, "cfg", None)
        return {"arch": getattr(cfg, "name", type(model).__name__), "nc": int(getattr(model, "nc", 0)),
                "source": "yoloq.train (EMA weights)"}
