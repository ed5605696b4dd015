"""INT8 quantization under TensorRT's rules: one entry point, ``quantize(model, recipe, calib_data)``.

    from yoloq.quant import Calibrate, ChannelScale, BiasCorrect, quantize, recipe_from_config

    qmodel = quantize(fp32_model, [ChannelScale("all", alpha=0.9), Calibrate("auto"), BiasCorrect()], batches)
    qmodel = quantize(fp32_model, recipe_from_config(cfg.quant), batches)   # what a config's quant section asks
    save_quantized(qmodel, "quant.pt")                                      # qat / export read this file

The model stays an ``nn.Module`` (deploy form, fused); its quantization state is one typed
``QuantState`` (``yoloq.quant.state``). Modules:

- the entry point: ``recipe`` (step configs, their handlers, ``quantize``), ``recipe_config`` (the
  recipe of a ``QuantConfig``, the automatic choice of the transforms), ``batches`` (calibration
  data);
- the scheme and its placement: ``scheme`` (INT8 levels, ``QDQSpec``), ``backend`` (the one
  boundary to pytorch-quantization), ``placement``, ``prepare``, ``state``;
- the steps: ``calibrate``, ``equalize``, ``channel_scale``, ``squeeze_excite``, ``bias_correct``,
  ``reconstruct`` (with ``adaround``, ``recon_blocks``), ``sensitivity`` (with ``forward_cache``),
  ``partial``;
- measuring: ``metrics``, ``diagnose``;
- QAT quantizers: ``learnable`` (PACT, LSQ+), ``swap`` (to learnable quantizers and back);
- files: ``checkpoint`` (``quant.pt``).
"""
from __future__ import annotations

from yoloq.config import QuantConfig
from yoloq.quant.calibrate import apply_calibration, calibrate, calibrate_auto
from yoloq.quant.checkpoint import load_quantized, save_quantized
from yoloq.quant.prepare import prepare, set_layers_quantized
from yoloq.quant.recipe import (BiasCorrect, Calibrate, ChannelScale, Equalize, FloatSE, Partial, Prepare,
                                Reconstruct, RecipeError, quantize)
from yoloq.quant.recipe_config import AutoTransforms, recipe_from_config
from yoloq.quant.state import QuantState, quant_state

__all__ = ["AutoTransforms", "BiasCorrect", "Calibrate", "ChannelScale", "Equalize", "FloatSE", "Partial", "Prepare",
           "QuantConfig", "QuantState", "Reconstruct", "RecipeError", "apply_calibration", "calibrate",
           "calibrate_auto", "load_quantized", "prepare", "quant_state", "quantize", "recipe_from_config",
           "save_quantized", "set_layers_quantized"]
