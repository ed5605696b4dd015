"""COCO-format images for evaluation and calibration: letterbox, dataset, loaders.

Preprocessing follows the YOLOv6 evaluation protocol: the image is resized (keeping its aspect
ratio, up or down) so its longer side equals the square input size, centred on a canvas filled
with 114, converted to RGB and divided by 255. Box coordinates map back with
``orig = (letterboxed - pad) / ratio``.

Images that are missing or cannot be decoded are never fatal: the dataset returns a
:class:`FailedItem`, the loader drops it from the batch, warns with the file name and records it in
``dataset.failed`` (in the main process, so it works with worker processes too).
"""
from __future__ import annotations

import json
import os
import random
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from yoloq.errors import InputError, short_repr

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
PAD_VALUE = 114
# Resampling used by ``letterbox``. "pil" (Pillow bilinear, antialiased when shrinking) reproduces
# the reference mAP of ../shared/weights/README.md; see tools/bench_eval.py and the tests.
INTERPOLATIONS = ("pil", "linear", "area")
DEFAULT_INTERPOLATION = "pil"
# The 80 COCO detection classes as their category ids (1..90 with gaps), in class-index order.
_UNUSED_COCO_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
COCO80_TO_91 = [i for i in range(1, 91) if i not in _UNUSED_COCO_IDS]


@dataclass(frozen=True)
class ImageMeta:
    """Where a letterboxed image came from; enough to map boxes back to the original."""
    image_id: int
    file: str
    orig_h: int
    orig_w: int
    ratio: float                 # letterboxed / original scale (same on both axes)
    pad: tuple[float, float]     # (pad_w, pad_h): left and top padding in letterboxed pixels


@dataclass(frozen=True)
class FailedItem:
    """Returned by the dataset for an image it could not read (missing or corrupt)."""
    file: str
    reason: str


# --------------------------------------------------------------------------- letterbox
def _resize(img: np.ndarray, size_wh: tuple[int, int], interpolation: str) -> np.ndarray:
    if interpolation == "pil":
        # Pillow filters channels independently, so BGR or RGB order does not matter here.
        return np.asarray(Image.fromarray(img).resize(size_wh, Image.BILINEAR))
    if interpolation == "linear":
        return cv2.resize(img, size_wh, interpolation=cv2.INTER_LINEAR)
    if interpolation == "area":
        return cv2.resize(img, size_wh, interpolation=cv2.INTER_AREA)
    raise InputError(f"letterbox: unknown interpolation '{interpolation}'; expected one of {INTERPOLATIONS}")


def letterbox(img_bgr: np.ndarray, new_size: int, pad: int = PAD_VALUE,
              interpolation: str = DEFAULT_INTERPOLATION):
    """Fit an HxWx3 uint8 image into a ``new_size`` square, keeping its aspect ratio.

    Returns ``(img, ratio, (pad_w, pad_h))``; channel order is preserved. The longer side becomes
    exactly ``new_size`` (small images are scaled up too, as upstream eval does), the padding is
    split evenly with the odd pixel going right/bottom.
    """
    if img_bgr.ndim != 3 or img_bgr.shape[2] != 3:
        raise InputError(f"letterbox: expected an HxWx3 image, got shape {img_bgr.shape}")
    h, w = img_bgr.shape[:2]
    ratio = new_size / max(h, w)
    new_w, new_h = max(1, round(w * ratio)), max(1, round(h * ratio))
    resized = img_bgr if (new_w, new_h) == (w, h) else _resize(img_bgr, (new_w, new_h), interpolation)
    pad_w, pad_h = (new_size - new_w) // 2, (new_size - new_h) // 2
    canvas = np.full((new_size, new_size, 3), pad, dtype=img_bgr.dtype)
    canvas[pad_h:pad_h + new_h, pad_w:pad_w + new_w] = resized
    return canvas, ratio, (float(pad_w), float(pad_h))


