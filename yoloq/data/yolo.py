"""Upstream YOLOv6 data YAMLs as a :class:`~yoloq.config.DataConfig`.

An upstream data YAML has ``train``, ``val`` (and ``test``, unused here), ``nc``, ``names``,
``is_coco`` and optionally ``anno_path`` (COCO's official JSON, which upstream evaluates COCO on).
``train`` / ``val`` are image folders (searched recursively, as upstream), ``.txt`` lists of image
paths (relative lines are relative to the list file), or lists of those. Relative paths resolve as
upstream resolves them, against the current directory; when that does not exist, against the YAML's
folder, then that folder's parent (upstream YAMLs live in ``<YOLOv6>/data/`` and are run from
``<YOLOv6>``). Labels: yoloq.data.yolo_labels.

The result is an ordinary DataConfig: ``train_images`` / ``val_images`` are the folders holding each
split, ``train_files`` / ``val_files`` the images relative to them, ``val_ann`` the COCO ground truth
built from the val labels (cached beside them), ``val_ann_official`` the ``anno_path`` file if given.
``train_ann`` stays empty (calibration needs no labels); :func:`train_ground_truth` builds it for
the PTQ steps that measure mAP on labeled train images.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

from yoloq.config import ConfigError, DataConfig
from yoloq.config.load import read_yaml
from yoloq.config.lookup import expand_path_vars
from yoloq.data.coco import IMAGE_SUFFIXES
from yoloq.data.yolo_labels import CACHE_SUFFIX, coco_ground_truth, label_path

YOLO_KEYS = ("train", "val", "test", "nc", "names", "is_coco", "anno_path")


def is_yolo_data_yaml(raw: dict) -> bool:
    """True for an upstream data YAML (``train`` / ``val`` keys) rather than yoloq's COCO-JSON form."""
    return "train" in raw or "val" in raw


def resolve_source(value: str, key: str, yaml_path: Path) -> Path:
    """An existing path for ``value``: absolute as given; relative against the current directory
    (upstream), then the YAML's folder, then its parent."""
    path = Path(os.path.expanduser(expand_path_vars(value, f"{yaml_path}: {key}")))
    yaml_dir = yaml_path.parent.resolve()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, yaml_dir / path, yaml_dir.parent / path]
    for candidate in candidates:
        if candidate.exists():
            return Path(os.path.abspath(candidate))     # keep symlinks: labels sit beside the linked path
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"{yaml_path}: {key}: '{value}' not found (tried {tried}; relative paths resolve against "
                      "the current directory as upstream YOLOv6 does, then the YAML's folder and its parent)")


