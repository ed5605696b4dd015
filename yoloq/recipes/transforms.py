"""The PTQ transforms in one run, and their automatic choice on calibration images.

Order of a PTQ run (reconstruction, when present, comes after bias correction)::

    FP32 fused model -> [equalize] -> prepare -> [SE convs in float] -> [channel scaling]
        -> calibrate -> [bias correction] -> evaluate

- ``equalize`` (``yoloq.quant.equalize``): exact cross-layer equalization on a copy of the FP32
  model (remaining BNs folded first when ``fold_qarepvgg_post_bn``), data-free;
- ``se_float`` (``yoloq.quant.squeeze_excite``): convs on globally pooled maps stay in float;
- ``channel_scale`` (``yoloq.quant.channel_scale``): per-channel input scaling from per-channel
  input ranges on ``transform_images`` calibration images; ``channel_scale_alpha: null`` picks the
  migration strength among ``channel_scale_alphas``;
- ``bias_correction`` (``yoloq.quant.bias_correct``): after calibration, the weight-rounding
  shift of each conv output measured on the same images, removed through the bias.

``auto`` (any of the switches) decides greedily in that order: each candidate is prepared,
calibrated with a proxy range rule on the ``transform_images`` images and scored by the detector
output SQNR against FP32 on the first ``auto_images`` of them (``yoloq.quant.metrics.output_error``).
Validation images are never used.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from yoloq.config import QuantConfig
from yoloq.quant.bias_correct import bias_correction
from yoloq.quant.calibrate import apply_calibration, collect_statistics
from yoloq.quant.channel_scale import absmax_hook, apply_channel_scaling, scale_groups, selected
from yoloq.quant.equalize import equalize
from yoloq.quant.metrics import output_error
from yoloq.quant.prepare import prepare, set_layers_quantized
from yoloq.quant.squeeze_excite import conv_macs, flop_share, pooled_map_convs
from yoloq.quant.state import quant_state
from yoloq.recipes.common import StageTimer

STEPS = ("equalize", "se_float", "channel_scale", "bias_correction")


@dataclass(frozen=True)
class TransformPlan:
    """Which transforms one model gets (``alpha`` None: chosen on calibration images)."""
    equalize: bool = False
    se_float: bool = False
    channel_scale: str = "off"
    alpha: Optional[float] = None
    bias_correction: bool = False

    def label(self) -> str:
        parts = ["equalize"] if self.equalize else []
        if self.se_float:
            parts.append("SE float")
        if self.channel_scale != "off":
            parts.append(f"scale {self.channel_scale}" + (f" a={self.alpha:g}" if self.alpha is not None else ""))
        if self.bias_correction:
            parts.append("bias correction")
        return " + ".join(parts) or "none"


def plan_from_config(qcfg: QuantConfig) -> TransformPlan:
    """The fixed part of the config (an ``auto`` step starts off)."""
    return TransformPlan(equalize=qcfg.equalize is True, se_float=qcfg.se_float is True,
                         channel_scale=qcfg.channel_scale if qcfg.channel_scale != "auto" else "off",
                         alpha=qcfg.channel_scale_alpha, bias_correction=qcfg.bias_correction is True)


def needs_search(qcfg: QuantConfig) -> bool:
    """Does the config leave anything to choose on calibration images?"""
    auto = any(getattr(qcfg, s) == "auto" for s in STEPS)
    return auto or (qcfg.channel_scale == "all" and qcfg.channel_scale_alpha is None)


def proxy_method(qcfg: QuantConfig) -> str:
    """Range rule calibrating the candidates of the search (the configured one, or entropy for
    ``calib: auto``, which the final calibration still decides)."""
    if qcfg.calib != "auto":
        return qcfg.calib if qcfg.calib != "percentile" else f"percentile-{qcfg.percentile:g}"
    return "entropy" if "entropy" in qcfg.auto_methods else qcfg.auto_methods[0]


class Transforms:
    """Applies a plan to one FP32 model; caches what candidates share (the equalized copy, channel
    ranges, the SE convs, FP32 reference outputs)."""

    def __init__(self, fp32: nn.Module, qcfg: QuantConfig, images: torch.Tensor,
                 timer: Optional[StageTimer] = None, progress: bool = False):
        self.fp32, self.qcfg, self.images = fp32.eval(), qcfg, images
        self.timer = timer or StageTimer()
        self.progress = progress
        self._sources: dict[bool, tuple[nn.Module, dict]] = {}
        self._ranges: dict[bool, dict] = {}
        self._se: Optional[list[str]] = None
        self.records: dict = {}

    # ----------------------------------------------------------------- pieces

    def source(self, plan: TransformPlan) -> nn.Module:
        """The FP32 model prepare starts from: a copy with the remaining BNs folded as prepare would
        fold them (so its conv outputs are the prepared model's), equalized when the plan says so."""
        if plan.equalize not in self._sources:
            with self.timer.stage("equalize") if plan.equalize else contextlib.nullcontext():
                model = copy.deepcopy(self.fp32)
                if self.qcfg.fold_qarepvgg_post_bn:
                    from yoloq.models.common import fold_remaining_bn
                    fold_remaining_bn(model)
                record = equalize(model) if plan.equalize else None
            self._sources[plan.equalize] = (model, record)
        return self._sources[plan.equalize][0]

    def se_convs(self) -> list[str]:
        if self._se is None:
            self._se = pooled_map_convs(self.fp32)
        return self._se

    @torch.no_grad()
    def ranges(self, plan: TransformPlan, layers: list[str]) -> dict:
        """Per-channel input absmax of ``layers`` in the source model on the transform images
        (cached per source; one pass for the layers not measured yet)."""
        ranges = self._ranges.setdefault(plan.equalize, {})
        missing = [n for n in layers if n not in ranges]
        if missing:
            model = self.source(plan)
            handles = [model.get_submodule(n).register_forward_pre_hook(absmax_hook(ranges, n)) for n in missing]
            try:
                for batch in self.images.split(self.qcfg.batch_size):
                    model(batch)
            finally:
                for h in handles:
                    h.remove()
        return ranges

    def after_prepare(self, qmodel: nn.Module, plan: TransformPlan, alpha: float) -> dict:
        """SE convs to float, then channel scaling (prepared, uncalibrated ``qmodel``)."""
        records = {}
        if plan.se_float:
            se = [n for n in self.se_convs() if n in quant_state(qmodel).placement.layers]
            set_layers_quantized(qmodel, se, False)
            records["se_float"] = self.se_record(se)
        if plan.channel_scale != "off":
            with self.timer.stage("channel_scale"):
                source = self.source(plan)
                state = quant_state(qmodel)
                groups = selected(scale_groups(source, state.placement.layers), plan.channel_scale, state.skip_layers)
                ranges = self.ranges(plan, [g.readers[0] for g in groups])
                records["channel_scale"] = apply_channel_scaling(qmodel, source, [], plan.channel_scale, alpha,
                                                                 ranges)
        return records

    def se_record(self, layers: list[str]) -> dict:
        macs = conv_macs(self.fp32, self.images.shape[-1])
        return {"layers": layers, "count": len(layers), "flop_share": flop_share(macs, layers),
                "note": "squeeze-excite convs (1x1 pooled maps) kept in float; not part of partial quantization"}

    def correct_biases(self, qmodel: nn.Module) -> dict:
        """Bias correction of the calibrated ``qmodel`` on the transform images."""
        with self.timer.stage("bias_correction"):
            return bias_correction(qmodel, self.images)

    # ----------------------------------------------------------------- the automatic choice

    def search(self, qcfg: QuantConfig) -> tuple[TransformPlan, list[dict]]:
        """Greedy choice of every ``auto`` step (and of alpha when it is null), in pipeline order."""
        images = self.images[: qcfg.auto_images]
        with torch.no_grad():
            refs = self.fp32(images)
        plan = plan_from_config(qcfg)
        trials: list[dict] = []
        scored: dict[TransformPlan, float] = {}

        def score(candidate: TransformPlan) -> float:
            if candidate not in scored:
                scored[candidate] = self._score(candidate, images, refs)
                trials.append({"plan": candidate.label(), "sqnr_db": scored[candidate]})
            return scored[candidate]

        timer, self.timer = self.timer, StageTimer()      # candidates' steps are not the run's steps
        try:
            for step, options in self._options(qcfg, plan):
                candidates = [dataclasses.replace(plan, **o) for o in options]
                bar = tqdm(candidates, desc=f"transforms auto: {step}", disable=not self.progress)
                plan = max(bar, key=score)    # first of equals wins (options list the cheaper first)
        finally:
            self.timer = timer
        return plan, trials

    def _options(self, qcfg: QuantConfig, plan: TransformPlan):
        alphas = [float(a) for a in qcfg.channel_scale_alphas]
        if qcfg.equalize == "auto":
            yield "equalize", [{"equalize": False}, {"equalize": True}]
        if qcfg.se_float == "auto":
            yield "se_float", [{"se_float": False}, {"se_float": True}]
        fixed_alpha = qcfg.channel_scale_alpha
        all_modes = [{"channel_scale": "all", "alpha": a} for a in ([fixed_alpha] if fixed_alpha is not None else alphas)]
        if qcfg.channel_scale == "auto":
            dw_alpha = fixed_alpha if fixed_alpha is not None else 1.0
            yield "channel_scale", [{"channel_scale": "off"}, {"channel_scale": "depthwise", "alpha": dw_alpha}] + all_modes
        elif qcfg.channel_scale == "all" and fixed_alpha is None:
            yield "channel_scale_alpha", all_modes
        if qcfg.bias_correction == "auto":
            yield "bias_correction", [{"bias_correction": False}, {"bias_correction": True}]

    def _score(self, plan: TransformPlan, images: torch.Tensor, refs: torch.Tensor) -> float:
        qmodel = self.build(plan, prepare_fn=lambda m: prepare(m, self.qcfg))
        collect_statistics(qmodel, self.images.split(self.qcfg.batch_size), num_bins=self.qcfg.num_bins,
                           progress=False)
        apply_calibration(qmodel, proxy_method(self.qcfg))
        if plan.bias_correction:
            self.correct_biases(qmodel)
        with torch.no_grad():
            return output_error(refs, qmodel(images))["sqnr_db"]

    def build(self, plan: TransformPlan, prepare_fn: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """Equalize, prepare (``prepare_fn``), SE to float, channel scaling: an uncalibrated model."""
        qmodel = prepare_fn(self.source(plan))
        self.records = {"equalize": self._sources[True][1]} if plan.equalize else {}
        self.records.update(self.after_prepare(qmodel, plan, plan.alpha if plan.alpha is not None else 1.0))
        return qmodel


def report_record(plan: TransformPlan, qcfg: QuantConfig, records: dict, trials: list, timings: dict) -> dict:
    """What the report lists per step: applied or not, how it was decided, details, seconds."""
    asked = {"equalize": qcfg.equalize, "se_float": qcfg.se_float, "channel_scale": qcfg.channel_scale,
             "bias_correction": qcfg.bias_correction}
    applied = {"equalize": plan.equalize, "se_float": plan.se_float,
               "channel_scale": plan.channel_scale if plan.channel_scale != "off" else False,
               "bias_correction": plan.bias_correction}
    steps = {s: {"asked": asked[s], "applied": applied[s], "seconds": timings.get(s),
                 "details": records.get(s)} for s in STEPS}
    if plan.channel_scale != "off":
        steps["channel_scale"]["alpha"] = plan.alpha
    return {"plan": plan.label(), "steps": steps, "auto_trials": trials, "auto_seconds": timings.get("transforms_auto"),
            "auto_metric": ("detector output SQNR vs FP32 (dB) on calibration images, candidates calibrated with "
                            f"{proxy_method(qcfg)}") if trials else None}
