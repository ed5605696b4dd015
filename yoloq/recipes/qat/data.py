"""What QAT trains on: train images only, letterboxed or augmented, with labels for det+distill.

- ``qat.loss: distill``, ``qat.augment: false``: ``qat.images`` train images (unlabelled ones
  included: distillation needs no labels), letterboxed as for evaluation; batches are images.
- ``qat.augment: true``: the same images through the training augmentation (``yoloq.train``:
  mosaic, mixup, HSV, affine, flip, as the config's ``augment`` section says), a different view each
  epoch: the teacher labels every view, so a few hundred images go further.
- ``qat.loss: det+distill``: the labelled train images (COCO JSON or YOLO labels), first
  ``qat.images`` of them, augmented or not; batches are ``(images, targets [M, 6])`` for the
  YOLOv6 loss (``yoloq.train.losses.DetectionLoss``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from yoloq.config import Config, DataConfig
from yoloq.data.coco import CocoDetectionDataset, calibration_images, collate_skip_failed
from yoloq.recipes.qat import QATError
from yoloq.train.augment import Augmenter
from yoloq.train.dataset import AugmentedDataset, LabelledImage, LabelledImages, make_train_loader, records_for
from yoloq.train.errors import TrainError


@dataclass
class QATData:
    loader: object
    sampler: object
    images: int
    labelled: bool
    augmented: bool


def _unlabelled_records(data_cfg: DataConfig, n: int, seed: int) -> list:
    root = Path(data_cfg.train_images)
    return [LabelledImage(str(root / name), np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
            for name in calibration_images(data_cfg, n, seed)]


def _labelled_records(data_cfg: DataConfig, nc: int, n: int) -> list:
    """The first ``n`` labelled train images, read as ``yoloq train`` reads them (COCO JSON or YOLO labels)."""
    try:
        return records_for(data_cfg, nc, train_images=n)
    except TrainError as err:
        raise QATError(f"qat.loss det+distill needs labelled train images: {err}") from None


def qat_data(cfg: Config, data_cfg: DataConfig, img_size: int) -> QATData:
    """The loader QAT trains on (see the module docstring), sharded by a seeded DistributedSampler."""
    qcfg = cfg.qat
    labelled = qcfg.loss == "det+distill"
    if not labelled and not qcfg.augment:
        files = calibration_images(data_cfg, qcfg.images, qcfg.seed)
        dataset = CocoDetectionDataset(data_cfg.train_images, None, img_size, files=files)
        loader, sampler = make_train_loader(dataset, qcfg.batch_size, qcfg.workers, qcfg.seed, collate_skip_failed)
        return QATData(loader, sampler, len(files), labelled=False, augmented=False)
    records = (_labelled_records(data_cfg, cfg.model.nc, qcfg.images) if labelled
               else _unlabelled_records(data_cfg, qcfg.images, qcfg.seed))
    dataset = AugmentedDataset(LabelledImages(records), Augmenter(cfg.augment, img_size), seed=qcfg.seed,
                               augment=qcfg.augment)
    loader, sampler = make_train_loader(dataset, qcfg.batch_size, qcfg.workers, qcfg.seed)
    return QATData(loader, sampler, len(records), labelled=labelled, augmented=qcfg.augment)
