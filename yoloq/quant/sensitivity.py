"""Per-layer quantization sensitivity and partial quantization (which layers to keep in float).

The fast metric needs no labels and never touches validation data: a handful of *calibration*
batches go through the FP32 model once (references), then through the calibrated quantized model
in one configuration per layer, and the detector outputs are compared with
``yoloq.quant.metrics.output_error`` (SQNR of class scores and of score-weighted boxes, dB).

Two modes:

- ``quantize-one`` (default): only layer L is quantized (its weight and input quantizer), every
  other layer runs in float. Measures the error L alone injects; robust when full INT8 is broken
  by many layers at once. Lower output SQNR = more sensitive.
- ``skip-one``: everything quantized except L. Measures how much keeping L in float recovers;
  what partial quantization does, but each layer's signal is small when many layers hurt.

Both give every row a ``score`` where higher = more sensitive, and the ranking sorts by it.
Cost: one forward of the scoring batches per layer (Lite-S: ~150 layers x 8 images), less the
layers each forward can reuse from the reference forward (``yoloq.quant.forward_cache``).
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from yoloq.errors import InputError
from yoloq.config import SensitivityMode, choices
from yoloq.quant.forward_cache import LayerOutputCache, worth_reusing
from yoloq.quant.metrics import add_powers, error_from_powers, output_powers
from yoloq.quant.prepare import quant_layers, set_layers_quantized
from yoloq.device import module_device
from yoloq.quant import backend
from yoloq.quant.state import quant_state

MODES = choices(SensitivityMode)
# Memory the reused layer outputs may hold: each layer's input and output for the images scored
# together (yolov6l at 640: 0.7 GB per image), so large models score a few images at a time.
CACHE_BUDGET_BYTES = 2 * 2**30


@torch.no_grad()
def layer_sensitivity(qmodel: nn.Module, fp32_model: nn.Module, images: Sequence[torch.Tensor],
                      mode: str = "quantize-one", layers: Optional[Sequence[str]] = None,
                      progress: bool = True) -> dict:
    """Rank the quantized layers of a calibrated ``qmodel`` by how much they hurt the output.

    ``images``: a few ``[B,3,S,S]`` batches (calibration images). The model's skip set is restored
    afterwards. Returns ``{"mode", "metric", "images", "seconds", "reference_sqnr_db", "model_sqnr_db",
    "ranking"}`` with ranking rows ``{"rank", "layer", "score", "error_share", "sqnr_db", "score_sqnr_db",
    "box_sqnr_db"}``. ``model_sqnr_db``: the model as it runs (its skips kept). ``error_share`` (see
    :func:`error_share`) says how much of that model's output error the layer accounts for.
    Each layer's forward reuses the reference forward's outputs of the layers it cannot reach
    (``yoloq.quant.forward_cache``): the numbers are those of full forwards, at a fraction of the cost.
    """
    if mode not in MODES:
        raise InputError(f"sensitivity mode '{mode}' unknown; expected one of {MODES}")
    if not images:
        raise InputError("layer_sensitivity: no images to score on")
    start = time.perf_counter()
    modules = quant_layers(qmodel)
    all_layers = list(modules)
    layers = list(layers) if layers is not None else all_layers
    unknown = [l for l in layers if l not in all_layers]
    if unknown:
        raise InputError(f"layer_sensitivity: not quantized layers: {unknown[:5]}")
    fp32_model.eval()
    qmodel.eval()
    saved_skips = list(quant_state(qmodel).skip_layers)
    changed = _changed_modules(qmodel, layers)
    reusable = {name: m for name, m in modules.items() if worth_reusing(m)}
    device = module_device(qmodel)
    powers: dict = {}
    flat = torch.cat([x.to(device) for x in images])
    bar = tqdm(total=len(layers) * len(flat), desc=f"sensitivity ({mode})", unit="img", disable=not progress)
    with backend.quiet():
        # the record's size does not depend on which layers are quantized: probe before toggling
        per_image = LayerOutputCache(qmodel, reusable).probe(flat[:1])
        chunks = flat.split(max(1, CACHE_BUDGET_BYTES // max(1, per_image)))
        refs = [fp32_model(x) for x in chunks]          # FP32 outputs, once for both passes
        model_powers = None                             # the model as it runs (its skips kept)
        for x, ref in zip(chunks, refs):
            model_powers = add_powers(model_powers, output_powers(ref, qmodel(x)))
        model_sqnr = error_from_powers(model_powers)["sqnr_db"]
        try:
            # reference point: everything quantized (skip-one) or nothing (quantize-one)
            set_layers_quantized(qmodel, all_layers, mode == "skip-one")
            for x, ref in zip(chunks, refs):
                _score_chunk(qmodel, ref, x, reusable, layers, changed, mode, powers, bar)
        finally:
            bar.close()
            set_layers_quantized(qmodel, all_layers, True)
            if saved_skips:
                set_layers_quantized(qmodel, saved_skips, False)
    base = error_from_powers(powers[None])["sqnr_db"]
    rows = []
    for layer in layers:
        err = error_from_powers(powers[layer])
        score = -err["sqnr_db"] if mode == "quantize-one" else err["sqnr_db"] - base
        rows.append({"layer": layer, "score": score, "error_share": error_share(mode, err["sqnr_db"], model_sqnr),
                     **err})
    rows.sort(key=lambda r: -r["score"])                # stable: model order among equals
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    metric = ("detector output SQNR vs FP32 with only this layer quantized (dB; lower = more sensitive)"
              if mode == "quantize-one" else
              "gain in detector output SQNR vs FP32 when only this layer is kept in float (dB; higher = more sensitive)")
    return {"mode": mode, "metric": metric, "images": int(sum(x.shape[0] for x in images)),
            "seconds": time.perf_counter() - start, "reference_sqnr_db": base, "model_sqnr_db": model_sqnr,
            "ranking": rows}


def error_share(mode: str, layer_sqnr_db: float, model_sqnr_db: float) -> float:
    """How much of the model's output error one layer accounts for, from SQNRs in dB.

    quantize-one: the error power with only this layer quantized over the model's (0.6: this layer
    alone makes 60 % of the model's error; the shares of all layers need not add to 1, errors of
    different layers partly cancel or compound). skip-one: the fraction of the model's error power
    that keeping only this layer in float removes (negative when it adds error). For a detector the
    SQNR is the mean of the score and box SQNRs in dB, so the share is the geometric mean of the
    score and box shares."""
    ratio = 10 ** ((model_sqnr_db - layer_sqnr_db) / 10)
    return ratio if mode == "quantize-one" else 1.0 - ratio


def _score_chunk(qmodel: nn.Module, ref: torch.Tensor, x: torch.Tensor, modules: dict, layers: list,
                 changed: dict, mode: str, powers: dict, bar) -> None:
    """Add the output error powers of ``x`` for the reference point (key None) and for each layer
    toggled."""
    cache = LayerOutputCache(qmodel, modules)
    powers[None] = add_powers(powers.get(None), output_powers(ref, cache.record(x)))
    for layer in layers:
        set_layers_quantized(qmodel, [layer], mode == "quantize-one")
        with cache.reuse(changed[layer]):
            powers[layer] = add_powers(powers.get(layer), output_powers(ref, qmodel(x)))
        set_layers_quantized(qmodel, [layer], mode == "skip-one")
        bar.update(len(x))


def _changed_modules(qmodel: nn.Module, layers: Sequence[str]) -> dict[str, list[nn.Module]]:
    """The modules whose settings toggling each layer changes: the layer and every holder of a
    quantizer slot that the layer's status decides (its input, a residual it fuses with)."""
    changed = {layer: [qmodel.get_submodule(layer)] for layer in layers}
    for _site, holder, _attr, layer in quant_state(qmodel).site_slots(qmodel):
        if layer in changed:
            changed[layer].append(holder)
    return changed


