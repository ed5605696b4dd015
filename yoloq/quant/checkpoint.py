"""Quantized checkpoints: everything needed to rebuild a calibrated / QAT model, as plain data.

Device-independent: every tensor is saved from the CPU (whatever device the model ran on) and read
with ``map_location="cpu"`` (``yoloq.safe_load``); ``load_quantized(path, device)`` moves the rebuilt
model.

The file (``torch.save`` of a dict of tensors and plain containers, so ``torch.load(...,
weights_only=True)`` reads it) holds the ``ModelConfig``, the fused FP32 weights (BN folding as
used by ``prepare``), the placement (sharing groups), the skipped layers, every activation amax
(per site), every per-channel weight amax, the calibration method and the caller's ``meta``.
Loading rebuilds the model with ``build_model(cfg).fuse()``, ``prepare`` and restores amax and
sharing; a placement that no longer matches the saved one is an error (model code changed).

Per-channel input scales (``yoloq.quant.channel_scale``) are stored as ``input_scales`` (layer ->
scale); the weights already hold w * s, so a file with scales is format version 2 (a version-1
reader must refuse it rather than build a model without the division). Files without scales stay
version 1; both versions are read. Bias-correction shifts (``QuantState.bias_shifts``: what a
layer gets back when it is later kept in float) are an optional ``bias_shifts`` entry; a file
without it loads with none recorded.

Quantizers other than pytorch-quantization's ``TensorQuantizer`` (PACT / LSQ+) are saved as
their class path (must live under ``yoloq.``) and ``state_dict()``; on load the class is rebuilt
with ``cls.from_checkpoint(state)`` when it defines it, else ``cls()`` + ``load_state_dict``.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from yoloq.errors import YoloqError
from yoloq.config import ConfigError, ModelConfig, QuantConfig, from_dict
from yoloq.io import atomic_torch_save
from yoloq.safe_load import CheckpointError, load_plain
from yoloq.quant.placement import Placement
from yoloq.quant import backend
from yoloq.quant.backend import TensorQuantizer, set_amax
from yoloq.quant.prepare import input_quantizers, prepare, quant_layers, replace_input_quantizer
from yoloq.quant.scheme import is_quantizer
from yoloq.quant.state import quant_state

FORMAT = "yoloq-quantized"
VERSION = 2                 # written when input_scales are present
BASE_VERSION = 1            # everything else
READABLE_VERSIONS = (1, 2)
_REQUIRED = ("format", "version", "model_config", "fold_bn", "weights", "placement", "skip_layers",
             "input_quantizers", "weight_amax", "calib_method", "meta")


class QuantCheckpointError(YoloqError, ValueError):
    """A quantized checkpoint is missing, unreadable or inconsistent; the message names the file."""


# --------------------------------------------------------------------------- save


def _check_plain(obj: Any, where: str) -> None:
    """Only what ``torch.load(weights_only=True)`` accepts."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: keys must be str or int, got {type(k).__name__}")
            _check_plain(v, f"{where}.{k}")
        return
    raise TypeError(f"{where}: {type(obj).__name__} cannot go into a quantized checkpoint "
                    f"(plain containers, numbers, strings and tensors only)")


def _quantizer_prefixes(model: nn.Module) -> list[str]:
    """Module paths (all aliases) of every quantizer object in ``model``."""
    return [name + "." for name, m in model.named_modules(remove_duplicate=False) if is_quantizer(m)]


def _fp32_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    prefixes = _quantizer_prefixes(model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if not any(k.startswith(p) for p in prefixes)}


def _quantizer_record(q: nn.Module) -> dict:
    if isinstance(q, TensorQuantizer):
        amax = backend.get_amax(q)
        return {"type": "TensorQuantizer", "amax": None if amax is None else amax.detach().cpu().clone(),
                "enabled": backend.is_enabled(q)}
    cls = type(q)
    if not cls.__module__.startswith("yoloq."):
        raise TypeError(f"cannot save quantizer of class {cls.__module__}.{cls.__qualname__}: "
                        f"only pytorch-quantization TensorQuantizer and yoloq quantizers")
    state = {k: v.detach().cpu().clone() for k, v in q.state_dict().items()}
    return {"type": f"{cls.__module__}:{cls.__qualname__}", "state": state}


