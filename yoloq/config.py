"""YAML configs -> validated dataclasses.

One experiment config (``configs/*.yaml``) has the sections ``model``, ``data``, ``eval``,
``quant``, ``qat`` and ``export``; every section is a small dataclass below. Unknown keys are an
error that names the key and the closest valid one, so a typo never silently falls back to a
default. Relative paths are resolved against the directory of the YAML file that holds them.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the file and key."""


# --------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    name: str = "yolov6lite_s"
    arch: str = "lite"                  # "yolov6" (EfficientRep/CSPBep family) | "lite"
    block: str = "repvgg"               # repvgg | qarepvgg | qarepvggv2 | repopt | hyper_search | conv_silu
    #                                     (repopt: RepOpt target RealVGGBlock; hyper_search: LinearAddBlock)
    depth_multiple: float = 1.0
    width_multiple: float = 1.0
    backbone: str = "EfficientRep"      # EfficientRep | CSPBepBackbone | Lite_EffiBackbone
    neck: str = "RepBiFPANNeck"         # RepBiFPANNeck | CSPRepBiFPANNeck | RepPANNeck (RepOpt) | Lite_EffiNeck
    csp_e: float = 0.5                  # CSPBep expansion (m: 2/3, l: 1/2)
    fuse_p2: bool = True                # backbone also returns C2 (BiFPAN necks); False for RepPANNeck
    cspsppf: bool = True                # CSPSPPF (n/s) instead of SPPF (m/l, RepOpt) after the last stage
    use_dfl: bool = False
    reg_max: int = 0                    # DFL bins - 1: 16 with use_dfl (m/l), 0 without (n/s)
    nc: int = 80
    img_size: int = 640
    weights: Optional[str] = None       # checkpoint path (resolved relative to the YAML file)


@dataclass
class EvalConfig:
    conf_thres: float = 0.03
    iou_thres: float = 0.65
    max_det: int = 300
    batch_size: int = 8
    workers: int = 2
    backend: str = "pycocotools"        # pycocotools | faster-coco-eval
    val_ann: str = "val_ann"            # which annotation key of the data YAML to evaluate on


@dataclass
class QuantConfig:
    calib: str = "max"                  # max | percentile | entropy | mse | auto
    percentile: float = 99.99
    calib_images: int = 256
    batch_size: int = 8
    workers: int = 2
    seed: int = 0
    num_bins: int = 2048
    skip_layers: list = field(default_factory=list)   # layer names kept in floating point
    max_drop: Optional[float] = None    # partial quantization: smallest k whose drop <= this
    fold_qarepvgg_post_bn: bool = True


@dataclass
class QATConfig:
    quantizer: str = "lsqplus"          # pact | lsqplus | fixed
    lsq_mode: str = "symmetric"         # symmetric | offset
    epochs: int = 2
    images: int = 256
    batch_size: int = 8
    lr: float = 1e-4                    # conv weights and biases
    quantizer_lr: float = 1e-3
    weight_scale_lr: Optional[float] = 1e-5   # LSQ weight scales (None = lr): at 1e-4 the depthwise
    #                                     scales of Lite-S collapse to <= 0 within 10 steps
    weight_decay: float = 5e-5
    alpha_decay: float = 1e-4           # L2 on PACT clip values
    distill_weight: float = 1.0         # channel-wise distillation (CWD) on the neck outputs
    temperature: float = 1.0            # CWD softmax temperature
    head_weight: float = 1.0            # head term: class-score KL + confidence-weighted box L1
    optimizer: str = "sgd"              # sgd (momentum, as LSQ) | adam
    momentum: float = 0.9
    init_images: int = 32               # train images for the PACT sign / LSQ+ MSE initialisation
    lsq_init: str = "amax"              # amax: start at the PTQ ranges | mse: MSE search on init_images
    #                                     (Lite-S, 100 val images: amax 23.3 AP at start, mse 8.4)
    max_scale_growth: float = 1000.0    # stop when a learned scale / clip moves more than this factor
    seed: int = 0
    workers: int = 2


