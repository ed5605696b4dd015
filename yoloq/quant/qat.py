"""Quantization-aware training by label-free distillation: ``run_qat(cfg, opts) -> QATResult``.

    runs/ptq/<name>/quant.pt --load_quantized--> student (PTQ INT8 model)
        teacher = the same fused FP32 weights with every quantizer off (frozen)
        swap_quantizers(student, pact | lsqplus | fixed)       (yoloq.quant.learnable)
        for each epoch: distill on unlabelled *train* images -> COCO mAP on val -> keep the best
        -> runs/qat/<name>/{report.md, report.json, curves.png, curves.csv, quant.pt, last.pt, best.pt}

Loss (every term a per-image mean, so DDP's gradient averaging equals one big batch):
- CWD (channel-wise distillation) on each neck output: per channel, a softmax over the H*W
  positions of teacher and student features at temperature T, KL(teacher || student) * T^2,
  averaged over channels and images, summed over levels (``distill_weight``);
- head: per anchor and class the Bernoulli KL between teacher and student sigmoid scores (summed
  over classes, mean over anchors), plus an L1 on the ltrb box distances weighted by the
  teacher's confidence (max class score), normalised per image (``head_weight``);
- PACT: ``alpha_decay * sum(alpha^2)`` (``pact_alpha_l2``).
Neck and head outputs are captured with forward hooks on ``model.neck`` / ``model.detect``.

Optimizer: two parameter groups -- conv weights (``lr``, ``weight_decay``; biases without decay)
and activation-quantizer parameters (``quantizer_lr``, no weight decay: PACT's L2 is in the loss);
LSQ per-channel weight scales form a fourth group at the weights' ``lr`` (as in LSQ, whose
gradient scale assumes one learning rate for a layer's weights and scale; at ``quantizer_lr`` they
collapsed to <= 0 in the first step on Lite-S). SGD with
momentum by default, as in LSQ, whose gradient scale g = 1/sqrt(N*Qp) assumes SGD (Adam would
undo it). Cosine learning-rate schedule per step. It is asserted at start-up that every
quantizer parameter requires grad and sits in the quantizer group.

BatchNorm: the model is fused (deploy form) -- every BN is already folded into its conv, so there
is no BN to train or freeze; the folded kernels and biases are trained directly, which is what
TensorRT will run. Weights of ``pact`` / ``fixed`` keep their calibrated per-channel amax;
``lsqplus`` learns per-channel weight scales too.

Model selection: the best epoch is chosen by val mAP (as asked of this tool); the report also
gives the last epoch so the selection effect is visible.

Checkpoints: ``last.pt`` (student, optimizer, schedule, history, evaluations) after every epoch,
``best.pt`` (student) when the val AP improves, both atomically. ``--resume`` rebuilds the
student exactly (``load_quantized`` + ``swap_quantizers`` structure + ``load_state_dict``) and
continues: the result equals an uninterrupted run (same data order: ``DistributedSampler`` seeded
per epoch). ``quant.pt`` is the PTQ checkpoint format (``save_quantized``) of
``freeze_quantizers(best)``: PACT / symmetric LSQ become TensorQuantizers with amax = 127 * scale
(the same Q/DQ), so ``tools/export.py`` reads it like a PTQ result; LSQ+ offset quantizers are
stored by class + state and rebuilt by ``load_quantized`` (``load_qat`` adds nothing but a check).

Distributed: launch with ``torchrun --nproc_per_node N tools/qat.py ...`` (gloo on CPU, nccl on
CUDA); each rank reads its shard of the images, rank 0 evaluates and writes.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import io
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..config import Config, ConfigError, QATConfig, load_config, load_data_config
from .learnable import (KINDS, LEARNABLE, LSQ_MODES, LSQWeightQuantizer, QuantizerDivergenceError, check_quantizers,
                        clamp_weight_scales, freeze_quantizers, named_quantizers, pact_alpha_l2, quantizer_parameters,
                        swap_quantizers)
from .prepare import TensorQuantizer

QUANTIZER_GROUPS = ("quantizers", "weight_scales")
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
MAX_GRAD_NORM = 10.0


class QATError(ValueError):
    """Bad input to QAT; the message names the file / option / value."""


# --------------------------------------------------------------------------- losses


def cwd_loss(student: list, teacher: list, temperature: float = 1.0) -> torch.Tensor:
    """Channel-wise distillation summed over feature levels: mean over (image, channel) of
    KL(softmax_HW(t / T) || softmax_HW(s / T)) * T^2."""
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher):
        s = s.flatten(2) / temperature
        t = t.detach().flatten(2) / temperature
        kl = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1)
        total = total + kl.mean() * temperature ** 2
    return total


def _flatten_head(outputs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """[(cls [B,nc,H,W], ltrb [B,4,H,W]) per level] -> cls [B,nc,N], ltrb [B,4,N]."""
    cls = torch.cat([c.flatten(2) for c, _ in outputs], 2)
    box = torch.cat([b.flatten(2) for _, b in outputs], 2)
    return cls, box


def head_loss(student: list, teacher: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(class term, box term): Bernoulli KL of the sigmoid scores (sum over classes, mean over
    anchors and images) and teacher-confidence-weighted L1 on ltrb (per image normalised)."""
    s_cls, s_box = _flatten_head(student)
    t_cls, t_box = _flatten_head(teacher)
    t_cls, t_box = t_cls.detach(), t_box.detach()
    p = torch.sigmoid(t_cls)
    # BCE(student logits, teacher probs) - H(teacher) = KL(Bernoulli(p_t) || Bernoulli(p_s)) >= 0
    kl = F.binary_cross_entropy_with_logits(s_cls, p, reduction="none") \
        - F.binary_cross_entropy_with_logits(t_cls, p, reduction="none")
    cls_term = kl.sum(1).mean()
    w = p.max(1).values                                            # [B, N]
    l1 = (s_box - t_box).abs().sum(1)                              # [B, N]
    box_term = ((w * l1).sum(1) / w.sum(1).clamp_min(1e-6)).mean()
    return cls_term, box_term


