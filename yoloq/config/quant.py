"""The ``quant`` section of an experiment config: one small section per concern.

    quant:
      seed: 0                       # calibration image choice, random weights, reconstruction
      loader:         {batch_size: 8, workers: 2}
      calibration:    {method: auto, images: 256, percentile: 99.99, num_bins: 2048, auto_methods: [...], auto_images: 32}
      transforms:     {equalize: false, channel_scale: all, channel_scale_alpha: 0.9, bias_correction: true, images: 64}
      reconstruction: {method: off, iters: 300, images: null, batch_size: 8, drop_prob: 0.5, reg_weight: 0.01}
      sensitivity:    {metric: fast, mode: quantize-one, images: 8, confirm_top: 5}
      partial:        {skip_layers: [], max_drop: null, max_skip: null, select_images: 128}

The flat keys of earlier configs (``calib``, ``calib_images``, ``channel_scale``, ``recon_iters``,
``sensitivity: fast`` ...) are still read: ``LEGACY_KEYS`` says where each one lives now, and a
dotted key (``calibration.method``, as ``--set`` writes it) names a nested key directly. Giving one
setting twice (old and new name) is an error naming both.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from yoloq.config.base import (AUTO_METHODS, CHANNEL_SCALE_ALPHAS, CalibMethod, ChannelScale, ConfigError,
                               Reconstruct, Section, Sensitivity, SensitivityMode, Switch, parse_method)


@dataclass
class LoaderConfig(Section):
    section = "quant.loader"
    batch_size: int = 8                 # calibration images per batch
    workers: int = 2

    def rules(self) -> None:
        self._require(self.batch_size >= 1, "batch_size", ">= 1")
        self._require(self.workers >= 0, "workers", ">= 0")


@dataclass
class CalibrationConfig(Section):
    section = "quant.calibration"
    method: CalibMethod = "max"         # activation range rule; auto: the one closest to FP32
    percentile: float = 99.99
    images: int = 256                   # train images
    num_bins: int = 2048
    auto_methods: list = field(default_factory=lambda: list(AUTO_METHODS))   # candidates of method: auto
    auto_images: int = 32               # calibration images scoring the auto candidates

    def rules(self) -> None:
        self._require(0.0 < self.percentile <= 100.0, "percentile", "in (0, 100]")
        for key in ("images", "num_bins", "auto_images"):
            self._require(getattr(self, key) >= 1, key, ">= 1")
        self._require(bool(self.auto_methods), "auto_methods", "a non-empty list of methods")
        for method in self.auto_methods:
            try:
                parse_method(method)
            except ConfigError as err:
                raise ConfigError(f"{self.section}.auto_methods: {err}") from None


@dataclass
class TransformsConfig(Section):
    """The PTQ transforms, in this order around prepare / calibrate: equalize -> SE float ->
    channel scaling -> calibrate -> bias correction; ``auto`` decides on calibration images."""
    section = "quant.transforms"
    equalize: Switch = False            # exact cross-layer equalization (data-free)
    channel_scale: ChannelScale = "off"  # per-channel input scaling: depthwise convs only, or all convs
    channel_scale_alpha: Optional[float] = None   # migration strength for dense convs in [0, 1]; null:
    #                                     chosen among channel_scale_alphas on calibration images
    channel_scale_alphas: list = field(default_factory=lambda: list(CHANNEL_SCALE_ALPHAS))   # auto's candidates
    bias_correction: Switch = False     # remove the weight-rounding shift of each conv output (sequential)
    se_float: Switch = False            # squeeze-excite convs (1x1 pooled maps) in float
    images: int = 64                    # calibration images for channel ranges, bias means, auto scoring

    def rules(self) -> None:
        alpha = self.channel_scale_alpha
        self._require(alpha is None or (_is_number(alpha) and 0.0 <= alpha <= 1.0), "channel_scale_alpha",
                      "in [0, 1] or null")
        self._require(bool(self.channel_scale_alphas) and all(_is_number(a) and 0.0 <= a <= 1.0
                                                              for a in self.channel_scale_alphas),
                      "channel_scale_alphas", "a non-empty list of numbers in [0, 1]")
        self._require(self.images >= 1, "images", ">= 1")


@dataclass
class ReconstructionConfig(Section):
    """Block reconstruction after calibration (yoloq.quant.reconstruct; docs/ptq_reconstruction.md)."""
    section = "quant.reconstruction"
    method: Reconstruct = "off"         # adaround (per layer) | brecq (per block) | qdrop (per block + drop)
    iters: int = 300                    # steps per block
    images: Optional[int] = None        # calibration images used (None: all of them)
    batch_size: int = 8                 # images per step
    drop_prob: float = 0.5              # qdrop: chance an activation element skips quantization
    reg_weight: float = 0.01            # lambda: weight of the AdaRound rounding regularizer
    device: Optional[str] = None        # null: the run's device (yoloq.device names: auto, cpu, cuda, cuda:N)

    def rules(self) -> None:
        self._require(self.iters >= 1, "iters", ">= 1")
        self._require(self.batch_size >= 1, "batch_size", ">= 1")
        self._require(self.images is None or (isinstance(self.images, int) and self.images >= 1),
                      "images", ">= 1 or null (all)")
        self._require(0.0 <= self.drop_prob < 1.0, "drop_prob", "in [0, 1)")
        self._require(self.reg_weight >= 0, "reg_weight", ">= 0")
        self._require(self.device is None or _is_device_name(self.device), "device",
                      "null (the run's device) or one of auto, cpu, cuda, cuda:N")


@dataclass
class SensitivityConfig(Section):
    section = "quant.sensitivity"
    metric: Sensitivity = "fast"        # fast: output SQNR per layer; map: + confirm top layers by mAP
    mode: SensitivityMode = "quantize-one"
    images: int = 8                     # calibration images scored per layer (vs 32: Spearman 0.99 on Lite-S);
    #                                     one forward per layer and image: a fixed cost, proportionate at 640
    confirm_top: int = 5                # layers confirmed with mAP when metric == "map"

    def rules(self) -> None:
        self._require(self.images >= 1, "images", ">= 1")
        self._require(self.confirm_top >= 1, "confirm_top", ">= 1")


@dataclass
class PartialConfig(Section):
    """Which layers stay in float: named ones, and the fewest most sensitive ones meeting max_drop."""
    section = "quant.partial"
    skip_layers: list = field(default_factory=list)   # layer names kept in floating point
    max_drop: Optional[float] = None    # fewest float layers whose AP drop on labeled train images <= this
    max_skip: Optional[int] = None      # ... but never more than this many
    select_images: int = 128            # labeled train images measured by max_drop / sensitivity map

    def rules(self) -> None:
        self._require(all(isinstance(s, str) for s in self.skip_layers), "skip_layers", "a list of layer names")
        self._require(self.max_drop is None or self.max_drop >= 0, "max_drop", ">= 0 (mAP points) or null")
        self._require(self.max_skip is None or self.max_skip >= 0, "max_skip", ">= 0 or null")
        self._require(self.select_images >= 1, "select_images", ">= 1")


# flat key of earlier configs -> where it lives now
LEGACY_KEYS = {
    "batch_size": "loader.batch_size", "workers": "loader.workers",
    "calib": "calibration.method", "percentile": "calibration.percentile", "calib_images": "calibration.images",
    "num_bins": "calibration.num_bins", "auto_methods": "calibration.auto_methods",
    "auto_images": "calibration.auto_images",
    "equalize": "transforms.equalize", "channel_scale": "transforms.channel_scale",
    "channel_scale_alpha": "transforms.channel_scale_alpha", "channel_scale_alphas": "transforms.channel_scale_alphas",
    "bias_correction": "transforms.bias_correction", "se_float": "transforms.se_float",
    "transform_images": "transforms.images",
    "reconstruct": "reconstruction.method", "recon_iters": "reconstruction.iters",
    "recon_images": "reconstruction.images", "recon_batch_size": "reconstruction.batch_size",
    "recon_drop_prob": "reconstruction.drop_prob", "recon_lambda": "reconstruction.reg_weight",
    "recon_device": "reconstruction.device",
    "sensitivity": "sensitivity.metric", "sensitivity_mode": "sensitivity.mode",
    "sensitivity_images": "sensitivity.images", "confirm_top": "sensitivity.confirm_top",
    "skip_layers": "partial.skip_layers", "max_drop": "partial.max_drop", "max_skip": "partial.max_skip",
    "select_images": "partial.select_images",
}


@dataclass
class QuantConfig(Section):
    section = "quant"
    legacy_keys = LEGACY_KEYS
    seed: int = 0
    fold_qarepvgg_post_bn: bool = True  # fold BNs surviving fuse() (QARepVGG, RepOpt) before quantizing
    diagnose: bool = True               # per-layer range / SQNR diagnosis in the report
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    transforms: TransformsConfig = field(default_factory=TransformsConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    partial: PartialConfig = field(default_factory=PartialConfig)

    @classmethod
    def of(cls, **keys) -> "QuantConfig":
        """A config from keyword settings, flat (``calib="max"``), dotted (``**{"calibration.method":
        "max"}``) or section dicts (``calibration={"method": "max"}``): what the Python API takes."""
        from yoloq.config.base import from_dict
        return from_dict(cls, keys, "quant")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_device_name(name) -> bool:
    """A name ``yoloq.device.resolve_device`` reads (whether the hardware is there is checked when the
    run starts, not when the config is read)."""
    return isinstance(name, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", name.strip().lower()) is not None
