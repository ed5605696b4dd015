"""The cost model of the default PTQ run (``yoloq bench-cost``): the arithmetic.

Two runs of ``yoloq ptq`` with the model's default settings differ only in their image counts: a
*small* run (few eval images, a reduced calibration count) and a *large* one (more of both). Each
stage named in ``report.json``'s ``timings`` is put in one of three kinds by what drives its cost:

- ``eval``: the FP32 and INT8 evaluations, one pass over the val images each (loading, model,
  NMS, COCOeval);
- ``calib``: loading the calibration images and calibrating on them (plus a fixed part: ``calib:
  auto`` scores its candidates on a fixed ``auto_images`` count);
- ``fixed``: everything else (loading the model, the PTQ transforms on ``transform_images``,
  bias correction, sensitivity on ``sensitivity_images``, diagnosis, saving): a fixed count of
  calibration images or none, never the val set.

A driven stage is fitted as ``a + b * n`` through its two measurements (``b`` >= 0: the per-image
cost); a fixed stage takes its small-run time (the large run may skip the costly ones), and a
fixed stage that grows between the runs is flagged: it does not keep its cost proportionate.
``report.json``'s ``total`` minus its stages (report writing, plots) is fixed too, and so is the
command's start (``wall - total``: imports). From the fits: the run at any scale, e.g. COCO
val2017 (5,000 eval images, 256 calibration images), and the ratio "default run / one FP32
evaluation" (``total / eval_fp32`` at that scale, as the README's 5.4x).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from yoloq.errors import InputError

EVAL_STAGES = ("eval_fp32", "eval_int8")
CALIB_STAGES = ("load_calibration_images", "calibrate")
OTHER, STARTUP = "other", "startup"          # total - stages; wall - total
RATIO_LIMIT = 6.0                            # issue 24: default run <= 6x one FP32 evaluation
GROWTH_FLAG = (1.0, 0.5)                     # a fixed stage grew by > 1 s and > 50 %: flagged
DRIVER_LABEL = {"eval": "eval images", "calib": "calibration images", "fixed": "nothing (fixed count)"}
BYTES_PER_DETECTION = 56                     # one kept NMS row (yoloq.eval.detections)
MAX_DETECTIONS = 300


class CostError(InputError):
    """Timings the cost model cannot use (a stage missing, the same image count twice)."""


@dataclass(frozen=True)
class Scale:
    """The image counts of one run."""
    eval_images: int
    calib_images: int

    def count(self, driver: str) -> int:
        return {"eval": self.eval_images, "calib": self.calib_images}.get(driver, 0)


OTHER_CPUS_LIMIT = 0.25                       # CPUs other work may hold before a run counts as loaded
COCO_VAL2017 = Scale(5000, 256)
SHARED_VAL = Scale(500, 256)                 # ../shared/coco: the README's 5.4x was measured on it


@dataclass
class RunRecord:
    """One measured ``yoloq ptq`` run: its scale, ``report.json``'s timings (seconds per stage and
    ``total``), the command's wall time and its peak RSS."""
    scale: Scale
    timings: dict
    wall_s: float
    peak_rss_mb: float
    load_average: float = 0.0               # the 1-minute load average, the higher of before / after
    cpus: int = 0
    other_cpus: Optional[float] = None      # CPUs that other processes kept busy, on average, during the run

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        return cls(scale=Scale(**d["scale"]), timings=dict(d["timings"]), wall_s=float(d["wall_s"]),
                   peak_rss_mb=float(d["peak_rss_mb"]), load_average=float(d.get("load_average", 0.0)),
                   cpus=int(d.get("cpus", 0)), other_cpus=d.get("other_cpus"))

    def loaded(self) -> bool:
        """Measured while other work held the CPUs: other processes kept more than
        ``OTHER_CPUS_LIMIT`` CPUs busy on average (the load average counts the run's own threads
        and loader workers, so it only decides for records without that measurement)."""
        if self.other_cpus is not None:
            return self.other_cpus > OTHER_CPUS_LIMIT
        return self.cpus > 0 and self.load_average > self.cpus

    def stages(self) -> dict:
        """The stage seconds, without ``total``, plus ``other`` (the rest of ``total``) and
        ``startup`` (the rest of the wall time)."""
        if "total" not in self.timings:
            raise CostError(f"timings without 'total': {sorted(self.timings)}")
        named = {k: float(v) for k, v in self.timings.items() if k != "total"}
        total = float(self.timings["total"])
        return {**named, OTHER: max(0.0, total - sum(named.values())), STARTUP: max(0.0, self.wall_s - total)}


def driver_of(stage: str) -> str:
    """What a stage's cost grows with: ``eval`` images, ``calib`` images, or nothing (``fixed``)."""
    return "eval" if stage in EVAL_STAGES else "calib" if stage in CALIB_STAGES else "fixed"


