"""Post-training quantization, end to end: ``run_ptq(cfg, ...) -> PTQResult``.

    load cfg + weights -> calibration images (train)
      -> yoloq.quant.quantize(fp32, recipe_from_config(cfg.quant), calibration images):
         [equalize] -> prepare -> [SE float, channel scaling] -> calibrate -> [bias correction]
         -> [block reconstruction] -> [sensitivity -> partial quantization]
      -> FP32 eval (val) -> diagnosis -> INT8 eval (val)
      -> runs/ptq/<name>/{report.md, report.json, *.png, quant.pt}

This module only does the data, the evaluation and the report around ``yoloq.quant.quantize``;
the steps and their automatic choice are ``yoloq.quant.recipe`` / ``yoloq.quant.recipe_config``.
Every quantization setting lives in ``cfg.quant`` (command-line flags arrive as overrides of it);
``PTQOptions`` only says what one run reads and writes. Data discipline: calibration, the automatic
method choice, the sensitivity ranking and the ``max_drop`` search only ever see *train* images
(``yoloq.recipes.partial``); validation images are only evaluated (FP32 once, INT8 once).
Everything is written into a hidden staging folder next to the output and renamed into place at
the end, so a failed or interrupted run leaves no partial report. Runs are deterministic for a seed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from torch import nn

from yoloq.config import Config, DataConfig, load_config
from yoloq.data import load_data_config
from yoloq.device import resolve_device
from yoloq.distributed import output_dir_on_main
from yoloq.errors import YoloqError
from yoloq.eval.bootstrap import evaluation_drop_interval
from yoloq.eval.coco_eval import EvalResult, evaluate_model
from yoloq.io import check_run_folder, staging_dir
from yoloq.models import load_model
from yoloq.models.build import NO_WEIGHTS_HINT
from yoloq.quant.recipe import RecipeError, quantize
from yoloq.quant.recipe_config import recipe_from_config, report_record
from yoloq.quant.state import quant_state
from yoloq.recipes.common import (CalibrationSet, StageTimer, align_classes, conv_kernels, load_calibration_set,
                                  peak_memory, reset_peak_memory, run_environment, seed_everything,
                                  thread_invariant_kernels)
from yoloq.recipes.partial import Selection
from yoloq.report.common import drop_text, stat_drop
from yoloq.report.ptq import write_report


class PTQError(YoloqError, ValueError):
    """Bad input to the PTQ pipeline; the message names the file / key / value."""


@dataclass
class PTQOptions:
    """What one run reads and writes (the quantization settings are ``cfg.quant``)."""
    skip_count: Optional[int] = None            # keep the k most sensitive layers in float (--skip-layers)
    random_weights: bool = False                # smoke test: seeded random weights, numbers meaningless
    max_images: Optional[int] = None            # evaluate only the first N val images
    name: Optional[str] = None                  # run folder name (default <model>_<calib>)
    out: str = "runs/ptq"
    save_model: bool = True
    plots: bool = True
    print_placement: bool = False
    progress: bool = True
    device: str = "auto"                        # every stage runs here (yoloq.device names)
    thread_invariant: bool = False              # PyTorch's conv kernels: the same numbers with any thread count


@dataclass
class PTQResult:
    name: str
    out_dir: Optional[Path]
    fp32: dict
    int8: dict
    drop: dict
    calib_method: str
    skipped_layers: list
    report: dict
    timings: dict = field(default_factory=dict)
    qmodel: Optional[nn.Module] = None


@dataclass
class PTQRun:
    """Everything one run produced, stage by stage (what the report is built from)."""
    name: str
    cfg: Config
    data_cfg: DataConfig
    opts: PTQOptions
    timer: StageTimer = field(default_factory=StageTimer)
    calib: CalibrationSet = field(default_factory=CalibrationSet)
    calib_info: dict = field(default_factory=dict)
    fp32_eval: Optional[EvalResult] = None
    int8_eval: Optional[EvalResult] = None
    sensitivity: Optional[dict] = None
    partial: dict = field(default_factory=lambda: {"mode": None})
    selection: Optional[dict] = None
    diagnosis: Optional[dict] = None
    transforms: dict = field(default_factory=dict)
    reconstruction: Optional[dict] = None
    drop_ci: Optional[dict] = None
    qmodel: Optional[nn.Module] = None


# --------------------------------------------------------------------------- inputs


def _check_file(path: Optional[str], what: str) -> None:
    if not path:
        raise PTQError(f"{what} is not set")
    if not Path(path).exists():
        raise PTQError(f"{what} not found: {path}")


def resolve(cfg: Config | str | os.PathLike, quant: Optional[dict] = None, eval: Optional[dict] = None,
            model: Optional[dict] = None, data: Optional[str] = None,
            random_weights: bool = False) -> tuple[Config, DataConfig]:
    """Config + overrides -> (cfg, data_cfg), with every file the run needs checked first."""
    if not isinstance(cfg, Config):
        cfg = load_config(cfg)
    cfg = cfg.with_overrides(data=data, quant=quant, eval=eval, model=model)
    if not cfg.data:
        raise PTQError(f"{cfg.path}: no 'data' (dataset YAML) in the config; pass --data")
    if not Path(cfg.data).is_file():
        raise PTQError(f"{cfg.path}: data: dataset YAML not found: {cfg.data}")
    data_cfg = load_data_config(cfg.data)
    cfg = align_classes(cfg, data_cfg)
    where = cfg.path or "config"
    if not random_weights:
        if not cfg.model.weights:
            raise PTQError(f"{where}: model.weights is not set: {NO_WEIGHTS_HINT}")
        _check_file(cfg.model.weights, f"{where}: model.weights")
    _check_file(data_cfg.train_images, f"{data_cfg.path}: train_images (calibration)")
    _check_file(data_cfg.val_images, f"{data_cfg.path}: val_images")
    _check_file(getattr(data_cfg, cfg.eval.val_ann), f"{data_cfg.path}: {cfg.eval.val_ann}")
    return cfg, data_cfg


def _check_options(opts: PTQOptions, cfg: Config) -> None:
    if opts.skip_count is not None and opts.skip_count < 0:
        raise PTQError(f"--skip-layers must be >= 0, got {opts.skip_count}")
    if opts.skip_count is not None and cfg.quant.partial.max_drop is not None:
        raise PTQError("--skip-layers and --max-drop both choose how many layers stay in float: give one")
    if opts.max_images is not None and opts.max_images < 1:
        raise PTQError(f"--max-images must be >= 1, got {opts.max_images}")


# --------------------------------------------------------------------------- stages


def run_quantization(cfg: Config, data_cfg: DataConfig, fp32: nn.Module, calib: CalibrationSet, *,
                     skip_count: Optional[int] = None, rank: bool = False, timer: Optional[StageTimer] = None,
                     scratch: Optional[Path] = None, progress: bool = False) -> PTQRun:
    """The quantization ``cfg.quant`` asks for (``yoloq.quant.recipe_from_config`` run by
    ``yoloq.quant.quantize``) on ``calib``, with the selection set of ``max_drop`` / sensitivity
    ``map`` on labeled train images: ``run.qmodel`` and the stage records, no val evaluation
    (what ``run_ptq``, ``yoloq.ptq`` and ``yoloq bench-ptq`` share). ``scratch`` holds the selection
    set's annotation file (a temporary folder when None)."""
    run = PTQRun(name=cfg.model.name, cfg=cfg, data_cfg=data_cfg, opts=PTQOptions(progress=progress))
    run.calib, run.timer = calib, timer or StageTimer()
    recipe = recipe_from_config(cfg.quant, skip_count=skip_count, rank=rank)
    with contextlib.ExitStack() as stack:
        folder = scratch or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        select = lambda: Selection(fp32, data_cfg, calib.files, cfg.quant, cfg.eval, cfg.model.img_size, folder)  # noqa: E731
        try:
            run.qmodel = quantize(fp32, recipe, calib.batches, progress=progress, timer=run.timer, select=select)
        except RecipeError as err:          # unknown skip layer names, too many layers to skip
            raise PTQError(f"{cfg.path or 'config'}: quant: {err}") from err
    records = quant_state(run.qmodel).records
    run.calib_info = records["calibration"]
    run.transforms = report_record(cfg.quant, records, run.timer.times)
    run.reconstruction = records.get("reconstruction")
    run.sensitivity = records.get("sensitivity")
    run.partial = records.get("partial", {"mode": None})
    run.selection = records.get("selection")
    return run


