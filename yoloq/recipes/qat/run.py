"""Quantization-aware training of a PTQ result by label-free distillation: ``run_qat(cfg, ...) -> QATResult``.

    runs/ptq/<name>/quant.pt --load_quantized--> student (PTQ INT8 model)
        teacher = the same fused FP32 weights with every quantizer off (frozen)
        swap_quantizers(student, pact | lsqplus | fixed)       (yoloq.quant.swap)
        for each epoch: distil on unlabelled *train* images -> COCO mAP on val -> keep the best
        -> runs/qat/<name>/{report.md, report.json, curves.png, curves.csv, quant.pt, last.pt, best.pt}

Losses: ``yoloq.recipes.qat.losses``; the loop, optimizer and checkpoints: ``trainer``; divergence
checks: ``guard``. Model selection: the best epoch by val mAP (the report also gives the last epoch,
free of that selection). ``quant.pt`` is the PTQ checkpoint format of ``freeze_quantizers(best)``,
so ``yoloq export`` reads it like a PTQ result. ``--resume`` continues from ``last.pt`` only with
the same settings (``trainer.check_same_run``). Distributed: ``torchrun --nproc_per_node N
tools/qat.py ...`` (gloo on CPU, nccl on CUDA); rank 0 evaluates and writes.
"""
from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from yoloq.config import Config, DataConfig, QATConfig, load_config, load_data_config
from yoloq.eval.coco_eval import evaluate_model
from yoloq.io import check_output_dir
from yoloq.safe_load import load_plain
from yoloq.quant.checkpoint import load_quantized, save_quantized
from yoloq.quant.swap import freeze_quantizers, swap_quantizers
from yoloq.recipes.common import StageTimer
from yoloq.recipes.qat import QATError
from yoloq.recipes.qat.data import QATData, qat_data
from yoloq.recipes.qat.trainer import FitExtras, FitResult, fit, is_main_process, make_teacher
from yoloq.train.trainer import resolve_device
from yoloq.report.qat import STATS, write_qat_report


@dataclass
class QATOptions:
    """What one run reads and writes (the training settings are ``cfg.qat``)."""
    from_dir: str = ""                      # runs/ptq/<name> (or its quant.pt)
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


def _resolve(cfg: Config | str | os.PathLike, opts: QATOptions, overrides: dict) -> tuple[Config, DataConfig, Path]:
    if not isinstance(cfg, Config):
        cfg = load_config(cfg)
    cfg = cfg.with_overrides(**overrides)
    where = cfg.path or "config"
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
    return cfg, data_cfg, ckpt


def run_name(qcfg: QATConfig, ckpt: Path) -> str:
    kind = qcfg.quantizer + (f"-{qcfg.lsq_mode}" if qcfg.quantizer == "lsqplus" else "")
    return f"{ckpt.parent.name}_{kind}"


def fingerprint(qcfg: QATConfig, ckpt: Path, opts: QATOptions) -> dict:
    """What a resumed run must share with the interrupted one (everything that shapes training)."""
    settings = {k: v for k, v in dataclasses.asdict(qcfg).items() if k != "workers"}
    return {"from": str(ckpt.resolve()), "max_images": opts.max_images, **settings}


def init_student(student: nn.Module, qcfg: QATConfig, data_cfg: DataConfig, resuming: bool) -> None:
    """Swap in the learnable quantizers (on resume: structure only, fit() restores the values)."""
    from yoloq.data.coco import calibration_loader
    batches = None
    if not resuming and (qcfg.quantizer == "pact" or (qcfg.quantizer == "lsqplus" and qcfg.lsq_init == "mse")):
        init = calibration_loader(data_cfg, qcfg.init_images, student.cfg.img_size, qcfg.batch_size, qcfg.workers,
                                  seed=qcfg.seed + 1)
        batches = [b for b, _ in init]
    swap_quantizers(student, qcfg.quantizer, qcfg.lsq_mode, calib_batches=batches)


