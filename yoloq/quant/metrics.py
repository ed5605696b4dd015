"""How far a quantized tensor or detector output is from FP32: SQNR in dB.

``power_ratio_db`` is the one formula; ``sqnr_db`` applies it to a reference and a test tensor
(optionally weighted); ``output_error`` scores a detector's ``[B, N, 4 + nc]`` output the way
calibration ``auto``, the sensitivity ranking and the PTQ transforms compare candidates.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

SQNR_CAP_DB = 200.0


def power_ratio_db(signal_power: float, noise_power: float) -> float:
    """10 log10(signal / noise), capped at +-200 dB (no noise: +200; no signal: -200), to 1e-9 dB:
    the float64 sums behind the powers are split by the thread count, which moves their last bits;
    rounded, rankings and reports are the same with any thread count."""
    if noise_power <= 0:
        return SQNR_CAP_DB
    if signal_power <= 0:
        return -SQNR_CAP_DB
    return round(min(SQNR_CAP_DB, 10.0 * math.log10(signal_power / noise_power)), 9)


def sqnr_db(reference: torch.Tensor, test: torch.Tensor, weight: Optional[torch.Tensor] = None) -> float:
    """10 log10(sum w*ref^2 / sum w*(test-ref)^2), capped at 200 dB."""
    return power_ratio_db(*_powers(reference, test, weight))


def output_error(reference: torch.Tensor, output: torch.Tensor) -> dict[str, float]:
    """Detector output error vs FP32. For ``[B, N, 4 + nc]`` outputs: SQNR of the class scores,
    SQNR of the boxes weighted by the FP32 best score of each anchor (background boxes do not
    matter), and their mean (``sqnr_db``, higher is better). Other outputs: plain SQNR."""
    return error_from_powers(output_powers(reference, output))


def output_powers(reference: torch.Tensor, output: torch.Tensor) -> dict[str, tuple[float, float]]:
    """The (signal, noise) power sums behind ``output_error``; they add over batches, so
    ``error_from_powers`` of the summed parts is the error of the concatenated outputs."""
    if reference.dim() == 3 and reference.shape[-1] > 4:
        scores_ref = reference[..., 4:]
        return {"score": _powers(scores_ref, output[..., 4:]),
                "box": _powers(reference[..., :4], output[..., :4], scores_ref.amax(-1, keepdim=True))}
    return {"all": _powers(reference, output)}


def add_powers(total: dict | None, part: dict) -> dict:
    """``total`` + ``part``, key by key (``total`` None: ``part``)."""
    if total is None:
        return dict(part)
    return {k: (total[k][0] + part[k][0], total[k][1] + part[k][1]) for k in total}


def error_from_powers(powers: dict[str, tuple[float, float]]) -> dict[str, float]:
    if "all" in powers:
        return {"sqnr_db": power_ratio_db(*powers["all"])}
    score, box = power_ratio_db(*powers["score"]), power_ratio_db(*powers["box"])
    return {"sqnr_db": 0.5 * (score + box), "score_sqnr_db": score, "box_sqnr_db": box}


def _powers(reference: torch.Tensor, test: torch.Tensor, weight: Optional[torch.Tensor] = None) -> tuple[float, float]:
    ref, err = reference.double(), (test.double() - reference.double())
    w = torch.ones_like(ref) if weight is None else weight.double().expand_as(ref)
    return float((w * ref ** 2).sum()), float((w * err ** 2).sum())


