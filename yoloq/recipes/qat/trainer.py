"""The QAT training loop: optimizer groups, cosine schedule, DDP, divergence checks, checkpoints.

Optimizer: conv weights (``lr``, ``weight_decay``; biases without decay) and activation-quantizer
parameters (``quantizer_lr``, no weight decay: PACT's L2 is in the loss); LSQ per-channel weight
scales form their own group (``weight_scale_lr``: at ``quantizer_lr`` they collapsed to <= 0 in the
first step on Lite-S). SGD with momentum by default, as in LSQ, whose gradient scale
g = 1/sqrt(N*Qp) assumes SGD (Adam would undo it). Cosine learning-rate schedule per step. It is
asserted at start-up that every quantizer parameter requires grad and sits in a quantizer group.

BatchNorm: the model is fused (deploy form) -- every BN is already folded into its conv, so the
folded kernels and biases are trained directly, which is what TensorRT will run.

Checkpoints: ``last.pt`` (student, optimizer, schedule, history) after every epoch, ``best.pt``
(student) when the val AP improves, both atomically; ``resume`` continues from ``last.pt`` and the
result equals an uninterrupted run (same data order: ``DistributedSampler`` seeded per epoch).
A diverging run stops (``yoloq.recipes.qat.guard``) before anything of the bad step is written.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from yoloq.config import ConfigError, QATConfig
from yoloq.io import atomic_torch_save
from yoloq.quant.learnable import LEARNABLE, LSQWeightQuantizer, clamp_weight_scales, quantizer_parameters
from yoloq.quant.scheme import TensorQuantizer
from yoloq.quant.state import named_quantizers
from yoloq.recipes.qat.guard import DivergenceGuard
from yoloq.recipes.qat import QATError
from yoloq.recipes.qat.data import targets_of
from yoloq.recipes.qat.losses import FeatureTap, distill_loss
from yoloq.report.run_log import RunLogger
from yoloq.safe_load import load_plain

QUANTIZER_GROUPS = ("quantizers", "weight_scales")
MAX_GRAD_NORM = 10.0


def parameter_groups(model: nn.Module, qcfg: QATConfig) -> list[dict]:
    """Conv weights (lr, weight decay), biases (lr, no decay), quantizer parameters (quantizer_lr,
    no decay). Every trainable parameter lands in exactly one group."""
    qparams = quantizer_parameters(model)
    qids = {id(p) for p in qparams}
    wscale_ids = {id(p) for q in named_quantizers(model, (LSQWeightQuantizer,)).values() for p in q.parameters()}
    weights, biases = [], []
    for name, p in model.named_parameters():
        if id(p) in qids or not p.requires_grad:
            continue
        (weights if p.dim() > 1 else biases).append(p)
    groups = [{"name": "weights", "params": weights, "lr": qcfg.lr, "weight_decay": qcfg.weight_decay},
              {"name": "biases", "params": biases, "lr": qcfg.lr, "weight_decay": 0.0}]
    act = [p for p in qparams if id(p) not in wscale_ids]
    wsc = [p for p in qparams if id(p) in wscale_ids]
    if act:
        groups.append({"name": "quantizers", "params": act, "lr": qcfg.quantizer_lr, "weight_decay": 0.0})
    if wsc:   # LSQ: weight scales share the weights' learning rate (the gradient scale g assumes it);
        #       measured on Lite-S: their relative gradients are ~10-6000x the weights', quantizer_lr collapses them
        wlr = qcfg.lr if qcfg.weight_scale_lr is None else qcfg.weight_scale_lr
        groups.append({"name": "weight_scales", "params": wsc, "lr": wlr, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, qcfg: QATConfig, masks: Optional[dict] = None) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or Adam over ``parameter_groups``; with RepOpt ``masks`` (parameter ->
    gradient multiplier) the RepOptimizer, SGD with the masks applied first."""
    groups = parameter_groups(model, qcfg)
    if masks:
        from yoloq.train.repopt import RepOptimizer
        if qcfg.optimizer != "sgd":
            raise QATError("RepOpt models train with the RepOptimizer (SGD): set qat.optimizer: sgd")
        opt = RepOptimizer(groups, masks=masks, lr=qcfg.lr, momentum=qcfg.momentum, nesterov=qcfg.momentum > 0)
    elif qcfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=qcfg.lr, momentum=qcfg.momentum, nesterov=qcfg.momentum > 0)
    elif qcfg.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=qcfg.lr)
    else:
        raise ConfigError(f"qat.optimizer must be 'sgd' or 'adam', got '{qcfg.optimizer}'")
    check_optimizer_covers_quantizers(model, opt)
    return opt


