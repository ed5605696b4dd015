"""The distillation step of the training engine (``yoloq qat``, ``yoloq.qat``).

Each batch runs the frozen FP32 teacher and the fake-quantized student; the losses are
``yoloq.recipes.qat.losses`` (channel-wise distillation on the neck, KL + box L1 on the head, PACT's
L2 on the clip values) plus, for labelled QAT (``qat.loss: det+distill``), ``det_weight`` x the
YOLOv6 detection loss. :mod:`yoloq.train.engine` runs it (resume, DDP, checkpoints, logs) with
:func:`qat_loop`: no accumulation, no EMA, the gradient norm clipped at 10.

Optimizer: conv weights (``lr``, ``weight_decay``; biases without decay) and activation-quantizer
parameters (``quantizer_lr``, no weight decay: PACT's L2 is in the loss); LSQ per-channel weight
scales form their own group (``weight_scale_lr``: at ``quantizer_lr`` they collapse, see
docs/results.md). SGD with momentum by default, as in LSQ, whose gradient scale g = 1/sqrt(N*Qp)
assumes SGD (Adam would undo it); RepOpt students train with the RepOptimizer (gradient masks of
their folded kernels). Cosine learning-rate schedule per step. It is checked at start-up that every
quantizer parameter requires grad and sits in a quantizer group.

BatchNorm: the model is fused (deploy form) -- every BN is already folded into its conv, so the
folded kernels and biases are trained directly, which is what TensorRT will run.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch
from torch import nn

from yoloq.config import QATConfig
from yoloq.quant.learnable import LEARNABLE, LSQWeightQuantizer, clamp_weight_scales, quantizer_parameters
from yoloq.quant.scheme import TensorQuantizer
from yoloq.quant.state import named_quantizers
from yoloq.recipes.qat import QATError
from yoloq.recipes.qat.guard import DivergenceGuard
from yoloq.recipes.qat.losses import FeatureTap, distill_loss
from yoloq.train.engine import Loop, Optimization, Step
from yoloq.train.optim import parameter_groups as base_groups
from yoloq.train.repopt import RepOptimizer

QUANTIZER_GROUPS = ("quantizers", "weight_scales")
MAX_GRAD_NORM = 10.0


class QuantizerGroupError(QATError):
    """A learnable quantizer would not be trained (its parameter is frozen or outside the quantizer groups)."""


def parameter_groups(model: nn.Module, qcfg: QATConfig) -> list[dict]:
    """The engine's groups (conv weights with ``weight_decay``, biases without) plus the quantizer
    parameters (``quantizer_lr``) and LSQ weight scales (``weight_scale_lr``, default ``lr``: the
    gradient scale g assumes it), both without weight decay."""
    qparams = quantizer_parameters(model)
    wscale_ids = {id(p) for q in named_quantizers(model, (LSQWeightQuantizer,)).values() for p in q.parameters()}
    act = [p for p in qparams if id(p) not in wscale_ids]
    wsc = [p for p in qparams if id(p) in wscale_ids]
    own = []
    if act:
        own.append({"name": "quantizers", "params": act, "lr": qcfg.quantizer_lr, "weight_decay": 0.0})
    if wsc:
        wlr = qcfg.lr if qcfg.weight_scale_lr is None else qcfg.weight_scale_lr
        own.append({"name": "weight_scales", "params": wsc, "lr": wlr, "weight_decay": 0.0})
    return base_groups(model, qcfg.weight_decay, "plain", own_groups=own)


def build_optimizer(model: nn.Module, qcfg: QATConfig, masks: Optional[dict] = None) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or Adam over ``parameter_groups``; with RepOpt ``masks`` (parameter ->
    gradient multiplier) the RepOptimizer, SGD with the masks applied first."""
    groups = parameter_groups(model, qcfg)
    if masks:
        if qcfg.optimizer != "sgd":
            raise QATError("RepOpt models train with the RepOptimizer (SGD): set qat.optimizer: sgd")
        opt = RepOptimizer(groups, masks=masks, lr=qcfg.lr, momentum=qcfg.momentum, nesterov=qcfg.momentum > 0)
    elif qcfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=qcfg.lr, momentum=qcfg.momentum, nesterov=qcfg.momentum > 0)
    else:                      # the config allows sgd | adam
        opt = torch.optim.Adam(groups, lr=qcfg.lr)
    check_optimizer_covers_quantizers(model, opt)
    return opt


