"""One quantization entry point: ``quantize(model, recipe, calib_data)``.

A recipe is an ordered list of small step configs; each config type has one handler (the shape of
torchao's ``quantize_(model, config)`` and ModelOpt's ``mtq.quantize(model, config, forward_loop)``)::

    recipe = [ChannelScale("all", alpha=0.9), Calibrate("auto"), BiasCorrect()]
    qmodel = quantize(fp32_model, recipe, calib_batches)

Steps act in phases, and a recipe lists them in phase order:

=============  ===========================================================================
``SOURCE``     the FP32 copy ``prepare`` starts from (BNs surviving ``fuse()`` folded):
               :class:`Equalize`
``PREPARE``    :class:`Prepare` (TensorRT placement, shared quantizers, named float layers);
               added with its defaults when a recipe has none
``PREPARED``   placed, not calibrated: :class:`FloatSE`, :class:`ChannelScale`
``CALIBRATE``  :class:`Calibrate` (one statistics pass; every range rule; ``auto``)
``CALIBRATED`` :class:`BiasCorrect`, :class:`Reconstruct`
``PARTIAL``    :class:`Partial` (sensitivity ranking, layers kept in float)
=============  ===========================================================================

``model`` is never changed; the result is a prepared copy whose ``QuantState.records`` holds what
each step did (the report's material). Images a step needs come from ``calib_data`` (train
images): the first ``images`` of them for the transforms, all of them for calibration. Everything
runs on the model's device. A step whose handler returns steps (``yoloq.quant.recipe_config``'s
automatic transform choice) has them inserted at their phases.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, ClassVar, Iterable, Optional, Sequence

import torch
from torch import nn

from yoloq.config import AUTO_METHODS
from yoloq.errors import InputError
from yoloq.quant.batches import count_images, first_images, image_batches
from yoloq.quant.state import quant_state


class Phase(IntEnum):
    SOURCE = 0
    PREPARE = 1
    PREPARED = 2
    CALIBRATE = 3
    CALIBRATED = 4
    PARTIAL = 5


class RecipeError(InputError):
    """A recipe that cannot run (steps out of order, a step the model cannot take)."""


# --------------------------------------------------------------------------- the steps


@dataclass(frozen=True)
class Equalize:
    """Exact cross-layer equalization of the FP32 source (data-free; ``yoloq.quant.equalize``)."""
    phase: ClassVar[Phase] = Phase.SOURCE


@dataclass(frozen=True)
class Prepare:
    """Quantizers placed as TensorRT wants them (``yoloq.quant.prepare``); ``skip_layers`` in float."""
    fold_bn: bool = True
    skip_layers: tuple = ()
    phase: ClassVar[Phase] = Phase.PREPARE


@dataclass(frozen=True)
class FloatSE:
    """Squeeze-excite convs (pooled maps) in float (``yoloq.quant.squeeze_excite``)."""
    phase: ClassVar[Phase] = Phase.PREPARED


@dataclass(frozen=True)
class ChannelScale:
    """Per-channel input scaling (``yoloq.quant.channel_scale``) from the per-channel input ranges
    of the source on the first ``images`` calibration images."""
    mode: str = "all"                  # depthwise | all
    alpha: float = 1.0
    images: int = 64
    phase: ClassVar[Phase] = Phase.PREPARED


@dataclass(frozen=True)
class Calibrate:
    """Activation ranges by ``method`` (max, percentile, percentile-<p>, entropy, mse, auto) from
    one statistics pass over every calibration image; ``auto`` scores ``auto_methods`` by the
    detector output on the first ``auto_images`` images (``yoloq.quant.calibrate``)."""
    method: str = "max"
    percentile: float = 99.99
    num_bins: int = 2048
    auto_methods: tuple = AUTO_METHODS
    auto_images: int = 32
    phase: ClassVar[Phase] = Phase.CALIBRATE


@dataclass(frozen=True)
class BiasCorrect:
    """Remove the weight-rounding shift of each conv output, measured on the first ``images``
    calibration images in one batch (``yoloq.quant.bias_correct``)."""
    images: int = 64
    phase: ClassVar[Phase] = Phase.CALIBRATED


@dataclass(frozen=True)
class Reconstruct:
    """AdaRound / BRECQ / QDrop on the first ``images`` calibration images (None: all), against
    the FP32 source (``yoloq.quant.reconstruct``); ``options``: ``ReconOptions`` fields."""
    method: str = "qdrop"
    images: Optional[int] = None
    options: tuple = ()                # ((field, value), ...) of ReconOptions
    phase: ClassVar[Phase] = Phase.CALIBRATED


@dataclass(frozen=True)
class Partial:
    """Rank layers by sensitivity on the first ``images`` calibration images, then keep in float
    the ``skip_count`` most sensitive ones, or the fewest whose AP drop measured by ``quantize``'s
    ``select`` is <= ``max_drop``; ``metric == "map"`` confirms the top with that AP."""
    metric: str = "fast"               # off | fast | map
    mode: str = "quantize-one"
    images: int = 16
    confirm_top: int = 5
    skip_count: Optional[int] = None
    max_drop: Optional[float] = None
    max_skip: Optional[int] = None
    phase: ClassVar[Phase] = Phase.PARTIAL

    @property
    def needs_selection(self) -> bool:
        return self.metric == "map" or self.max_drop is not None

    def check(self, run: "QuantRun") -> None:
        """Right after prepare: a fixed float-layer count must leave layers to choose from."""
        state = quant_state(run.qmodel)
        free = len(state.placement.layers) - len(state.skip_layers)
        if self.skip_count and self.skip_count > free:
            raise RecipeError(f"--skip-layers {self.skip_count}: only {free} quantized layers to choose from")
        if self.needs_selection and run.select is None:
            raise RecipeError("max_drop / sensitivity map measure AP on labeled train images: "
                              "quantize() needs select=")


# --------------------------------------------------------------------------- the run


class StepCache:
    """What several ``quantize`` calls on one FP32 model share (candidates of an automatic choice):
    the sources by (fold_bn, equalize) and their per-channel input ranges."""

    def __init__(self):
        self.sources: dict[tuple, tuple[nn.Module, Optional[dict]]] = {}
        self.ranges: dict[tuple, dict] = {}


class _NoTimer:
    @contextlib.contextmanager
    def stage(self, name: str):
        yield


@dataclass
class QuantRun:
    """What the handlers work on."""
    fp32: nn.Module                            # the caller's model (read only)
    calib: list                                # calibration batches on the model's device
    fold_bn: bool
    equalized: bool = False
    qmodel: Optional[nn.Module] = None
    records: dict = field(default_factory=dict)
    timer: object = field(default_factory=_NoTimer)
    cache: StepCache = field(default_factory=StepCache)
    select: Optional[Callable[[], object]] = None
    progress: bool = False

    @property
    def key(self) -> tuple:
        return self.fold_bn, self.equalized

    @property
    def source(self) -> nn.Module:
        """The FP32 model ``prepare`` starts from (BNs folded as prepare folds them, equalized when
        the recipe says so): its conv outputs are the prepared model's in float."""
        if (self.fold_bn, False) not in self.cache.sources:
            model = copy.deepcopy(self.fp32).eval()
            if self.fold_bn:
                from yoloq.models.common import fold_remaining_bn
                fold_remaining_bn(model)
            self.cache.sources[(self.fold_bn, False)] = (model, None)
        return self.cache.sources[self.key][0]

    def images(self, n: Optional[int]) -> list:
        return self.calib if n is None else first_images(self.calib, n)


