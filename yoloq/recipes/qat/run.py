"""Quantization-aware training of a PTQ result: ``run_qat(cfg, ...) -> QATResult``.

    runs/ptq/<name>/quant.pt --load_quantized--> student (PTQ INT8 model)
      (or --weights fp32.pt: the config's PTQ settings first, in memory)
        teacher = the student's fused weights with every quantizer off (frozen)
        swap_quantizers(student, pact | lsqplus | fixed)                  (yoloq.quant.swap)
        each epoch: distil on *train* images -- unlabelled, or labelled with the YOLOv6 loss added
        (qat.loss det+distill) -- then COCO mAP on val -> keep the best
        -> runs/qat/<name>/{report.md, report.json, curves.png, curves.csv, quant.pt, last.pt, best.pt}

:func:`distill` is the recipe (data, teacher, quantizer swap, the distillation step in the training
engine :mod:`yoloq.train.engine`) that ``yoloq qat`` and ``yoloq.qat`` share; ``run_qat`` adds the
inputs, the baselines (the FP32 model of the config's weights and the PTQ student on the same val
images) and the report. Losses: ``losses``; the step, optimizer and schedule: ``step``; divergence
checks: ``guard``. Model selection: the best epoch by val mAP (the report also gives the last epoch,
free of that selection). ``quant.pt`` is the PTQ checkpoint format of ``freeze_quantizers(best)``,
so ``yoloq export`` reads it like a PTQ result. ``--resume`` continues from ``last.pt`` only with
the same settings. Distributed: ``torchrun --nproc_per_node N tools/qat.py ...`` (gloo on CPU, nccl
on CUDA); rank 0 evaluates and writes.
"""
from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from yoloq.config import Config, DataConfig, QATConfig, load_config
from yoloq.data import load_data_config
from yoloq.data.coco import calibration_loader
from yoloq.device import resolve_device
from yoloq.eval.coco_eval import evaluate_model
from yoloq.io import check_run_folder
from yoloq.models import load_model
from yoloq.quant.checkpoint import load_quantized, save_quantized
from yoloq.quant.swap import freeze_quantizers, swap_quantizers
from yoloq.recipes.common import StageTimer
from yoloq.recipes.qat import QATError
from yoloq.recipes.qat.data import QATData, qat_data
from yoloq.recipes.qat.step import DistillStep, make_teacher, qat_loop
from yoloq.report.qat import STATS, write_qat_report
from yoloq.report.run_log import library_log
from yoloq.safe_load import load_plain
from yoloq.train.engine import FitResult, fit, world_and_rank
from yoloq.train.run_files import new_run_folder


LIBRARY_LOG = "pytorch_quantization.log"     # the library's own warnings (e.g. "Overwriting amax"), not the terminal's


@dataclass
class QATOptions:
    """What one run reads and writes (the training settings are ``cfg.qat``)."""
    from_dir: str = ""                      # runs/ptq/<name> (or its quant.pt)
    weights: Optional[str] = None           # instead of from_dir: FP32 weights, PTQ with the config's settings
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


