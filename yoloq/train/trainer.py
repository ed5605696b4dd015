"""The training loop: ``fit(model, loader, loss_fn, tcfg, ...) -> FitResult``.

- SGD (Nesterov) or, for RepOpt targets, :class:`~yoloq.train.repopt.RepOptimizer`, with the
  groups, warm-up + cosine schedule and EMA of :mod:`yoloq.train.optim`;
- gradient accumulation to ``nominal_batch_size`` images per optimizer step (over all processes);
  each micro-batch loss is divided by its accumulation group's length, so a step sees the mean
  gradient, and weight decay is scaled by ``batch * world * accumulate / nominal`` (YOLOv6);
- AMP (float16 autocast + GradScaler) on CUDA when ``amp``; the losses run in float32;
- ``torch.distributed`` (torchrun; gloo on CPU, nccl on CUDA): DDP over the raw head outputs,
  per-rank shards from a ``DistributedSampler``; rank 0 evaluates, logs and writes;
- after every epoch ``last.pt`` (model, EMA, optimizer, scaler, counters, history) and, when the
  evaluation improves, ``best.pt`` (EMA weights as a plain checkpoint for tools/eval.py, ptq.py),
  both atomically. ``resume`` continues from ``last.pt``: the data order (sampler seeded per
  epoch), augmentation (seeded per item) and learning rate (a function of the step) come out the
  same, so the result equals an uninterrupted run;
- a NaN/inf loss stops with :class:`~yoloq.train.errors.NonFiniteLossError` naming the epoch, the
  step and the loss part(s) that went bad.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from yoloq.weights import save_checkpoint
from yoloq.config import TrainConfig
from yoloq.train.errors import NonFiniteLossError, TrainError
from yoloq.io import atomic_torch_save
from yoloq.report.run_log import RunLogger
from yoloq.train.optim import custom_l2, make_ema, parameter_groups, set_learning_rate, warmup_steps
from yoloq.train.repopt import RepOptimizer, target_masks


class RawHeadOutputs(nn.Module):
    """``images -> model.detect.forward_raw(model.neck(model.backbone(images)))``: what the losses
    take (DDP wraps this, so gradients of every part are synchronised)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not callable(getattr(getattr(model, "detect", None), "forward_raw", None)):
            raise TrainError(f"{type(model).__name__}: training needs a head with forward_raw() "
                             "(the YOLOv6 Detect head; Lite models are not trainable here yet)")
        self.model = model

    def forward(self, images):
        m = self.model
        return m.detect.forward_raw(m.neck(m.backbone(images)))


@dataclass
class FitResult:
    history: list                       # one dict per epoch
    best_epoch: Optional[int]
    ema_state: dict                     # final EMA weights (CPU)
    model_state: dict                   # final raw weights (CPU)
    out_dir: Optional[Path] = None
    extra: dict = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK`` under torchrun) when CUDA is there, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def check_finite(loss: torch.Tensor, parts: dict, epoch: int, step: int, ddp: bool = False) -> None:
    """Raise NonFiniteLossError naming the bad part(s); under DDP every rank raises together."""
    bad = [k for k, v in parts.items() if not torch.isfinite(v).all()]
    flag = torch.tensor([1.0 if (bad or not torch.isfinite(loss)) else 0.0], device=loss.device)
    if ddp:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        values = ", ".join(f"{k} {float(v):.4g}" for k, v in parts.items())
        what = f"loss part(s) {', '.join(bad)}" if bad else "the loss (on another process)"
        raise NonFiniteLossError(f"epoch {epoch + 1} step {step + 1}: {what} not finite ({values}); "
                                 "lower train.lr0, check the data, or start from other weights")


