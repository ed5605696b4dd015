"""INT8 quantization under TensorRT's rules, one verb per stage.

    from yoloq.quant import prepare, calibrate, quantize, save_quantized, load_quantized

    qmodel = prepare(fp32_model, QuantConfig())        # quantizers placed and shared (TensorRT rules)
    calibrate(qmodel, batches, "entropy")               # activation ranges from train images
    qmodel = quantize(fp32_model, batches, QuantConfig(calib="auto"))   # prepare + calibrate in one
    save_quantized(qmodel, "quant.pt")                  # qat / export read this file

The model stays an ``nn.Module`` (deploy form, fused); its quantization state is one typed
``QuantState`` (``yoloq.quant.state``). Modules: ``scheme`` (the INT8 levels and ``QDQSpec``),
``placement``, ``prepare``, ``calibrate``, ``metrics``, ``sensitivity``, ``diagnose``,
``learnable`` (PACT, LSQ+), ``swap`` (to learnable quantizers and back), ``checkpoint``.
"""
from __future__ import annotations

from typing import Iterable, Optional

from torch import nn

from yoloq.config import QuantConfig
from yoloq.quant.calibrate import apply_calibration, calibrate, calibrate_auto
from yoloq.quant.checkpoint import load_quantized, save_quantized
from yoloq.quant.prepare import prepare, set_layers_quantized
from yoloq.quant.state import QuantState, quant_state

__all__ = ["QuantConfig", "QuantState", "apply_calibration", "calibrate", "calibrate_auto", "load_quantized",
           "prepare", "quant_state", "quantize", "save_quantized", "set_layers_quantized"]


TRANSFORM_KEYS = {"equalize": False, "channel_scale": "off", "bias_correction": False, "se_float": False,
                  "reconstruct": "off"}      # QuantConfig fields and their "not asked" values


def quantize(model: nn.Module, batches: Iterable, qcfg: Optional[QuantConfig] = None, progress: bool = True) -> nn.Module:
    """``prepare`` + calibration of a deploy-form FP32 ``model`` on ``batches`` (train images,
    ``[B,3,S,S]`` in 0..1). ``qcfg.calib == "auto"`` picks the range rule whose detector output is
    closest to ``model``'s on the first ``auto_images`` images. Returns the quantized copy. The PTQ
    transforms and reconstruction are not run here (``yoloq.recipes.ptq.quantize`` runs them)."""
    qcfg = qcfg or QuantConfig()
    asked = [k for k, off in TRANSFORM_KEYS.items() if getattr(qcfg, k) != off]
    if asked:        # they need the FP32 model, calibration images and a search: the recipe runs them
        raise ValueError(f"quantize() only prepares and calibrates; quant.{', quant.'.join(asked)} ask for PTQ "
                         f"transforms: use yoloq.recipes.ptq.quantize (or yoloq.ptq / yoloq ptq)")
    batches = list(batches)
    qmodel = prepare(model, qcfg)
    if qcfg.calib == "auto":
        calibrate_auto(qmodel, batches, model, list(qcfg.auto_methods), num_bins=qcfg.num_bins,
                       score_batches=max(1, -(-qcfg.auto_images // max(1, batches[0].shape[0]))) if batches else 1,
                       progress=progress)
    else:
        calibrate(qmodel, batches, qcfg.calib, qcfg.percentile, num_bins=qcfg.num_bins, progress=progress)
    return qmodel
