"""Read YOLOv6 checkpoints of every common kind, safely, and load them strictly.

Formats read by ``read_checkpoint(path)``:

- plain state dicts: ``{'model_state_dict': sd, 'arch', 'nc', 'names', ...}`` (``shared/weights``),
  ``{'model': sd}``, ``{'state_dict': sd}`` or a bare ``{key: tensor}``;
- upstream release / training files: ``torch.save`` dicts whose ``model`` / ``ema`` hold pickled
  upstream ``nn.Module`` objects (fp16). They are read without the upstream ``yolov6`` package
  and without running any code from the file (``yoloq.safe_load``: TorchScript archives and
  unknown zip layouts are refused before loading; pickled classes become inert stubs); the state
  dict is then collected from the stubs' ``_parameters`` / ``_buffers`` / ``_modules`` in
  registration order.
  When both are present, ``ema`` is used unless it is None: that is what upstream evaluates and
  what its strip step keeps as the final model.

Then, on every format: tensors are cast to float32 (integer buffers kept), training-only head
branches (``cls_preds_ab`` / ``reg_preds_ab`` from anchor-aided training, ``reg_preds_dist`` from
distillation) are dropped with a note in ``info['ignored']``, and, when the target model's keys
are given, the names of upstream YOLOv6 0.3.0 checkpoints are renamed to the current ones (``remap_legacy_keys``).

``load_weights(model, path)`` loads strictly: train-form files into the model as built, deploy-form
files (``rbr_reparam`` or fused conv biases) after ``model.fuse()``. Anything else raises
``WeightsMismatch`` (a ``CheckpointError``) with the first missing / unexpected / mis-shaped keys;
``yoloq.models.build.load_weights`` adds the config in ``configs/*.yaml`` whose model the file does
fit (this module builds no models: it sits below ``yoloq.models``).
"""
from __future__ import annotations

import copy
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from yoloq.io import atomic_torch_save
from yoloq.safe_load import CheckpointError, ModuleStub, safe_torch_load

QUANTIZED_FORMAT = "yoloq-quantized"          # yoloq.quant.checkpoint.FORMAT
MAX_LISTED = 10

# Head branches that exist only for training (loaded and ignored, as upstream's deploy does).
TRAINING_ONLY_MODULES = ("cls_preds_ab", "reg_preds_ab", "reg_preds_dist")


























# --------------------------------------------------------------------------- state dict extraction


def _stub_state_dict(stub: ModuleStub, prefix: str = "", out: Optional[dict] = None) -> dict:
    """Parameters, persistent buffers, then children (nn.Module.state_dict order)."""
    out = OrderedDict() if out is None else out
    state = stub.state
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in non_persistent:
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, ModuleStub):
            raise CheckpointError(f"module '{prefix + name}' is a {type(child).__name__}, not a module")
        _stub_state_dict(child, f"{prefix}{name}.", out)
    return out


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _metadata(obj: Mapping) -> dict:
    """Small scalar entries of a checkpoint dict (arch, nc, names, epoch, ...)."""
    def plain(v):
        return v is None or isinstance(v, (str, int, float, bool)) or (
            isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float)) for x in v))
    return {k: v for k, v in obj.items() if isinstance(k, str) and plain(v)}


def _extract(obj: Any, path: Path) -> tuple[dict, dict]:
    """(raw state dict, info) from whatever ``torch.load`` returned."""
    if isinstance(obj, ModuleStub):
        return _stub_state_dict(obj), {"format": "release", "source_key": None, "class": obj.source}
    if _is_state_dict(obj):
        return OrderedDict(obj), {"format": "bare", "source_key": None}
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict or a pickled model, got {type(obj).__name__}")
    if obj.get("format") == QUANTIZED_FORMAT:
        raise CheckpointError(f"{path}: a yoloq quantized checkpoint (written by ptq / qat), not FP32 weights; "
                              f"give it to `yoloq export --ckpt` or `yoloq qat --from`, and the FP32 "
                              f"checkpoint it came from to --weights / model.weights")
    info = {"meta": _metadata(obj)}
    ema = obj.get("ema")
    candidates = ["ema"] if ema is not None else []
    candidates += ["model", "model_state_dict", "state_dict"]
    for key in candidates:
        value = obj.get(key)
        if isinstance(value, ModuleStub):
            return _stub_state_dict(value), {**info, "format": "release", "source_key": key, "class": value.source}
        if _is_state_dict(value):
            return OrderedDict(value), {**info, "format": "plain", "source_key": key}
    raise CheckpointError(f"{path}: no model found: expected a state dict or a pickled model under one of "
                          f"'model_state_dict', 'model', 'ema', 'state_dict'; top-level keys are "
                          f"{sorted(map(str, obj))[:20]}")


