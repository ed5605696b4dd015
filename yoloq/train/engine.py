"""The one training engine: ``fit(model, loader, step, loop, ...) -> FitResult``.

``yoloq train`` (the YOLOv6 detection loss), ``yoloq qat`` and ``yoloq.qat`` (distillation, optionally
plus the detection loss) all run this loop. What differs is a :class:`Step` -- the forward pass and
its losses, the optimizer it needs and how its learning rate moves, its extra stop rules -- and the
:class:`Loop` settings. The engine owns everything around the step:

- epochs: ``set_epoch`` on the sampler and the dataset (a seeded order and augmentation per epoch,
  so a resumed run sees the same data), mosaic off for the last ``close_mosaic_epochs``;
- gradient accumulation over ``accumulate`` batches per optimizer step (each loss divided by its
  group's length, so a step sees the mean gradient), AMP (float16 autocast of the forward pass +
  GradScaler, CUDA only), gradient-norm clipping, the EMA of the weights;
- ``torch.distributed`` (torchrun): the step's network in DDP, per-rank shards from the sampler;
  rank 0 evaluates, logs and writes;
- stops: a non-finite loss (all ranks stop together), weights or EMA end the run with an error
  naming the epoch, the step and the part, before anything of that step is saved;
- checkpoints: ``last.pt`` (everything ``resume`` needs) after every epoch and ``best.pt`` when the
  evaluation improves, both atomically; ``resume`` refuses a missing ``last.pt`` and a run whose
  settings (``fingerprint``) differ; a run that fails before its first ``last.pt`` removes the logs
  it created;
- run logs (:mod:`yoloq.report.run_log`): TensorBoard per step, ``results.csv`` per epoch.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from yoloq.device import DeviceLike, resolve_device
from yoloq.io import atomic_torch_save
from yoloq.report.run_log import RunLogger
from yoloq.safe_load import load_plain
from yoloq.train.errors import TrainError
from yoloq.train.guard import Guard
from yoloq.train.optim import make_ema
from yoloq.train.run_files import check_same_run, logs_removed_on_failure, read_best
from yoloq.weights import save_checkpoint


@dataclass
class Loop:
    """How the engine runs a step: epochs, accumulation, AMP, clipping, EMA, evaluation."""
    epochs: int
    accumulate: int = 1                       # batches per optimizer step
    max_grad_norm: Optional[float] = None     # clip the gradient norm (None: off)
    amp: bool = False                         # float16 autocast + GradScaler (CUDA only)
    ema: Optional[tuple[float, float]] = None  # (decay, tau) of the weights' EMA; evaluated and saved instead
    eval_interval: int = 1                    # evaluate every N epochs and after the last (0: never)
    close_mosaic_epochs: int = 0              # augmented data: the last N epochs without mosaic
    bn_momentum: Optional[float] = None       # override BatchNorm momentum
    keep_step_losses: bool = False            # keep every step's loss (in last.pt and the result)


@dataclass
class Optimization:
    """The optimizer and how its learning rate moves: ``set_lr(opt, step, epoch)`` before every
    optimizer step (a pure function of the step: resume needs no state), or a torch ``scheduler``
    stepped after every optimizer step (saved in last.pt)."""
    optimizer: torch.optim.Optimizer
    set_lr: Optional[Callable[[torch.optim.Optimizer, int, int], None]] = None
    scheduler: Optional[object] = None


class Step:
    """One training objective, plugged into :func:`fit`. Subclasses define :meth:`losses` and
    :meth:`optimization`; the rest has defaults."""
    name = "train"                 # progress-bar label
    broadcast_buffers = True       # DDP: broadcast rank 0's buffers every forward pass
    guard = Guard()

    def network(self, model: nn.Module) -> nn.Module:
        """The module whose forward runs every step (DDP wraps it, so its gradients synchronise)."""
        return model

    def to(self, device: torch.device) -> None:
        """Move what the step holds besides the model (e.g. a teacher)."""

    def losses(self, forward: Callable, images: torch.Tensor, targets: Optional[torch.Tensor],
               epoch: int) -> tuple[torch.Tensor, dict]:
        """``(loss, parts)`` of one batch; ``forward(images)`` runs :meth:`network` (DDP, autocast)."""
        raise NotImplementedError

    def optimization(self, model: nn.Module, loop: Loop, batches_per_epoch: int, world: int) -> Optimization:
        raise NotImplementedError

    def after_update(self, model: nn.Module) -> None:
        """After every optimizer step (e.g. keep learned scales in range)."""

    def epoch_stats(self, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
        """Extra columns of the epoch's row."""
        return {}

    def best_meta(self, model: nn.Module) -> dict:
        """Meta stored with ``best.pt`` besides epoch and AP."""
        return {}

    def close(self) -> None:
        """Release hooks at the end of the run."""


