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


# ---- training (yoloq.train): defaults are YOLOv6 v3's (solver, data_aug, head loss of its configs)
@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int = 16                # per process
    nominal_batch_size: int = 64        # gradients accumulate to this many images per optimizer step
    workers: int = 4
    seed: int = 0
    lr0: float = 0.01
    lrf: float = 0.01                   # cosine from lr0 down to lr0 * lrf
    momentum: float = 0.937             # SGD, Nesterov
    weight_decay: float = 5e-4
    weight_decay_mode: str = "plain"    # plain | custom_l2 (RepVGG paper's L2 on the equivalent kernel)
    warmup_epochs: float = 3.0
    warmup_min_steps: int = 1000        # optimizer steps
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    max_grad_norm: Optional[float] = 10.0   # null: no clipping (needed for exact RepOpt equivalence)
    ema_decay: float = 0.9999
    ema_tau: float = 2000.0             # EMA decay ramps up as decay * (1 - exp(-updates / tau))
    amp: bool = True                    # mixed precision on CUDA (ignored on CPU)
    bn_momentum: Optional[float] = None # null: the model's (upstream 0.03); short runs need faster BN statistics
    eval_interval: int = 1              # COCO evaluation every N epochs (and after the last)
    eval_split: str = "val"             # val | train (overfit checks: the training images themselves)
    train_images: Optional[int] = None  # use only the first N labelled train images (by image id)
    scales: Optional[str] = None        # RepOpt: scales file of the hyper-search model (resolved like weights)


@dataclass
class LossConfig:
    iou_type: str = "giou"              # giou | siou (YOLOv6-N uses siou)
    cls_weight: float = 1.0
    iou_weight: float = 2.5
    dfl_weight: float = 0.5
    vfl_alpha: float = 0.75
    vfl_gamma: float = 2.0
    atss_warmup_epochs: int = 4         # ATSS assignment for the first epochs, then task-aligned
    atss_topk: int = 9
    atss_cell_size: float = 5.0         # ATSS anchor box side in strides
    tal_topk: int = 13
    tal_alpha: float = 1.0
    tal_beta: float = 6.0


@dataclass
class AugmentConfig:
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.5
    shear: float = 0.0
    fliplr: float = 0.5
    mosaic: float = 1.0                 # probability
    mixup: float = 0.0                  # probability (after mosaic)
    close_mosaic_epochs: int = 15       # the last N epochs without mosaic / mixup


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
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
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


def resolve_path(value: Optional[str], base_dir: Path) -> Optional[str]:
    """Resolve a path from a YAML file relative to that file's directory."""
    if value is None or value == "":
        return value
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else (base_dir / p).resolve())


_SECTIONS = {"model": ModelConfig, "eval": EvalConfig, "quant": QuantConfig,
             "qat": QATConfig, "export": ExportConfig,
             "train": TrainConfig, "loss": LossConfig, "augment": AugmentConfig}


def load_config(path: str | os.PathLike) -> Config:
    """Load an experiment config YAML (``configs/*.yaml``)."""
    path = Path(path)
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
    cfg.model.weights = resolve_path(cfg.model.weights, base)
    cfg.train.scales = resolve_path(cfg.train.scales, base)
    data = raw.get("data")
    if data is not None and not isinstance(data, str):
        raise ConfigError(f"{path}: 'data' must be the path of a dataset YAML, got {data!r}")
    cfg.data = resolve_path(data, base)
    return cfg


def load_data_config(path: str | os.PathLike) -> DataConfig:
    """Load a dataset YAML (``data/*.yaml``); paths are resolved relative to it."""
    path = Path(path)
    dc = from_dict(DataConfig, _read_yaml(path), str(path))
    base = path.parent.resolve()
    for key in ("train_images", "train_ann", "val_images", "val_ann", "val_ann_official"):
        setattr(dc, key, resolve_path(getattr(dc, key), base))
    dc.path = str(path)
    return dc