def check_optimizer_covers_quantizers(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Every learnable-quantizer parameter must require grad and be optimised in the quantizer
    group (an optimizer built from conv weights alone silently freezes the quantizers)."""
    in_group = {id(p): g.get("name") for g in opt.param_groups for p in g["params"]}
    for qname, q in named_quantizers(model, LEARNABLE).items():
        for pname, p in q.named_parameters():
            if not p.requires_grad:
                raise AssertionError(f"quantizer '{qname}': parameter '{pname}' does not require grad")
            if in_group.get(id(p)) not in QUANTIZER_GROUPS:
                raise AssertionError(f"quantizer '{qname}': parameter '{pname}' is not in the optimizer's "
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


def _images(batch) -> Optional[torch.Tensor]:
    if batch is None:
        return None
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def check_same_run(saved: Optional[dict], now: Optional[dict], path: Path) -> None:
    """--resume continues the interrupted run exactly: refuse when any training setting differs
    (a resumed run with another learning rate would report settings that were not used)."""
    if now is None or saved == now:
        return
    saved = saved or {}
    diff = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]
    raise QATError(f"{path}: --resume continues the interrupted run with its own settings, but these differ: "
                   f"{'; '.join(diff)}. Resume with the original settings, or start a new run with --name")


@dataclass
class FitExtras:
    """What a QAT run may add to plain distillation."""
    det_loss: Optional[Callable] = None     # yoloq.train.losses.DetectionLoss (qat.loss det+distill)
    masks: Optional[dict] = None            # RepOpt gradient masks of the student's folded kernels
    log_dir: Optional[Path] = None          # TensorBoard events + steps.csv (yoloq.report.run_log)
    close_mosaic_epochs: int = 0            # augmented data: the last N epochs without mosaic / mixup


@dataclass
class FitResult:
    history: list                   # one dict per epoch
    best_epoch: Optional[int]
    best_state: dict                # student state_dict (CPU) of the best (or last) epoch
    last_state: dict
    extra: dict = field(default_factory=dict)
    step_losses: list = field(default_factory=list)   # the total loss of every step (loss curve)


def make_teacher(student_ptq: nn.Module) -> nn.Module:
    """The FP32 fused model with the student's (PTQ) weights: a copy with every quantizer off."""
    teacher = copy.deepcopy(student_ptq).eval()
    for m in teacher.modules():
        if isinstance(m, TensorQuantizer):
            m.disable()
        elif isinstance(m, LEARNABLE):
            m.disable()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def make_train_loader(dataset, batch_size: int, workers: int, seed: int, collate_fn=None):
    """DataLoader + DistributedSampler (one replica without torch.distributed): each epoch a
    seeded shuffle, each rank every world-th image -- the same order on resume."""
    from torch.utils.data import DataLoader, DistributedSampler
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=max(0, workers),
                        collate_fn=collate_fn, drop_last=False)
    return loader, sampler