def _to_float32(state_dict: dict) -> tuple[dict, list[str]]:
    """Cast floating tensors to float32 (plain tensors, not Parameters); record the source dtypes."""
    out, dtypes = OrderedDict(), set()
    for key, value in state_dict.items():
        value = value.detach()
        if value.is_floating_point():
            dtypes.add(str(value.dtype).replace("torch.", ""))
            value = value.float()
        out[key] = value.contiguous()
    return out, sorted(dtypes)


def drop_training_only(state_dict: dict) -> tuple[dict, list[str]]:
    """Remove training-only head branches; return (state dict, notes naming what was dropped)."""
    kept, dropped = OrderedDict(), OrderedDict()
    for key, value in state_dict.items():
        branch = next((p for p in key.split(".") if p in TRAINING_ONLY_MODULES), None)
        if branch is None:
            kept[key] = value
        else:
            dropped.setdefault(branch, []).append(key)
    notes = [f"{branch}: {len(keys)} tensors dropped (training-only branch, unused at inference)"
             for branch, keys in dropped.items()]
    return kept, notes


# --------------------------------------------------------------------------- upstream YOLOv6 0.3.0 names


def _canonical(key: str) -> str:
    """Key with the 0.4.0 wrapper levels removed: ``X.block.conv.w`` -> ``X.conv.w`` (ConvBN-style
    wrappers; 0.3.0's SimConv / Conv held conv and bn directly) and ``ERBlock_5.2.sppf.cv1`` ->
    ``ERBlock_5.2.cv1`` (0.4.0 wraps SPPF / CSPSPPF bodies in ``sppf`` / ``cspsppf``)."""
    parts = key.split(".")
    out = []
    for i, part in enumerate(parts):
        if part == "block" and i + 1 < len(parts) and parts[i + 1] in ("conv", "bn"):
            continue
        if part in ("sppf", "cspsppf"):
            continue
        out.append(part)
    return ".".join(out)


def remap_legacy_keys(state_dict: dict, target_keys: Iterable[str]) -> tuple[dict, dict]:
    """Rename keys the target does not have to the target key with the same canonical form.

    Only keys missing from ``target_keys`` are touched, and only onto a target key that is unique
    for its canonical form and not already in the file. Also strips a DataParallel ``module.``
    prefix. Returns (state dict in the original order, {old: new}).
    """
    target = list(target_keys)
    target_set = set(target)
    by_canon: dict[str, Optional[str]] = {}
    for key in target:
        c = _canonical(key)
        by_canon[c] = None if c in by_canon else key          # None marks an ambiguous form
    present = set(state_dict)
    known = target_set | set(by_canon)
    out, renamed = OrderedDict(), {}
    for key, value in state_dict.items():
        new = key
        if new not in target_set and new.startswith("module.") and new[7:] in known:
            new = new[7:]
        if new not in target_set:
            candidate = by_canon.get(_canonical(new))
            if candidate is not None and candidate not in present:
                new = candidate
        if new != key:
            renamed[key] = new
        out[new] = value
    return out, renamed


# --------------------------------------------------------------------------- public reading API