@dataclass
class FitResult:
    history: list                         # one dict per epoch
    best_epoch: Optional[int]
    model_state: dict                     # final weights (CPU)
    ema_state: Optional[dict] = None      # final EMA weights (CPU), with Loop.ema
    out_dir: Optional[Path] = None
    extra: dict = field(default_factory=dict)
    step_losses: list = field(default_factory=list)

    @property
    def final_state(self) -> dict:
        """What was evaluated: the EMA weights when there is an EMA, else the weights."""
        return self.ema_state if self.ema_state is not None else self.model_state

    def best_state(self) -> dict:
        """The evaluated weights of the best epoch (the final ones without evaluations)."""
        last_epoch = self.history[-1]["epoch"] if self.history else None
        path = self.out_dir / "best.pt" if self.out_dir is not None else None
        if self.best_epoch in (None, last_epoch) or path is None or not path.is_file():
            return self.final_state
        return read_best(path)


def world_and_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


class _Engine:
    """The mutable pieces of one run (optimizer, scaler, EMA, counters), saved in last.pt."""

    def __init__(self, model: nn.Module, loader, step: Step, loop: Loop, device: torch.device,
                 out_dir: Optional[Path], fingerprint: Optional[dict], extra: Optional[dict]):
        self.model, self.loader, self.step, self.loop, self.device = model, loader, step, loop, device
        self.world, self.rank = world_and_rank()
        self.optim = step.optimization(model, loop, len(loader), self.world)
        self.ema = make_ema(model, *loop.ema) if loop.ema else None
        self.amp = bool(loop.amp and device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.out_dir, self.fingerprint, self.extra = out_dir, fingerprint, dict(extra or {})
        self.opt_step, self.start_epoch = 0, 0
        self.history: list = []
        self.step_losses: list = []
        self.best_ap, self.best_epoch = -math.inf, None
        self.net = self._wrap(step.network(model))

    @property
    def opt(self) -> torch.optim.Optimizer:
        return self.optim.optimizer

    @property
    def evaluated(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _wrap(self, net: nn.Module) -> nn.Module:
        if self.world <= 1:
            return net
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(net, device_ids=ids, broadcast_buffers=self.step.broadcast_buffers)

    # ------------------------------------------------------------------ last.pt
    def state(self, epoch: int) -> dict:
        state = {"model": _cpu(self.model.state_dict()), "optimizer": self.opt.state_dict(),
                 "scaler": self.scaler.state_dict(), "epoch": epoch, "opt_step": self.opt_step,
                 "history": self.history, "best_ap": self.best_ap, "best_epoch": self.best_epoch,
                 "fingerprint": self.fingerprint, "extra": self.extra, "rng": torch.get_rng_state(),
                 "step_losses": self.step_losses}
        if self.ema is not None:
            state["ema"] = _cpu(self.ema.state_dict())
        if self.optim.scheduler is not None:
            state["scheduler"] = self.optim.scheduler.state_dict()
        return state

    def restore(self, path: Path) -> None:
        """Continue from ``path`` (last.pt of this engine, or of the train / QAT loops before it)."""
        state = load_plain(path)
        if not isinstance(state, dict):
            raise TrainError(f"{path}: not a last.pt of a training run")
        check_same_run(state.get("fingerprint"), self.fingerprint, path)
        try:
            self.model.load_state_dict(state["model"] if "model" in state else state["student"])
            self.opt.load_state_dict(self._old_qat_groups(state) if "student" in state else state["optimizer"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            if self.optim.scheduler is not None and "scheduler" in state:
                self.optim.scheduler.load_state_dict(state["scheduler"])
            if "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
            self.step_losses = list(state.get("step_losses", []))
            self.opt_step = int(state.get("opt_step", len(self.step_losses)))
            self.start_epoch, self.history = int(state["epoch"]), list(state["history"])
            self.best_ap, self.best_epoch = state["best_ap"], state["best_epoch"]
            self.extra.update(state.get("extra") or {})
            torch.set_rng_state(state["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise TrainError(f"{path}: not a last.pt this run can continue ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from None

    def _old_qat_groups(self, state: dict) -> dict:
        """A QAT last.pt from before the one engine has no (empty) ``no_decay`` group: add it."""
        saved = state["optimizer"]
        if len(saved["param_groups"]) != len(self.opt.param_groups) - 1 or self.opt.param_groups[1]["params"]:
            return saved
        empty = {k: v for k, v in self.opt.param_groups[1].items() if k != "params"}
        groups = saved["param_groups"]
        return {**saved, "param_groups": [groups[0], {**empty, "params": []}, *groups[1:]]}

    # ------------------------------------------------------------------ one epoch
    def _forward(self, images: torch.Tensor):
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            return self.net(images)

    def _check_loss(self, loss: torch.Tensor, parts: dict, where: str, images: torch.Tensor) -> None:
        bad = [k for k, v in parts.items() if not torch.isfinite(v).all()]
        flag = torch.tensor([1.0 if (bad or not torch.isfinite(loss).all()) else 0.0], device=loss.device)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            raise self.step.guard.nonfinite_loss(loss, parts, bad, where, self.model, images)
        self.step.guard.check_loss(loss, parts, where)

    def _optimizer_step(self, epoch: int, where: str) -> None:
        if self.optim.set_lr is not None:
            self.optim.set_lr(self.opt, self.opt_step, epoch)
        self.scaler.unscale_(self.opt)
        if self.loop.max_grad_norm:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.loop.max_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.optim.scheduler is not None:
            self.optim.scheduler.step()
        self.step.after_update(self.model)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.opt_step += 1
        self.step.guard.check_model(self.model, where)

    def train_epoch(self, epoch: int, logger: RunLogger, progress: bool) -> dict:
        """One pass over the loader; returns the epoch's row (mean of every loss part, lr, time)."""
        n, acc, ddp = len(self.loader), self.loop.accumulate, self.world > 1
        sums: dict[str, float] = {}
        steps, start = 0, time.perf_counter()
        bar = tqdm(self.loader, total=n, desc=f"{self.step.name} epoch {epoch + 1}/{self.loop.epochs}",
                   disable=not progress, unit="batch", leave=False)
        for i, batch in enumerate(bar):
            images, targets = unpack_batch(batch)
            if images is None:
                continue
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device) if targets is not None else None
            where = f"epoch {epoch + 1} step {i + 1}"
            group_start = (i // acc) * acc
            group_len = min(acc, n - group_start)
            boundary = i + 1 == group_start + group_len
            if i == group_start:
                self.opt.zero_grad(set_to_none=True)
            with contextlib.nullcontext() if (boundary or not ddp) else self.net.no_sync():
                loss, parts = self.step.losses(self._forward, images, targets, epoch)
                self._check_loss(loss, parts, where, images)
                self.scaler.scale(loss / group_len).backward()
            if boundary:
                self._optimizer_step(epoch, where)
            values = {k: float(v.detach()) for k, v in parts.items()}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
            if self.loop.keep_step_losses:
                self.step_losses.append(float(loss.detach()))
            logger.scalars({**{f"loss/{k}": v for k, v in values.items()},
                            **{f"lr/{g.get('name', j)}": g["lr"] for j, g in enumerate(self.opt.param_groups)}},
                           epoch * n + i + 1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()})
        return {"epoch": epoch + 1, **{k: v / max(steps, 1) for k, v in sums.items()},
                "lr": self.opt.param_groups[0]["lr"], "train_seconds": round(time.perf_counter() - start, 2),
                "steps": steps}

    def end_epoch(self, row: dict, evaluate: Optional[Callable]) -> None:
        """Evaluate (rank 0), check, record the row, write best.pt / last.pt."""
        epoch, loop = row["epoch"], self.loop
        if self.ema is not None:
            self.step.guard.check_ema(self.ema.module, f"epoch {epoch}")
        row.update(self.step.epoch_stats(self.model, self.opt))
        due = loop.eval_interval > 0 and (epoch % loop.eval_interval == 0 or epoch == loop.epochs)
        if evaluate is not None and self.rank == 0 and due:
            start = time.perf_counter()
            row.update({k: float(v) for k, v in evaluate(self.evaluated).items()})
            row["eval_seconds"] = round(time.perf_counter() - start, 2)
            self.step.guard.check_eval(row, self.extra)
        self.history.append(row)
        if self.out_dir is None or self.rank != 0:
            return
        if "AP" in row and row["AP"] > self.best_ap:
            self.best_ap, self.best_epoch = row["AP"], epoch
            self.save_best(epoch, row["AP"])
        atomic_torch_save(self.state(epoch), self.out_dir / "last.pt")

    def save_best(self, epoch: int, ap: Optional[float]) -> None:
        meta = {"epoch": epoch, **self.step.best_meta(self.model)}
        if ap is not None:
            meta["AP"] = float(ap)
        save_checkpoint(_cpu(self.evaluated.state_dict()), self.out_dir / "best.pt", **meta)

    def result(self) -> FitResult:
        ema = _cpu(self.ema.module.state_dict()) if self.ema is not None else None
        return FitResult(self.history, self.best_epoch, _cpu(self.model.state_dict()), ema, self.out_dir,
                         self.extra, self.step_losses)


def unpack_batch(batch) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(images, targets or None)`` of a batch: an image tensor, ``(images, targets [M, 6])``, or
    ``(images, anything else)``; ``(None, None)`` for a batch whose images all failed to load."""
    if batch is None:
        return None, None
    if isinstance(batch, (tuple, list)):
        targets = batch[1] if len(batch) == 2 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], targets
    return batch, None


def fit(model: nn.Module, loader: Iterable, step: Step, loop: Loop, *, sampler=None, dataset=None,
        evaluate: Optional[Callable[[nn.Module], dict]] = None, out_dir: Optional[Path] = None,
        resume: bool = False, fingerprint: Optional[dict] = None, extra: Optional[dict] = None,
        device: DeviceLike = "cpu", progress: bool = False, stop_after_epoch: Optional[int] = None) -> FitResult:
    """Train ``model`` for ``loop.epochs`` epochs on ``loader`` with ``step``.

    ``sampler`` and ``dataset`` (default: the loader's) get ``set_epoch`` each epoch.
    ``evaluate(model) -> {'AP': ...}`` runs on rank 0 (on the EMA weights when there is an EMA)
    every ``loop.eval_interval`` epochs and after the last; the best AP is kept as ``best.pt``. With
    ``out_dir`` rank 0 writes last.pt / best.pt / the logs there; ``resume`` continues from its
    last.pt (``fingerprint`` must match the saved one). ``extra`` is carried in last.pt (e.g.
    baseline evaluations). ``stop_after_epoch`` ends early (tests: an interrupted run).
    """
    device = resolve_device(device)
    dataset = dataset if dataset is not None else getattr(loader, "dataset", None)
    model.to(device).train()
    step.to(device)
    if loop.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = loop.bn_momentum
    out_dir = Path(out_dir) if out_dir is not None else None
    try:
        run = _Engine(model, loader, step, loop, device, out_dir, fingerprint, extra)
        if resume:
            last = out_dir / "last.pt" if out_dir is not None else None
            if last is None or not last.is_file():
                raise TrainError(f"--resume: no checkpoint to continue at {last} (start the run without --resume)")
            run.restore(last)
        with logs_removed_on_failure(out_dir if run.rank == 0 else None):
            _epochs(run, sampler, dataset, evaluate, resume, progress, stop_after_epoch)
    finally:
        step.close()
    return run.result()


def _epochs(run: _Engine, sampler, dataset, evaluate: Optional[Callable], resume: bool, progress: bool,
            stop_after_epoch: Optional[int]) -> None:
    """The epochs of :func:`fit`, with the run logs."""
    loop, out_dir = run.loop, run.out_dir
    logger = RunLogger(out_dir, enabled=run.rank == 0,
                       resume_step=run.start_epoch * len(run.loader) if resume else None)
    try:
        for epoch in range(run.start_epoch, loop.epochs):
            for obj in (sampler, dataset):
                if hasattr(obj, "set_epoch"):
                    obj.set_epoch(epoch)
            if hasattr(dataset, "set_mosaic"):
                dataset.set_mosaic(epoch < loop.epochs - loop.close_mosaic_epochs)
            row = run.train_epoch(epoch, logger, progress and run.rank == 0)
            run.end_epoch(row, evaluate)
            logger.epoch(run.history)
            if progress and run.rank == 0:
                tqdm.write(epoch_line(row, loop.epochs))
            if run.world > 1:
                dist.barrier()
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
        if out_dir is not None and run.rank == 0 and not (out_dir / "best.pt").is_file():
            run.save_best(len(run.history), None)
    finally:
        logger.close()


def epoch_line(row: dict, epochs: int) -> str:
    """``epoch 3/100: cls 1.234 iou 0.456 lr 0.0099 | AP 12.34 AP50 30.12 (4.2 s)``."""
    skip = ("epoch", "AP", "AP50", "AP75", "APs", "APm", "APl", "steps")
    parts = [f"{k} {v:.4g}" for k, v in row.items()
             if k not in skip and not k.endswith("seconds") and isinstance(v, (int, float))]
    text = f"epoch {row['epoch']}/{epochs}: " + " ".join(parts)
    if "AP" in row:
        text += " | " + " ".join(f"{k} {row[k] * 100:.2f}" for k in ("AP", "AP50", "AP75") if k in row)
    return text + f" ({row.get('train_seconds', 0):.1f} s)"