class FeatureTap:
    """Forward hooks keeping the latest outputs of ``model.neck`` and ``model.detect``."""

    def __init__(self, model: nn.Module):
        for name in ("neck", "detect"):
            if not isinstance(getattr(model, name, None), nn.Module):
                raise QATError(f"QAT distillation needs model.{name} (the neck / head modules); "
                               f"{type(model).__name__} has none")
        self.out: dict[str, object] = {}
        self.handles = [model.neck.register_forward_hook(self._keep("neck")),
                        model.detect.register_forward_hook(self._keep("detect"))]

    def _keep(self, key: str):
        def hook(module, args, output):
            self.out[key] = output
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def distill_loss(s_tap: FeatureTap, t_tap: FeatureTap, qcfg: QATConfig, student: nn.Module) -> dict:
    neck_s, neck_t = list(s_tap.out["neck"]), list(t_tap.out["neck"])
    terms = {"cwd": cwd_loss(neck_s, neck_t, qcfg.temperature)}
    terms["cls"], terms["box"] = head_loss(s_tap.out["detect"], t_tap.out["detect"])
    terms["alpha_l2"] = pact_alpha_l2(student).to(terms["cwd"].device)
    terms["loss"] = (qcfg.distill_weight * terms["cwd"] + qcfg.head_weight * (terms["cls"] + terms["box"])
                     + qcfg.alpha_decay * terms["alpha_l2"])
    return terms


# --------------------------------------------------------------------------- optimizer


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


def build_optimizer(model: nn.Module, qcfg: QATConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, qcfg)
    if qcfg.optimizer == "sgd":
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


# --------------------------------------------------------------------------- diagnosis


@torch.no_grad()
def first_nonfinite_quantizer(model: nn.Module, images: torch.Tensor) -> Optional[str]:
    """Run ``images`` once and return the first quantizer (model order) whose output is NaN/inf."""
    found: list[str] = []
    handles = []
    for name, q in named_quantizers(model).items():
        def hook(module, args, out, name=name):
            if not found and not torch.isfinite(out).all():
                found.append(name)
        handles.append(q.register_forward_hook(hook))
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def _diverged(model: nn.Module, images: torch.Tensor, loss: torch.Tensor, where: str,
              max_growth: float) -> QuantizerDivergenceError:
    try:
        check_quantizers(model, max_growth)
    except QuantizerDivergenceError as err:
        return QuantizerDivergenceError(f"{where}: loss is {float(loss)}; {err}")
    name = first_nonfinite_quantizer(model, images)
    if name:
        return QuantizerDivergenceError(f"{where}: loss is {float(loss)}; quantizer '{name}' is the first to output "
                                        f"NaN/inf (its input is already non-finite: check the weights before it)")
    return QuantizerDivergenceError(f"{where}: loss is {float(loss)} while every quantizer is finite; "
                                    f"lower --lr (weights diverged)")