def _log_quantization(run: PTQRun) -> None:
    log = _logger(run.opts)
    if run.transforms.get("auto_trials"):
        log(f"transforms auto: {run.transforms['plan']}")
    log(f"calibration: {run.calib_info['method']} on {run.calib.images} train images")
    rec = run.reconstruction
    if rec:
        log(f"reconstruction: {rec['method']}, {len(rec['blocks'])} blocks ({rec['improved']} improved) "
            f"on {rec['images']} train images")


def _evaluate(run: PTQRun, model: nn.Module) -> EvalResult:
    return evaluate_model(model, run.data_cfg, run.cfg.eval, run.cfg.model.img_size, max_images=run.opts.max_images,
                          progress=run.opts.progress)


def _quantize_and_evaluate(run: PTQRun, scratch: Path) -> None:
    """Load, quantize (calibration first: NaN / inf activations fail in seconds), evaluate FP32,
    diagnose, evaluate INT8."""
    cfg, qcfg, timer, log = run.cfg, run.cfg.quant, run.timer, _logger(run.opts)
    with timer.stage("load"):
        fp32 = load_model(cfg.model, random_weights=run.opts.random_weights, seed=qcfg.seed)
        fp32.to(resolve_device(run.opts.device))
    with timer.stage("load_calibration_images"):
        calib = load_calibration_set(run.data_cfg, qcfg.calibration.images, cfg.model.img_size,
                                     qcfg.loader.batch_size, cfg.eval.workers, qcfg.seed)
    done = run_quantization(cfg, run.data_cfg, fp32, calib, skip_count=run.opts.skip_count, rank=True,
                            timer=timer, scratch=scratch, progress=run.opts.progress)
    for key in ("calib", "qmodel", "calib_info", "transforms", "reconstruction", "sensitivity", "partial", "selection"):
        setattr(run, key, getattr(done, key))
    _log_quantization(run)
    if run.opts.print_placement:
        print(quant_state(run.qmodel).placement.describe())
    with timer.stage("eval_fp32"):
        run.fp32_eval = _evaluate(run, fp32)
    log(f"FP32 AP {run.fp32_eval.stats['AP'] * 100:.2f} on {run.fp32_eval.n_images} images")
    if qcfg.diagnose:
        from yoloq.quant.diagnose import diagnose
        with timer.stage("diagnose"):
            run.diagnosis = diagnose(run.qmodel, run.calib.first(max(8, qcfg.sensitivity.images)))
    with timer.stage("eval_int8"):
        run.int8_eval = _evaluate(run, run.qmodel)
    log(f"INT8 AP {run.int8_eval.stats['AP'] * 100:.2f}")
    if cfg.eval.bootstrap:
        with timer.stage("bootstrap"):
            run.drop_ci = drop_interval_record(run.fp32_eval, run.int8_eval, cfg.eval.bootstrap)
        log(f"AP drop {drop_text(run.drop_ci['drop'], run.drop_ci)} ({cfg.eval.bootstrap} bootstrap resamples)")