def top_layers(sensitivity: dict, k: int) -> list[str]:
    """The ``k`` most sensitive layers of a ``layer_sensitivity`` result."""
    if k < 0:
        raise InputError(f"skip count must be >= 0, got {k}")
    ranking = sensitivity["ranking"]
    if k > len(ranking):
        raise InputError(f"cannot skip {k} layers: only {len(ranking)} were ranked")
    return [r["layer"] for r in ranking[:k]]


def search_skip_count(ranked_layers: Sequence[str], measure_drop: Callable[[list[str]], float],
                      max_drop: float, max_k: Optional[int] = None, progress: bool = True) -> tuple[int, list[dict]]:
    """Smallest k such that keeping the k most sensitive layers in float gives ``measure_drop <=
    max_drop``. Probes k = 0, 1, 2, 4, ... until one passes, then bisects between the last failing
    and the first passing k (assumes the drop shrinks as k grows, which it does up to noise).

    Returns ``(k, trace)`` with trace rows ``{"k", "drop"}`` in probing order. If even ``max_k``
    layers do not reach ``max_drop``, returns ``max_k`` (the best we can do) and the trace shows it.
    """
    max_k = len(ranked_layers) if max_k is None else min(max_k, len(ranked_layers))
    trace: list[dict] = []
    cache: dict[int, float] = {}
    bar = tqdm(desc="partial-quantization search", disable=not progress, unit="eval")

    def drop_at(k: int) -> float:
        if k not in cache:
            cache[k] = float(measure_drop(list(ranked_layers[:k])))
            trace.append({"k": k, "drop": cache[k]})
            bar.update(1)
        return cache[k]

    try:
        if drop_at(0) <= max_drop:
            return 0, trace
        fail, k = 0, 1
        while True:
            k = min(k, max_k)
            if drop_at(k) <= max_drop:
                passed = k
                break
            if k == max_k:
                return max_k, trace
            fail, k = k, 2 * k
        while passed - fail > 1:                  # invariant: fail fails, passed passes
            mid = (fail + passed) // 2
            if drop_at(mid) <= max_drop:
                passed = mid
            else:
                fail = mid
        return passed, trace
    finally:
        bar.close()