Handler = Callable[[object, QuantRun], Optional[list]]
HANDLERS: dict[type, Handler] = {}


def register(step_type: type):
    """Decorator: the handler of ``step_type`` (one per type)."""
    def add(fn: Handler) -> Handler:
        HANDLERS[step_type] = fn
        return fn
    return add


def quantize(model: nn.Module, recipe: Sequence, calib_data: Iterable, *, progress: bool = False,
             timer=None, cache: Optional[StepCache] = None, select: Optional[Callable[[], object]] = None
             ) -> nn.Module:
    """Run ``recipe`` (step configs, in phase order) on a deploy-form FP32 ``model`` with
    ``calib_data`` (train image batches ``[B,3,S,S]`` in 0..1, or loader items ``(images, ...)``).
    Returns the quantized copy; ``quant_state(q).records`` says what each step did. ``select``
    makes the object whose ``drop(qmodel)`` (AP points) ``Partial(max_drop=...)`` minimises;
    ``timer`` (``StageTimer``-like) times the stages; ``cache`` is shared between calls on the
    same model."""
    steps = _checked(recipe)
    device = _model_device(model)
    prepare_step = next((s for s in steps if isinstance(s, Prepare)), Prepare())
    run = QuantRun(fp32=model.eval(), calib=[b.to(device) for b in image_batches(calib_data)],
                   fold_bn=prepare_step.fold_bn, timer=timer or _NoTimer(), cache=cache or StepCache(),
                   select=select, progress=progress)
    pending = list(steps)
    if not any(isinstance(s, Prepare) for s in pending):
        _insert(pending, [prepare_step])
    while pending:
        step = pending.pop(0)
        extra = HANDLERS[type(step)](step, run)
        if extra:
            _insert(pending, list(extra))
        if isinstance(step, Prepare):
            for later in pending:
                check = getattr(later, "check", None)
                if check:
                    check(run)
    quant_state(run.qmodel).records = run.records
    return run.qmodel