def drop_interval_record(reference: EvalResult, candidate: EvalResult, resamples: int) -> dict:
    """The report's ``drop_ci``: the AP drop and its paired-bootstrap interval over the evaluated images."""
    interval = evaluation_drop_interval(reference, candidate, resamples)
    return {**interval.to_dict(), "seed": 0, "method": "paired bootstrap over the evaluated images (percentile)"}


def _logger(opts: PTQOptions):
    return print if opts.progress else (lambda *a, **k: None)


# --------------------------------------------------------------------------- the pipeline


def run_ptq(cfg: Config | str | os.PathLike, options: Optional[PTQOptions] = None, *, quant: Optional[dict] = None,
            eval: Optional[dict] = None, model: Optional[dict] = None, data: Optional[str] = None,
            **option_overrides) -> PTQResult:
    """Calibrate, evaluate and report one model. ``quant`` / ``eval`` / ``model`` override config
    keys (``None`` values are ignored), ``data`` the dataset YAML; other keywords are
    ``PTQOptions`` fields."""
    opts = dataclasses.replace(options or PTQOptions(), **option_overrides)
    resolve_device(opts.device)                 # a GPU that is not there: one line, before any work
    cfg, data_cfg = resolve(cfg, quant=quant, eval=eval, model=model, data=data, random_weights=opts.random_weights)
    _check_options(opts, cfg)
    name = opts.name if opts.name is not None else f"{cfg.model.name}_{cfg.quant.calibration.method}"
    final_dir = check_run_folder(opts.out, name, "ptq",
                                 "--name" if opts.name is not None else "run name from model.name",
                                 inputs={"--weights": cfg.model.weights, "--data": cfg.data})
    seed_everything(cfg.quant.seed)
    run = PTQRun(name=name, cfg=cfg, data_cfg=data_cfg, opts=opts)
    reset_peak_memory(resolve_device(opts.device))
    # under torchrun every rank runs the pipeline (evaluations sharded) and rank 0 alone writes the run
    with output_dir_on_main(lambda: staging_dir(final_dir, "ptq")) as stage_dir, tempfile.TemporaryDirectory() as scratch, \
            thread_invariant_kernels(opts.thread_invariant):
        _quantize_and_evaluate(run, Path(scratch))
        report = build_report(run)
        if opts.save_model:
            _save_model(run, stage_dir / "quant.pt")
            report["files"].append("quant.pt")
        report["timings"] = run.timer.with_total()
        report["memory"] = peak_memory(resolve_device(opts.device))
        write_report(report, stage_dir, plots=opts.plots)
    state = quant_state(run.qmodel)
    return PTQResult(name=name, out_dir=final_dir, fp32=report["fp32"], int8=report["int8"], drop=report["drop"],
                     calib_method=run.calib_info["method"], skipped_layers=list(state.skip_layers), report=report,
                     timings=report["timings"], qmodel=run.qmodel)


