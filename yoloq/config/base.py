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
           "LSQMode", "NMSKind", "Neck", "Optimizer", "QATLoss", "QATQuantizer", "RECON_METHODS",
           "Reconstruct", "Section", "Sensitivity", "SensitivityMode", "Switch", "WeightDecayMode", "choices",
           "from_dict", "merge_settings", "nest_keys", "parse_method"]

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
    naming ``where`` and the key. A field whose type is a ``Section`` is built from a nested
    mapping; a ``Section`` with ``legacy_keys`` also reads its earlier flat keys and dotted keys
    (``calibration.method``), see :func:`nest_keys`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    data = nest_keys(cls, data, where)
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in fields.values()}
    for name in fields:                 # true / false / "auto": the class's exact Literal check decides
        if len({type(c) for c in _literal_choices(hints.get(name))}) > 1:
            defaults[name] = None
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            valid = sorted(fields) + sorted(getattr(cls, "legacy_keys", {}))
            raise ConfigError(f"{where}: unknown key '{key}'{closest_hint(key, valid)}; "
                              f"valid keys: {', '.join(sorted(fields))}")
        sub = _section_type(hints.get(key))
        if sub is not None:
            kwargs[key] = value if isinstance(value, sub) else from_dict(sub, value, _nested_where(where, cls, sub))
            continue
        kwargs[key] = _check_type(key, _onoff(value, _literal_choices(hints.get(key))), defaults[key], where)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(_prefixed(where, cls, str(err))) from None


def default_workers(cap: int) -> int:
    """DataLoader workers this machine can feed: its cores minus one for the training process, at
    most ``cap`` (more workers than cores only slow a run down, and PyTorch warns about it)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                       # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(cap, cores - 1))


def _section_type(hint) -> Optional[type]:
    return hint if isinstance(hint, type) and issubclass(hint, Section) else None


def _nested_where(where: str, parent, sub) -> str:
    """``"f.yaml: quant"`` -> ``"f.yaml: quant.calibration"`` (the context of a nested section)."""
    section = getattr(parent, "section", "")
    if section and where.endswith(section):
        return where[: -len(section)] + sub.section
    return f"{where}: {sub.section}"


def _prefixed(where: str, cls, message: str) -> str:
    """``where: message`` without saying the section twice (``f.yaml: quant.x must be ...``)."""
    section = getattr(cls, "section", "")
    if section and message.startswith(section) and where.endswith(section):
        where = where[: -len(section)].rstrip(": ")
    return f"{where}: {message}" if where else message


def nest_keys(cls, data: dict, where: str) -> dict:
    """Settings of a section with nested sections in their nested form: flat keys of earlier
    configs (``cls.legacy_keys``: ``calib`` -> ``calibration.method``) and dotted keys
    (``calibration.method``) move into their section's mapping. A scalar given for a section whose
    old flat key had the same name (``sensitivity: fast``) is that old key. The same setting given
    twice is an error naming both spellings."""
    legacy = getattr(cls, "legacy_keys", None)
    if not legacy and not any("." in str(k) for k in data):
        return data
    out: dict = {}
    origin: dict = {}                           # dotted path -> how the user spelled it
    for key, value in data.items():
        path = _new_path(cls, key, value, legacy or {})
        if len(path) == 1 and isinstance(value, dict) and _section_type(typing.get_type_hints(cls).get(key)):
            for sub_key, sub_value in value.items():
                _put(out, origin, (key, *str(sub_key).split(".")), sub_value, f"{key}.{sub_key}", where)
        else:
            _put(out, origin, path, value, key, where)
    return out


def _new_path(cls, key: str, value: Any, legacy: dict) -> tuple:
    key = str(key)
    is_section = _section_type(typing.get_type_hints(cls).get(key)) is not None
    if key in legacy and not (is_section and isinstance(value, dict)):
        return tuple(legacy[key].split("."))
    return tuple(key.split("."))


def _put(out: dict, origin: dict, path: tuple, value: Any, spelled: str, where: str) -> None:
    dotted = ".".join(path)
    if dotted in origin:
        raise ConfigError(f"{where}: '{origin[dotted]}' and '{spelled}' both set {dotted}; keep one "
                          f"('{dotted}' is the current name)")
    node = out
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: '{spelled}' sets a key inside '{part}', which is not a section")
    node[path[-1]] = value
    origin[dotted] = spelled


def merge_settings(base: dict, changes: dict) -> dict:
    """``base`` (a section as nested dicts) with ``changes`` (nested dicts) applied on top."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_settings(out[key], value)
        else:
            out[key] = value
    return out