def _list_file_images(list_file: Path) -> list[Path]:
    """Images of a ``.txt`` list: one path a line, relative ones relative to the list file."""
    images, missing = [], []
    for line_no, line in enumerate(list_file.read_text().splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(os.path.expanduser(entry))
        path = path if path.is_absolute() else list_file.parent / path
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ConfigError(f"{list_file}:{line_no}: '{entry}' is not an image file "
                              f"(expected one of {', '.join(IMAGE_SUFFIXES)})")
        (images if path.is_file() else missing).append(path)
    if missing:
        warnings.warn(f"{list_file}: {len(missing)} listed image(s) not found and left out, e.g. {missing[0]}",
                      stacklevel=3)
    return images


def source_images(source: Path, key: str, yaml_path: Path) -> list[Path]:
    """The images of one split source: a folder (recursive) or a ``.txt`` list."""
    if source.is_dir():
        return [p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if source.suffix.lower() == ".txt":
        return _list_file_images(source)
    raise ConfigError(f"{yaml_path}: {key}: {source} must be an image folder or a .txt list of images")


def split_images(value, key: str, yaml_path: Path) -> tuple[Path, list[str], Path]:
    """(folder holding the split, image paths relative to it (sorted), first source) of ``value``."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise ConfigError(f"{yaml_path}: '{key}' must be an image folder, a .txt image list or a list of those, "
                          f"got {value!r}")
    sources = [resolve_source(v, key, yaml_path) for v in values]
    images = sorted({Path(os.path.abspath(p)) for s in sources for p in source_images(s, key, yaml_path)}, key=str)
    if not images:
        raise ConfigError(f"{yaml_path}: {key}: no images found in {', '.join(map(str, sources))}")
    root = Path(os.path.commonpath([str(p.parent) for p in images]))
    return root, [p.relative_to(root).as_posix() for p in images], sources[0]


def cache_file(source: Path) -> Path:
    """Where the COCO ground truth of a split is cached: beside its label folder
    (``labels/val2017.yoloq-gt.json``), or beside a ``.txt`` list (``val.yoloq-gt.json``)."""
    if source.is_dir():
        labels = label_path(source / "x.jpg").parent
        return labels.parent / f"{labels.name}{CACHE_SUFFIX}"
    return source.parent / f"{source.stem}{CACHE_SUFFIX}"


def _classes(raw: dict, path: Path) -> tuple[int, list, bool]:
    nc, names, is_coco = raw.get("nc"), raw.get("names"), raw.get("is_coco", False)
    if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
        raise ConfigError(f"{path}: 'nc' must be the number of classes (an integer >= 1), got {nc!r}")
    if not isinstance(names, list) or len(names) != nc:
        raise ConfigError(f"{path}: 'names' must be a list of nc = {nc} class names, got "
                          f"{len(names) if isinstance(names, list) else repr(names)}")
    if not isinstance(is_coco, bool):
        raise ConfigError(f"{path}: 'is_coco' must be true/false, got {is_coco!r}")
    if is_coco and nc != 80:
        raise ConfigError(f"{path}: is_coco: true maps COCO's 80 classes to category ids; got nc = {nc}")
    return nc, [str(n) for n in names], is_coco


def _check_keys(raw: dict, path: Path) -> None:
    unknown = sorted(set(raw) - set(YOLO_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)} in an upstream YOLOv6 data YAML; "
                          f"valid keys: {', '.join(YOLO_KEYS)}")


def split_ground_truth(path: Path, raw: dict, split: str) -> tuple[Path, list[str], str]:
    """(folder, files, cached COCO ground-truth path) of ``split`` ("train" / "val")."""
    nc, names, is_coco = _classes(raw, path)
    root, files, source = split_images(raw[split], split, path)
    try:
        ann = coco_ground_truth(cache_file(source), root, files, nc, names, is_coco)
    except ValueError as err:            # a bad label line: the message names file and line
        raise ConfigError(f"{path}: {split} labels: {err}") from err
    return root, files, str(ann)


def load_yolo_data_config(path: str | os.PathLike, raw: dict) -> DataConfig:
    """DataConfig of an upstream data YAML (``raw``: its parsed mapping); builds / reuses the val ground truth."""
    path = Path(path)
    _check_keys(raw, path)
    nc, names, _ = _classes(raw, path)
    dc = DataConfig(nc=nc, names=names, path=str(path))
    if raw.get("train") is not None:
        root, files, _ = split_images(raw["train"], "train", path)
        dc.train_images, dc.train_files = str(root), files
    if raw.get("val") is not None:
        root, files, ann = split_ground_truth(path, raw, "val")
        dc.val_images, dc.val_files, dc.val_ann = str(root), files, ann
    if raw.get("anno_path"):
        dc.val_ann_official = str(resolve_source(raw["anno_path"], "anno_path", path))
    return dc


def train_ground_truth(data_cfg: DataConfig) -> Optional[str]:
    """COCO ground truth of a YOLO dataset's train labels (cached), or None for a COCO-JSON dataset
    (whose ``train_ann`` is given in its YAML)."""
    if not data_cfg.path:
        return None
    raw = read_yaml(Path(data_cfg.path))
    if not is_yolo_data_yaml(raw) or raw.get("train") is None:
        return None
    return split_ground_truth(Path(data_cfg.path), raw, "train")[2]