def _checked(recipe: Sequence) -> list:
    steps = list(recipe)
    for step in steps:
        if type(step) not in HANDLERS:
            raise RecipeError(f"quantize: {step!r} is not a step config (known: "
                              f"{', '.join(sorted(t.__name__ for t in HANDLERS))})")
    for before, after in zip(steps, steps[1:]):
        if after.phase < before.phase:
            raise RecipeError(f"quantize: {type(after).__name__} cannot come after {type(before).__name__} "
                              f"(phase {after.phase.name} before {before.phase.name})")
    kinds = [type(s) for s in steps]
    twice = sorted({k.__name__ for k in kinds if kinds.count(k) > 1})
    if twice:
        raise RecipeError(f"quantize: {', '.join(twice)} given more than once")
    return steps


def _insert(pending: list, new: list) -> None:
    """Put ``new`` steps (in their order) into ``pending`` at their phases, ahead of pending steps
    of the same phase (a chosen bias correction runs before a configured reconstruction)."""
    for step in reversed(new):
        at = next((i for i, s in enumerate(pending) if s.phase >= step.phase), len(pending))
        pending.insert(at, step)


def _model_device(model: nn.Module) -> torch.device:
    from yoloq.device import module_device
    return module_device(model)


# --------------------------------------------------------------------------- handlers


@register(Equalize)
def _equalize(step: Equalize, run: QuantRun) -> None:
    from yoloq.quant.equalize import equalize
    key = (run.fold_bn, True)
    if key not in run.cache.sources:
        with run.timer.stage("equalize"):
            model = copy.deepcopy(run.source)
            record = equalize(model)
        run.cache.sources[key] = (model, record)
    run.equalized = True
    run.records["equalize"] = run.cache.sources[key][1]


@register(Prepare)
def _prepare(step: Prepare, run: QuantRun) -> None:
    from yoloq.quant.prepare import prepare
    with run.timer.stage("prepare"):
        try:
            run.qmodel = prepare(run.source, fold_bn=step.fold_bn, skip_layers=step.skip_layers)
        except InputError as err:
            raise RecipeError(f"skip_layers: {err}") from err


