"""The recipe a ``QuantConfig`` asks for, and the automatic choice of the PTQ transforms.

``recipe_from_config(qcfg)`` turns the ``quant`` section into step configs for
``yoloq.quant.quantize``::

    [Equalize] -> Prepare -> [FloatSE] -> [ChannelScale] -> Calibrate -> [BiasCorrect]
        -> [Reconstruct] -> [Partial]

- ``equalize`` (``yoloq.quant.equalize``): exact cross-layer equalization on a copy of the FP32
  model (remaining BNs folded first when ``fold_qarepvgg_post_bn``), data-free;
- ``se_float`` (``yoloq.quant.squeeze_excite``): convs on globally pooled maps stay in float;
- ``channel_scale`` (``yoloq.quant.channel_scale``): per-channel input scaling from per-channel
  input ranges on ``transforms.images`` calibration images; ``channel_scale_alpha: null`` picks the
  migration strength among ``channel_scale_alphas``;
- ``bias_correction`` (``yoloq.quant.bias_correct``): after calibration, the weight-rounding
  shift of each conv output measured on the same images, removed through the bias.

When a switch is ``auto`` (or ``channel_scale: all`` has no alpha), the recipe starts with an
:class:`AutoTransforms` step. It decides greedily in the order above: each candidate is quantized
by the same ``quantize`` on the ``transforms.images`` images, calibrated as the run calibrates
(``calibration.method``, ``auto`` included: a candidate judged under another range rule than the
one the run gives it can win the search and lose the run), and scored by the detector output SQNR
against FP32 on the first ``calibration.auto_images`` of them (``yoloq.quant.metrics.output_error``);
the chosen steps are then inserted into the run. Validation images are never used.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from tqdm import tqdm

from yoloq.config import QuantConfig
from yoloq.quant.metrics import output_error
from yoloq.quant.state import quant_state
from yoloq.quant.recipe import (BiasCorrect, Calibrate, ChannelScale, Equalize, FloatSE, Partial, Phase, Prepare,
                                QuantRun, Reconstruct, quantize, register)

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

    def steps(self, images: int) -> list:
        """The step configs of this plan (transforms on the first ``images`` calibration images)."""
        out: list = [Equalize()] if self.equalize else []
        if self.se_float:
            out.append(FloatSE())
        if self.channel_scale != "off":
            out.append(ChannelScale(self.channel_scale, self.alpha if self.alpha is not None else 1.0, images))
        if self.bias_correction:
            out.append(BiasCorrect(images))
        return out


def plan_from_config(qcfg: QuantConfig) -> TransformPlan:
    """The fixed part of the config (an ``auto`` step starts off)."""
    t = qcfg.transforms
    return TransformPlan(equalize=t.equalize is True, se_float=t.se_float is True,
                         channel_scale=t.channel_scale if t.channel_scale != "auto" else "off",
                         alpha=t.channel_scale_alpha, bias_correction=t.bias_correction is True)


def needs_search(qcfg: QuantConfig) -> bool:
    """Does the config leave anything to choose on calibration images?"""
    t = qcfg.transforms
    auto = any(getattr(t, s) == "auto" for s in STEPS)
    return auto or (t.channel_scale == "all" and t.channel_scale_alpha is None)


def proxy_method(qcfg: QuantConfig) -> str:
    """How the search calibrates its candidates: exactly as the run will (``auto`` included, so a
    candidate is judged under the range rule the run would pick for it, not under a stand-in)."""
    c = qcfg.calibration
    if c.method == "auto":
        return f"auto ({', '.join(c.auto_methods)})"
    return c.method if c.method != "percentile" else f"percentile-{c.percentile:g}"


def _run_calibration(qcfg: QuantConfig) -> Calibrate:
    c = qcfg.calibration
    return Calibrate(c.method, c.percentile, c.num_bins, tuple(c.auto_methods), c.auto_images)


def recipe_from_config(qcfg: QuantConfig, skip_count: Optional[int] = None, rank: bool = False) -> list:
    """The step configs ``qcfg`` asks for. ``skip_count`` keeps that many most sensitive layers in
    float; ``rank`` adds the sensitivity ranking even when no layer is to be kept in float (the
    PTQ report shows it)."""
    c, t, r, s, p = qcfg.calibration, qcfg.transforms, qcfg.reconstruction, qcfg.sensitivity, qcfg.partial
    plan = plan_from_config(qcfg)
    steps = plan.steps(t.images)
    if needs_search(qcfg):
        steps = [AutoTransforms(qcfg)]
    steps.append(Prepare(fold_bn=qcfg.fold_qarepvgg_post_bn, skip_layers=tuple(p.skip_layers)))
    steps.append(_run_calibration(qcfg))
    if r.method != "off":
        options = (("iters", r.iters), ("batch_size", r.batch_size), ("reg_weight", r.reg_weight),
                   ("drop_prob", r.drop_prob), ("device", r.device), ("seed", qcfg.seed))
        steps.append(Reconstruct(r.method, r.images, options))
    if skip_count or p.max_drop is not None or (rank and s.metric != "off"):
        steps.append(Partial(s.metric, s.mode, s.images, s.confirm_top, skip_count, p.max_drop, p.max_skip))
    return sorted(steps, key=lambda step: step.phase)      # stable: the order above within a phase


# --------------------------------------------------------------------------- the automatic choice


@dataclass(frozen=True)
class AutoTransforms:
    """Choose the ``auto`` transforms of ``qcfg`` on calibration images; the chosen steps replace it."""
    qcfg: QuantConfig
    phase: ClassVar[Phase] = Phase.SOURCE


@register(AutoTransforms)
def _auto_transforms(step: AutoTransforms, run: QuantRun) -> list:
    with run.timer.stage("transforms_auto"):
        plan, trials = search(run, step.qcfg)
    run.records["transforms_auto"] = {"plan": plan, "trials": trials}
    return plan.steps(step.qcfg.transforms.images)


def search(run: QuantRun, qcfg: QuantConfig) -> tuple[TransformPlan, list[dict]]:
    """Greedy choice of every ``auto`` step (and of alpha when it is null), in pipeline order."""
    batches = run.images(qcfg.transforms.images)
    images = torch.cat(batches)[: qcfg.calibration.auto_images]
    with torch.no_grad():
        refs = run.fp32(images)
    plan = plan_from_config(qcfg)
    trials: list[dict] = []
    scored: dict[TransformPlan, float] = {}

    def score(candidate: TransformPlan) -> float:
        if candidate not in scored:
            scored[candidate], method = _score(run, qcfg, candidate, batches, images, refs)
            trials.append({"plan": candidate.label(), "alpha": candidate.alpha, "sqnr_db": scored[candidate],
                           "calib": method})
        return scored[candidate]

    for step, options in _options(qcfg):
        candidates = [dataclasses.replace(plan, **o) for o in options]
        bar = tqdm(candidates, desc=f"transforms auto: {step}", disable=not run.progress)
        plan = max(bar, key=score)    # first of equals wins (options list the cheaper first)
    return plan, trials


def choose_alpha(fp32: torch.nn.Module, qcfg: QuantConfig, batches: list) -> dict:
    """What ``channel_scale_alpha: null`` picks among ``channel_scale_alphas`` on ``batches``
    (calibration images): ``{"chosen": alpha, "trials": [{"plan", "alpha", "sqnr_db"}, ...]}``."""
    t = dataclasses.replace(qcfg.transforms, channel_scale="all", channel_scale_alpha=None)
    qcfg = dataclasses.replace(qcfg, transforms=t)
    run = QuantRun(fp32=fp32.eval(), calib=list(batches), fold_bn=qcfg.fold_qarepvgg_post_bn)
    plan, trials = search(run, qcfg)
    return {"chosen": plan.alpha, "trials": [dict(trial) for trial in trials]}


def _options(qcfg: QuantConfig):
    t = qcfg.transforms
    alphas = [float(a) for a in t.channel_scale_alphas]
    if t.equalize == "auto":
        yield "equalize", [{"equalize": False}, {"equalize": True}]
    if t.se_float == "auto":
        yield "se_float", [{"se_float": False}, {"se_float": True}]
    fixed = t.channel_scale_alpha
    all_modes = [{"channel_scale": "all", "alpha": a} for a in ([fixed] if fixed is not None else alphas)]
    if t.channel_scale == "auto":
        dw_alpha = fixed if fixed is not None else 1.0
        yield "channel_scale", [{"channel_scale": "off"}, {"channel_scale": "depthwise", "alpha": dw_alpha}] + all_modes
    elif t.channel_scale == "all" and fixed is None:
        yield "channel_scale_alpha", all_modes
    if t.bias_correction == "auto":
        yield "bias_correction", [{"bias_correction": False}, {"bias_correction": True}]


def _score(run: QuantRun, qcfg: QuantConfig, plan: TransformPlan, batches: list, images: torch.Tensor,
           refs: torch.Tensor) -> tuple[float, str]:
    """Detector output SQNR of ``plan`` calibrated on the transform images as the run calibrates,
    and the range rule that calibration used."""
    recipe = plan.steps(qcfg.transforms.images) + [
        Prepare(fold_bn=qcfg.fold_qarepvgg_post_bn, skip_layers=tuple(qcfg.partial.skip_layers)),
        _run_calibration(qcfg)]
    qmodel = quantize(run.fp32, sorted(recipe, key=lambda s: s.phase), batches, cache=run.cache)
    with torch.no_grad():
        return output_error(refs, qmodel(images))["sqnr_db"], quant_state(qmodel).calib.method


def report_record(qcfg: QuantConfig, records: dict, timings: dict) -> dict:
    """What the report lists per transform: applied or not, how it was decided, details, seconds."""
    t = qcfg.transforms
    auto = records.get("transforms_auto")
    plan = auto["plan"] if auto else plan_from_config(qcfg)
    trials = auto["trials"] if auto else []
    asked = {s: getattr(t, s) for s in STEPS}
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