def load_qat(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Load a QAT result (``runs/qat/<name>/quant.pt``): the PTQ checkpoint format, so this is
    ``load_quantized`` plus a check that the file came from QAT (``meta['qat']``)."""
    model, meta = load_quantized(path)
    if "qat" not in meta:
        raise QATError(f"{path}: not a QAT checkpoint (no 'qat' in its meta); load it with load_quantized")
    return model, meta


def _source(opts: QATOptions) -> Optional[Path]:
    """The quantized checkpoint of ``--from`` (None with ``--weights``)."""
    if bool(opts.from_dir) == bool(opts.weights):
        raise QATError("give exactly one of --from (a PTQ run folder runs/ptq/<name> or its quant.pt) and "
                       "--weights (FP32 weights: PTQ with the config's quant settings first)")
    if opts.weights:
        if not Path(opts.weights).is_file():
            raise QATError(f"--weights {opts.weights}: file not found")
        return None
    src = Path(opts.from_dir)
    ckpt = src / "quant.pt" if src.is_dir() else src
    if not ckpt.is_file():
        raise QATError(f"--from {opts.from_dir}: no quantized checkpoint at {ckpt} (run yoloq ptq first, or "
                       "start from FP32 weights with --weights)")
    return ckpt


def _resolve(cfg: Config | str | os.PathLike, opts: QATOptions, overrides: dict) -> tuple[Config, DataConfig,
                                                                                           Optional[Path]]:
    if not isinstance(cfg, Config):
        cfg = load_config(cfg)
    cfg = cfg.with_overrides(**overrides)
    where = cfg.path or "config"
    if not cfg.data or not Path(cfg.data).is_file():
        raise QATError(f"{where}: data: dataset YAML not found: {cfg.data}")
    if cfg.qat.scales and cfg.model.block != "repopt":
        raise QATError(f"--scales / qat.scales {cfg.qat.scales}: '{cfg.model.name}' (block '{cfg.model.block}') "
                       "is not a RepOpt model; the scales file is for RepOpt models only (leave it out)")
    ckpt = _source(opts)
    if opts.max_images is not None and opts.max_images < 1:
        raise QATError(f"--max-images must be >= 1, got {opts.max_images}")
    return cfg, load_data_config(cfg.data), ckpt


def run_name(qcfg: QATConfig, ckpt: Optional[Path], model_name: str) -> str:
    kind = qcfg.quantizer + (f"-{qcfg.lsq_mode}" if qcfg.quantizer == "lsqplus" else "")
    return f"{ckpt.parent.name if ckpt is not None else model_name}_{kind}"


def fingerprint(cfg: Config, ckpt: Optional[Path], opts: QATOptions) -> dict:
    """What a resumed run must share with the interrupted one (everything that shapes training)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg.qat).items() if k != "workers"}
    if ckpt is not None:
        return {"from": str(ckpt.resolve()), "max_images": opts.max_images, **settings}
    return {"from": f"weights {Path(opts.weights).resolve()}", "quant": dataclasses.asdict(cfg.quant),
            "max_images": opts.max_images, **settings}


def ptq_student(cfg: Config, data_cfg: DataConfig, weights: str, progress: bool) -> tuple[nn.Module, dict]:
    """``--weights``: the FP32 checkpoint through the config's PTQ stages (calibration, transforms,
    bias correction, reconstruction; as ``yoloq.ptq``), in memory."""
    from yoloq.recipes.common import load_calibration_set
    from yoloq.recipes.ptq import run_quantization
    q = cfg.quant
    calib = load_calibration_set(data_cfg, q.calibration.images, cfg.model.img_size, q.loader.batch_size,
                                 cfg.eval.workers, q.seed)
    run = run_quantization(cfg, data_cfg, load_model(cfg.model, weights), calib, progress=progress)
    return run.qmodel, {"name": cfg.model.name, "calib_method": run.calib_info["method"], "weights": str(weights)}


def init_student(student: nn.Module, qcfg: QATConfig, data_cfg: DataConfig, resuming: bool) -> None:
    """Swap in the learnable quantizers (on resume: structure only, fit() restores the values)."""
    batches = None
    if not resuming and (qcfg.quantizer == "pact" or (qcfg.quantizer == "lsqplus" and qcfg.lsq_init == "mse")):
        init = calibration_loader(data_cfg, qcfg.init_images, student.cfg.img_size, qcfg.batch_size, qcfg.workers,
                                  seed=qcfg.seed + 1)
        batches = [b for b, _ in init]
    swap_quantizers(student, qcfg.quantizer, qcfg.lsq_mode, calib_batches=batches)


def distill_step(cfg: Config, student: nn.Module, teacher: nn.Module, data: QATData) -> DistillStep:
    """The distillation step, with the detection loss for labelled QAT and RepOpt masks for RepOpt models."""
    det = None
    if data.labelled:
        from yoloq.train.losses import DetectionLoss
        det = DetectionLoss(student.cfg, cfg.loss, strides=student.strides)
    masks = repopt_masks(cfg, student) if student.cfg.block == "repopt" else None
    return DistillStep(student, teacher, cfg.qat, det_loss=det, masks=masks)