def read_checkpoint(path: str | os.PathLike, target_keys: Optional[Iterable[str]] = None
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """Read any supported checkpoint -> (float32 state dict, info).

    ``info``: ``path``, ``format`` ('plain' | 'bare' | 'release'), ``source_key`` (dict entry
    used, e.g. 'model_state_dict' or 'ema'), ``class`` (pickled root class, release files),
    ``meta`` (arch, nc, names, epoch, ... when stored), ``dtypes`` (stored float dtypes),
    ``ignored`` (notes on dropped tensors), ``remapped`` ({old key: new key}, only with
    ``target_keys``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    raw, info = _extract(safe_torch_load(path), path)
    state_dict, dtypes = _to_float32(raw)
    state_dict, ignored = drop_training_only(state_dict)
    info.update(path=str(path), dtypes=dtypes, ignored=ignored, remapped={})
    if target_keys is not None:
        state_dict, info["remapped"] = remap_legacy_keys(state_dict, target_keys)
    return state_dict, info


def save_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, **meta) -> Path:
    """Write a plain checkpoint ``{'model_state_dict': sd, **meta}`` atomically (temp + rename)."""
    return atomic_torch_save({"model_state_dict": OrderedDict(state_dict), **meta}, path)


# --------------------------------------------------------------------------- comparing key sets


def key_shapes(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, tuple]":
    """{key: shape} of a state dict, in its order."""
    return OrderedDict((k, tuple(v.shape)) for k, v in state_dict.items())


class Mismatch:
    """Missing / unexpected / mis-shaped keys of a file against a model's state dict."""

    def __init__(self, file_shapes: Mapping[str, tuple], model_shapes: Mapping[str, tuple]):
        self.missing = [(k, s) for k, s in model_shapes.items() if k not in file_shapes]
        self.unexpected = [(k, s) for k, s in file_shapes.items() if k not in model_shapes]
        self.misshaped = [(k, file_shapes[k], s) for k, s in model_shapes.items()
                          if k in file_shapes and tuple(file_shapes[k]) != tuple(s)]

    def __bool__(self):
        return bool(self.missing or self.unexpected or self.misshaped)

    @property
    def count(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.misshaped)

    def describe(self) -> str:
        lines = [f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                 f"{len(self.misshaped)} mis-shaped keys"]
        for title, rows in (("missing from the file", self.missing), ("unexpected in the file", self.unexpected)):
            if rows:
                lines.append(f"  {title} (first {min(len(rows), MAX_LISTED)} of {len(rows)}):")
                lines += [f"    {k} {list(s)}" for k, s in rows[:MAX_LISTED]]
        if self.misshaped:
            lines.append(f"  mis-shaped (first {min(len(self.misshaped), MAX_LISTED)} of {len(self.misshaped)}):")
            lines += [f"    {k}: file {list(a)} vs model {list(b)}" for k, a, b in self.misshaped[:MAX_LISTED]]
        return "\n".join(lines)


def looks_deploy_form(state_dict: Mapping[str, Any], model_keys: Iterable[str]) -> bool:
    """True if the file has fused blocks: ``rbr_reparam`` keys, or conv biases the train-form model
    has no place for (its conv there is followed by a BN)."""
    model_keys = set(model_keys)
    if any(".rbr_reparam." in k for k in state_dict) and not any(".rbr_reparam." in k for k in model_keys):
        return True
    return any(k.endswith(".bias") and k not in model_keys and k[:-4] + "weight" in model_keys
               for k in state_dict)


# --------------------------------------------------------------------------- loading into a model


class WeightsMismatch(CheckpointError):
    """A checkpoint whose keys or shapes do not fit the model. Carries the file's state dict and its
    ``arch`` entry so that ``yoloq.models.build.load_weights`` can add the config the file does fit."""

    def __init__(self, message: str, note: str, state_dict: Mapping[str, torch.Tensor], arch: Optional[str]):
        super().__init__(message + note)
        self.message, self.note, self.state_dict, self.arch = message, note, state_dict, arch

    def with_hint(self, hint: str) -> "WeightsMismatch":
        """The same error with ``hint`` (a line naming a config) before the note."""
        return WeightsMismatch(f"{self.message}\n{hint}", self.note, self.state_dict, self.arch)


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "name", None) or type(model).__name__


def _is_fused(model: nn.Module) -> bool:
    keys = model.state_dict().keys()
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return any(".rbr_reparam." in k for k in keys) or not has_bn


def _check_finite(state_dict: Mapping[str, torch.Tensor], path) -> None:
    """NaN / inf weights evaluate to AP 0 with nothing but "no detections": say what is wrong."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} of {len(state_dict)} tensors hold NaN/inf values (first: '{bad[0]}'); "
                              f"the weights are not finite (a diverged training run?) and cannot be evaluated")


def load_weights(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load ``path`` into ``model`` strictly; returns the ``info`` of ``read_checkpoint`` plus
    ``form`` ('train' | 'deploy'). Deploy-form files fuse the model first (in place).

    Raises WeightsMismatch, a CheckpointError naming the file and the first missing / unexpected /
    mis-shaped keys, instead of loading anything partially (``yoloq.models.build.load_weights`` adds
    the config that fits).
    """
    raw, info = read_checkpoint(path)
    _check_finite(raw, path)
    model_shapes = key_shapes(model.state_dict())
    state_dict, remapped = remap_legacy_keys(raw, model_shapes)
    mismatch = Mismatch(key_shapes(state_dict), model_shapes)
    form = "train"
    if mismatch and hasattr(model, "fuse") and looks_deploy_form(state_dict, model_shapes):
        fused_shapes = key_shapes(copy.deepcopy(model).fuse().state_dict())
        fused_sd, fused_remapped = remap_legacy_keys(raw, fused_shapes)
        fused_mismatch = Mismatch(key_shapes(fused_sd), fused_shapes)
        if not fused_mismatch or fused_mismatch.count < mismatch.count:
            state_dict, remapped, mismatch, form = fused_sd, fused_remapped, fused_mismatch, "deploy"
    if mismatch:
        fused_note = "\nThe model looks fused already: load weights before calling fuse()." if _is_fused(model) else ""
        raise WeightsMismatch(f"{path}: checkpoint does not fit model '{_model_name(model)}' ({form} form): "
                              f"{mismatch.describe()}", fused_note, raw, info.get("meta", {}).get("arch"))
    if form == "deploy":
        model.fuse()
    model.load_state_dict(state_dict, strict=True)
    info.update(form=form, remapped=remapped)
    return info