@dataclass
class StageCost:
    """``seconds(n) = fixed_s + per_image_s * n`` for ``n`` images of the stage's driver."""
    name: str
    driver: str
    fixed_s: float
    per_image_s: float
    small_s: Optional[float]
    large_s: Optional[float]
    grows: bool = False                      # a fixed stage that grew with the image counts

    def at(self, scale: Scale) -> float:
        return self.fixed_s + self.per_image_s * scale.count(self.driver)


def _fit_driven(name: str, driver: str, small: RunRecord, large: RunRecord, s: float, l: float) -> StageCost:
    n_small, n_large = small.scale.count(driver), large.scale.count(driver)
    if n_small == n_large:
        raise CostError(f"stage {name}: both runs used {n_small} {driver} images; the two runs need different "
                        f"{driver} image counts to separate the per-image cost from the fixed one")
    slope = max(0.0, (l - s) / (n_large - n_small))
    fixed = max(0.0, min(s - slope * n_small, l - slope * n_large))
    return StageCost(name, driver, fixed, slope, s, l)


def _grew(small_s: float, large_s: float) -> bool:
    absolute, relative = GROWTH_FLAG
    return large_s - small_s > max(absolute, relative * small_s)


def fit_stages(small: RunRecord, large: RunRecord) -> list[StageCost]:
    """One ``StageCost`` per stage of the small run (the large one may skip fixed stages)."""
    s_stages, l_stages = small.stages(), large.stages()
    costs = []
    for name, s in s_stages.items():
        driver, l = driver_of(name), l_stages.get(name)
        if driver != "fixed":
            if l is None:
                raise CostError(f"stage {name} is in the small run's timings but not in the large run's")
            costs.append(_fit_driven(name, driver, small, large, s, l))
        elif name == STARTUP:
            costs.append(StageCost(name, driver, min(s, l), 0.0, s, l))   # the quieter start of the two
        else:
            costs.append(StageCost(name, driver, s, 0.0, s, l, grows=l is not None and _grew(s, l)))
    missing = [d for d in EVAL_STAGES if d not in s_stages]
    if missing:
        raise CostError(f"timings without {missing}: not a full PTQ run")
    return costs


@dataclass
class ModelCost:
    """The fitted cost of one model's default PTQ run."""
    model: str
    img_size: int
    weights: str                             # "trained" / "random (head prior)"
    stages: list
    small: RunRecord
    large: RunRecord
    notes: list = field(default_factory=list)

    def stage(self, name: str) -> StageCost:
        return next(c for c in self.stages if c.name == name)

    def total(self, scale: Scale) -> float:
        """``report.json``'s total at ``scale`` (the process start excluded)."""
        return sum(c.at(scale) for c in self.stages if c.name != STARTUP)

    def wall(self, scale: Scale) -> float:
        return self.total(scale) + self.stage(STARTUP).at(scale)

    def ratio(self, scale: Scale) -> float:
        """Default run / one FP32 evaluation at ``scale``."""
        return self.total(scale) / max(self.stage("eval_fp32").at(scale), 1e-9)

    def fixed_total(self) -> float:
        return sum(c.fixed_s for c in self.stages if c.name != STARTUP)

    def peak_rss_mb(self, scale: Scale) -> float:
        """Peak RSS at ``scale``: the large run's, plus the growth per calibration image seen
        between the runs (the calibration set stays in memory), plus the kept NMS rows of the
        extra eval images (``MAX_DETECTIONS`` x ``BYTES_PER_DETECTION`` each; the evaluation
        keeps nothing else per image)."""
        s, l = self.small, self.large
        extra_calib = scale.calib_images - l.scale.calib_images
        per_calib = max(0.0, (l.peak_rss_mb - s.peak_rss_mb) / max(1, l.scale.calib_images - s.scale.calib_images))
        rows = max(0, scale.eval_images - l.scale.eval_images) * MAX_DETECTIONS * BYTES_PER_DETECTION / 2 ** 20
        return l.peak_rss_mb + per_calib * max(0, extra_calib) + rows

    def growing_stages(self) -> list[StageCost]:
        return [c for c in self.stages if c.grows]

    def to_dict(self) -> dict:
        return {"model": self.model, "img_size": self.img_size, "weights": self.weights,
                "small": asdict(self.small), "large": asdict(self.large), "notes": list(self.notes),
                "stages": [asdict(c) for c in self.stages]}


def model_cost(model: str, img_size: int, weights: str, small: RunRecord, large: RunRecord,
               notes: Sequence[str] = ()) -> ModelCost:
    if large.scale.eval_images <= small.scale.eval_images or large.scale.calib_images <= small.scale.calib_images:
        raise CostError(f"{model}: the large run ({large.scale}) needs more eval and calibration images than the "
                        f"small one ({small.scale})")
    return ModelCost(model, img_size, weights, fit_stages(small, large), small, large, list(notes))