def _cpu(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().cpu().clone()


def save_quantized(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Write a prepared (calibrated / trained) model to ``path`` atomically."""
    state = quant_state(model)
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise ValueError("save_quantized: the model has no ModelConfig in .cfg (build it with build_model)")
    meta = dict(meta or {})
    _check_plain(meta, "meta")
    from yoloq.quant.channel_scale import input_scales
    scales = input_scales(model)
    ckpt = {
        "format": FORMAT,
        "version": VERSION if scales else BASE_VERSION,
        "model_config": dataclasses.asdict(cfg),
        "fold_bn": bool(state.fold_bn),
        "weights": _fp32_weights(model),
        "placement": state.placement.to_dict(),
        "skip_layers": list(state.skip_layers),
        "input_quantizers": {name: _quantizer_record(q) for name, q in input_quantizers(model).items()},
        "weight_amax": {name: _cpu(backend.get_amax(backend.weight_quantizer(m)))
                        for name, m in quant_layers(model).items()},
        "calib_method": state.calib.method,
        "meta": meta,
    }
    if scales:
        ckpt["input_scales"] = scales
    if state.bias_shifts:
        ckpt["bias_shifts"] = {name: t.detach().cpu().clone() for name, t in state.bias_shifts.items()}
    _check_plain(ckpt, "checkpoint")
    atomic_torch_save(ckpt, path)


# --------------------------------------------------------------------------- load


def _read(path: Path) -> dict:
    try:
        ckpt = load_plain(path)
    except CheckpointError as err:
        raise QuantCheckpointError(str(err).replace("checkpoint not found", "quantized checkpoint not found")) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise QuantCheckpointError(f"{path}: not a yoloq quantized checkpoint (no format '{FORMAT}'); if these are "
                                   f"FP32 weights, quantize them first: yoloq ptq --cfg <config> --weights {path}")
    if ckpt.get("version") not in READABLE_VERSIONS:
        raise QuantCheckpointError(f"{path}: format version {ckpt.get('version')!r}, this code reads "
                                   f"{' and '.join(map(str, READABLE_VERSIONS))}")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise QuantCheckpointError(f"{path}: missing key(s) {', '.join(missing)}")
    _check_finite(ckpt, path)
    return ckpt


def _float_tensors(obj, where: str):
    """(name, tensor) of every floating-point tensor in the stored containers."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _float_tensors(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _float_tensors(v, f"{where}[{i}]")


def _check_finite(ckpt: dict, path: Path) -> None:
    """NaN / inf weights, ranges, scales or shifts give a model that detects nothing (AP 0, an ONNX
    file of NaN): refuse the file on load, naming the first bad tensor, as FP32 weights are."""
    stored = {k: ckpt.get(k) for k in ("weights", "input_quantizers", "weight_amax", "input_scales", "bias_shifts")}
    tensors = list(_float_tensors(stored, ""))
    bad = [name for name, t in tensors if not torch.isfinite(t).all()]
    if bad:
        raise QuantCheckpointError(f"{path}: {len(bad)} of {len(tensors)} tensors hold NaN/inf values (first: "
                                   f"'{bad[0]}'); the quantized model is not finite (a diverged QAT run, an edited "
                                   f"file?) and cannot be evaluated or exported")


def _learnable_classes() -> dict[str, type]:
    from yoloq.quant.learnable import LEARNABLE
    return {f"{cls.__module__}:{cls.__qualname__}": cls for cls in LEARNABLE}


def _rebuild_quantizer(record: dict, where: str) -> nn.Module:
    classes = _learnable_classes()
    cls = classes.get(str(record.get("type")))
    if cls is None:
        raise QuantCheckpointError(f"{where}: unsupported quantizer type {record.get('type')!r}; expected "
                                   f"'TensorQuantizer' or one of {sorted(classes)}")
    state = record.get("state")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise QuantCheckpointError(f"{where}: 'state' must be a dict of tensors")
    try:
        return cls.from_checkpoint(state)
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise QuantCheckpointError(f"{where}: invalid {cls.__name__} state ({type(err).__name__}: {err})") from None


def _checked_amax(amax, where: str, numel: Optional[int]) -> Optional[torch.Tensor]:
    """A stored amax: None (uncalibrated) or a finite, positive tensor with ``numel`` values."""
    if amax is None:
        return None
    if not isinstance(amax, torch.Tensor) or not amax.is_floating_point():
        raise QuantCheckpointError(f"{where}: amax must be a float tensor, got {type(amax).__name__}")
    if numel is not None and amax.numel() != numel:
        raise QuantCheckpointError(f"{where}: amax has {amax.numel()} values, the layer needs {numel}")
    if not torch.isfinite(amax).all() or (amax <= 0).any():
        raise QuantCheckpointError(f"{where}: amax must be finite and > 0")
    return amax


def load_quantized(path: str | os.PathLike, device: Optional[torch.device | str] = None) -> tuple[nn.Module, dict]:
    """Rebuild a quantized model saved by ``save_quantized`` (on any device: the file holds CPU
    tensors only). Returns ``(model, meta)``, eval mode, on ``device`` (default: the CPU).
    Every stored field is checked: an edited or damaged file is a ``QuantCheckpointError`` naming
    the file and the field, never a traceback from deep inside."""
    path = Path(path)
    ckpt = _read(path)
    try:
        model, meta = _rebuild(ckpt, path)
        return (model if device is None else model.to(device)), meta
    except YoloqError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError, IndexError) as err:
        raise QuantCheckpointError(f"{path}: inconsistent quantized checkpoint, was it edited? "
                                   f"({type(err).__name__}: {err})") from err


def _rebuild(ckpt: dict, path: Path) -> tuple[nn.Module, dict]:
    from yoloq.models import build_model
    from yoloq.models.common import fold_remaining_bn
    try:
        cfg = from_dict(ModelConfig, ckpt["model_config"], f"{path}: model_config")
        model = build_model(cfg).fuse()
    except ConfigError as err:
        raise QuantCheckpointError(str(err)) from err
    if ckpt["fold_bn"]:
        fold_remaining_bn(model)
    try:
        model.load_state_dict(ckpt["weights"], strict=True)
    except RuntimeError as err:
        raise QuantCheckpointError(f"{path}: weights do not fit model '{cfg.name}': "
                                   f"{str(err).splitlines()[1] if len(str(err).splitlines()) > 1 else err}") from err
    qmodel = prepare(model.eval(), QuantConfig(fold_qarepvgg_post_bn=bool(ckpt["fold_bn"])),
                     skip_layers=ckpt["skip_layers"])
    saved = Placement.from_dict(ckpt["placement"])
    if saved.to_dict() != quant_state(qmodel).placement.to_dict():
        raise QuantCheckpointError(f"{path}: the quantizer placement of the rebuilt model differs from the saved "
                                   f"one (model code changed since saving?)")
    _restore_input_scales(qmodel, ckpt, path)
    _restore_quantizers(qmodel, ckpt, path)
    quant_state(qmodel).bias_shifts = _checked_bias_shifts(qmodel, ckpt, path)
    quant_state(qmodel).calib.method = ckpt["calib_method"]
    return qmodel, dict(ckpt["meta"])


def _restore_quantizers(model: nn.Module, ckpt: dict, path: Path) -> None:
    records = ckpt["input_quantizers"]
    current = input_quantizers(model)
    if set(records) != set(current):
        raise QuantCheckpointError(f"{path}: quantizer sites differ from the rebuilt model's")
    for name, record in records.items():
        where = f"{path}: input_quantizers.{name}"
        if not isinstance(record, dict):
            raise QuantCheckpointError(f"{where}: expected a record dict, got {type(record).__name__}")
        if record.get("type") == "TensorQuantizer":
            q = current[name]
            amax = _checked_amax(record.get("amax"), where, 1)
            if amax is not None:
                set_amax(q, amax)
            if not record.get("enabled", True):
                backend.set_enabled(q, False)
        else:
            replace_input_quantizer(model, name, _rebuild_quantizer(record, where))
    layers = quant_layers(model)
    for name, amax in ckpt["weight_amax"].items():
        if name not in layers:
            raise QuantCheckpointError(f"{path}: weight_amax for unknown layer '{name}'")
        out_channels = layers[name].weight.shape[1 if isinstance(layers[name], nn.ConvTranspose2d) else 0]
        amax = _checked_amax(amax, f"{path}: weight_amax.{name}", out_channels)
        if amax is not None:
            set_amax(backend.weight_quantizer(layers[name]), amax)


def _checked_bias_shifts(model: nn.Module, ckpt: dict, path: Path) -> dict:
    shifts = ckpt.get("bias_shifts", {})
    if not isinstance(shifts, dict):
        raise QuantCheckpointError(f"{path}: bias_shifts must be a dict layer -> tensor")
    layers = quant_layers(model)
    for name, shift in shifts.items():
        where = f"{path}: bias_shifts.{name}"
        if name not in layers or layers[name].bias is None:
            raise QuantCheckpointError(f"{where}: not a quantized layer with a bias in the rebuilt model")
        bias = layers[name].bias
        if not isinstance(shift, torch.Tensor) or not shift.is_floating_point() or shift.shape != bias.shape:
            raise QuantCheckpointError(f"{where}: expected a float tensor of shape {tuple(bias.shape)}, got "
                                       f"{getattr(shift, 'shape', type(shift).__name__)}")
    return dict(shifts)


def _restore_input_scales(model: nn.Module, ckpt: dict, path: Path) -> None:
    """Per-channel input scales (version 2); the stored weights already hold w * s."""
    from yoloq.quant.channel_scale import set_input_scale
    scales = ckpt.get("input_scales", {})
    if scales and ckpt["version"] < VERSION:
        raise QuantCheckpointError(f"{path}: input_scales in a version-{ckpt['version']} file (written as "
                                   f"version {VERSION}); was it edited?")
    if not isinstance(scales, dict):
        raise QuantCheckpointError(f"{path}: input_scales must be a dict layer -> tensor")
    layers = quant_layers(model)
    for name, scale in scales.items():
        where = f"{path}: input_scales.{name}"
        if name not in layers:
            raise QuantCheckpointError(f"{where}: not a quantized layer of the rebuilt model")
        if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
            raise QuantCheckpointError(f"{where}: expected a float tensor, got {type(scale).__name__}")
        try:
            set_input_scale(model, name, scale, fold_into_weight=False)
        except (ValueError, TypeError) as err:
            raise QuantCheckpointError(f"{where}: {err}") from None
