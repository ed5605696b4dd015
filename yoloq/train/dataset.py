"""Labelled training data: records from a reader, the augmented dataset and its batches.

    records = read_coco_records(img_dir, ann_file)        # or any reader -> list[LabelledImage]
    dataset = AugmentedDataset(LabelledImages(records), Augmenter(cfg.augment, 640), seed=0)
    loader = DataLoader(dataset, ..., collate_fn=collate_targets)
    # batches: images [B, 3, S, S] float RGB 0..1, targets [M, 6] (image index, class, x1, y1, x2, y2)

A reader turns a dataset format into :class:`LabelledImage` records (image path, boxes xyxy in the
image's own pixels, class indices 0..nc-1); :func:`read_coco_records` reads COCO JSON, and a reader
for YOLO ``.txt`` labels plugs in the same way. :class:`AugmentedDataset` wraps anything indexable
that returns a :class:`~yoloq.train.augment.Sample` (so label-free image folders work too: their
samples simply have no boxes).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from yoloq.data.coco import quiet_worker, read_annotation_images, read_coco_json, read_image
from yoloq.train.augment import Augmenter, Sample, letterbox_sample, resize_longest
from yoloq.train.errors import TrainError


@dataclass(frozen=True)
class LabelledImage:
    file: str                                   # image path
    boxes: np.ndarray = field(repr=False)       # [n, 4] float32 x1, y1, x2, y2 (image pixels)
    classes: np.ndarray = field(repr=False)     # [n] int64 class indices
    image_id: int = -1


# --------------------------------------------------------------------------- readers


def coco_class_map(categories: Sequence[dict], where: str) -> dict[int, int]:
    """COCO category id -> class index, in increasing id order (the evaluator's 80 -> 91 map)."""
    try:
        ids = sorted(int(c["id"]) for c in categories)
    except (KeyError, TypeError, ValueError) as err:
        raise TrainError(f"{where}: malformed 'categories' entry ({err})") from err
    if not ids:
        raise TrainError(f"{where}: no 'categories'; a labelled COCO file lists its classes")
    return {cid: i for i, cid in enumerate(ids)}


def read_coco_records(img_dir: str | os.PathLike, ann_file: str | os.PathLike) -> list[LabelledImage]:
    """Records of a COCO instances file: non-crowd boxes with positive size, by image id.

    Images listed in a top-level ``unlabeled_image_ids`` (as in ``../shared/coco``) are left out:
    they have no labels, which is not the same as having no objects. Other images without
    annotations are kept as background images.
    """
    where = str(ann_file)
    try:
        data = read_coco_json(ann_file)
        images = read_annotation_images(ann_file, data)
    except (ValueError, FileNotFoundError) as err:
        raise TrainError(str(err)) from err
    class_of = coco_class_map(data.get("categories") or [], where)
    unlabeled = set(data.get("unlabeled_image_ids") or [])
    per_image: dict[int, list] = {}
    for ann in data.get("annotations") or []:
        if ann.get("iscrowd", 0):
            continue
        cid = ann.get("category_id")
        if cid not in class_of:
            raise TrainError(f"{where}: annotation {ann.get('id')} has category_id {cid}, not in 'categories'")
        x, y, w, h = (float(v) for v in ann["bbox"])
        if not (np.isfinite([x, y, w, h]).all()):
            raise TrainError(f"{where}: annotation {ann.get('id')} has a non-finite bbox {ann['bbox']}")
        if w > 0 and h > 0:
            per_image.setdefault(ann["image_id"], []).append((x, y, x + w, y + h, class_of[cid]))
    img_dir = Path(img_dir)
    records = []
    for entry in images:
        if entry["id"] in unlabeled:
            continue
        rows = np.array(per_image.get(entry["id"], []), np.float32).reshape(-1, 5)
        records.append(LabelledImage(str(img_dir / entry["file_name"]), rows[:, :4], rows[:, 4].astype(np.int64),
                                     int(entry["id"])))
    return records


def check_labelled(records: Sequence[LabelledImage], where: str, nc: int) -> None:
    """Training needs boxes: refuse a dataset without any, or with class indices outside 0..nc-1."""
    if not records:
        raise TrainError(f"{where}: no labelled images (every image is missing or listed as unlabeled); "
                         "training needs images with boxes")
    if not any(len(r.boxes) for r in records):
        raise TrainError(f"{where}: none of its {len(records)} images has a box; training needs labels "
                         "(an unlabelled folder or a file without 'annotations'?)")
    top = max((int(r.classes.max()) for r in records if len(r.classes)), default=-1)
    if top >= nc:
        raise TrainError(f"{where}: class index {top} but the model has nc={nc} classes")


def first_labelled(records: Sequence[LabelledImage], n: int) -> list[LabelledImage]:
    """The first ``n`` records that have at least one box, by image id (a small overfit subset)."""
    if n < 1:
        raise TrainError(f"train.train_images must be >= 1, got {n}")
    chosen = [r for r in sorted(records, key=lambda r: r.image_id) if len(r.boxes)][:n]
    return chosen


def write_subset_annotations(ann_file: str | os.PathLike, image_ids: Sequence[int], out: str | os.PathLike) -> Path:
    """A COCO file holding only ``image_ids`` (all their annotations), written atomically: the
    ground truth for evaluating on a training subset."""
    data = read_coco_json(ann_file)
    keep = set(int(i) for i in image_ids)
    subset = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    subset["images"] = [e for e in data.get("images", []) if e["id"] in keep]
    subset["annotations"] = [a for a in data.get("annotations", []) if a["image_id"] in keep]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(subset, f)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


# --------------------------------------------------------------------------- datasets


class LabelledImages(Dataset):
    """Records -> original :class:`Sample` (BGR image + boxes); an unreadable image is an error
    naming the file (a training set with holes would silently change what is learned)."""

    def __init__(self, records: Sequence[LabelledImage]):
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        r = self.records[index]
        image = read_image(r.file)
        if image is None:
            raise TrainError(f"training image missing or unreadable: {r.file}")
        return Sample(image, r.boxes.copy(), r.classes.copy())


class AugmentedDataset(Dataset):
    """Wrap a dataset of :class:`Sample` with the augmentation pipeline.

    Items are ``(image uint8 [3, S, S] RGB, labels float32 [n, 5] (class, x1, y1, x2, y2))``. The
    random generator of item ``i`` is seeded with ``(seed, epoch, i)``: the same epoch and seed
    give the same item whatever the worker count or order. ``set_epoch`` before each epoch (the
    trainer does); mosaic/mixup are off when ``augment`` is False or after ``set_mosaic(False)``.
    ``augment=False`` gives the evaluation letterbox.
    """

    def __init__(self, base: Dataset, augmenter: Augmenter, seed: int = 0, augment: bool = True):
        self.base, self.augmenter, self.seed, self.augment = base, augmenter, int(seed), augment
        self.epoch = 0
        self.mosaic = True

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_mosaic(self, enabled: bool) -> None:
        self.mosaic = bool(enabled)

    def sample(self, index: int) -> Sample:
        size = self.augmenter.size
        if not self.augment:
            return letterbox_sample(resize_longest(self.base[index], size), size)
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        return self.augmenter(self.base.__getitem__, int(index), len(self.base), rng, use_mosaic=self.mosaic)

    def __getitem__(self, index: int):
        s = self.sample(index)
        image = torch.from_numpy(np.ascontiguousarray(s.image[:, :, ::-1].transpose(2, 0, 1)))
        labels = np.concatenate((s.classes.astype(np.float32)[:, None], s.boxes), 1)
        return image, torch.from_numpy(labels)


def collate_targets(items):
    """-> images ``[B, 3, S, S]`` float 0..1, targets ``[M, 6]`` (image index, class, x1, y1, x2, y2)."""
    images = torch.stack([img for img, _ in items]).float().div_(255.0)
    rows = [torch.cat((torch.full((len(lab), 1), float(i)), lab), 1) for i, (_, lab) in enumerate(items)]
    return images, torch.cat(rows) if rows else torch.zeros(0, 6)


def training_annotations(data_cfg) -> str:
    """The COCO ground truth of the train split: ``train_ann`` of a COCO-JSON dataset YAML, or, for an
    upstream YOLO data YAML, its ``.txt`` labels read and checked by :mod:`yoloq.data.yolo_labels`
    (cached as COCO JSON beside them, as for evaluation)."""
    from yoloq.data.yolo import train_ground_truth
    ann = data_cfg.train_ann or train_ground_truth(data_cfg)
    if not data_cfg.train_images or not ann:
        raise TrainError(f"{data_cfg.path}: training needs labelled train images: 'train_images' and 'train_ann' "
                         "(COCO JSON), or an upstream YOLO data YAML whose 'train' images have .txt labels")
    return str(ann)


def records_for(data_cfg, nc: int, train_images: Optional[int] = None) -> list[LabelledImage]:
    """The training records named by a dataset YAML (COCO JSON ``train_ann``, or YOLO labels through
    :func:`training_annotations`), checked to carry labels; only the first ``train_images``
    labelled ones if given."""
    ann = training_annotations(data_cfg)
    if not Path(data_cfg.train_images).is_dir():
        raise TrainError(f"{data_cfg.path}: train_images folder not found: {data_cfg.train_images}")
    records = read_coco_records(data_cfg.train_images, ann)
    check_labelled(records, ann, nc)
    missing = [r.file for r in records if not Path(r.file).is_file()]
    if missing:
        raise TrainError(f"{ann}: {len(missing)} listed image(s) missing from {data_cfg.train_images}, "
                         f"e.g. {missing[0]}")
    if train_images is not None:
        records = first_labelled(records, train_images)
    return records


def make_train_loader(dataset: Dataset, batch_size: int, workers: int, seed: int, collate_fn=collate_targets):
    """DataLoader + DistributedSampler (one replica without torch.distributed): a seeded shuffle
    per epoch (``sampler.set_epoch``), each rank every world-th item -- the same order on resume.
    Batches are ``collate_fn``'s (default: images + targets [M, 6])."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler
    initialised = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialised else 1
    rank = dist.get_rank() if initialised else 0
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=max(0, workers),
                        collate_fn=collate_fn, drop_last=False, persistent_workers=False,
                        worker_init_fn=quiet_worker if workers > 0 else None)
    return loader, sampler