# --------------------------------------------------------------------------- training loop


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


def _images(batch) -> Optional[torch.Tensor]:
    if batch is None:
        return None
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@dataclass
class FitResult:
    history: list                   # one dict per epoch
    best_epoch: Optional[int]
    best_state: dict                # student state_dict (CPU) of the best (or last) epoch
    last_state: dict
    extra: dict = field(default_factory=dict)


def fit(student: nn.Module, teacher: nn.Module, loader: Iterable, qcfg: QATConfig, epochs: int, *,
        sampler=None, evaluate: Optional[Callable[[nn.Module], dict]] = None, out_dir: Optional[Path] = None,
        resume: bool = False, fingerprint: Optional[dict] = None, extra: Optional[dict] = None,
        device: torch.device | str = "cpu", progress: bool = False,
        stop_after_epoch: Optional[int] = None) -> FitResult:
    """Distil ``teacher`` into the fake-quantized ``student`` for ``epochs`` epochs.

    ``loader`` yields image batches (tensors or ``(images, ...)``); with ``torch.distributed``
    initialised the student is wrapped in DDP (each rank passes its own shard, ``sampler`` is
    re-seeded per epoch with ``set_epoch``). ``evaluate(model) -> {"AP": ...}`` runs on rank 0
    after every epoch (best = highest AP). With ``out_dir`` rank 0 writes ``last.pt`` every epoch
    and ``best.pt`` on improvement; ``resume`` continues from ``last.pt`` (``fingerprint`` must
    match the saved one). ``extra`` is carried in ``last.pt`` (e.g. baseline evaluations).
    ``stop_after_epoch`` ends early after that epoch (tests: an interrupted run).
    """
    device = torch.device(device)
    student.to(device).train()
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    s_tap, t_tap = FeatureTap(student), FeatureTap(teacher)
    opt = build_optimizer(student, qcfg)
    steps_per_epoch = len(loader)
    sched = cosine_schedule(opt, epochs * steps_per_epoch)
    history: list = []
    best_epoch, best_ap = None, -math.inf
    start_epoch = 0
    extra = dict(extra or {})
    last_path = out_dir / "last.pt" if out_dir else None
    best_path = out_dir / "best.pt" if out_dir else None

    if resume and last_path is not None and last_path.is_file():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        if fingerprint is not None and state.get("fingerprint") != fingerprint:
            raise QATError(f"{last_path}: saved run differs from this one "
                           f"(saved {state.get('fingerprint')}, now {fingerprint}); use another --name")
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, best_epoch, best_ap = state["history"], state["best_epoch"], state["best_ap"]
        start_epoch = state["epoch"]
        extra.update(state.get("extra", {}))
        torch.set_rng_state(state["rng"])

    ddp = dist.is_initialized() and dist.get_world_size() > 1
    model = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None,
                                                broadcast_buffers=False) if ddp else student
    try:
        for epoch in range(start_epoch, epochs):
            if sampler is not None and hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            n_steps = 0
            bar = tqdm(loader, total=steps_per_epoch, desc=f"qat epoch {epoch + 1}/{epochs}",
                       disable=not (progress and _is_main()), unit="batch")
            for step, batch in enumerate(bar):
                images = _images(batch)
                if images is None:
                    continue
                images = images.to(device, non_blocking=True)
                with torch.no_grad():
                    teacher(images)
                model(images)
                terms = distill_loss(s_tap, t_tap, qcfg, student)
                loss = terms["loss"]
                if not torch.isfinite(loss):
                    raise _diverged(student, images, loss, f"epoch {epoch + 1} step {step + 1}",
                                    qcfg.max_scale_growth)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), MAX_GRAD_NORM)
                opt.step()
                sched.step()
                clamp_weight_scales(student)
                try:
                    check_quantizers(student, qcfg.max_scale_growth)
                except QuantizerDivergenceError as err:
                    raise QuantizerDivergenceError(f"epoch {epoch + 1} step {step + 1}: {err}") from None
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                n_steps += 1
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            row = {"epoch": epoch + 1, **{k: v / max(n_steps, 1) for k, v in sums.items()},
                   "lr": opt.param_groups[0]["lr"],
                   "quantizer_lr": next((g["lr"] for g in opt.param_groups if g["name"] == "quantizers"), None),
                   "train_seconds": round(time.perf_counter() - t0, 2), "steps": n_steps}
            if evaluate is not None and _is_main():
                t1 = time.perf_counter()
                metrics = evaluate(student)
                row.update({k: float(v) for k, v in metrics.items()})
                row["eval_seconds"] = round(time.perf_counter() - t1, 2)
                if row["AP"] > best_ap:
                    best_ap, best_epoch = row["AP"], epoch + 1
                    if best_path is not None:
                        atomic_torch_save({"student": _cpu_state(student), "epoch": epoch + 1, "AP": best_ap},
                                          best_path)
            history.append(row)
            if last_path is not None and _is_main():
                atomic_torch_save({"student": _cpu_state(student), "optimizer": opt.state_dict(),
                                   "scheduler": sched.state_dict(), "epoch": epoch + 1, "history": history,
                                   "best_epoch": best_epoch, "best_ap": best_ap, "fingerprint": fingerprint,
                                   "extra": extra, "rng": torch.get_rng_state()}, last_path)
            if ddp:
                dist.barrier()
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
    finally:
        s_tap.remove()
        t_tap.remove()
    last_state = _cpu_state(student)
    best_state = last_state
    if best_epoch is not None and best_epoch != (history[-1]["epoch"] if history else None):
        if best_path is not None and best_path.is_file():
            best_state = torch.load(best_path, map_location="cpu", weights_only=True)["student"]
    return FitResult(history=history, best_epoch=best_epoch, best_state=best_state, last_state=last_state,
                     extra=extra)