def read_image(path: str | Path) -> Optional[np.ndarray]:
    """BGR uint8 image, or None when missing/undecodable.

    EXIF orientation is ignored on purpose: COCO boxes refer to the stored pixel layout.
    """
    return cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)


JPEG_START = b"\xff\xd8\xff"


def jpeg_truncated(path: str | Path) -> bool:
    """A JPEG file (by content, whatever its name: a PNG named .jpg is decoded as the PNG it is)
    without the end-of-image marker: libjpeg would decode its first part and only print a warning,
    leaving the rest grey."""
    with open(path, "rb") as f:
        if f.read(len(JPEG_START)) != JPEG_START:
            return False
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 1024))
        tail = f.read().rstrip(b"\x00")
    return not tail.endswith(b"\xff\xd9")


def to_uint8_tensor(img_bgr: np.ndarray) -> torch.Tensor:
    """HxWx3 BGR uint8 -> [3,H,W] uint8 RGB (a quarter of the float bytes to move between processes)."""
    return torch.from_numpy(np.ascontiguousarray(img_bgr[:, :, ::-1].transpose(2, 0, 1)))


def to_tensor(img_bgr: np.ndarray) -> torch.Tensor:
    """HxWx3 BGR uint8 -> [3,H,W] float32 RGB in 0..1."""
    return to_uint8_tensor(img_bgr).float().div_(255.0)