def repopt_masks(cfg: Config, student: nn.Module) -> dict:
    """RepOpt gradient masks for the student's BN-folded kernels: a folded kernel is ``a * W`` with
    ``a = gamma / sigma`` of the block's BN per output channel, so SGD on it with mask ``a^2 * M``
    is SGD on ``W`` with the RepOpt mask ``M`` (the scales come from the hyper-search model)."""
    from yoloq.models.blocks import RealVGGBlock
    from yoloq.train.repopt import load_scales, target_masks
    if not cfg.qat.scales:
        raise QATError(f"{cfg.path}: '{student.cfg.name}' is a RepOpt model: QAT trains it with the RepOptimizer; "
                       f"set qat.scales (or --scales) to the hyper-search scales file (yoloq repopt-scales)")
    fp32 = load_model(cfg.model, fuse=False)
    masks = target_masks(fp32, load_scales(cfg.qat.scales))
    out = {}
    for name, block in fp32.named_modules():
        if isinstance(block, RealVGGBlock) and block.conv.weight in masks:
            a = block.bn.weight.detach() / torch.sqrt(block.bn.running_var + block.bn.eps)
            out[student.get_submodule(f"{name}.conv").weight] = masks[block.conv.weight] * a.view(-1, 1, 1, 1) ** 2
    return out


def _baselines(extra: dict, fp32_model: Callable[[], Optional[nn.Module]], student: nn.Module, evaluate: Callable,
               log) -> None:
    """The FP32 model and the PTQ student on val, once (kept in last.pt across resumes)."""
    if {"fp32", "ptq"} <= set(extra):
        return
    log("evaluating the FP32 model and the PTQ student on val ...")
    fp32 = fp32_model()
    extra["fp32"] = {k: float(v) for k, v in evaluate(fp32).items()} if fp32 is not None else {}
    del fp32
    extra["ptq"] = {k: float(v) for k, v in evaluate(student).items()}
    fp32_ap = f"{extra['fp32']['AP'] * 100:.2f}" if extra["fp32"] else "- (no FP32 weights)"
    log(f"FP32 AP {fp32_ap}  PTQ AP {extra['ptq']['AP'] * 100:.2f}")


def distill(cfg: Config, data_cfg: DataConfig, student: nn.Module, *, evaluate: Optional[Callable] = None,
            fp32_model: Callable[[], Optional[nn.Module]] = lambda: None, out_dir: Optional[Path] = None, resume: bool = False,
            fingerprint: Optional[dict] = None, device="cpu", progress: bool = False,
            timer: Optional[StageTimer] = None) -> tuple[FitResult, QATData]:
    """QAT of ``student`` (a PTQ model, trained in place) as ``cfg.qat`` says: the recipe ``yoloq qat``
    and ``yoloq.qat`` share. With ``evaluate`` the FP32 model ``fp32`` and the PTQ student are
    evaluated first (rank 0; the report's baselines; ``fp32_model()`` loads the FP32 model), then
    every epoch."""
    timer = timer or StageTimer()
    log = print if (progress and world_and_rank()[1] == 0) else (lambda *a, **k: None)
    teacher = make_teacher(student)
    data = qat_data(cfg, data_cfg, student.cfg.img_size)      # bad data fails before the baselines are evaluated
    last = out_dir / "last.pt" if out_dir is not None else None
    extra = (load_plain(last).get("extra") or {}) if resume and last is not None and last.is_file() else {}
    if evaluate is not None and world_and_rank()[1] == 0:
        with timer.stage("eval_baselines"):
            _baselines(extra, fp32_model, student, evaluate, log)
    with timer.stage("init_quantizers"):
        init_student(student, cfg.qat, data_cfg, resume)
    close = cfg.augment.close_mosaic_epochs if data.augmented else 0
    with timer.stage("train_and_eval"):
        result = fit(student, data.loader, distill_step(cfg, student, teacher, data), qat_loop(cfg.qat, None, close),
                     sampler=data.sampler, evaluate=evaluate, out_dir=out_dir, resume=resume,
                     fingerprint=fingerprint, extra=extra, device=device, progress=progress)
    return result, data


