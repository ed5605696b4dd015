"""YAML configs -> validated dataclasses.

One experiment config (``configs/*.yaml``) has the sections ``model``, ``data``, ``eval``,
``quant``, ``qat`` and ``export``; every section is a small dataclass below that checks itself
when it is made (``__post_init__``): a ``Literal`` annotation lists the allowed values, the
numeric rules sit next to the fields. Unknown keys are an error that names the key and the closest
valid one, so a typo never silently falls back to a default. Relative paths are resolved against
the directory of the YAML file that holds them. Command-line flags change a config only through
``Config.with_overrides``, which validates again.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from yoloq.errors import YoloqError

Arch = Literal["yolov6", "lite"]
Block = Literal["repvgg", "qarepvgg", "qarepvggv2", "repopt", "hyper_search", "conv_silu"]
Backbone = Literal["EfficientRep", "CSPBepBackbone", "Lite_EffiBackbone"]
Neck = Literal["RepBiFPANNeck", "CSPRepBiFPANNeck", "RepPANNeck", "Lite_EffiNeck"]
CalibMethod = Literal["max", "percentile", "entropy", "mse", "auto"]
Sensitivity = Literal["off", "fast", "map"]
SensitivityMode = Literal["quantize-one", "skip-one"]
QATQuantizer = Literal["pact", "lsqplus", "fixed"]
LSQMode = Literal["symmetric", "offset"]
Optimizer = Literal["sgd", "adam"]
LSQInit = Literal["amax", "mse"]
Backend = Literal["pycocotools", "faster-coco-eval"]
AnnKey = Literal["val_ann", "val_ann_official"]
NMSKind = Literal["trt", "onnx"]
Reconstruct = Literal["off", "adaround", "brecq", "qdrop"]      # yoloq.quant.reconstruct
ReconDevice = Literal["auto", "cpu", "cuda"]

CALIB_METHODS = ("max", "percentile", "entropy", "mse")         # one range rule each
AUTO_METHODS = ("max", "percentile-99.99", "percentile-99.999", "entropy", "mse")
RECON_METHODS = tuple(m for m in typing.get_args(Reconstruct) if m != "off")
# img_size must be a multiple of this: the stride of the coarsest level both families concatenate
# with an upsampled one (Lite's extra stride-64 level rounds up, so 32 suffices there too)
IMG_SIZE_MULTIPLE = 32


class ConfigError(YoloqError, ValueError):
    """A config file or value is invalid; the message names the file and key."""


def parse_method(method: str, percentile: float = 99.99) -> tuple[str, float]:
    """'max' | 'percentile' | 'percentile-99.999' | 'entropy' | 'mse' -> (kind, percentile)."""
    m = re.fullmatch(r"percentile(?:-(\d+(?:\.\d+)?))?", str(method))
    if m:
        return "percentile", float(m.group(1)) if m.group(1) else float(percentile)
    if method not in CALIB_METHODS:
        hint = " ('auto' needs the FP32 model: use calibrate_auto)" if method == "auto" else ""
        raise ConfigError(f"unknown calibration method '{method}'{hint}; expected one of "
                          f"{', '.join(CALIB_METHODS)} or 'percentile-<p>' (e.g. percentile-99.999)")
    return method, float(percentile)


def choices(alias) -> tuple:
    """The allowed values of a ``Literal`` alias above (for argparse ``choices``)."""
    return typing.get_args(alias)


# --------------------------------------------------------------------------- self-checking sections


class Section:
    """Mixin: ``__post_init__`` checks every ``Literal`` field, then the class's own ``rules()``."""

    section = "?"

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            choices = _literal_choices(hints.get(f.name))
            value = getattr(self, f.name)
            if choices and value not in choices and not (value is None and _is_optional(hints.get(f.name))):
                hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
                raise ConfigError(f"{self.section}.{f.name}: '{value}' is not one of {', '.join(map(str, choices))}"
                                  + (f" (did you mean '{hint[0]}'?)" if hint else ""))
        self.rules()

    def rules(self) -> None:
        """Numeric ranges and cross-field rules (subclasses)."""

    def _require(self, ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{self.section}.{key} must be {rule}, got {getattr(self, key)!r}")


def _literal_choices(hint) -> tuple:
    for arg in (typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return ()


def _is_optional(hint) -> bool:
    return typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)


@dataclass
class ModelConfig(Section):
    section = "model"
    name: str = "yolov6lite_s"
    arch: Arch = "lite"
    block: Block = "repvgg"             # repopt: RepOpt target RealVGGBlock; hyper_search: LinearAddBlock
    depth_multiple: float = 1.0
    width_multiple: float = 1.0
    backbone: Backbone = "EfficientRep"
    neck: Neck = "RepBiFPANNeck"
    csp_e: float = 0.5                  # CSPBep expansion (m: 2/3, l: 1/2)
    fuse_p2: bool = True                # backbone also returns C2 (BiFPAN necks); False for RepPANNeck
    cspsppf: bool = True                # CSPSPPF (n/s) instead of SPPF (m/l, RepOpt) after the last stage
    use_dfl: bool = False
    reg_max: int = 0                    # DFL bins - 1: 16 with use_dfl (m/l), 0 without (n/s)
    nc: int = 80
    img_size: int = 640
    weights: Optional[str] = None       # checkpoint path (resolved relative to the YAML file)

    def rules(self) -> None:
        for key in ("depth_multiple", "width_multiple", "csp_e"):
            self._require(getattr(self, key) > 0, key, "> 0")
        self._require(self.reg_max >= 0, "reg_max", ">= 0")
        self._require(self.nc >= 1, "nc", ">= 1")
        self._require(self.img_size > 0 and self.img_size % IMG_SIZE_MULTIPLE == 0, "img_size",
                      f"a positive multiple of {IMG_SIZE_MULTIPLE} (the model's stride-32 level)")


@dataclass
class EvalConfig(Section):
    section = "eval"
    conf_thres: float = 0.03
    iou_thres: float = 0.65
    max_det: int = 300
    batch_size: int = 8
    workers: int = 2
    backend: Backend = "pycocotools"
    val_ann: AnnKey = "val_ann"         # which annotation key of the data YAML to evaluate on

    def rules(self) -> None:
        self._require(0.0 <= self.conf_thres <= 1.0, "conf_thres", "in [0, 1]")
        self._require(0.0 < self.iou_thres <= 1.0, "iou_thres", "in (0, 1]")
        for key in ("max_det", "batch_size"):
            self._require(getattr(self, key) >= 1, key, ">= 1")
        self._require(self.workers >= 0, "workers", ">= 0")


@dataclass
class QuantConfig(Section):
    section = "quant"
    calib: CalibMethod = "max"
    percentile: float = 99.99
    calib_images: int = 256
    batch_size: int = 8
    workers: int = 2
    seed: int = 0
    num_bins: int = 2048
    skip_layers: list = field(default_factory=list)   # layer names kept in floating point
    max_drop: Optional[float] = None    # partial quantization: fewest float layers whose drop <= this
    max_skip: Optional[int] = None      # ... but never more than this many
    fold_qarepvgg_post_bn: bool = True
    auto_methods: list = field(default_factory=lambda: list(AUTO_METHODS))   # candidates of calib: auto
    auto_images: int = 32               # calibration images scoring the auto candidates
    sensitivity: Sensitivity = "fast"   # fast: output SQNR per layer; map: + confirm top layers by mAP
    sensitivity_mode: SensitivityMode = "quantize-one"
    sensitivity_images: int = 16        # calibration images scored per layer (Lite-S 8 vs 32: Spearman 0.99)
    confirm_top: int = 5                # layers confirmed with mAP when sensitivity == "map"
    select_images: int = 128            # labeled train images measured by max_drop / sensitivity map
    diagnose: bool = True               # per-layer range / SQNR diagnosis in the report
    # block reconstruction after calibration (yoloq.quant.reconstruct; docs/ptq_reconstruction.md)
    reconstruct: Reconstruct = "off"    # adaround (per layer) | brecq (per block) | qdrop (per block + drop)
    recon_iters: int = 300              # steps per block (Lite-S qdrop: ~15 min on 2 quiet CPU cores)
    recon_images: Optional[int] = None  # calibration images used (None: all of them)
    recon_batch_size: int = 8           # images per step
    recon_drop_prob: float = 0.5        # qdrop: chance an activation element skips quantization
    recon_lambda: float = 0.01          # weight of the AdaRound rounding regularizer
    recon_device: ReconDevice = "auto"  # auto: cuda when available

    def rules(self) -> None:
        self._require(0.0 < self.percentile <= 100.0, "percentile", "in (0, 100]")
        for key in ("calib_images", "batch_size", "num_bins", "auto_images", "sensitivity_images",
                    "confirm_top", "select_images"):
            self._require(getattr(self, key) >= 1, key, ">= 1")
        self._require(self.workers >= 0, "workers", ">= 0")
        for key in ("recon_iters", "recon_batch_size"):
            self._require(getattr(self, key) >= 1, key, ">= 1")
        self._require(self.recon_images is None or (isinstance(self.recon_images, int) and self.recon_images >= 1), "recon_images", ">= 1 or null (all)")
        self._require(0.0 <= self.recon_drop_prob < 1.0, "recon_drop_prob", "in [0, 1)")
        self._require(self.recon_lambda >= 0, "recon_lambda", ">= 0")
        self._require(self.max_drop is None or self.max_drop >= 0, "max_drop", ">= 0 (mAP points) or null")
        self._require(self.max_skip is None or self.max_skip >= 0, "max_skip", ">= 0 or null")
        self._require(all(isinstance(s, str) for s in self.skip_layers), "skip_layers", "a list of layer names")
        self._require(bool(self.auto_methods), "auto_methods", "a non-empty list of methods")
        for method in self.auto_methods:
            try:
                parse_method(method)
            except ConfigError as err:
                raise ConfigError(f"quant.auto_methods: {err}") from None


@dataclass
class QATConfig(Section):
    section = "qat"
    quantizer: QATQuantizer = "lsqplus"
    lsq_mode: LSQMode = "symmetric"
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
    optimizer: Optimizer = "sgd"        # sgd (momentum, as LSQ) | adam
    momentum: float = 0.9
    init_images: int = 32               # train images for the PACT sign / LSQ+ MSE initialisation
    lsq_init: LSQInit = "amax"          # amax: start at the PTQ ranges | mse: MSE search on init_images
    #                                     (Lite-S, 100 val images: amax 23.3 AP at start, mse 8.4)
    max_scale_growth: float = 1000.0    # stop when a learned scale / clip moves more than this factor
    max_loss_growth: float = 100.0      # stop when the loss grows past this x its first steps' mean
    collapse_ratio: float = 0.1         # stop when an epoch's val AP falls below this x the PTQ AP (0: off)
    seed: int = 0
    workers: int = 2

    def rules(self) -> None:
        for key in ("epochs", "images", "batch_size", "init_images"):
            self._require(getattr(self, key) >= 1, key, ">= 1")
        for key in ("lr", "quantizer_lr", "temperature"):
            self._require(getattr(self, key) > 0, key, "> 0")
        self._require(self.weight_scale_lr is None or self.weight_scale_lr > 0, "weight_scale_lr", "> 0 (or null = lr)")
        for key in ("weight_decay", "alpha_decay", "distill_weight", "head_weight"):
            self._require(getattr(self, key) >= 0, key, ">= 0")
        self._require(0.0 <= self.momentum < 1.0, "momentum", "in [0, 1)")
        self._require(self.max_scale_growth > 1.0, "max_scale_growth", "> 1")
        self._require(self.max_loss_growth > 1.0, "max_loss_growth", "> 1")
        self._require(0.0 <= self.collapse_ratio < 1.0, "collapse_ratio", "in [0, 1)")
        self._require(self.workers >= 0, "workers", ">= 0")


@dataclass
class ExportConfig(Section):
    section = "export"
    opset: int = 13
    dynamic_batch: bool = False
    simplify: bool = True
    nms: Optional[NMSKind] = None

    def rules(self) -> None:
        self._require(self.opset >= 13, "opset", ">= 13 (per-channel QuantizeLinear)")


_SECTIONS = {"model": ModelConfig, "eval": EvalConfig, "quant": QuantConfig, "qat": QATConfig,
             "export": ExportConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Optional[str] = None          # path to a dataset YAML (data/*.yaml)
    eval: EvalConfig = field(default_factory=EvalConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    path: Optional[str] = None          # the YAML this came from (set by load_config)

    def with_overrides(self, data: Optional[str] = None, **sections: Optional[dict]) -> "Config":
        """A copy with ``section={key: value}`` changes applied (``None`` values are skipped, so
        unset command-line flags change nothing), validated as if read from the file."""
        where = f"{self.path or 'config'} (with command-line overrides)"
        changes: dict[str, Any] = {}
        for name, values in sections.items():
            if name not in _SECTIONS:
                raise ConfigError(f"unknown config section '{name}'{_closest(name, _SECTIONS)}")
            values = {k: v for k, v in (values or {}).items() if v is not None}
            if values:
                merged = {**dataclasses.asdict(getattr(self, name)), **values}
                changes[name] = from_dict(_SECTIONS[name], merged, where)
        if data is not None:
            changes["data"] = str(data)
        return dataclasses.replace(self, **changes)


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

    def __post_init__(self):
        if self.nc < 1:
            raise ConfigError(f"nc must be >= 1, got {self.nc}")


# --------------------------------------------------------------------------- loading


def _closest(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _check_type(name: str, value: Any, default: Any, where: str) -> Any:
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
    """Build dataclass ``cls`` from ``data``; unknown keys and invalid values raise ConfigError
    naming ``where`` and the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in fields.values()}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key '{key}'{_closest(key, fields)}; "
                              f"valid keys: {', '.join(sorted(fields))}")
        kwargs[key] = _check_type(key, value, defaults[key], where)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _read_yaml(path: Path) -> dict:
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
    environment variables (``${YOLOQ_SHARED}``: see yoloq.config_lookup)."""
    if value is None or value == "":
        return value
    from yoloq.config_lookup import expand_path_vars
    p = Path(os.path.expanduser(expand_path_vars(value, where)))
    return str(p if p.is_absolute() else (base_dir / p).resolve())


def load_config(path: str | os.PathLike) -> Config:
    """Load an experiment config: a YAML path, a shipped config's bare name (``yolov6lite_s``), or an
    upstream YOLOv6 ``.py`` model config (read without executing it; yoloq.upstream_config)."""
    from yoloq.config_lookup import find_config
    path = find_config(path)
    if path.suffix == ".py":
        from yoloq.upstream_config import load_upstream_config
        return load_upstream_config(path)
    raw = _read_yaml(path)
    valid = set(_SECTIONS) | {"data"}
    for key in raw:
        if key not in valid:
            raise ConfigError(f"{path}: unknown section '{key}'{_closest(key, valid)}; "
                              f"valid sections: {', '.join(sorted(valid))}")
    sections = {name: from_dict(cls, raw.get(name), f"{path}: {name}") for name, cls in _SECTIONS.items()}
    base = path.parent.resolve()
    sections["model"].weights = resolve_path(sections["model"].weights, base, f"{path}: model.weights")
    data = raw.get("data")
    if data is not None and not isinstance(data, str):
        raise ConfigError(f"{path}: 'data' must be the path of a dataset YAML, got {data!r}")
    return Config(**sections, data=resolve_path(data, base, f"{path}: data"), path=str(path))


def load_data_config(path: str | os.PathLike) -> DataConfig:
    """Load a dataset YAML: yoloq's COCO-JSON form (``data/*.yaml``, paths relative to it) or an
    upstream YOLOv6 data YAML (``train``/``val`` image folders or lists, YOLO .txt labels;
    yoloq.data.yolo). A bare name looks in the shipped data YAMLs."""
    from yoloq.config_lookup import find_data_config
    path = find_data_config(path)
    raw = _read_yaml(path)
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
