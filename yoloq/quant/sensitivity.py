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
Cost: one forward of the scoring batches per layer (Lite-S: ~150 layers x 32 images).
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from yoloq.errors import InputError
from yoloq.config import SensitivityMode, choices
from yoloq.quant.metrics import output_error
from yoloq.quant.prepare import quant_layers, set_layers_quantized
from yoloq.device import module_device
from yoloq.quant import backend
from yoloq.quant.state import quant_state

MODES = choices(SensitivityMode)


@torch.no_grad()
def _outputs(model: nn.Module, images: Sequence[torch.Tensor]) -> torch.Tensor:
    device = module_device(model)
    return torch.cat([model(x.to(device)) for x in images])


@torch.no_grad()
def layer_sensitivity(qmodel: nn.Module, fp32_model: nn.Module, images: Sequence[torch.Tensor],
                      mode: str = "quantize-one", layers: Optional[Sequence[str]] = None,
                      progress: bool = True) -> dict:
    """Rank the quantized layers of a calibrated ``qmodel`` by how much they hurt the output.

    ``images``: a few ``[B,3,S,S]`` batches (calibration images). The model's skip set is restored
    afterwards. Returns ``{"mode", "metric", "images", "seconds", "reference_sqnr_db", "ranking"}``
    with ranking rows ``{"rank", "layer", "score", "sqnr_db", "score_sqnr_db", "box_sqnr_db"}``.
    """
    if mode not in MODES:
        raise InputError(f"sensitivity mode '{mode}' unknown; expected one of {MODES}")
    if not images:
        raise InputError("layer_sensitivity: no images to score on")
    start = time.perf_counter()
    all_layers = list(quant_layers(qmodel))
    layers = list(layers) if layers is not None else all_layers
    unknown = [l for l in layers if l not in all_layers]
    if unknown:
        raise InputError(f"layer_sensitivity: not quantized layers: {unknown[:5]}")
    fp32_model.eval()
    qmodel.eval()
    refs = _outputs(fp32_model, images)
    saved_skips = list(quant_state(qmodel).skip_layers)
    rows = []
    with backend.quiet():
        try:
            # reference point: everything quantized (skip-one) or nothing (quantize-one)
            set_layers_quantized(qmodel, all_layers, mode == "skip-one")
            base = output_error(refs, _outputs(qmodel, images))["sqnr_db"]
            for layer in tqdm(layers, desc=f"sensitivity ({mode})", disable=not progress):
                set_layers_quantized(qmodel, [layer], mode == "quantize-one")
                err = output_error(refs, _outputs(qmodel, images))
                set_layers_quantized(qmodel, [layer], mode == "skip-one")
                score = -err["sqnr_db"] if mode == "quantize-one" else err["sqnr_db"] - base
                rows.append({"layer": layer, "score": score, **err})
        finally:
            set_layers_quantized(qmodel, all_layers, True)
            if saved_skips:
                set_layers_quantized(qmodel, saved_skips, False)
    rows.sort(key=lambda r: -r["score"])                # stable: model order among equals
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    metric = ("detector output SQNR vs FP32 with only this layer quantized (dB; lower = more sensitive)"
              if mode == "quantize-one" else
              "gain in detector output SQNR vs FP32 when only this layer is kept in float (dB; higher = more sensitive)")
    return {"mode": mode, "metric": metric, "images": int(sum(x.shape[0] for x in images)),
            "seconds": time.perf_counter() - start, "reference_sqnr_db": base, "ranking": rows}


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
