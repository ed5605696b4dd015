"""Reading dataset YAMLs: yoloq's COCO-JSON form (``data/*.yaml``, paths relative to the file) or an
upstream YOLOv6 data YAML (yoloq.data.yolo); shipped ones by bare name (yoloq.config.lookup)."""
from __future__ import annotations

import os

from yoloq.config import ConfigError, DataConfig, from_dict, resolve_path
from yoloq.config.load import read_yaml
from yoloq.config.lookup import find_data_config
from yoloq.data.yolo import is_yolo_data_yaml, load_yolo_data_config
from yoloq.errors import short_repr


def load_data_config(path: str | os.PathLike) -> DataConfig:
    """Load a dataset YAML: yoloq's COCO-JSON form (``data/*.yaml``, paths relative to it) or an
    upstream YOLOv6 data YAML (``train``/``val`` image folders or lists, YOLO .txt labels;
    yoloq.data.yolo). A bare name looks in the shipped data YAMLs."""
    path = find_data_config(path)
    raw = read_yaml(path)
    if is_yolo_data_yaml(raw):
        return load_yolo_data_config(path, raw)
    dc = from_dict(DataConfig, raw, str(path))
    for key in ("train_files", "val_files"):
        files = getattr(dc, key)
        if files is not None and not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
            raise ConfigError(f"{path}: '{key}' must be a list of image paths relative to the folder, got {short_repr(files)}")
    base = path.parent.resolve()
    for key in ("train_images", "train_ann", "val_images", "val_ann", "val_ann_official"):
        setattr(dc, key, resolve_path(getattr(dc, key), base, f"{path}: {key}"))
    dc.path = str(path)
    return dc