def _fp32_model(cfg: Config, opts: QATOptions) -> Optional[nn.Module]:
    """The FP32 model the PTQ student came from (the config's weights, or --weights) for the report."""
    weights = opts.weights or cfg.model.weights
    return load_model(cfg.model, weights) if weights else None


def run_qat(cfg: Config | str | os.PathLike, options: Optional[QATOptions] = None, *, qat: Optional[dict] = None,
            eval: Optional[dict] = None, data: Optional[str] = None, **option_overrides) -> QATResult:
    """QAT of a PTQ result: distil, evaluate every epoch, write the report and quant.pt. ``qat`` /
    ``eval`` override config keys (``None`` values are ignored); other keywords are ``QATOptions``."""
    opts = dataclasses.replace(options or QATOptions(), **option_overrides)
    cfg, data_cfg, ckpt = _resolve(cfg, opts, {"qat": qat, "eval": eval, "data": data})
    name = opts.name if opts.name is not None else run_name(cfg.qat, ckpt, cfg.model.name)
    out_dir = check_run_folder(opts.out, name, "qat",
                               "--name" if opts.name is not None else "run name from the PTQ run / model.name")
    last = out_dir / "last.pt"
    if last.is_file() and not opts.resume:
        raise QATError(f"{out_dir} already holds a run (last.pt); pass --resume to continue it or choose --name")
    if opts.resume and not last.is_file():
        raise QATError(f"--resume: no checkpoint to continue at {last} (start the run without --resume)")
    device, rank = resolve_device(opts.device), world_and_rank()[1]
    main = rank == 0
    torch.manual_seed(cfg.qat.seed)
    timer = StageTimer()
    with new_run_folder(out_dir, "qat", rank), library_log(out_dir / LIBRARY_LOG if main else None):
        if ckpt is not None:
            student, ptq_meta = load_quantized(ckpt)
        else:
            with timer.stage("ptq"):
                student, ptq_meta = ptq_student(cfg, data_cfg, opts.weights, opts.progress and main)
        if student.cfg.name != cfg.model.name:
            raise QATError(f"--from {ckpt}: holds model '{student.cfg.name}', the config {cfg.path} is for "
                           f"'{cfg.model.name}'")
        evaluations: list = []          # every val evaluation of this process (the drop intervals pair them)

        def evaluate(m):
            result = evaluate_model(m.to(device), data_cfg, cfg.eval, student.cfg.img_size, max_images=opts.max_images,
                                    progress=opts.progress, shard=False)          # rank 0 alone evaluates
            evaluations.append(result)
            return result.stats
        result, qdata = distill(cfg, data_cfg, student, evaluate=evaluate, fp32_model=lambda: _fp32_model(cfg, opts),
                                out_dir=out_dir, resume=opts.resume, fingerprint=fingerprint(cfg, ckpt, opts),
                                device=device, progress=opts.progress, timer=timer)
        if not main:
            return QATResult(name=name, out_dir=out_dir, report={}, history=result.history)
        student.load_state_dict(result.best_state())
        student.cpu().eval()
        report = build_report(name, cfg, opts, ckpt, ptq_meta, result, qdata, timer.with_total())
        with timer.stage("bootstrap"):
            report["drop_ci"] = drop_intervals(report, evaluations, cfg.eval.bootstrap)
        report["timings"] = timer.with_total()
        save_quantized(freeze_quantizers(student), out_dir / "quant.pt", meta=_meta(name, cfg, ckpt, opts, ptq_meta,
                                                                                     result, report))
        write_qat_report(report, result.history, out_dir, plots=opts.plots)
    return QATResult(name=name, out_dir=out_dir, report=report, history=result.history, model=student)