class Trainer:
    """One distillation run of ``fit`` (see there); each epoch is ``_train_epoch`` + ``_end_epoch``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, loader, qcfg: QATConfig, epochs: int, sampler,
                 evaluate, out_dir: Optional[Path], fingerprint: Optional[dict], extra: Optional[dict],
                 device: torch.device, progress: bool, extras: Optional[FitExtras] = None):
        self.student, self.teacher, self.loader, self.qcfg, self.epochs = student, teacher, loader, qcfg, epochs
        self.sampler, self.evaluate, self.fingerprint, self.device = sampler, evaluate, fingerprint, device
        self.progress, self.extra = progress, dict(extra or {})
        self.last_path = out_dir / "last.pt" if out_dir else None
        self.best_path = out_dir / "best.pt" if out_dir else None
        self.extras = extras or FitExtras()
        self.opt = build_optimizer(student, qcfg, self.extras.masks)
        self.sched = cosine_schedule(self.opt, epochs * len(loader))
        self.guard = DivergenceGuard(qcfg)
        self.history: list = []
        self.step_losses: list = []
        self.log = RunLogger(self.extras.log_dir, enabled=is_main_process()) if self.extras.log_dir else None
        self.best_epoch, self.best_ap, self.start_epoch = None, -math.inf, 0
        self.taps = (FeatureTap(student), FeatureTap(teacher))
        ddp = dist.is_initialized() and dist.get_world_size() > 1
        self.model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False) if ddp else student

    def resume(self) -> None:
        if self.last_path is None or not self.last_path.is_file():
            return
        state = load_plain(self.last_path)
        check_same_run(state.get("fingerprint"), self.fingerprint, self.last_path)
        self.student.load_state_dict(state["student"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.history, self.best_epoch, self.best_ap = state["history"], state["best_epoch"], state["best_ap"]
        self.step_losses = list(state.get("step_losses", []))
        self.start_epoch = state["epoch"]
        self.extra.update(state.get("extra", {}))
        torch.set_rng_state(state["rng"])

    def _losses(self, images: torch.Tensor, targets: Optional[torch.Tensor]) -> dict:
        with torch.no_grad():
            self.teacher(images)
        self.model(images)
        terms = distill_loss(*self.taps, self.qcfg, self.student)
        if self.extras.det_loss is not None and targets is not None:
            head = self.taps[0].out["detect"]
            if getattr(self.student.cfg, "use_dfl", False):          # DFL: the loss needs the bin logits
                head = self.student.detect.forward_raw(self.taps[0].out["neck"])
            det, _ = self.extras.det_loss(head, targets.to(images.device), None)
            terms["det"] = det
            terms["loss"] = terms["loss"] + self.qcfg.det_weight * det
        return terms

    def _step(self, images: torch.Tensor, targets: Optional[torch.Tensor], where: str) -> dict:
        terms = self._losses(images, targets)
        self.guard.check_loss(terms, where, self.student, images)
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), MAX_GRAD_NORM)
        self.opt.step()
        self.sched.step()
        clamp_weight_scales(self.student)
        self.guard.check_model(self.student, where)
        return {k: float(v.detach()) for k, v in terms.items()}

    def _set_epoch(self, epoch: int) -> None:
        """Data order (sampler) and, for augmented data, this epoch's views and mosaic on or off."""
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        dataset = getattr(self.loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
            dataset.set_mosaic(self.epochs - epoch > self.extras.close_mosaic_epochs)

    def _log_step(self, terms: dict) -> None:
        self.step_losses.append(terms["loss"])
        if self.log is not None:
            step = len(self.step_losses)
            self.log.scalars({f"loss/{k}": v for k, v in terms.items()}, step)
            self.log.scalars({f"lr/{g['name']}": g["lr"] for g in self.opt.param_groups}, step)

    def _train_epoch(self, epoch: int) -> dict:
        self._set_epoch(epoch)
        start, sums, steps = time.perf_counter(), {}, 0
        bar = tqdm(self.loader, total=len(self.loader), desc=f"qat epoch {epoch + 1}/{self.epochs}",
                   disable=not (self.progress and is_main_process()), unit="batch")
        for step, batch in enumerate(bar):
            images = _images(batch)
            if images is None:
                continue
            terms = self._step(images.to(self.device, non_blocking=True), targets_of(batch),
                               f"epoch {epoch + 1} step {step + 1}")
            self._log_step(terms)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
            bar.set_postfix(loss=f"{terms['loss']:.4f}")
        return {"epoch": epoch + 1, **{k: v / max(steps, 1) for k, v in sums.items()},
                "lr": self.opt.param_groups[0]["lr"],
                "quantizer_lr": next((g["lr"] for g in self.opt.param_groups if g["name"] == "quantizers"), None),
                "train_seconds": round(time.perf_counter() - start, 2), "steps": steps}

    def _end_epoch(self, row: dict) -> None:
        """Evaluate (rank 0), check for a collapse, then keep best.pt / last.pt."""
        epoch = row["epoch"]
        if self.evaluate is not None and is_main_process():
            start = time.perf_counter()
            row.update({k: float(v) for k, v in self.evaluate(self.student).items()})
            row["eval_seconds"] = round(time.perf_counter() - start, 2)
            self.guard.check_map(row["AP"], self.extra.get("ptq", {}).get("AP"), epoch)
            if row["AP"] > self.best_ap:
                self.best_ap, self.best_epoch = row["AP"], epoch
                if self.best_path is not None:
                    atomic_torch_save({"student": _cpu_state(self.student), "epoch": epoch, "AP": self.best_ap},
                                      self.best_path)
        row.update(quantizer_scale_stats(self.student))
        self.history.append(row)
        if self.log is not None:
            self.log.epoch(self.history)
        if self.last_path is not None and is_main_process():
            atomic_torch_save({"student": _cpu_state(self.student), "optimizer": self.opt.state_dict(),
                               "scheduler": self.sched.state_dict(), "epoch": epoch, "history": self.history,
                               "best_epoch": self.best_epoch, "best_ap": self.best_ap,
                               "fingerprint": self.fingerprint, "extra": self.extra, "rng": torch.get_rng_state(),
                               "step_losses": self.step_losses},
                              self.last_path)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def run(self, stop_after_epoch: Optional[int] = None) -> FitResult:
        try:
            for epoch in range(self.start_epoch, self.epochs):
                self._end_epoch(self._train_epoch(epoch))
                if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                    break
        finally:
            for tap in self.taps:
                tap.remove()
            if self.log is not None:
                self.log.close()
        last_state = _cpu_state(self.student)
        best_state = last_state
        last_epoch = self.history[-1]["epoch"] if self.history else None
        if self.best_epoch is not None and self.best_epoch != last_epoch and self.best_path is not None \
                and self.best_path.is_file():
            best_state = load_plain(self.best_path)["student"]
        return FitResult(history=self.history, best_epoch=self.best_epoch, best_state=best_state,
                         last_state=last_state, extra=self.extra, step_losses=self.step_losses)


def fit(student: nn.Module, teacher: nn.Module, loader: Iterable, qcfg: QATConfig, epochs: int, *,
        sampler=None, evaluate: Optional[Callable[[nn.Module], dict]] = None, out_dir: Optional[Path] = None,
        resume: bool = False, fingerprint: Optional[dict] = None, extra: Optional[dict] = None,
        device: torch.device | str = "cpu", progress: bool = False,
        stop_after_epoch: Optional[int] = None, extras: Optional[FitExtras] = None) -> FitResult:
    """Distil ``teacher`` into the fake-quantized ``student`` for ``epochs`` epochs.

    ``loader`` yields image batches (tensors or ``(images, ...)``); with ``torch.distributed``
    initialised the student is wrapped in DDP (each rank passes its own shard, ``sampler`` is
    re-seeded per epoch with ``set_epoch``). ``evaluate(model) -> {"AP": ...}`` runs on rank 0
    after every epoch (best = highest AP). With ``out_dir`` rank 0 writes ``last.pt`` every epoch
    and ``best.pt`` on improvement; ``resume`` continues from ``last.pt`` (``fingerprint`` must
    match the saved one). ``extra`` is carried in ``last.pt`` (e.g. baseline evaluations; its
    ``ptq`` AP is the reference of the collapse check). ``stop_after_epoch`` ends early after that
    epoch (tests: an interrupted run). ``extras``: the detection loss on labelled batches, RepOpt
    masks, the TensorBoard / CSV log folder (``FitExtras``).
    """
    device = torch.device(device)
    student.to(device).train()
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    trainer = Trainer(student, teacher, loader, qcfg, epochs, sampler, evaluate, out_dir, fingerprint, extra,
                      device, progress, extras)
    if resume:
        trainer.resume()
    return trainer.run(stop_after_epoch)