def fit_extras(cfg: Config, student: nn.Module, data: QATData, out_dir: Optional[Path]) -> FitExtras:
    """The detection loss (labelled QAT), RepOpt masks (RepOpt models) and the log folder."""
    det = None
    if data.labelled:
        from yoloq.train.losses import DetectionLoss
        det = DetectionLoss(student.cfg, cfg.loss, strides=student.strides)
    masks = repopt_masks(cfg, student) if student.cfg.block == "repopt" else None
    return FitExtras(det_loss=det, masks=masks, log_dir=out_dir,
                     close_mosaic_epochs=cfg.augment.close_mosaic_epochs if data.augmented else 0)


def repopt_masks(cfg: Config, student: nn.Module) -> dict:
    """RepOpt gradient masks for the student's BN-folded kernels: a folded kernel is ``a * W`` with
    ``a = gamma / sigma`` of the block's BN per output channel, so SGD on it with mask ``a^2 * M``
    is SGD on ``W`` with the RepOpt mask ``M`` (the scales come from the hyper-search model)."""
    from yoloq.models import load_model
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


def _baselines(extra: dict, teacher: nn.Module, student: nn.Module, evaluate, log) -> None:
    """FP32 teacher and PTQ student on val, once (kept in last.pt across resumes)."""
    if {"fp32", "ptq"} <= set(extra):
        return
    log("evaluating FP32 teacher and PTQ student on val ...")
    extra["fp32"] = {k: float(v) for k, v in evaluate(teacher).items()}
    extra["ptq"] = {k: float(v) for k, v in evaluate(student).items()}
    log(f"FP32 AP {extra['fp32']['AP'] * 100:.2f}  PTQ AP {extra['ptq']['AP'] * 100:.2f}")


def run_qat(cfg: Config | str | os.PathLike, options: Optional[QATOptions] = None, *, qat: Optional[dict] = None,
            eval: Optional[dict] = None, data: Optional[str] = None, **option_overrides) -> QATResult:
    """QAT of a PTQ result: distil, evaluate every epoch, write the report and quant.pt. ``qat`` /
    ``eval`` override config keys (``None`` values are ignored); other keywords are ``QATOptions``."""
    opts = dataclasses.replace(options or QATOptions(), **option_overrides)
    cfg, data_cfg, ckpt = _resolve(cfg, opts, {"qat": qat, "eval": eval, "data": data})
    qcfg = cfg.qat
    name = opts.name or run_name(qcfg, ckpt)
    out_dir = Path(opts.out) / name
    check_output_dir(out_dir, "--out")
    if (out_dir / "last.pt").is_file() and not opts.resume:
        raise QATError(f"{out_dir} already holds a run (last.pt); pass --resume to continue it or choose --name")
    device, main = resolve_device(opts.device), is_main_process()
    log = print if (opts.progress and main) else (lambda *a, **k: None)
    torch.manual_seed(qcfg.seed)
    timer = StageTimer()

    student, ptq_meta = load_quantized(ckpt)
    if student.cfg.name != cfg.model.name:
        raise QATError(f"--from {ckpt}: holds model '{student.cfg.name}', the config {cfg.path} is for "
                       f"'{cfg.model.name}'")
    teacher = make_teacher(student)
    img_size = student.cfg.img_size
    evaluate = lambda m: evaluate_model(m.to(device), data_cfg, cfg.eval, img_size,      # noqa: E731
                                        max_images=opts.max_images, progress=opts.progress).stats
    data = qat_data(cfg, data_cfg, img_size)              # bad data fails before the baselines are evaluated
    last = out_dir / "last.pt"
    resuming = opts.resume and last.is_file()
    extra = load_plain(last).get("extra", {}) if resuming else {}
    if main:
        with timer.stage("eval_baselines"):
            _baselines(extra, teacher, student, evaluate, log)
    with timer.stage("init_quantizers"):
        init_student(student, qcfg, data_cfg, resuming)
    with timer.stage("train_and_eval"):
        result = fit(student, teacher, data.loader, qcfg, qcfg.epochs, sampler=data.sampler, evaluate=evaluate,
                     out_dir=out_dir, resume=opts.resume, fingerprint=fingerprint(qcfg, ckpt, opts), extra=extra,
                     device=device, progress=opts.progress, extras=fit_extras(cfg, student, data, out_dir))
    if not main:
        return QATResult(name=name, out_dir=out_dir, report={}, history=result.history)
    student.load_state_dict(result.best_state)
    student.cpu().eval()
    report = build_report(name, cfg, opts, ckpt, ptq_meta, result, data, timer.with_total())
    save_quantized(freeze_quantizers(student), out_dir / "quant.pt", meta=_meta(name, cfg, ckpt, ptq_meta, result,
                                                                                  report))
    write_qat_report(report, result.history, out_dir, plots=opts.plots)
    return QATResult(name=name, out_dir=out_dir, report=report, history=result.history, model=student)


