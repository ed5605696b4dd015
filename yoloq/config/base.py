"""The pieces every config section is made of: allowed values (``Literal`` aliases), the
self-checking ``Section`` base, ``from_dict`` (unknown keys and wrong types are errors naming the
key and the closest valid one) and the calibration method names."""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from typing import Any, Literal, Optional

from yoloq.errors import YoloqError, short_repr

__all__ = ["AUTO_METHODS", "AnnKey", "Arch", "Backbone", "Backend", "Block", "CALIB_METHODS", "CHANNEL_SCALE_ALPHAS",
           "CalibMethod", "ChannelScale", "ConfigError", "EvalSplit", "IMG_SIZE_MULTIPLE", "IouType", "LSQInit",
           "LSQMode", "NMSKind", "Neck", "Optimizer", "QATLoss", "QATQuantizer", "RECON_METHODS", "ReconDevice",
           "Reconstruct", "Section", "Sensitivity", "SensitivityMode", "Switch", "WeightDecayMode", "choices",
           "from_dict", "parse_method"]

Arch = Literal["yolov6", "lite"]
Block = Literal["repvgg", "qarepvgg", "qarepvggv2", "repopt", "hyper_search", "conv_silu"]
Backbone = Literal["EfficientRep", "CSPBepBackbone", "Lite_EffiBackbone"]
Neck = Literal["RepBiFPANNeck", "CSPRepBiFPANNeck", "RepPANNeck", "Lite_EffiNeck"]
CalibMethod = Literal["max", "percentile", "entropy", "mse", "auto"]
Sensitivity = Literal["off", "fast", "map"]
SensitivityMode = Literal["quantize-one", "skip-one"]
QATQuantizer = Literal["pact", "lsqplus", "fixed"]
QATLoss = Literal["distill", "det+distill"]
LSQMode = Literal["symmetric", "offset"]
Optimizer = Literal["sgd", "adam"]
LSQInit = Literal["amax", "mse"]
Backend = Literal["pycocotools", "faster-coco-eval"]
AnnKey = Literal["val_ann", "val_ann_official"]
NMSKind = Literal["trt", "onnx"]
WeightDecayMode = Literal["plain", "custom_l2"]
EvalSplit = Literal["val", "train"]
IouType = Literal["giou", "siou"]
Switch = Literal[False, True, "auto"]                           # a PTQ transform: off, on, or chosen by auto
ChannelScale = Literal["off", "depthwise", "all", "auto"]
Reconstruct = Literal["off", "adaround", "brecq", "qdrop"]      # yoloq.quant.reconstruct
ReconDevice = Literal["auto", "cpu", "cuda"]

CALIB_METHODS = ("max", "percentile", "entropy", "mse")         # one range rule each
AUTO_METHODS = ("max", "percentile-99.99", "percentile-99.999", "entropy", "mse")
CHANNEL_SCALE_ALPHAS = (0.5, 0.65, 0.8, 0.9)                  # candidates of channel_scale: auto
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
            if choices and not _is_choice(value, choices) and not (value is None and _is_optional(hints.get(f.name))):
                names = [_yaml_name(c) for c in choices]
                hint = difflib.get_close_matches(_yaml_name(value), names, n=1)
                raise ConfigError(f"{self.section}.{f.name}: '{_yaml_name(value)}' is not one of {', '.join(names)}"
                                  + (f" (did you mean '{hint[0]}'?)" if hint else ""))
        self.rules()

    def rules(self) -> None:
        """Numeric ranges and cross-field rules (subclasses)."""

    def _require(self, ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{self.section}.{key} must be {rule}, got {short_repr(getattr(self, key))}")


def _literal_choices(hint) -> tuple:
    for arg in (typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return ()


def _yaml_name(value) -> str:
    """How a YAML file spells a value (true / false for booleans), bounded for messages."""
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) and len(value) <= 100 else short_repr(value).strip("'")


def _is_choice(value, choices: tuple) -> bool:
    """``value in choices`` with types compared too (so 1 is not accepted for True)."""
    return any(type(value) is type(c) and value == c for c in choices)


def _onoff(value: Any, choices: tuple) -> Any:
    """YAML 1.1 reads a bare ``off`` / ``on`` as false / true: give a choice of 'off' / 'on' back."""
    if isinstance(value, bool) and ("on" if value else "off") in choices:
        return "on" if value else "off"
    return value


def _is_optional(hint) -> bool:
    return typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)


def closest_hint(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _check_type(name: str, value: Any, default: Any, where: str) -> Any:
    """Coerce ints to floats where a float is expected; refuse obviously wrong types."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{name}' must be true/false, got {short_repr(value)}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{name}' must be a number, got {short_repr(value)}")
        return float(value)
    elif isinstance(default, int):
        if isinstance(value, float) and value.is_integer() and abs(value) <= 2 ** 53:
            return int(value)           # 1e4 / 5e1 (scientific notation reads as a float)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{name}' must be an integer, got {short_repr(value)}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{name}' must be a string, got {short_repr(value)}")
    elif isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{name}' must be a list, got {short_repr(value)}")
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
    hints = typing.get_type_hints(cls)
    for name in fields:                 # true / false / "auto": the class's exact Literal check decides
        if len({type(c) for c in _literal_choices(hints.get(name))}) > 1:
            defaults[name] = None
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key '{key}'{closest_hint(key, fields)}; "
                              f"valid keys: {', '.join(sorted(fields))}")
        kwargs[key] = _check_type(key, _onoff(value, _literal_choices(hints.get(key))), defaults[key], where)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def default_workers(cap: int) -> int:
    """DataLoader workers this machine can feed: its cores minus one for the training process, at
    most ``cap`` (more workers than cores only slow a run down, and PyTorch warns about it)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                       # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(cap, cores - 1))