def model_cost_from_dict(d: dict) -> ModelCost:
    return model_cost(d["model"], d["img_size"], d["weights"], RunRecord.from_dict(d["small"]),
                      RunRecord.from_dict(d["large"]), d.get("notes", ()))


# --------------------------------------------------------------------------- tables


def duration(seconds: float) -> str:
    """85 s, 34.5 min, 3.2 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f}" if seconds >= 0.01 else f"{seconds * 1000:.1f}"


def summary_table(costs: Sequence[ModelCost], full: Scale = COCO_VAL2017, shared: Scale = SHARED_VAL) -> str:
    """One row per model: per-image ms of the driven stages, the fixed seconds, peak RSS, the
    extrapolated run and the ratio (Markdown)."""
    head = ["model", "size", "weights", "eval FP32 ms/img", "eval INT8 ms/img", "calibration ms/img",
            "fixed stages", "peak RSS MB (measured / at full scale)",
            f"one FP32 eval, {full.eval_images:,} img",
            f"default run, {full.eval_images:,} img / {full.calib_images} calib",
            f"ratio at {full.eval_images:,}", f"ratio at {shared.eval_images}", f"<= {RATIO_LIMIT:g}x"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in costs:
        calib = sum(c.stage(n).per_image_s for n in CALIB_STAGES if any(s.name == n for s in c.stages))
        top = sorted((s for s in c.stages if s.name != STARTUP), key=lambda s: -s.fixed_s)[:3]
        fixed = ", ".join(f"{s.name} {s.fixed_s:.1f}" for s in top)
        ratio = c.ratio(full)
        lines.append("| " + " | ".join([
            c.model, str(c.img_size), c.weights, _ms(c.stage("eval_fp32").per_image_s),
            _ms(c.stage("eval_int8").per_image_s), _ms(calib), f"{c.fixed_total():.1f} s ({fixed})",
            f"{c.large.peak_rss_mb:,.0f} / {c.peak_rss_mb(full):,.0f}", duration(c.stage("eval_fp32").at(full)),
            duration(c.wall(full)), f"{ratio:.2f}x", f"{c.ratio(shared):.2f}x",
            "yes" if ratio <= RATIO_LIMIT else "**no**"]) + " |")
    return "\n".join(lines)


def stage_table(cost: ModelCost, full: Scale = COCO_VAL2017) -> str:
    """Every stage of one model: its driver, both measurements, the fit and its time at ``full``."""
    s, l = cost.small.scale, cost.large.scale
    head = ["stage", "scales with", f"small run s ({s.eval_images} eval / {s.calib_images} calib)",
            f"large run s ({l.eval_images} / {l.calib_images})", "fixed s", "ms per image",
            f"at {full.eval_images:,} / {full.calib_images} s", "check"]
    lines = [f"{cost.model} at {cost.img_size} ({cost.weights} weights)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"          # noqa: E731
    for c in cost.stages:
        check = "grows with the image counts" if c.grows else ""
        per = _ms(c.per_image_s) if c.driver != "fixed" else "-"
        lines.append(f"| {c.name} | {DRIVER_LABEL[c.driver]} | {fmt(c.small_s)} | {fmt(c.large_s)} | {c.fixed_s:.2f} | "
                     f"{per} | {c.at(full):.1f} | {check} |")
    return "\n".join(lines)


def _load_text(runs: Sequence[RunRecord]) -> str:
    measured = [r.other_cpus for r in runs if r.other_cpus is not None]
    if measured:
        return f"other processes kept {max(measured):.2f} of {runs[0].cpus} CPUs busy"
    return f"load average up to {max(r.load_average for r in runs):.1f} on {runs[0].cpus} CPUs"


def findings(costs: Sequence[ModelCost], full: Scale = COCO_VAL2017) -> list[str]:
    """One line per model over the ratio limit and per fixed stage that grew between the runs."""
    out = []
    for c in costs:
        loaded = [r for r in (c.small, c.large) if r.loaded()]
        if loaded:
            out.append(f"{c.model}: measured under load ({_load_text(loaded)}): these timings are "
                       f"not the machine's; measure on a quiet one")
        if c.ratio(full) > RATIO_LIMIT:
            top = sorted(c.stages, key=lambda s: -s.at(full))[:3]
            out.append(f"{c.model}: default run = {c.ratio(full):.2f}x one FP32 evaluation at {full.eval_images} "
                       f"images (limit {RATIO_LIMIT:g}x); largest stages: "
                       + ", ".join(f"{s.name} {duration(s.at(full))}" for s in top))
        for s in c.growing_stages():
            out.append(f"{c.model}: fixed stage '{s.name}' grew from {s.small_s:.1f} s to {s.large_s:.1f} s between "
                       f"the runs ({c.small.scale.eval_images} -> {c.large.scale.eval_images} eval images, "
                       f"{c.small.scale.calib_images} -> {c.large.scale.calib_images} calibration images): it does "
                       f"not use a fixed image count")
    return out