def _save_model(run: PTQRun, path: Path) -> None:
    from yoloq.quant.checkpoint import save_quantized
    with run.timer.stage("save"):
        save_quantized(run.qmodel, path, meta={
            "name": run.name, "calib_method": run.calib_info["method"], "config": str(run.cfg.path),
            "fp32_AP": run.fp32_eval.stats["AP"], "int8_AP": run.int8_eval.stats["AP"],
            "calib_images": run.calib.images, "seed": run.cfg.quant.seed,
            "transforms": run.transforms.get("plan", "none"),
            "reconstruct": run.cfg.quant.reconstruction.method})


def build_report(run: PTQRun) -> dict:
    """The report dict (``yoloq.report.ptq`` renders it)."""
    cfg, opts, state = run.cfg, run.opts, quant_state(run.qmodel)
    fp32_eval, int8_eval = run.fp32_eval, run.int8_eval
    stats = lambda s: {k: float(s[k]) for k in s}          # noqa: E731
    notes = []
    if opts.random_weights:
        notes.append("SMOKE TEST: random weights (--random-weights); every mAP here is meaningless")
    if opts.max_images:
        notes.append(f"quick run: evaluated only the first {opts.max_images} val images")
    failed = sorted(set(fp32_eval.failed_files + int8_eval.failed_files))
    if failed:
        notes.append(f"unreadable val images skipped: {failed}")
    placement = state.placement
    return {
        "name": run.name,
        "model": {"name": cfg.model.name, "arch": cfg.model.arch, "block": cfg.model.block,
                  "weights": cfg.model.weights, "img_size": cfg.model.img_size},
        "config": {"path": cfg.path, "quant": dataclasses.asdict(cfg.quant), "eval": dataclasses.asdict(cfg.eval),
                   "options": dataclasses.asdict(opts)},
        "data": {"config": run.data_cfg.path, "ann_key": cfg.eval.val_ann, "ann_file": fp32_eval.ann_file,
                 "eval_images": fp32_eval.n_images, "max_images": opts.max_images},
        "calibration": {**run.calib_info, "images": run.calib.images, "seed": cfg.quant.seed,
                        "percentile": cfg.quant.calibration.percentile, "num_bins": cfg.quant.calibration.num_bins,
                        "split": "train",
                        "files": list(run.calib.files)},
        "fp32": stats(fp32_eval.stats),
        "int8": stats(int8_eval.stats),
        "drop": stat_drop(fp32_eval.stats, int8_eval.stats),
        "drop_ci": run.drop_ci,
        "per_class": {"fp32": fp32_eval.per_class, "int8": int8_eval.per_class},
        "pr_curve": {"fp32": fp32_eval.pr_curve, "int8": int8_eval.pr_curve},
        "eval_timing": {"fp32": fp32_eval.timing, "int8": int8_eval.timing},
        "skipped_layers": list(state.skip_layers),
        "transforms": run.transforms,
        "partial": run.partial,
        "selection": run.selection,
        "sensitivity": run.sensitivity,
        "diagnosis": run.diagnosis,
        "reconstruction": run.reconstruction,
        "placement": {"sites": len(placement.sites), "quantized_layers": len(placement.layers),
                      "float_layers": dict(placement.float_layers)},
        "timings": dict(run.timer.times),
        "files": ["report.md", "report.json"],
        "notes": notes,
        "env": {**run_environment(resolve_device(opts.device)), "conv_kernels": conv_kernels(opts.thread_invariant)},
    }
