"""Reading experiment configs and dataset YAMLs: paths relative to the file that holds them,
``${YOLOQ_SHARED}`` expanded, shipped configs by bare name, upstream ``.py`` configs and YOLO data YAMLs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import yaml

from yoloq.config.base import ConfigError, closest_hint, from_dict
from yoloq.config.lookup import expand_path_vars, find_config, find_data_config
from yoloq.config.sections import _SECTIONS, Config, DataConfig
from yoloq.config.upstream import load_upstream_config


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text (UTF-8) YAML file: {err.reason} at byte {err.start}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, got {type(data).__name__}")
    return data


def resolve_path(value: Optional[str], base_dir: Path, where: str = "config") -> Optional[str]:
    """Resolve a path from a YAML file relative to that file's directory, after expanding
    environment variables (``${YOLOQ_SHARED}``: see yoloq.config.lookup)."""
    if value is None or value == "":
        return value
    p = Path(os.path.expanduser(expand_path_vars(value, where)))
    return str(p if p.is_absolute() else (base_dir / p).resolve())


def load_config(path: str | os.PathLike) -> Config:
    """Load an experiment config: a YAML path, a shipped config's bare name (``yolov6lite_s``), or an
    upstream YOLOv6 ``.py`` model config (read without executing it; yoloq.config.upstream)."""
    path = find_config(path)
    if path.suffix == ".py":
        return load_upstream_config(path)
    raw = read_yaml(path)
    valid = set(_SECTIONS) | {"data"}
    for key in raw:
        if key not in valid:
            raise ConfigError(f"{path}: unknown section '{key}'{closest_hint(key, valid)}; "
                              f"valid sections: {', '.join(sorted(valid))}")
    sections = {name: from_dict(cls, raw.get(name), f"{path}: {name}") for name, cls in _SECTIONS.items()}
    base = path.parent.resolve()
    sections["model"].weights = resolve_path(sections["model"].weights, base, f"{path}: model.weights")
    sections["train"].scales = resolve_path(sections["train"].scales, base, f"{path}: train.scales")
    sections["qat"].scales = resolve_path(sections["qat"].scales, base, f"{path}: qat.scales")
    data = raw.get("data")
    if data is not None and not isinstance(data, str):
        raise ConfigError(f"{path}: 'data' must be the path of a dataset YAML, got {data!r}")
    return Config(**sections, data=resolve_path(data, base, f"{path}: data"), path=str(path))


def load_data_config(path: str | os.PathLike) -> DataConfig:
    """Load a dataset YAML: yoloq's COCO-JSON form (``data/*.yaml``, paths relative to it) or an
    upstream YOLOv6 data YAML (``train``/``val`` image folders or lists, YOLO .txt labels;
    yoloq.data.yolo). A bare name looks in the shipped data YAMLs."""
    path = find_data_config(path)
    raw = read_yaml(path)
    from yoloq.data.yolo import is_yolo_data_yaml, load_yolo_data_config
    if is_yolo_data_yaml(raw):
        return load_yolo_data_config(path, raw)
    dc = from_dict(DataConfig, raw, str(path))
    for key in ("train_files", "val_files"):
        files = getattr(dc, key)
        if files is not None and not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
            raise ConfigError(f"{path}: '{key}' must be a list of image paths relative to the folder, got {files!r}")
    base = path.parent.resolve()
    for key in ("train_images", "train_ann", "val_images", "val_ann", "val_ann_official"):
        setattr(dc, key, resolve_path(getattr(dc, key), base, f"{path}: {key}"))
    dc.path = str(path)
    return dc