# --------------------------------------------------------------------------- dataset
def list_images(img_dir: str | Path) -> list[str]:
    """Sorted file names of the images directly inside ``img_dir``."""
    img_dir = Path(img_dir)
    if not img_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {img_dir}")
    return sorted(p.name for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _image_id_from_name(name: str, index: int) -> int:
    stem = Path(name).stem
    return int(stem) if stem.isdigit() else index


def read_coco_json(ann_file: str | Path) -> dict:
    """A COCO annotation file as a dict; errors name the file."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    try:
        data = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{ann_file}: not valid JSON: {err}") from err
    except RecursionError:
        raise InputError(f"{ann_file}: JSON nested too deeply to be a COCO annotation file") from None
    if not isinstance(data, dict):
        raise InputError(f"{ann_file}: expected a JSON object, got {type(data).__name__}")
    return data


def read_annotation_images(ann_file: str | Path, data: Optional[dict] = None) -> list[dict]:
    """The ``images`` entries of a COCO JSON (``data`` if already read), sorted by id."""
    data = read_coco_json(ann_file) if data is None else data
    images = data.get("images")
    if not isinstance(images, list):
        raise InputError(f"{ann_file}: no 'images' list; is this a COCO instances file?")
    for entry in images:
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            raise InputError(f"{ann_file}: image entry without 'id'/'file_name': {short_repr(entry, 200)}")
        if isinstance(entry["id"], bool) or not isinstance(entry["id"], int) or not isinstance(entry["file_name"], str):
            raise InputError(f"{ann_file}: image {short_repr(entry['id'])}: 'id' must be an integer and 'file_name' "
                             f"a string, got {short_repr(entry['id'])} / {short_repr(entry['file_name'])}")
    return sorted(images, key=lambda e: e["id"])


class CocoDetectionDataset(Dataset):
    """Letterboxed images of a COCO folder.

    With ``ann_file`` the images are the JSON's ``images`` (sorted by id), without it every image
    file in ``img_dir`` (calibration needs no labels). ``files`` restricts either list to those
    file names (in the given order); without ``ann_file`` they are paths relative to ``img_dir``
    and may lie in sub-folders. Items are ``(image [3,S,S] float32 RGB 0..1, ImageMeta)`` (with
    ``uint8``: uint8 RGB 0..255, for the consumer to scale on its device) or a :class:`FailedItem`
    for an unreadable file.
    """

    def __init__(self, img_dir: str | Path, ann_file: Optional[str | Path] = None, img_size: int = 640,
                 files: Optional[Sequence[str]] = None, interpolation: str = DEFAULT_INTERPOLATION,
                 uint8: bool = False):
        if interpolation not in INTERPOLATIONS:
            raise InputError(f"unknown interpolation '{interpolation}'; expected one of {INTERPOLATIONS}")
        self.img_dir = Path(img_dir)
        self.ann_file = str(ann_file) if ann_file else None
        self.img_size = int(img_size)
        self.interpolation = interpolation
        self.uint8 = uint8
        self.failed: list[str] = []          # files that could not be read (filled by the loader)
        if ann_file:
            if not self.img_dir.is_dir():
                raise FileNotFoundError(f"image folder not found: {self.img_dir}")
            entries = [(e["id"], e["file_name"]) for e in read_annotation_images(ann_file)]
        elif files is not None:
            # explicit files (may sit in sub-folders, as a YOLO dataset's images do): no folder listing
            missing = [f for f in files if not (self.img_dir / f).is_file()]
            if missing:
                raise InputError(f"{self.img_dir}: {len(missing)} requested file(s) not found, e.g. {missing[0]}")
            entries = [(_image_id_from_name(n, i), n) for i, n in enumerate(files)]
            files = None
        else:
            entries = [(_image_id_from_name(n, i), n) for i, n in enumerate(list_images(img_dir))]
        if files is not None:
            by_name = {name: image_id for image_id, name in entries}
            unknown = [f for f in files if f not in by_name]
            if unknown:
                where = self.ann_file or str(self.img_dir)
                raise InputError(f"{where}: {len(unknown)} requested file(s) not listed, e.g. {unknown[0]}")
            entries = [(by_name[f], f) for f in files]
        self.entries: list[tuple[int, str]] = entries

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def image_ids(self) -> list[int]:
        return [image_id for image_id, _ in self.entries]

    def __getitem__(self, index: int):
        image_id, name = self.entries[index]
        path = self.img_dir / name
        if not path.is_file():
            return FailedItem(str(path), "missing")
        if jpeg_truncated(path):
            return FailedItem(str(path), "truncated JPEG (no end-of-image marker)")
        img = read_image(path)
        if img is None:
            return FailedItem(str(path), "cannot be decoded")
        boxed, ratio, pad = letterbox(img, self.img_size, interpolation=self.interpolation)
        meta = ImageMeta(image_id, str(path), img.shape[0], img.shape[1], ratio, pad)
        return (to_uint8_tensor(boxed) if self.uint8 else to_tensor(boxed)), meta

    def record_failure(self, item: FailedItem) -> None:
        """Warn about an unreadable image and count it (called in the main process)."""
        self.failed.append(item.file)
        warnings.warn(f"skipping image {item.file}: {item.reason}", stacklevel=3)


# --------------------------------------------------------------------------- loaders
def collate_skip_failed(items):
    """Stack readable items; failed ones travel alongside so the main process can record them."""
    good = [it for it in items if not isinstance(it, FailedItem)]
    failed = [it for it in items if isinstance(it, FailedItem)]
    images = torch.stack([img for img, _ in good]) if good else None
    return images, [meta for _, meta in good], failed


class SkippingLoader:
    """Iterates ``(images [B,3,S,S], list[ImageMeta])`` batches; failed images are recorded on the
    dataset (warning + ``dataset.failed``) and left out; a batch with no readable image is skipped."""

    def __init__(self, loader: DataLoader, dataset: CocoDetectionDataset):
        self.loader = loader
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[ImageMeta]]]:
        for images, metas, failed in self.loader:
            for item in failed:
                self.dataset.record_failure(item)
            if images is not None:
                yield images, metas


def quiet_worker(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process (a terminal sends SIGINT to the whole
    process group; each worker would print a traceback). SIGTERM keeps PyTorch's worker handler: a
    worker it kills dies without output, and the main process reports the termination once
    (``yoloq.cli.common``); ignoring it instead could leave the main process waiting for workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset: CocoDetectionDataset, batch_size: int, workers: int, shuffle: bool = False,
                seed: int = 0, indices: Optional[Sequence[int]] = None, pin_memory: bool = False) -> SkippingLoader:
    """Batches of ``dataset`` (only its items at ``indices`` if given: one process's shard), letterboxed
    in ``workers`` processes; ``pin_memory`` for fast non-blocking copies to a GPU."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    source = dataset if indices is None else Subset(dataset, list(indices))
    loader = DataLoader(source, batch_size=batch_size, shuffle=shuffle, num_workers=max(0, workers),
                        collate_fn=collate_skip_failed, generator=generator,
                        pin_memory=pin_memory and torch.cuda.is_available(),
                        worker_init_fn=quiet_worker if workers > 0 else None)
    return SkippingLoader(loader, dataset)


def _is_readable(path: Path) -> bool:
    """Cheap check (header + structure, no full decode) used to pick calibration images."""
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # noqa: BLE001 - any Pillow failure means "not usable"
        return False


def _split_paths(folder: str, files: Optional[Sequence[str]]) -> set[Path]:
    return {(Path(folder) / f).resolve() for f in (files if files is not None else list_images(folder))}


def _train_files_outside_val(data_cfg) -> list[str]:
    """The train image names (``train_files`` if set, else the folder's images), refusing any overlap
    with the val images: calibrating on evaluation images would leak."""
    train_dir = Path(data_cfg.train_images)
    train_files = getattr(data_cfg, "train_files", None)
    val_files = getattr(data_cfg, "val_files", None)
    if train_files is None and val_files is None:
        if data_cfg.val_images and train_dir.resolve() == Path(data_cfg.val_images).resolve():
            raise InputError(f"{data_cfg.path}: train_images and val_images are the same folder ({train_dir}); "
                             "refusing to calibrate on evaluation images")
        return list_images(train_dir)
    names = list(train_files) if train_files is not None else list_images(train_dir)
    if data_cfg.val_images and Path(data_cfg.val_images).is_dir():
        shared = _split_paths(str(train_dir), names) & _split_paths(data_cfg.val_images, val_files)
        if shared:
            raise InputError(f"{data_cfg.path}: {len(shared)} train image(s) are also val images, e.g. "
                             f"{sorted(shared)[0]}; refusing to calibrate on evaluation images")
    return names


def calibration_images(data_cfg, n: int, seed: int = 0) -> list[str]:
    """``n`` readable train images (file names), chosen deterministically for ``seed``.

    Only the train split is ever listed (``data_cfg.train_files`` if set, else the images directly
    in ``data_cfg.train_images``): calibrating on evaluation images would leak.
    """
    if n < 1:
        raise InputError(f"calibration needs at least 1 image, got n={n}")
    train_dir = Path(data_cfg.train_images or "")
    if not data_cfg.train_images:
        raise InputError(f"{data_cfg.path}: 'train_images' is not set; calibration uses train images only")
    names = _train_files_outside_val(data_cfg)
    random.Random(seed).shuffle(names)
    chosen = []
    for name in names:
        if len(chosen) == n:
            break
        if _is_readable(train_dir / name):
            chosen.append(name)
        else:
            warnings.warn(f"calibration: skipping unreadable image {train_dir / name}", stacklevel=2)
    if not chosen:
        raise InputError(f"no readable image in calibration folder {train_dir}")
    if len(chosen) < n:
        warnings.warn(f"calibration: asked for {n} images, {train_dir} has only {len(chosen)} readable",
                      stacklevel=2)
    return chosen


def calibration_loader(data_cfg, n_images: int, img_size: int, batch_size: int, workers: int,
                       seed: int = 0, shuffle: bool = False) -> SkippingLoader:
    """Loader over :func:`calibration_images` (train split, letterboxed like evaluation)."""
    files = calibration_images(data_cfg, n_images, seed)
    dataset = CocoDetectionDataset(data_cfg.train_images, None, img_size, files=files)
    return make_loader(dataset, batch_size, workers, shuffle=shuffle, seed=seed)
