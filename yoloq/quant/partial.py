"""Partial quantization: which layers stay in floating point, from a sensitivity ranking.

``skip_count`` keeps the layers the fast sensitivity metric (``yoloq.quant.sensitivity``) ranks
worst in float; ``max_drop`` searches the smallest such count whose AP drop, measured by a
*selection* (``drop(qmodel)`` in AP points: ``yoloq.recipes.partial.Selection`` measures it on
labeled train images, never on val), is <= the target; ``confirm_with_map`` measures the top of the
ranking with that AP. Layers already kept in float (named in ``skip_layers``, SE convs) stay so and
are not counted.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn
from tqdm import tqdm

from yoloq.quant.prepare import set_layers_quantized
from yoloq.quant.sensitivity import search_skip_count
from yoloq.quant.state import quant_state


def partial_quantization(qmodel: nn.Module, sensitivity: dict, selection, skip_count: Optional[int],
                         max_drop: Optional[float], max_skip: Optional[int], progress: bool) -> dict:
    """Keep the most sensitive layers in float: a fixed count (``skip_count``) or the smallest count
    whose ``selection.drop`` is <= ``max_drop`` (at most ``max_skip``). Returns the report record."""
    explicit = set(quant_state(qmodel).skip_layers)
    ranked = [r["layer"] for r in sensitivity["ranking"] if r["layer"] not in explicit]

    def keep_in_float(layers: Sequence[str]) -> None:
        set_layers_quantized(qmodel, ranked, True)
        if layers:
            set_layers_quantized(qmodel, list(layers), False)

    if skip_count:
        keep_in_float(ranked[:skip_count])
        return {"mode": f"--skip-layers {skip_count} (most sensitive by the fast metric)", "k": skip_count}
    if max_drop is None:
        return {"mode": None}

    def measure(layers: list[str]) -> float:
        keep_in_float(layers)
        return selection.drop(qmodel)

    k, trace = search_skip_count(ranked, measure, max_drop, max_k=max_skip, progress=progress)
    keep_in_float(ranked[:k])
    note = (f"searched on {selection.info['images']} labeled train images "
            f"({selection.info['disjoint_from_calibration']} not used for calibration), "
            f"FP32 AP there {selection.fp32_ap * 100:.2f}; never on val")
    if all(t["drop"] > max_drop for t in trace):
        note += f"; target not reached: kept the {k} most sensitive layers in float"
    return {"mode": f"--max-drop {max_drop}", "k": k, "search": trace,
            "metric": "AP drop (points) on labeled train images", "note": note}


def confirm_with_map(qmodel: nn.Module, sensitivity: dict, selection, top: int, progress: bool) -> None:
    """For the ``top`` most sensitive layers: selection AP drop with that layer alone in float
    (everything else as currently configured); stored as ``map_drop`` on the ranking rows."""
    current = list(quant_state(qmodel).skip_layers)
    base = selection.drop(qmodel)
    sensitivity["map_reference_drop"] = base
    for row in tqdm(sensitivity["ranking"][:top], desc="sensitivity (mAP)", disable=not progress):
        if row["layer"] in current:
            continue
        set_layers_quantized(qmodel, [row["layer"]], False)
        row["map_drop"] = selection.drop(qmodel)
        set_layers_quantized(qmodel, [row["layer"]], True)
    sensitivity["map_metric"] = ("AP drop (points) vs FP32 on labeled train images with this layer kept in float; "
                                 f"all layers quantized: {base:.2f}")
