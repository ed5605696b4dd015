"""``build_model(cfg.model)`` -> a YOLOv6 detector (train form); ``load_model`` adds weights and fusion.

``load_weights`` is ``yoloq.weights.load_weights`` with the hint that needs models built: the config
in ``configs/*.yaml`` whose model fits a file that does not fit (``suggest_config``)."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from yoloq import weights as checkpoints
from yoloq.config import ConfigError, ModelConfig, load_config
from yoloq.config.lookup import CONFIG_DIR
from yoloq.errors import YoloqError


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "lite":
        from yoloq.models.lite import build_lite
        return build_lite(cfg)
    if cfg.arch == "yolov6":
        from yoloq.models.yolov6 import build_yolov6
        return build_yolov6(cfg)
    raise ConfigError(f"model.arch: unknown architecture '{cfg.arch}'; expected 'yolov6' or 'lite'")


NO_WEIGHTS_HINT = ("pass --weights PATH (or set model.weights in the config), or --random-weights for a "
                   "smoke test whose numbers mean nothing")


def load_model(cfg: ModelConfig, weights: Optional[str | os.PathLike] = None, fuse: bool = True,
               random_weights: bool = False, seed: int = 0) -> nn.Module:
    """Build the model of ``cfg``, load ``weights`` (default ``cfg.weights``; every checkpoint form
    ``yoloq.weights`` reads) and, with ``fuse``, convert it to deploy form (exact up to float
    rounding). ``random_weights``: seeded random initialisation instead (smoke tests). Eval mode."""
    weights = weights or cfg.weights
    if random_weights:
        torch.manual_seed(seed)
        model = build_model(cfg)
    elif not weights:
        raise ConfigError(f"model '{cfg.name}': no weights: {NO_WEIGHTS_HINT}")
    else:
        model = build_model(cfg)
        load_weights(model, weights)
    return (model.fuse() if fuse else model).eval()


def load_weights(model: nn.Module, path: str | os.PathLike) -> dict:
    """``yoloq.weights.load_weights(model, path)`` (strict; the file's ``info``); a file that does not
    fit ``model`` is a ``WeightsMismatch`` that also names the config whose model it does fit."""
    try:
        return checkpoints.load_weights(model, path)
    except checkpoints.WeightsMismatch as err:
        raise err.with_hint(suggestion_text(err.state_dict, err.arch)) from None


# --------------------------------------------------------------------------- config suggestion


@functools.lru_cache(maxsize=64)
def _config_signatures(config_path: str, mtime: float) -> list[tuple[str, dict]]:
    """[(form, {key: shape})] of a config's model in train and deploy form (built on 'meta')."""
    cfg = load_config(config_path)
    with torch.device("meta"):
        model = build_model(cfg.model)
        sigs = [("train", dict(checkpoints.key_shapes(model.state_dict())))]
        if hasattr(model, "fuse"):
            sigs.append(("deploy", dict(checkpoints.key_shapes(model.fuse().state_dict()))))
    return sigs


def _candidate_configs(config_dir: Path, state_dict: Mapping[str, Any], hint: Optional[str]) -> list[Path]:
    """Configs of the file's family (Lite or not, judged from the keys; a cheap YAML read each),
    the one named by the file's ``arch`` entry first."""
    is_lite = any(".lite_effiblock_" in k for k in state_dict)
    ranked = []
    for config in sorted(Path(config_dir).glob("*.yaml")):
        try:
            model_cfg = load_config(config).model
        except YoloqError:         # a config that does not read cannot be a suggestion
            continue
        if (model_cfg.arch == "lite") != is_lite:
            continue
        named = hint is not None and hint in (model_cfg.name, config.stem)
        ranked.append((not named, config.name, config))
    return [row[-1] for row in sorted(ranked)]


def suggest_config(state_dict: Mapping[str, torch.Tensor], config_dir: Path = CONFIG_DIR,
                   hint: Optional[str] = None) -> Optional[tuple[str, str, bool]]:
    """(config path, form, exact) of the ``configs/*.yaml`` model that best fits ``state_dict``:
    the first exact key/shape match, else the largest overlap of (key, shape) pairs; None if none.
    ``hint`` (the file's ``arch`` entry, if any) is tried first."""
    best = None
    for config in _candidate_configs(Path(config_dir), state_dict, hint):
        try:
            sigs = _config_signatures(str(config), config.stat().st_mtime)
        except YoloqError:         # a config that does not build cannot be a suggestion
            continue
        for form, shapes in sigs:
            adapted, _ = checkpoints.remap_legacy_keys(state_dict, shapes)
            file_shapes = checkpoints.key_shapes(adapted)
            common = sum(1 for k, s in file_shapes.items() if shapes.get(k) == s)
            score = common / max(len(set(file_shapes) | set(shapes)), 1)
            if best is None or score > best[0]:
                best = (score, str(config), form)
            if score == 1.0:
                return str(config), form, True
    if best is None or best[0] == 0:
        return None
    return best[1], best[2], False


def suggestion_text(state_dict: Mapping[str, torch.Tensor], hint: Optional[str] = None) -> str:
    """One line naming the config that fits ``state_dict`` (or saying none does)."""
    found = suggest_config(state_dict, hint=hint)
    if found is None:
        return "No config in configs/*.yaml builds a model with these keys."
    config, form, exact = found
    rel = os.path.relpath(config, CONFIG_DIR.parent)
    if exact:
        return f"The file fits {rel} ({form} form, every key and shape matches): use --cfg {rel}."
    return f"Closest config: {rel} ({form} form, partial overlap only)."