def _meta(name: str, cfg: Config, ckpt: Path, ptq_meta: dict, result: FitResult, report: dict) -> dict:
    return {"name": name, "qat": cfg.qat.quantizer, "lsq_mode": cfg.qat.lsq_mode, "from": str(ckpt),
            "ptq_meta": {k: v for k, v in ptq_meta.items() if isinstance(v, (str, int, float, bool))},
            "best_epoch": result.best_epoch, "fp32_AP": report["fp32"].get("AP"),
            "ptq_AP": report["ptq"].get("AP"), "qat_AP": report["qat"].get("AP"),
            "config": str(cfg.path), "seed": cfg.qat.seed}


def build_report(name: str, cfg: Config, opts: QATOptions, ckpt: Path, ptq_meta: dict, result: FitResult,
                 data: QATData, timings: dict) -> dict:
    from yoloq.quant import backend
    fp32, ptq = result.extra.get("fp32", {}), result.extra.get("ptq", {})
    rows = {r["epoch"]: r for r in result.history}
    best = rows.get(result.best_epoch, result.history[-1] if result.history else {})
    last = result.history[-1] if result.history else {}
    pick = lambda r: {k: r[k] for k in STATS if k in r}                     # noqa: E731
    qat, qat_last = pick(best), pick(last)
    notes = ["best epoch chosen by val AP (the same images the table reports): 'QAT last' is free of that "
             "selection", "the model is fused: no BatchNorm is trained (folded into the conv weights)"]
    if opts.max_images:
        notes.append(f"quick run: evaluated only the first {opts.max_images} val images")
    return {
        "name": name, "kind": "qat",
        "model": {"name": cfg.model.name, "arch": cfg.model.arch, "img_size": cfg.model.img_size},
        "from": {"checkpoint": str(ckpt), "calib_method": ptq_meta.get("calib_method")},
        "config": {"path": cfg.path, "qat": dataclasses.asdict(cfg.qat), "options": dataclasses.asdict(opts)},
        "train": {"images": data.images, "split": "train", "augmented": data.augmented,
                  "labels": "labelled (YOLOv6 loss + distillation)" if data.labelled else "none (distillation)",
                  "epochs_run": len(result.history), "step_losses": result.step_losses},
        "fp32": fp32, "ptq": ptq, "qat": qat, "qat_last": qat_last, "best_epoch": result.best_epoch,
        "drop": {"ptq": {k: (fp32[k] - ptq[k]) * 100 for k in STATS if k in fp32 and k in ptq},
                 "qat": {k: (fp32[k] - qat[k]) * 100 for k in STATS if k in fp32 and k in qat}},
        "history": result.history, "timings": timings, "notes": notes,
        "files": ["report.md", "report.json", "curves.csv", "curves.png", "results.csv", "tensorboard/", "quant.pt",
                  "last.pt", "best.pt"],
        "env": {"python": platform.python_version(), "torch": torch.__version__,
                "pytorch_quantization": backend.version(),
                "world_size": dist.get_world_size() if dist.is_initialized() else 1},
    }