@register(FloatSE)
def _float_se(step: FloatSE, run: QuantRun) -> None:
    from yoloq.quant.prepare import set_layers_quantized
    from yoloq.quant.squeeze_excite import conv_macs, flop_share, pooled_map_convs
    placed = set(quant_state(run.qmodel).placement.layers)
    se = [n for n in pooled_map_convs(run.fp32) if n in placed]
    set_layers_quantized(run.qmodel, se, False)
    macs = conv_macs(run.fp32, run.calib[0].shape[-1])
    run.records["se_float"] = {"layers": se, "count": len(se), "flop_share": flop_share(macs, se),
                               "note": "squeeze-excite convs (1x1 pooled maps) kept in float; not part of "
                                       "partial quantization"}


@register(ChannelScale)
def _channel_scale(step: ChannelScale, run: QuantRun) -> None:
    from yoloq.quant.channel_scale import apply_channel_scaling, input_absmax, scale_groups, selected
    with run.timer.stage("channel_scale"):
        state = quant_state(run.qmodel)
        groups = selected(scale_groups(run.source, state.placement.layers), step.mode, state.skip_layers)
        batches = run.images(step.images)
        ranges = run.cache.ranges.setdefault(run.key, {})        # shared by the candidates of an auto choice
        missing = [g.readers[0] for g in groups if g.readers[0] not in ranges]
        if missing:
            ranges.update(input_absmax(run.source, missing, batches))
        run.records["channel_scale"] = apply_channel_scaling(run.qmodel, run.source, batches, step.mode, step.alpha,
                                                             ranges)


@register(Calibrate)
def _calibrate(step: Calibrate, run: QuantRun) -> None:
    from yoloq.quant.calibrate import calibrate, calibrate_auto
    with run.timer.stage("calibrate"):
        if step.method == "auto":
            per_batch = run.calib[0].shape[0]
            info = calibrate_auto(run.qmodel, run.calib, run.fp32, list(step.auto_methods),
                                  num_bins=step.num_bins, score_batches=max(1, -(-step.auto_images // per_batch)),
                                  progress=run.progress)
            record = {"requested": "auto", "method": info["method"], "auto_errors": info["errors"],
                      "auto_metric": info["metric"], "auto_images": info["images"]}
        else:
            calibrate(run.qmodel, run.calib, step.method, step.percentile, num_bins=step.num_bins,
                      progress=run.progress)
            record = {"requested": step.method, "method": quant_state(run.qmodel).calib.method}
    run.records["calibration"] = {**record, "images": count_images(run.calib)}


@register(BiasCorrect)
def _bias_correct(step: BiasCorrect, run: QuantRun) -> None:
    from yoloq.quant.bias_correct import bias_correction
    with run.timer.stage("bias_correction"):
        run.records["bias_correction"] = bias_correction(run.qmodel, torch.cat(run.images(step.images)))


@register(Reconstruct)
def _reconstruct(step: Reconstruct, run: QuantRun) -> None:
    from yoloq.quant.reconstruct import ReconOptions, reconstruct
    with run.timer.stage("reconstruct"):
        opts = ReconOptions(method=step.method, progress=run.progress, **dict(step.options))
        run.records["reconstruction"] = reconstruct(run.qmodel, run.source, run.images(step.images), opts)


@register(Partial)
def _partial(step: Partial, run: QuantRun) -> None:
    from yoloq.quant.partial import confirm_with_map, partial_quantization
    from yoloq.quant.sensitivity import layer_sensitivity
    if step.metric == "off" and not step.skip_count and step.max_drop is None:
        return
    with run.timer.stage("sensitivity"):
        ranking = layer_sensitivity(run.qmodel, run.fp32, run.images(step.images), step.mode, progress=run.progress)
    selection = None
    if step.needs_selection:
        with run.timer.stage("selection_fp32"):
            selection = run.select()
        run.records["selection"] = selection.info
    with run.timer.stage("partial_search" if step.max_drop is not None else "partial"):
        run.records["partial"] = partial_quantization(run.qmodel, ranking, selection, step.skip_count,
                                                      step.max_drop, step.max_skip, run.progress)
    if step.metric == "map":
        with run.timer.stage("sensitivity_map"):
            confirm_with_map(run.qmodel, ranking, selection, step.confirm_top, run.progress)
    run.records["sensitivity"] = ranking
