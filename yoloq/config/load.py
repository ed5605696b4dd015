"""Reading experiment configs: paths relative to the file that holds them, ``${YOLOQ_SHARED}``
expanded, shipped configs by bare name, upstream ``.py`` configs. Dataset YAMLs: yoloq.data.load."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from yoloq.config.base import ConfigError, closest_hint, from_dict
from yoloq.config.lookup import expand_path_vars, find_config
from yoloq.config.sections import _SECTIONS, Config
from yoloq.config.upstream import load_upstream_config
from yoloq.config.yaml_text import load_yaml
from yoloq.errors import short_repr


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text (UTF-8) YAML file: {err.reason} at byte {err.start}") from None
    data = load_yaml(text, str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, got {type(data).__name__}")
    return data


def apply_settings(cfg: Config, settings: Sequence[str]) -> Config:
    """``--set section.key=value ...`` (values in YAML syntax, ``1e-3`` a number; ``data=PATH`` the
    dataset YAML) onto ``cfg``
    through ``Config.with_overrides``: an unknown section or key, an empty or bad value, is a
    ConfigError naming it. ``key=null`` sets a value to none where the field allows it."""
    sections: dict[str, dict] = {}
    data = None
    for item in settings:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if sep and section == "data" and not dot and text.strip():      # the dataset YAML (top-level key)
            data = text.strip()
            continue
        if not sep or not dot or not key:
            raise ConfigError(f"--set {short_repr(item)}: expected SECTION.KEY=VALUE (or data=PATH), e.g. "
                              f"train.lr0=0.02")
        if not text.strip():
            raise ConfigError(f"--set {name.strip()}: empty value; give one (null to unset, '' for an empty string)")
        value = load_yaml(text, f"--set {name.strip()}")
        if value is None and text.strip() not in ("null", "~", "Null", "NULL"):
            raise ConfigError(f"--set {name.strip()}: no value in {short_repr(text)}")
        sections.setdefault(section, {})[key.strip()] = value
    return cfg.with_overrides(data=data, **sections)


def resolve_path(value: Optional[str], base_dir: Path, where: str = "config") -> Optional[str]:
    """Resolve a path from a YAML file relative to that file's directory, after expanding
    environment variables (``${YOLOQ_SHARED}``: see yoloq.config.lookup)."""
    if value is None or value == "":
        return value
    p = Path(os.path.expanduser(expand_path_vars(value, where)))
    return str(p if p.is_absolute() else (base_dir / p).resolve())


def load_config(path: str | os.PathLike | Config) -> Config:
    """Load an experiment config: a YAML path, a shipped config's bare name (``yolov6lite_s``), or an
    upstream YOLOv6 ``.py`` model config (read without executing it; yoloq.config.upstream). A Config
    passes through (a command's ``--cfg`` already loaded with its ``--set`` overrides)."""
    if isinstance(path, Config):
        return path
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
        raise ConfigError(f"{path}: 'data' must be the path of a dataset YAML, got {short_repr(data)}")
    return Config(**sections, data=resolve_path(data, base, f"{path}: data"), path=str(path))