# --------------------------------------------------------------------------- building the run


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


def load_qat(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Load a QAT result (``runs/qat/<name>/quant.pt``): the PTQ checkpoint format, so this is
    ``load_quantized`` plus a check that the file came from QAT (``meta['qat']``)."""
    from .qcheckpoint import load_quantized
    model, meta = load_quantized(path)
    if "qat" not in meta:
        raise QATError(f"{path}: not a QAT checkpoint (no 'qat' in its meta); load it with load_quantized")
    return model, meta


@dataclass
class QATOptions:
    """Command-line overrides of ``cfg.qat`` plus what the run reads and writes."""
    from_dir: str = ""                      # runs/ptq/<name> (or its quant.pt)
    quantizer: Optional[str] = None         # pact | lsqplus | fixed
    lsq_mode: Optional[str] = None          # symmetric | offset
    epochs: Optional[int] = None
    images: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    quantizer_lr: Optional[float] = None
    weight_scale_lr: Optional[float] = None
    optimizer: Optional[str] = None         # sgd | adam
    workers: Optional[int] = None
    max_images: Optional[int] = None        # evaluate only the first N val images
    name: Optional[str] = None
    out: str = "runs/qat"
    resume: bool = False
    device: str = "auto"
    progress: bool = True
    plots: bool = True


@dataclass
class QATResult:
    name: str
    out_dir: Path
    report: dict
    history: list = field(default_factory=list)
    model: Optional[nn.Module] = None


def _resolve(cfg: Config | str | os.PathLike, opts: QATOptions):
    if not isinstance(cfg, Config):
        cfg = load_config(cfg)
    where = cfg.path or "config"
    over = {k: getattr(opts, k) for k in ("quantizer", "lsq_mode", "epochs", "images", "batch_size", "lr",
                                          "quantizer_lr", "weight_scale_lr", "optimizer", "workers") if getattr(opts, k) is not None}
    qcfg = dataclasses.replace(cfg.qat, **over)
    if qcfg.quantizer not in KINDS:
        raise ConfigError(f"{where}: qat.quantizer / --quantizer must be one of {KINDS}, got '{qcfg.quantizer}'")
    if qcfg.lsq_mode not in LSQ_MODES:
        raise ConfigError(f"{where}: qat.lsq_mode / --lsq-mode must be one of {LSQ_MODES}, got '{qcfg.lsq_mode}'")
    for key in ("epochs", "images", "batch_size", "init_images"):
        if getattr(qcfg, key) < 1:
            raise ConfigError(f"{where}: qat.{key} must be >= 1, got {getattr(qcfg, key)}")
    for key in ("lr", "quantizer_lr", "temperature"):
        if not getattr(qcfg, key) > 0:
            raise ConfigError(f"{where}: qat.{key} must be > 0, got {getattr(qcfg, key)}")
    if qcfg.weight_scale_lr is not None and not qcfg.weight_scale_lr > 0:
        raise ConfigError(f"{where}: qat.weight_scale_lr must be > 0 (or null = lr), got {qcfg.weight_scale_lr}")
    if qcfg.lsq_init not in ("amax", "mse"):
        raise ConfigError(f"{where}: qat.lsq_init must be 'amax' or 'mse', got '{qcfg.lsq_init}'")
    if qcfg.optimizer not in ("sgd", "adam"):
        raise ConfigError(f"{where}: qat.optimizer must be 'sgd' or 'adam', got '{qcfg.optimizer}'")
    if not cfg.data or not Path(cfg.data).is_file():
        raise QATError(f"{where}: data: dataset YAML not found: {cfg.data}")
    data_cfg = load_data_config(cfg.data)
    if not opts.from_dir:
        raise QATError("--from is required: the PTQ run folder (runs/ptq/<name>) or its quant.pt")
    src = Path(opts.from_dir)
    ckpt = src / "quant.pt" if src.is_dir() else src
    if not ckpt.is_file():
        raise QATError(f"--from {opts.from_dir}: no quantized checkpoint at {ckpt} (run tools/ptq.py first)")
    if opts.max_images is not None and opts.max_images < 1:
        raise QATError(f"--max-images must be >= 1, got {opts.max_images}")
    return cfg, data_cfg, qcfg, ckpt


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", local)
        return torch.device("cpu")
    return torch.device(name)


def run_qat(cfg: Config | str | os.PathLike, options: Optional[QATOptions] = None, **overrides) -> QATResult:
    """QAT of a PTQ result: distil, evaluate every epoch, write the report and quant.pt."""
    from ..data.coco import CocoDetectionDataset, calibration_images, calibration_loader, collate_skip_failed
    from ..eval.coco_eval import evaluate_model
    from .qcheckpoint import load_quantized, save_quantized

    opts = dataclasses.replace(options or QATOptions(), **overrides)
    cfg, data_cfg, qcfg, ckpt = _resolve(cfg, opts)
    kind_name = qcfg.quantizer + (f"-{qcfg.lsq_mode}" if qcfg.quantizer == "lsqplus" else "")
    ptq_name = ckpt.parent.name
    name = opts.name or f"{ptq_name}_{kind_name}"
    out_dir = Path(opts.out) / name
    if (out_dir / "last.pt").is_file() and not opts.resume:
        raise QATError(f"{out_dir} already holds a run (last.pt); pass --resume to continue it or choose --name")
    device = _device(opts.device)
    main = _is_main()
    log = print if (opts.progress and main) else (lambda *a, **k: None)
    torch.manual_seed(qcfg.seed)
    times: dict[str, float] = {}
    t_start = time.perf_counter()

    student, ptq_meta = load_quantized(ckpt)
    img_size = student.cfg.img_size
    if student.cfg.name != cfg.model.name:
        raise QATError(f"--from {ckpt}: holds model '{student.cfg.name}', the config {cfg.path} is for "
                       f"'{cfg.model.name}'")
    teacher = make_teacher(student)
    eval_cfg = cfg.eval
    evaluate = lambda m: evaluate_model(m.to(device), data_cfg, eval_cfg, img_size,      # noqa: E731
                                        max_images=opts.max_images, progress=opts.progress).stats
    fingerprint = {"from": str(ckpt.resolve()), "quantizer": qcfg.quantizer, "lsq_mode": qcfg.lsq_mode,
                   "images": qcfg.images, "batch_size": qcfg.batch_size, "seed": qcfg.seed,
                   "max_images": opts.max_images}
    last = out_dir / "last.pt"
    resuming = opts.resume and last.is_file()
    extra = {}
    if resuming:
        extra = torch.load(last, map_location="cpu", weights_only=True).get("extra", {})
    if not {"fp32", "ptq"} <= set(extra) and main:
        t = time.perf_counter()
        log("evaluating FP32 teacher and PTQ student on val ...")
        extra["fp32"] = {k: float(v) for k, v in evaluate(teacher).items()}
        extra["ptq"] = {k: float(v) for k, v in evaluate(student).items()}
        times["eval_baselines"] = round(time.perf_counter() - t, 2)
        log(f"FP32 AP {extra['fp32']['AP'] * 100:.2f}  PTQ AP {extra['ptq']['AP'] * 100:.2f}")

    t = time.perf_counter()
    if resuming:     # structure only; every value comes back with load_state_dict in fit()
        swap_quantizers(student, qcfg.quantizer, qcfg.lsq_mode)
    else:
        batches = None
        if qcfg.quantizer == "pact" or (qcfg.quantizer == "lsqplus" and qcfg.lsq_init == "mse"):
            init = calibration_loader(data_cfg, qcfg.init_images, img_size, qcfg.batch_size, qcfg.workers,
                                      seed=qcfg.seed + 1)
            batches = [b for b, _ in init]
        swap_quantizers(student, qcfg.quantizer, qcfg.lsq_mode, calib_batches=batches)
    times["init_quantizers"] = round(time.perf_counter() - t, 2)

    files = calibration_images(data_cfg, qcfg.images, qcfg.seed)
    dataset = CocoDetectionDataset(data_cfg.train_images, None, img_size, files=files)
    loader, sampler = make_train_loader(dataset, qcfg.batch_size, qcfg.workers, qcfg.seed, collate_skip_failed)

    t = time.perf_counter()
    result = fit(student, teacher, loader, qcfg, qcfg.epochs, sampler=sampler, evaluate=evaluate, out_dir=out_dir,
                 resume=opts.resume, fingerprint=fingerprint, extra=extra, device=device, progress=opts.progress)
    times["train_and_eval"] = round(time.perf_counter() - t, 2)
    if not main:
        return QATResult(name=name, out_dir=out_dir, report={}, history=result.history)

    student.load_state_dict(result.best_state)
    student.cpu().eval()
    report = _report(name, cfg, qcfg, opts, ckpt, ptq_meta, result, len(files), times, t_start)
    meta = {"name": name, "qat": qcfg.quantizer, "lsq_mode": qcfg.lsq_mode, "from": str(ckpt),
            "ptq_meta": {k: v for k, v in ptq_meta.items() if isinstance(v, (str, int, float, bool))},
            "best_epoch": result.best_epoch, "fp32_AP": report["fp32"].get("AP"),
            "ptq_AP": report["ptq"].get("AP"), "qat_AP": report["qat"].get("AP"),
            "config": str(cfg.path), "seed": qcfg.seed}
    save_quantized(freeze_quantizers(student), out_dir / "quant.pt", meta=meta)
    write_qat_report(report, result.history, out_dir, plots=opts.plots)
    return QATResult(name=name, out_dir=out_dir, report=report, history=result.history, model=student)


# --------------------------------------------------------------------------- report


def _report(name, cfg, qcfg, opts, ckpt, ptq_meta, result: FitResult, n_images, times, t_start) -> dict:
    import pytorch_quantization
    fp32, ptq = result.extra.get("fp32", {}), result.extra.get("ptq", {})
    rows = {r["epoch"]: r for r in result.history}
    best = rows.get(result.best_epoch, result.history[-1] if result.history else {})
    last = result.history[-1] if result.history else {}
    pick = lambda r: {k: r[k] for k in STATS if k in r}                     # noqa: E731
    qat, qat_last = pick(best), pick(last)
    times = dict(times)
    times["total"] = round(time.perf_counter() - t_start, 2)
    notes = ["best epoch chosen by val AP (the same images the table reports): 'QAT last' is free of that "
             "selection", "the model is fused: no BatchNorm is trained (folded into the conv weights)"]
    if opts.max_images:
        notes.append(f"quick run: evaluated only the first {opts.max_images} val images")
    return {
        "name": name, "kind": "qat",
        "model": {"name": cfg.model.name, "arch": cfg.model.arch, "img_size": cfg.model.img_size},
        "from": {"checkpoint": str(ckpt), "calib_method": ptq_meta.get("calib_method")},
        "config": {"path": cfg.path, "qat": dataclasses.asdict(qcfg),
                   "options": {k: v for k, v in dataclasses.asdict(opts).items()}},
        "train": {"images": n_images, "split": "train", "labels": "none (distillation)",
                  "epochs_run": len(result.history)},
        "fp32": fp32, "ptq": ptq, "qat": qat, "qat_last": qat_last, "best_epoch": result.best_epoch,
        "drop": {"ptq": {k: (fp32[k] - ptq[k]) * 100 for k in STATS if k in fp32 and k in ptq},
                 "qat": {k: (fp32[k] - qat[k]) * 100 for k in STATS if k in fp32 and k in qat}},
        "history": result.history, "timings": times, "notes": notes,
        "files": ["report.md", "report.json", "curves.csv", "curves.png", "quant.pt", "last.pt", "best.pt"],
        "env": {"python": platform.python_version(), "torch": torch.__version__,
                "pytorch_quantization": getattr(pytorch_quantization, "__version__", "?"),
                "world_size": dist.get_world_size() if dist.is_initialized() else 1},
    }


CSV_COLUMNS = ("epoch", "loss", "cwd", "cls", "box", "alpha_l2", "lr", "quantizer_lr", "AP", "AP50",
               "train_seconds", "eval_seconds")


def curves_csv(history: list) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in CSV_COLUMNS})
    return buf.getvalue()


def plot_curves(history: list, fp32: dict, ptq: dict) -> bytes:
    from ..report import _figure_bytes, _pyplot
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("loss", "cwd", "cls", "box"):
        ax1.plot(epochs, [r.get(key) for r in history], "o-", label=key)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("distillation loss (train)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    if any("AP" in r for r in history):
        ax2.plot(epochs, [r.get("AP", float("nan")) * 100 for r in history], "o-", label="QAT")
    for label, stats, style in (("FP32", fp32, "--"), ("PTQ", ptq, ":")):
        if "AP" in stats:
            ax2.axhline(stats["AP"] * 100, linestyle=style, color="gray" if label == "FP32" else "red", label=label)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("val AP (%)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return _figure_bytes(fig)


def render_qat_markdown(report: dict) -> str:
    from ..report import _num, _pct, md_table
    fp32, ptq, qat, last = report["fp32"], report["ptq"], report["qat"], report["qat_last"]
    qc = report["config"]["qat"]
    out = [f"# QAT report: {report['name']}", "",
           f"- model: `{report['model']['name']}`, input {report['model']['img_size']}",
           f"- from PTQ: `{report['from']['checkpoint']}` (calibration {report['from']['calib_method']})",
           f"- quantizer: **{qc['quantizer']}**" + (f" ({qc['lsq_mode']})" if qc["quantizer"] == "lsqplus" else "")
           + f", {report['train']['epochs_run']} epochs on {report['train']['images']} unlabelled train images, "
           f"batch {qc['batch_size']}, {qc['optimizer']} lr {qc['lr']:g} / quantizer lr {qc['quantizer_lr']:g}",
           f"- best epoch: {report['best_epoch']}", "",
           "## FP32 / PTQ / QAT (COCO bbox, %)", ""]
    rows = [(k, _pct(fp32.get(k)), _pct(ptq.get(k)), _pct(qat.get(k)), _pct(last.get(k)),
             _num(report["drop"]["ptq"].get(k)), _num(report["drop"]["qat"].get(k))) for k in STATS]
    out += [md_table(("metric", "FP32", "PTQ", "QAT best", "QAT last", "PTQ drop", "QAT drop"), rows), ""]
    out += ["## Epochs", ""]
    rows = [(r["epoch"], f"{r.get('loss', 0):.4f}", f"{r.get('cwd', 0):.4f}", f"{r.get('cls', 0):.4f}",
             f"{r.get('box', 0):.4f}", _pct(r.get("AP")), f"{r.get('train_seconds', 0):.0f}") for r in report["history"]]
    out += [md_table(("epoch", "loss", "CWD", "cls KL", "box L1", "val AP", "train s"), rows), ""]
    out += ["## Time per stage", "", md_table(("stage", "seconds"), [(k, f"{v:.1f}") for k, v in
                                                                     report["timings"].items()]), ""]
    out += [f"- {n}" for n in report["notes"]] + ["", "![curves](curves.png)", ""]
    return "\n".join(out)


def write_qat_report(report: dict, history: list, out_dir: Path, plots: bool = True) -> None:
    from ..report import atomic_write_bytes, atomic_write_text, to_json
    atomic_write_text(out_dir / "curves.csv", curves_csv(history))
    if plots and history:
        atomic_write_bytes(out_dir / "curves.png", plot_curves(history, report["fp32"], report["ptq"]))
    atomic_write_text(out_dir / "report.json", to_json(report))
    atomic_write_text(out_dir / "report.md", render_qat_markdown(report))
