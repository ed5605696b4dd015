"""``run_train(cfg, options) -> TrainResult``: everything ``yoloq train`` does, as a library call.

    config (model / train / loss / augment sections) + dataset YAML
      -> labelled train records (COCO JSON, or upstream YOLO .txt labels; optionally the first N)
      -> model (from scratch with the head's prior initialisation, or from --weights)
         RepOpt target: scales file checked against the model, kernels re-initialised from it
      -> AugmentedDataset + DistributedSampler loader
      -> the training engine (yoloq.train.engine.fit) with the detection step (yoloq.train.detection)
      -> runs/train/<name>/{best.pt, last.pt, results.csv, tensorboard/, run.json}

A run that fails before its first epoch is saved leaves no folder behind; the device and every
input are checked before anything is written.

Evaluation is COCO mAP of the EMA weights on the val split, or, with ``eval_split: train``, on the
training images themselves (an overfit check; their ground truth is written to
``<run>/train_subset.json``). Train images are never mixed into the val evaluation.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from yoloq.config import Config, ConfigError, apply_settings, load_config
from yoloq.data import load_data_config
from yoloq.device import resolve_device
from yoloq.io import atomic_write_text, check_run_folder
from yoloq.models.detector import init_head_biases
from yoloq.train.augment import Augmenter
from yoloq.train.dataset import (AugmentedDataset, LabelledImages, make_train_loader, records_for,
                                 training_annotations, write_subset_annotations)
from yoloq.train.detection import DetectionStep, check_trainable, train_loop
from yoloq.train.engine import FitResult, fit, world_and_rank
from yoloq.train.run_files import new_run_folder
from yoloq.train.errors import TrainError
from yoloq.train.losses import DetectionLoss
from yoloq.train.repopt import check_scales, load_scales, reinit_from_scales

@dataclass
class TrainOptions:
    """Command-line overrides of ``cfg.train`` plus what the run reads and writes."""
    data: Optional[str] = None          # dataset YAML (default: the config's data)
    weights: Optional[str] = None       # start from this checkpoint (default: model.weights, else scratch)
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    img_size: Optional[int] = None      # default: model.img_size
    workers: Optional[int] = None
    lr0: Optional[float] = None
    train_images: Optional[int] = None
    eval_split: Optional[str] = None
    scales: Optional[str] = None
    max_eval_images: Optional[int] = None
    settings: Sequence[str] = ()        # "section.key=value" overrides of the config (--set)
    name: Optional[str] = None
    out: str = "runs/train"
    resume: bool = False
    device: str = "auto"
    progress: bool = True


@dataclass
class TrainResult:
    name: str
    out_dir: Path
    history: list
    best_epoch: Optional[int]
    fit: Optional[FitResult] = field(default=None, repr=False)




def _resolve(cfg, opts: TrainOptions):
    if not isinstance(cfg, Config):
        cfg = load_config(cfg)
    where = cfg.path or "config"
    cfg = apply_settings(cfg, opts.settings)
    cfg = cfg.with_overrides(train={k: getattr(opts, k) for k in ("epochs", "batch_size", "workers", "lr0",
                                                                 "train_images", "eval_split", "scales")})
    data_path = opts.data or cfg.data
    if not data_path or not Path(data_path).is_file():
        raise TrainError(f"{where}: dataset YAML not found: {data_path} (set 'data' or pass --data)")
    data_cfg = load_data_config(data_path)
    return cfg, dataclasses.replace(data_cfg, train_ann=training_annotations(data_cfg))


def build_training_model(cfg: Config, weights: Optional[str], scales: Optional[dict], seed: int) -> nn.Module:
    """The model to train: from ``weights`` or from scratch (head prior; RepOpt re-init)."""
    from yoloq.models.build import build_model, load_weights
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    check_trainable(model, cfg.path or "config")
    if cfg.model.block == "repopt" and scales is None:
        raise TrainError(f"{cfg.path}: block 'repopt' trains with the RepOptimizer: set train.scales (or --scales) "
                         "to the hyper-search scales file (yoloq repopt-scales)")
    if scales is not None:
        check_scales(model, scales)
    if weights:
        load_weights(model, weights)
    else:
        init_head_biases(model.detect)
        if scales is not None:
            reinit_from_scales(model, scales, seed)
    return model


def _evaluator(cfg: Config, data_cfg, records, out_dir: Path, img_size: int, opts: TrainOptions, device):
    from yoloq.eval.coco_eval import evaluate_model
    eval_data = data_cfg
    if cfg.train.eval_split == "train":
        subset = write_subset_annotations(data_cfg.train_ann, [r.image_id for r in records],
                                          out_dir / "train_subset.json")
        eval_data = dataclasses.replace(data_cfg, val_images=data_cfg.train_images, val_ann=str(subset))
    eval_cfg = dataclasses.replace(cfg.eval, val_ann="val_ann") if cfg.train.eval_split == "train" else cfg.eval

    def evaluate(model: nn.Module) -> dict:
        stats = evaluate_model(model.to(device), eval_data, eval_cfg, img_size, max_images=opts.max_eval_images,
                               progress=False, shard=False).stats         # rank 0 alone evaluates
        return {k: stats[k] for k in ("AP", "AP50", "AP75")}
    return evaluate


def _fingerprint(cfg: Config, data_cfg, img_size: int, weights, world: int) -> dict:
    """What a resumed run must share with the interrupted one (the DataLoader workers change nothing)."""
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k != "workers"}
    return {"model": dataclasses.asdict(cfg.model), "train": train,
            "loss": dataclasses.asdict(cfg.loss), "augment": dataclasses.asdict(cfg.augment),
            "train_ann": data_cfg.train_ann, "img_size": img_size, "weights": weights, "world": world}


def run_train(cfg, options: Optional[TrainOptions] = None, **overrides) -> TrainResult:
    """Train a detector as configured; see the module docstring for what is written."""
    opts = dataclasses.replace(options or TrainOptions(), **overrides)
    cfg, data_cfg = _resolve(cfg, opts)
    tcfg = cfg.train
    img_size = opts.img_size or cfg.model.img_size
    if img_size % 32:
        raise ConfigError(f"image size must be a multiple of 32 (the largest stride), got {img_size}")
    name = opts.name if opts.name is not None else cfg.model.name
    out_dir = check_run_folder(opts.out, name, "train",
                              "--name" if opts.name is not None else "run name from model.name")
    if (out_dir / "last.pt").is_file() and not opts.resume:
        raise TrainError(f"{out_dir} already holds a run (last.pt); pass --resume to continue it or choose --name")
    if opts.resume and not (out_dir / "last.pt").is_file():
        raise TrainError(f"--resume: no checkpoint to continue at {out_dir / 'last.pt'} (start the run without "
                         "--resume)")
    device = resolve_device(opts.device)
    world, rank = world_and_rank()

    records = records_for(data_cfg, cfg.model.nc, tcfg.train_images)
    scales = load_scales(tcfg.scales) if tcfg.scales else None
    weights = opts.weights or cfg.model.weights
    model = build_training_model(cfg, weights, scales, tcfg.seed)
    dataset = AugmentedDataset(LabelledImages(records), Augmenter(cfg.augment, img_size), seed=tcfg.seed)
    loader, sampler = make_train_loader(dataset, tcfg.batch_size, tcfg.workers, tcfg.seed)
    fingerprint = _fingerprint(cfg, data_cfg, img_size, weights, world)
    with new_run_folder(out_dir, "train", rank):
        if world > 1:
            dist.barrier()
        evaluate = _evaluator(cfg, data_cfg, records, out_dir, img_size, opts, device)
        if rank == 0:
            atomic_write_text(out_dir / "run.json", json.dumps({**fingerprint, "images": len(records),
                                                                "data": data_cfg.path}, indent=1, default=str))
        result = fit(model, loader, DetectionStep(DetectionLoss(cfg.model, cfg.loss), tcfg, scales),
                     train_loop(tcfg, world, cfg.augment.close_mosaic_epochs), sampler=sampler, dataset=dataset,
                     evaluate=evaluate, out_dir=out_dir, resume=opts.resume, fingerprint=fingerprint, device=device,
                     progress=opts.progress and rank == 0)
    return TrainResult(name, out_dir, result.history, result.best_epoch, result)
