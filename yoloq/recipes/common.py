"""Small things every recipe (PTQ, QAT) shares: stage timing, seeding, the calibration set."""
from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from yoloq.config import Config, DataConfig
from yoloq.errors import InputError


class StageTimer:
    """Wall-clock seconds per named stage (a stage entered twice adds up)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - start, 2)

    def with_total(self) -> dict[str, float]:
        return {**self.times, "total": round(time.perf_counter() - self.start, 2)}


def align_classes(cfg: Config, data_cfg: DataConfig) -> Config:
    """The model predicts the dataset's classes: upstream takes ``nc`` from the data YAML, so a model
    section (an upstream .py config, or a COCO config used with another dataset) follows it."""
    if cfg.model.nc == data_cfg.nc:
        return cfg
    return cfg.with_overrides(model={"nc": data_cfg.nc})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class CalibrationSet:
    """Calibration images (train split) loaded once: letterboxed batches and their file names."""
    batches: list = field(default_factory=list)
    files: list = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(b.shape[0] for b in self.batches)

    def first(self, n: int) -> list:
        """The first ``n`` images, as batches."""
        out, seen = [], 0
        for b in self.batches:
            if seen >= n:
                break
            out.append(b[: n - seen])
            seen += out[-1].shape[0]
        return out


def load_calibration_set(data_cfg: DataConfig, n_images: int, img_size: int, batch_size: int, workers: int,
                         seed: int) -> CalibrationSet:
    """``n_images`` train images chosen by ``seed`` (``yoloq.data.coco.calibration_loader``)."""
    from yoloq.data.coco import calibration_loader
    loader = calibration_loader(data_cfg, n_images, img_size, batch_size, workers, seed=seed)
    files = [name for _, name in loader.dataset.entries]
    batches = [images for images, _ in loader]
    if not batches:
        raise InputError(f"calibration: none of the {len(files)} chosen images in {data_cfg.train_images} "
                         f"could be read")
    return CalibrationSet(batches=batches, files=files)