class _Run:
    """The mutable pieces of one training run (optimizer, EMA, counters), saved in last.pt."""

    def __init__(self, model: nn.Module, tcfg: TrainConfig, batches_per_epoch: int, world: int,
                 device: torch.device, repopt_scales: Optional[dict]):
        self.tcfg = tcfg
        self.accumulate = max(1, round(tcfg.nominal_batch_size / (tcfg.batch_size * world)))
        self.weight_decay = tcfg.weight_decay * tcfg.batch_size * world * self.accumulate / tcfg.nominal_batch_size
        groups = parameter_groups(model, self.weight_decay, tcfg.weight_decay_mode)
        kwargs = dict(lr=tcfg.lr0, momentum=tcfg.momentum, nesterov=tcfg.momentum > 0)
        if repopt_scales is not None:
            self.opt = RepOptimizer(groups, target_masks(model, repopt_scales), **kwargs)
        else:
            self.opt = torch.optim.SGD(groups, **kwargs)
        self.ema = make_ema(model, tcfg.ema_decay, tcfg.ema_tau)
        self.amp = bool(tcfg.amp and device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.steps_per_epoch = math.ceil(batches_per_epoch / self.accumulate)
        self.warmup = warmup_steps(tcfg, self.steps_per_epoch)
        self.opt_step, self.start_epoch = 0, 0
        self.history: list = []
        self.best_ap, self.best_epoch = -math.inf, None

    def state(self, model: nn.Module, epoch: int, fingerprint) -> dict:
        return {"model": _cpu(model.state_dict()), "ema": _cpu(self.ema.state_dict()),
                "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "epoch": epoch,
                "opt_step": self.opt_step, "history": self.history, "best_ap": self.best_ap,
                "best_epoch": self.best_epoch, "fingerprint": fingerprint, "rng": torch.get_rng_state()}

    def restore(self, model: nn.Module, path: Path, fingerprint) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if fingerprint is not None and state.get("fingerprint") != fingerprint:
            saved = state.get("fingerprint") or {}
            diff = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
            raise TrainError(f"{path}: the saved run differs from this one in {', '.join(diff) or 'its settings'}; "
                             "start a new run (--name) instead of --resume")
        model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.opt_step = state["epoch"], state["opt_step"]
        self.history, self.best_ap, self.best_epoch = state["history"], state["best_ap"], state["best_epoch"]
        torch.set_rng_state(state["rng"])


def _optimizer_step(run: _Run, model: nn.Module, epoch: int) -> None:
    set_learning_rate(run.opt, run.tcfg, run.opt_step, epoch, run.warmup)
    run.scaler.unscale_(run.opt)
    if run.tcfg.max_grad_norm:
        nn.utils.clip_grad_norm_(model.parameters(), run.tcfg.max_grad_norm)
    run.scaler.step(run.opt)
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    run.ema.update_parameters(model)
    run.opt_step += 1


def train_one_epoch(run: _Run, model: nn.Module, net: nn.Module, loader: Iterable, loss_fn: Callable,
                    epoch: int, device: torch.device, logger: RunLogger, progress: bool) -> dict:
    """One pass over ``loader``; returns the mean of every loss part."""
    ddp = isinstance(net, nn.parallel.DistributedDataParallel)
    n = len(loader)
    sums: dict[str, float] = {}
    bar = tqdm(loader, total=n, desc=f"train epoch {epoch + 1}/{run.tcfg.epochs}", disable=not progress,
               unit="batch", leave=False)
    for i, (images, targets) in enumerate(bar):
        images, targets = images.to(device, non_blocking=True), targets.to(device)
        group_start = (i // run.accumulate) * run.accumulate
        group_len = min(run.accumulate, n - group_start)
        boundary = i + 1 == group_start + group_len
        sync = contextlib.nullcontext() if (boundary or not ddp) else net.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=torch.float16, enabled=run.amp):
                outputs = net(images)
            loss, parts = loss_fn(outputs, targets, epoch)
            if run.tcfg.weight_decay_mode == "custom_l2":
                l2 = custom_l2(model)
                loss = loss + 0.5 * run.weight_decay * l2
                parts = {**parts, "l2": l2.detach()}
            check_finite(loss, parts, epoch, i, ddp)
            run.scaler.scale(loss / group_len).backward()
        if boundary:
            _optimizer_step(run, model, epoch)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        logger.scalars({**{f"loss/{k}": v for k, v in parts.items()}, "lr": run.opt.param_groups[0]["lr"]},
                       epoch * n + i)
        bar.set_postfix({k: f"{float(v):.3f}" for k, v in parts.items()})
    return {k: v / max(n, 1) for k, v in sums.items()}


def _wrap(model: nn.Module, device: torch.device) -> nn.Module:
    net = RawHeadOutputs(model)
    if _world()[0] > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return net


def _save_best(run: _Run, model: nn.Module, path: Path, epoch: int, ap: Optional[float]) -> None:
    cfg = getattr(model, "cfg", None)
    meta = {"arch": getattr(cfg, "name", type(model).__name__), "nc": int(getattr(model, "nc", 0)),
            "epoch": epoch, "source": "yoloq.train (EMA weights)"}
    if ap is not None:
        meta["AP"] = float(ap)
    save_checkpoint(_cpu(run.ema.module.state_dict()), path, **meta)


def fit(model: nn.Module, loader: Iterable, loss_fn: Callable, tcfg: TrainConfig, *, sampler=None, dataset=None,
        close_mosaic_epochs: int = 0, evaluate: Optional[Callable[[nn.Module], dict]] = None,
        out_dir: Optional[Path] = None, resume: bool = False, fingerprint: Optional[dict] = None,
        device: torch.device | str = "cpu", progress: bool = False, repopt_scales: Optional[dict] = None,
        stop_after_epoch: Optional[int] = None) -> FitResult:
    """Train ``model`` for ``tcfg.epochs`` epochs on ``loader`` (batches ``(images, targets)``).

    ``loss_fn(raw_head_outputs, targets, epoch) -> (loss, parts)`` (:class:`DetectionLoss`).
    ``sampler`` / ``dataset`` get ``set_epoch`` each epoch; the dataset's mosaic is switched off for
    the last ``close_mosaic_epochs``. ``evaluate(ema_model) -> {'AP': ...}`` runs on rank 0 every
    ``tcfg.eval_interval`` epochs and after the last. ``repopt_scales`` (a loaded scales file)
    trains with the RepOptimizer. ``stop_after_epoch`` ends early (tests: an interrupted run).
    """
    device = torch.device(device)
    model.to(device).train()
    if tcfg.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = tcfg.bn_momentum
    world, rank = _world()
    run = _Run(model, tcfg, len(loader), world, device, repopt_scales)
    out_dir = Path(out_dir) if out_dir is not None else None
    last = out_dir / "last.pt" if out_dir else None
    if resume:
        if last is None or not last.is_file():
            raise TrainError(f"--resume: no checkpoint to continue at {last}")
        run.restore(model, last, fingerprint)
    logger = RunLogger(out_dir, enabled=rank == 0, resume_step=run.start_epoch * len(loader) if resume else None)
    net = _wrap(model, device)
    try:
        for epoch in range(run.start_epoch, tcfg.epochs):
            for obj in (sampler, dataset):
                if hasattr(obj, "set_epoch"):
                    obj.set_epoch(epoch)
            if hasattr(dataset, "set_mosaic"):
                dataset.set_mosaic(epoch < tcfg.epochs - close_mosaic_epochs)
            t0 = time.perf_counter()
            row = {"epoch": epoch + 1, **train_one_epoch(run, model, net, loader, loss_fn, epoch, device, logger,
                                                          progress and rank == 0)}
            row.update(lr=run.opt.param_groups[0]["lr"], train_seconds=round(time.perf_counter() - t0, 2))
            _end_of_epoch(run, model, row, epoch, evaluate, out_dir, fingerprint, rank)
            logger.epoch(run.history)
            if progress and rank == 0:
                tqdm.write(epoch_line(row, tcfg.epochs))
            if world > 1:
                dist.barrier()
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
        if out_dir is not None and rank == 0 and not (out_dir / "best.pt").is_file():
            _save_best(run, model, out_dir / "best.pt", len(run.history), None)
    finally:
        logger.close()
    return FitResult(run.history, run.best_epoch, _cpu(run.ema.module.state_dict()), _cpu(model.state_dict()),
                     out_dir)


def epoch_line(row: dict, epochs: int) -> str:
    """``epoch 3/100: cls 1.234 iou 0.456 lr 0.0099 | AP 12.34 AP50 30.12 (4.2 s)``."""
    parts = [f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "AP", "AP50", "AP75")
             and not k.endswith("seconds")]
    text = f"epoch {row['epoch']}/{epochs}: " + " ".join(parts)
    if "AP" in row:
        text += " | " + " ".join(f"{k} {row[k] * 100:.2f}" for k in ("AP", "AP50", "AP75") if k in row)
    return text + f" ({row.get('train_seconds', 0):.1f} s)"


def _end_of_epoch(run: _Run, model: nn.Module, row: dict, epoch: int, evaluate, out_dir, fingerprint,
                  rank: int) -> None:
    """Evaluate (rank 0, on the EMA weights), record the row, write last.pt / best.pt."""
    tcfg = run.tcfg
    due = tcfg.eval_interval > 0 and ((epoch + 1) % tcfg.eval_interval == 0 or epoch + 1 == tcfg.epochs)
    if evaluate is not None and rank == 0 and due:
        t1 = time.perf_counter()
        row.update({k: float(v) for k, v in evaluate(run.ema.module).items()})
        row["eval_seconds"] = round(time.perf_counter() - t1, 2)
    run.history.append(row)
    if out_dir is None or rank != 0:
        return
    if "AP" in row and row["AP"] > run.best_ap:
        run.best_ap, run.best_epoch = row["AP"], epoch + 1
        _save_best(run, model, out_dir / "best.pt", epoch + 1, row["AP"])
    atomic_torch_save(run.state(model, epoch + 1, fingerprint), out_dir / "last.pt")