def drop_intervals(report: dict, evaluations: list, resamples: int) -> dict:
    """The PTQ and (best-epoch) QAT drops with their paired-bootstrap intervals against FP32: each
    side is the evaluation of this process whose stats the report shows (none after a resume that
    did not re-run it, or without FP32 weights)."""
    from yoloq.recipes.ptq import drop_interval_record
    def by_stats(stats: dict):
        return next((e for e in reversed(evaluations)
                     if stats and all(e.stats.get(k) == v for k, v in stats.items())), None)

    fp32 = by_stats(report["fp32"])
    out = {}
    for key in ("ptq", "qat"):
        other = by_stats(report[key])
        out[key] = drop_interval_record(fp32, other, resamples) if resamples and fp32 and other else None
    return out


def _meta(name: str, cfg: Config, ckpt: Optional[Path], opts: QATOptions, ptq_meta: dict, result: FitResult,
          report: dict) -> dict:
    return {"name": name, "qat": cfg.qat.quantizer, "lsq_mode": cfg.qat.lsq_mode,
            "from": str(ckpt) if ckpt is not None else f"weights {opts.weights}",
            "ptq_meta": {k: v for k, v in ptq_meta.items() if isinstance(v, (str, int, float, bool))},
            "best_epoch": result.best_epoch, "fp32_AP": report["fp32"].get("AP"),
            "ptq_AP": report["ptq"].get("AP"), "qat_AP": report["qat"].get("AP"),
            "config": str(cfg.path), "seed": cfg.qat.seed}


def build_report(name: str, cfg: Config, opts: QATOptions, ckpt: Optional[Path], ptq_meta: dict, result: FitResult,
                 data: QATData, timings: dict) -> dict:
    from yoloq.quant import backend
    fp32, ptq = result.extra.get("fp32", {}), result.extra.get("ptq", {})
    rows = {r["epoch"]: r for r in result.history}
    best = rows.get(result.best_epoch, result.history[-1] if result.history else {})
    last = result.history[-1] if result.history else {}
    pick = lambda r: {k: r[k] for k in STATS if k in r}                     # noqa: E731
    qat, qat_last = pick(best), pick(last)
    notes = ["best epoch chosen by val AP (the same images the table reports): 'QAT last' is free of that "
             "selection", "the model is fused: no BatchNorm is trained (folded into the conv weights)",
             "FP32: the model of the config's weights, as in the PTQ report; the distillation teacher is the PTQ "
             "model's own weights with its quantizers off (bias correction included)"]
    if not fp32:
        notes.append("FP32 not evaluated: the config names no FP32 weights")
    if opts.max_images:
        notes.append(f"quick run: evaluated only the first {opts.max_images} val images")
    source = {"checkpoint": str(ckpt)} if ckpt is not None else {"checkpoint": None, "weights": str(opts.weights)}
    return {
        "name": name, "kind": "qat",
        "model": {"name": cfg.model.name, "arch": cfg.model.arch, "img_size": cfg.model.img_size},
        "from": {**source, "calib_method": ptq_meta.get("calib_method")},
        "config": {"path": cfg.path, "qat": dataclasses.asdict(cfg.qat), "options": dataclasses.asdict(opts)},
        "train": {"images": data.images, "split": "train", "augmented": data.augmented,
                  "labels": "labelled (YOLOv6 loss + distillation)" if data.labelled else "none (distillation)",
                  "epochs_run": len(result.history), "step_losses": result.step_losses},
        "fp32": fp32, "ptq": ptq, "qat": qat, "qat_last": qat_last, "best_epoch": result.best_epoch,
        "drop": {"ptq": {k: (fp32[k] - ptq[k]) * 100 for k in STATS if k in fp32 and k in ptq},
                 "qat": {k: (fp32[k] - qat[k]) * 100 for k in STATS if k in fp32 and k in qat}},
        "history": result.history, "timings": timings, "notes": notes,
        "files": ["report.md", "report.json", "curves.csv", "curves.png", "results.csv", "tensorboard/", "quant.pt",
                  "last.pt", "best.pt", f"{LIBRARY_LOG} (when the library warned)"],
        "env": {"python": platform.python_version(), "torch": torch.__version__,
                "pytorch_quantization": backend.version(),
                "world_size": dist.get_world_size() if dist.is_initialized() else 1},
    }
