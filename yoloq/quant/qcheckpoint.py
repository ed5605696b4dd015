"""Quantized checkpoints: everything needed to rebuild a calibrated / QAT model, as plain data.

The file (``torch.save`` of a dict of tensors and plain containers, so ``torch.load(...,
weights_only=True)`` reads it) holds the ``ModelConfig``, the fused FP32 weights (BN folding as
used by ``prepare``), the placement (sharing groups), the skipped layers, every activation amax
(per site), every per-channel weight amax, the calibration method and the caller's ``meta``.
Loading rebuilds the model with ``build_model(cfg).fuse()``, ``prepare`` and restores amax and
sharing; a placement that no longer matches the saved one is an error (model code changed).

Quantizers other than pytorch-quantization's ``TensorQuantizer`` (PACT / LSQ+) are saved as
their class path (must live under ``yoloq.``) and ``state_dict()``; on load the class is rebuilt
with ``cls.from_checkpoint(state)`` when it defines it, else ``cls()`` + ``load_state_dict``.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, ModelConfig, QuantConfig, from_dict
from .placement import Placement
from .prepare import (TensorQuantizer, _require_prepared, input_quantizers, prepare, quant_layers,
                      replace_input_quantizer, set_amax)

FORMAT = "yoloq-quantized"
VERSION = 1
_REQUIRED = ("format", "version", "model_config", "fold_bn", "weights", "placement", "skip_layers",
             "input_quantizers", "weight_amax", "calib_method", "meta")


class QuantCheckpointError(ValueError):
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
    quantizer_ids = {id(q) for q in input_quantizers(model).values()}
    return [name + "." for name, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, TensorQuantizer) or id(m) in quantizer_ids]


def _fp32_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    prefixes = _quantizer_prefixes(model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if not any(k.startswith(p) for p in prefixes)}


def _quantizer_record(q: nn.Module) -> dict:
    if isinstance(q, TensorQuantizer):
        amax = getattr(q, "_amax", None)
        return {"type": "TensorQuantizer", "amax": None if amax is None else amax.detach().cpu().clone(),
                "enabled": not q._disabled}
    cls = type(q)
    if not cls.__module__.startswith("yoloq."):
        raise TypeError(f"cannot save quantizer of class {cls.__module__}.{cls.__qualname__}: "
                        f"only pytorch-quantization TensorQuantizer and yoloq quantizers")
    state = {k: v.detach().cpu().clone() for k, v in q.state_dict().items()}
    return {"type": f"{cls.__module__}:{cls.__qualname__}", "state": state}


def save_quantized(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Write a prepared (calibrated / trained) model to ``path`` atomically."""
    placement = _require_prepared(model)
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise ValueError("save_quantized: the model has no ModelConfig in .cfg (build it with build_model)")
    meta = dict(meta or {})
    _check_plain(meta, "meta")
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": dataclasses.asdict(cfg),
        "fold_bn": bool(getattr(model, "quant_fold_bn", True)),
        "weights": _fp32_weights(model),
        "placement": placement.to_dict(),
        "skip_layers": list(model.quant_skip_layers),
        "input_quantizers": {name: _quantizer_record(q) for name, q in input_quantizers(model).items()},
        "weight_amax": {name: (None if getattr(m._weight_quantizer, "_amax", None) is None
                               else m._weight_quantizer._amax.detach().cpu().clone())
                        for name, m in quant_layers(model).items()},
        "calib_method": getattr(model, "quant_calib_method", None),
        "meta": meta,
    }
    _check_plain(ckpt, "checkpoint")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- load


def _read(path: Path) -> dict:
    if not path.is_file():
        raise QuantCheckpointError(f"quantized checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise QuantCheckpointError(f"{path}: not a readable quantized checkpoint ({type(err).__name__}: "
                                   f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise QuantCheckpointError(f"{path}: not a yoloq quantized checkpoint (no format '{FORMAT}'; "
                                   f"a plain/release checkpoint loads with yoloq.checkpoint.load_weights)")
    if ckpt.get("version") != VERSION:
        raise QuantCheckpointError(f"{path}: format version {ckpt.get('version')!r}, this code reads {VERSION}")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise QuantCheckpointError(f"{path}: missing key(s) {', '.join(missing)}")
    return ckpt


def _rebuild_quantizer(record: dict, where: str) -> nn.Module:
    module_name, _, qualname = str(record.get("type", "")).partition(":")
    if not module_name.startswith("yoloq.") or not qualname:
        raise QuantCheckpointError(f"{where}: unsupported quantizer type {record.get('type')!r}")
    try:
        cls = getattr(importlib.import_module(module_name), qualname)
    except (ImportError, AttributeError) as err:
        raise QuantCheckpointError(f"{where}: quantizer class {record['type']} not found ({err})") from err
    state = record.get("state", {})
    if hasattr(cls, "from_checkpoint"):
        return cls.from_checkpoint(state)
    q = cls()
    q.load_state_dict(state)
    return q


def load_quantized(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Rebuild a quantized model saved by ``save_quantized``. Returns ``(model, meta)`` (CPU, eval)."""
    from ..models import build_model
    from ..models.blocks import fold_remaining_bn

    path = Path(path)
    ckpt = _read(path)
    try:
        cfg = from_dict(ModelConfig, ckpt["model_config"], f"{path}: model_config")
    except ConfigError as err:
        raise QuantCheckpointError(str(err)) from err
    model = build_model(cfg).fuse()
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
    if saved.to_dict() != qmodel.quant_placement.to_dict():
        raise QuantCheckpointError(f"{path}: the quantizer placement of the rebuilt model differs from the saved "
                                   f"one (model code changed since saving?)")
    _restore_quantizers(qmodel, ckpt, path)
    qmodel.quant_calib_method = ckpt["calib_method"]
    return qmodel, dict(ckpt["meta"])


def _restore_quantizers(model: nn.Module, ckpt: dict, path: Path) -> None:
    records = ckpt["input_quantizers"]
    current = input_quantizers(model)
    if set(records) != set(current):
        raise QuantCheckpointError(f"{path}: quantizer sites differ from the rebuilt model's")
    for name, record in records.items():
        where = f"{path}: input_quantizers.{name}"
        if record.get("type") == "TensorQuantizer":
            q = current[name]
            if record.get("amax") is not None:
                set_amax(q, record["amax"])
            if not record.get("enabled", True):
                q.disable()
        else:
            replace_input_quantizer(model, name, _rebuild_quantizer(record, where))
    layers = quant_layers(model)
    for name, amax in ckpt["weight_amax"].items():
        if name not in layers:
            raise QuantCheckpointError(f"{path}: weight_amax for unknown layer '{name}'")
        if amax is not None:
            set_amax(layers[name]._weight_quantizer, amax)