@dataclass
class ExportConfig:
    opset: int = 13
    dynamic_batch: bool = False
    simplify: bool = True
    nms: Optional[str] = None           # None | trt | onnx


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Optional[str] = None          # path to a dataset YAML (data/*.yaml)
    eval: EvalConfig = field(default_factory=EvalConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    path: Optional[str] = None          # the YAML this came from (set by load_config)


@dataclass
class DataConfig:
    """A dataset YAML (``data/*.yaml``): COCO-format image folders and annotation files."""
    train_images: str = ""
    train_ann: str = ""
    val_images: str = ""
    val_ann: str = ""
    val_ann_official: Optional[str] = None
    nc: int = 80
    names: list = field(default_factory=list)
    path: Optional[str] = None
    # Explicit image lists, relative to train_images / val_images (set for YOLO-format data, whose
    # splits may be recursive folders or .txt lists); None = every image directly in the folder.
    train_files: Optional[list] = None
    val_files: Optional[list] = None


# --------------------------------------------------------------------------- loading
def _closest(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _check_type(cls_name: str, name: str, value: Any, default: Any, where: str) -> Any:
    """Coerce ints to floats where a float is expected; refuse obviously wrong types."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{name}' must be true/false, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{name}' must be a number, got {value!r}")
        return float(value)
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{name}' must be an integer, got {value!r}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{name}' must be a string, got {value!r}")
    elif isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{name}' must be a list, got {value!r}")
    return value


def from_dict(cls, data: Optional[dict], where: str):
    """Build dataclass ``cls`` from ``data``; unknown keys raise ConfigError naming them."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key '{key}'{_closest(key, fields)}; "
                              f"valid keys: {', '.join(sorted(fields))}")
        kwargs[key] = _check_type(cls.__name__, key, value, getattr(defaults, key), f"{where}")
    return cls(**kwargs)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, got {type(data).__name__}")
    return data


def resolve_path(value: Optional[str], base_dir: Path, where: str = "config") -> Optional[str]:
    """Resolve a path from a YAML file relative to that file's directory, after expanding
    environment variables (``${YOLOQ_SHARED}``: see yoloq.config_lookup)."""
    if value is None or value == "":
        return value
    from .config_lookup import expand_path_vars
    p = Path(os.path.expanduser(expand_path_vars(value, where)))
    return str(p if p.is_absolute() else (base_dir / p).resolve())


_SECTIONS = {"model": ModelConfig, "eval": EvalConfig, "quant": QuantConfig,
             "qat": QATConfig, "export": ExportConfig}


def load_config(path: str | os.PathLike) -> Config:
    """Load an experiment config: a YAML path, a shipped config's bare name (``yolov6lite_s``), or an
    upstream YOLOv6 ``.py`` model config (read without executing it; yoloq.upstream_config)."""
    from .config_lookup import find_config
    path = find_config(path)
    if path.suffix == ".py":
        from .upstream_config import load_upstream_config
        return load_upstream_config(path)
    raw = _read_yaml(path)
    valid = set(_SECTIONS) | {"data"}
    for key in raw:
        if key not in valid:
            raise ConfigError(f"{path}: unknown section '{key}'{_closest(key, valid)}; "
                              f"valid sections: {', '.join(sorted(valid))}")
    cfg = Config(path=str(path))
    for name, cls in _SECTIONS.items():
        setattr(cfg, name, from_dict(cls, raw.get(name), f"{path}: {name}"))
    base = path.parent.resolve()
    cfg.model.weights = resolve_path(cfg.model.weights, base, f"{path}: model.weights")
    data = raw.get("data")
    if data is not None and not isinstance(data, str):
        raise ConfigError(f"{path}: 'data' must be the path of a dataset YAML, got {data!r}")
    cfg.data = resolve_path(data, base, f"{path}: data")
    return cfg


def load_data_config(path: str | os.PathLike) -> DataConfig:
    """Load a dataset YAML: yoloq's COCO-JSON form (``data/*.yaml``, paths relative to it) or an
    upstream YOLOv6 data YAML (``train``/``val`` image folders or lists, YOLO .txt labels;
    yoloq.data.yolo). A bare name looks in the shipped data YAMLs."""
    from .config_lookup import find_data_config
    path = find_data_config(path)
    raw = _read_yaml(path)
    from .data.yolo import is_yolo_data_yaml, load_yolo_data_config
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
