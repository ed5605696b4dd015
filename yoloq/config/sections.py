"""The sections of an experiment config, each a dataclass that checks itself when it is made, and
``Config`` (all sections; ``with_overrides`` is the one way command-line flags change it). The
``quant`` section, itself made of sections, is ``yoloq.config.quant``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from yoloq.config.base import (default_workers, IMG_SIZE_MULTIPLE, AnnKey, Arch, Backbone, Backend, Block, ConfigError, EvalSplit,
                               IouType, LSQInit, LSQMode, Neck, NMSKind, Optimizer, QATLoss, QATQuantizer, Section,
                               WeightDecayMode, closest_hint, from_dict, merge_settings, nest_keys)
from yoloq.config.quant import QuantConfig


MAX_MULTIPLE = 4.0          # depth / width multiple
MAX_REG_MAX = 64            # DFL bins - 1
MAX_CLASSES = 100_000
MAX_IMG_SIZE = 8192


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
        # the name becomes part of file names (runs/ptq/<name>_<calib>, runs/eval/<name>.json): one plain component
        name = self.name
        self._require(isinstance(name, str) and 0 < len(name) <= 120 and "/" not in name and "\\" not in name
                      and not name.startswith(".") and all(ord(c) >= 32 for c in name), "name",
                      "a plain name (no '/', not starting with '.', at most 120 characters), e.g. yolov6lite_s")
        # upper bounds keep a typo or a hostile file from building a model that fills the memory
        # (upstream's largest: depth 1.33, width 1.5, reg_max 16, 1280 px)
        for key in ("depth_multiple", "width_multiple"):
            self._require(0 < getattr(self, key) <= MAX_MULTIPLE, key, f"in (0, {MAX_MULTIPLE:g}]")
        self._require(0 < self.csp_e <= 1, "csp_e", "in (0, 1]")
        self._require(0 <= self.reg_max <= MAX_REG_MAX, "reg_max", f"in [0, {MAX_REG_MAX}]")
        self._require(1 <= self.nc <= MAX_CLASSES, "nc", f"in [1, {MAX_CLASSES}]")
        self._require(0 < self.img_size <= MAX_IMG_SIZE and self.img_size % IMG_SIZE_MULTIPLE == 0, "img_size",
                      f"a positive multiple of {IMG_SIZE_MULTIPLE} (the model's stride-32 level) <= {MAX_IMG_SIZE}")


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
    bootstrap: int = 1000               # resamples of the paired bootstrap interval of a drop (0: none)

    def rules(self) -> None:
        self._require(0.0 <= self.conf_thres <= 1.0, "conf_thres", "in [0, 1]")
        self._require(isinstance(self.bootstrap, int) and not isinstance(self.bootstrap, bool)
                      and self.bootstrap >= 0, "bootstrap", "an integer >= 0 (resamples; 0: no interval)")
        self._require(0.0 < self.iou_thres <= 1.0, "iou_thres", "in (0, 1]")
        for key in ("max_det", "batch_size"):
            self._require(getattr(self, key) >= 1, key, ">= 1")
        self._require(self.workers >= 0, "workers", ">= 0")


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
    weight_scale_lr: Optional[float] = 1e-5   # LSQ weight scales (None = lr): near-dead depthwise
    #                                     channels have tiny scales that lr would drive below zero
    #                                     (measured: docs/results.md, QAT learning-rate notes)
    weight_decay: float = 5e-5
    alpha_decay: float = 1e-4           # L2 on PACT clip values
    distill_weight: float = 1.0         # channel-wise distillation (CWD) on the neck outputs
    temperature: float = 1.0            # CWD softmax temperature
    head_weight: float = 1.0            # head term: class-score KL + confidence-weighted box L1
    optimizer: Optimizer = "sgd"        # sgd (momentum, as LSQ) | adam
    momentum: float = 0.9
    init_images: int = 32               # train images for the PACT sign / LSQ+ MSE initialisation
    lsq_init: LSQInit = "amax"          # amax: start at the PTQ ranges | mse: MSE search on init_images
    #                                     (mse starts far below PTQ: docs/results.md, QAT)
    max_scale_growth: float = 1000.0    # stop when a learned scale / clip moves more than this factor
    loss: QATLoss = "distill"           # det+distill: + the YOLOv6 loss on labelled train images
    det_weight: float = 1.0             # weight of the detection loss in det+distill
    augment: bool = False               # augmented views (train.augment settings) instead of letterboxed images
    scales: Optional[str] = None        # RepOpt models: the hyper-search scales file (QAT uses the RepOptimizer)
    max_loss_growth: float = 100.0      # stop when the loss grows past this x its first steps' mean
    collapse_ratio: float = 0.1         # stop when an epoch's val AP falls below this x the PTQ AP (0: off)
    seed: int = 0
    workers: int = field(default_factory=lambda: default_workers(2))   # DataLoader processes (this machine's cores - 1, at most 2)

    def rules(self) -> None:
        for key in ("epochs", "images", "batch_size", "init_images"):
            self._require(getattr(self, key) >= 1, key, ">= 1")
        for key in ("lr", "quantizer_lr", "temperature"):
            self._require(getattr(self, key) > 0, key, "> 0")
        self._require(self.weight_scale_lr is None or self.weight_scale_lr > 0, "weight_scale_lr", "> 0 (or null = lr)")
        for key in ("weight_decay", "alpha_decay", "distill_weight", "head_weight", "det_weight"):
            self._require(getattr(self, key) >= 0, key, ">= 0")
        self._require(0.0 <= self.momentum < 1.0, "momentum", "in [0, 1)")
        self._require(self.max_scale_growth > 1.0, "max_scale_growth", "> 1")
        self._require(self.max_loss_growth > 1.0, "max_loss_growth", "> 1")
        self._require(0.0 <= self.collapse_ratio < 1.0, "collapse_ratio", "in [0, 1)")
        self._require(self.workers >= 0, "workers", ">= 0")


# ---- training (yoloq.train): defaults are YOLOv6 v3's (solver, data_aug, head loss of its configs)
@dataclass
class TrainConfig(Section):
    section = "train"
    epochs: int = 300
    batch_size: int = 16                # per process
    nominal_batch_size: int = 64        # gradients accumulate to this many images per optimizer step
    workers: int = field(default_factory=lambda: default_workers(4))   # DataLoader processes (this machine's cores - 1, at most 4)
    seed: int = 0
    lr0: float = 0.01
    lrf: float = 0.01                   # cosine from lr0 down to lr0 * lrf
    momentum: float = 0.937             # SGD, Nesterov
    weight_decay: float = 5e-4
    weight_decay_mode: WeightDecayMode = "plain"   # custom_l2: RepVGG paper's L2 on the equivalent kernel
    warmup_epochs: float = 3.0
    warmup_min_steps: int = 1000        # optimizer steps
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    max_grad_norm: Optional[float] = 10.0   # null: no clipping (needed for exact RepOpt equivalence)
    ema_decay: float = 0.9999
    ema_tau: float = 2000.0             # EMA decay ramps up as decay * (1 - exp(-updates / tau))
    amp: bool = True                    # mixed precision on CUDA (ignored on CPU)
    bn_momentum: Optional[float] = None # null: the model's (upstream 0.03); short runs need faster BN statistics
    eval_interval: int = 1              # COCO evaluation every N epochs and after the last (0: never)
    eval_split: EvalSplit = "val"       # train: overfit checks on the training images themselves
    train_images: Optional[int] = None  # use only the first N labelled train images (by image id)
    scales: Optional[str] = None        # RepOpt: scales file of the hyper-search model (resolved like weights)

    def rules(self) -> None:
        for key in ("epochs", "batch_size", "nominal_batch_size"):
            self._require(getattr(self, key) >= 1, key, ">= 1")
        for key in ("eval_interval", "workers", "warmup_epochs", "warmup_min_steps", "weight_decay", "warmup_bias_lr"):
            self._require(getattr(self, key) >= 0, key, ">= 0")
        self._require(self.lr0 > 0, "lr0", "> 0")
        self._require(0 < self.lrf <= 1, "lrf", "in (0, 1]")
        for key in ("momentum", "warmup_momentum", "ema_decay"):
            self._require(0 <= getattr(self, key) < 1, key, "in [0, 1)")
        self._require(self.ema_tau > 0, "ema_tau", "> 0")
        self._require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "> 0 or null")
        self._require(self.bn_momentum is None or 0 < self.bn_momentum <= 1, "bn_momentum", "in (0, 1] or null")
        self._require(self.train_images is None or self.train_images >= 1, "train_images", ">= 1 or null")


@dataclass
class LossConfig(Section):
    section = "loss"
    iou_type: IouType = "giou"          # siou for YOLOv6-N
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

    def rules(self) -> None:
        for key in ("cls_weight", "iou_weight", "dfl_weight", "vfl_gamma", "atss_warmup_epochs", "tal_alpha",
                    "tal_beta"):
            self._require(getattr(self, key) >= 0, key, ">= 0")
        self._require(0 <= self.vfl_alpha <= 1, "vfl_alpha", "in [0, 1]")
        for key in ("atss_topk", "tal_topk"):
            self._require(getattr(self, key) >= 1, key, ">= 1")
        self._require(self.atss_cell_size > 0, "atss_cell_size", "> 0")


@dataclass
class AugmentConfig(Section):
    section = "augment"
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

    def rules(self) -> None:
        for key in ("hsv_h", "hsv_s", "hsv_v", "degrees", "shear", "close_mosaic_epochs"):
            self._require(getattr(self, key) >= 0, key, ">= 0")
        for key in ("translate", "scale"):
            self._require(0 <= getattr(self, key) < 1, key, "in [0, 1)")
        for key in ("fliplr", "mosaic", "mixup"):
            self._require(0 <= getattr(self, key) <= 1, key, "a probability in [0, 1]")


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
             "export": ExportConfig, "train": TrainConfig, "loss": LossConfig, "augment": AugmentConfig}


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

    def __str__(self) -> str:                   # messages name a config by its file
        return str(self.path or "config")

    def with_overrides(self, data: Optional[str] = None, **sections: Optional[dict]) -> "Config":
        """A copy with ``section={key: value}`` changes applied (``None`` values are skipped, so
        unset command-line flags change nothing), validated as if read from the file."""
        where = f"{self.path or 'config'} (with command-line overrides)"
        changes: dict[str, Any] = {}
        for name, values in sections.items():
            if name not in _SECTIONS:
                raise ConfigError(f"unknown config section '{name}'{closest_hint(name, _SECTIONS)}")
            values = {k: v for k, v in (values or {}).items() if v is not None}
            if values:
                cls = _SECTIONS[name]
                merged = merge_settings(dataclasses.asdict(getattr(self, name)), nest_keys(cls, values, where))
                changes[name] = from_dict(cls, merged, where)
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