def check_optimizer_covers_quantizers(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Every learnable-quantizer parameter must require grad and be optimised in a quantizer
    group (an optimizer built from conv weights alone silently freezes the quantizers)."""
    in_group = {id(p): g.get("name") for g in opt.param_groups for p in g["params"]}
    for qname, q in named_quantizers(model, LEARNABLE).items():
        for pname, p in q.named_parameters():
            if not p.requires_grad:
                raise QuantizerGroupError(f"quantizer '{qname}': parameter '{pname}' does not require grad, so QAT "
                                          "would leave it as it is")
            if in_group.get(id(p)) not in QUANTIZER_GROUPS:
                raise QuantizerGroupError(f"quantizer '{qname}': parameter '{pname}' is not in the optimizer's "
                                          f"quantizer group (found in: {in_group.get(id(p))})")


def cosine_schedule(opt: torch.optim.Optimizer, total_steps: int, final: float = 0.01):
    total = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


def quantizer_scale_stats(model: nn.Module) -> dict:
    """How far the learned quantizers moved: their scale (PACT: clip) over its starting value, min /
    mean / max over the activation quantizers, and the mean over the weight channels."""
    act, weight = [], []
    for q in named_quantizers(model, LEARNABLE).values():
        value = q.alpha if hasattr(q, "alpha") else q.scale
        ratio = (value.detach() / q.init_value.clamp_min(1e-12)).flatten()
        (weight if isinstance(q, LSQWeightQuantizer) else act).append(ratio)
    out = {}
    if act:
        a = torch.cat(act)
        out.update(act_scale_ratio_min=float(a.min()), act_scale_ratio_mean=float(a.mean()),
                   act_scale_ratio_max=float(a.max()))
    if weight:
        out["weight_scale_ratio_mean"] = float(torch.cat(weight).mean())
    return out


def make_teacher(student_ptq: nn.Module) -> nn.Module:
    """The distillation teacher: a frozen copy of the PTQ model with every quantizer off (the fused
    FP32 weights PTQ produced, bias correction included)."""
    teacher = copy.deepcopy(student_ptq).eval()
    for m in teacher.modules():
        if isinstance(m, (TensorQuantizer, *LEARNABLE)):
            m.disable()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def qat_loop(qcfg: QATConfig, epochs: Optional[int] = None, close_mosaic_epochs: int = 0) -> Loop:
    """The engine settings of QAT: evaluate every epoch, keep every step's loss (the loss curve)."""
    return Loop(epochs=epochs or qcfg.epochs, max_grad_norm=MAX_GRAD_NORM, eval_interval=1,
                close_mosaic_epochs=close_mosaic_epochs, keep_step_losses=True)


class DistillStep(Step):
    """Teacher and student on one batch; the distillation terms (+ the detection loss on labels)."""
    name = "qat"
    broadcast_buffers = False

    def __init__(self, student: nn.Module, teacher: nn.Module, qcfg: QATConfig, det_loss: Optional[Callable] = None,
                 masks: Optional[dict] = None):
        self.student, self.teacher, self.qcfg = student, teacher, qcfg
        self.det_loss, self.masks = det_loss, masks
        self.guard = DivergenceGuard(qcfg)
        self.taps = (FeatureTap(student), FeatureTap(teacher))

    def to(self, device: torch.device) -> None:
        self.teacher.to(device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def optimization(self, model: nn.Module, loop: Loop, batches_per_epoch: int, world: int) -> Optimization:
        opt = build_optimizer(model, self.qcfg, self.masks)
        return Optimization(opt, scheduler=cosine_schedule(opt, loop.epochs * batches_per_epoch))

    def losses(self, forward, images, targets, epoch):
        with torch.no_grad():
            self.teacher(images)
        forward(images)
        terms = distill_loss(*self.taps, self.qcfg, self.student)
        if self.det_loss is not None and targets is not None:
            head = self.taps[0].out["detect"]
            if getattr(self.student.cfg, "use_dfl", False):          # DFL: the loss needs the bin logits
                head = self.student.detect.forward_raw(self.taps[0].out["neck"])
            det, _ = self.det_loss(head, targets, None)
            terms["det"] = det
            terms["loss"] = terms["loss"] + self.qcfg.det_weight * det
        return terms["loss"], terms

    def after_update(self, model: nn.Module) -> None:
        clamp_weight_scales(model)

    def epoch_stats(self, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
        quantizer_lr = next((g["lr"] for g in opt.param_groups if g.get("name") == "quantizers"), None)
        return {"quantizer_lr": quantizer_lr, **quantizer_scale_stats(model)}

    def best_meta(self, model: nn.Module) -> dict:
        return {"source": "yoloq qat (fake-quantized student)"}

    def close(self) -> None:
        for tap in self.taps:
            tap.remove()
