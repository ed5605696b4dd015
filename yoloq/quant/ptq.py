"""Post-training quantization, end to end: ``run_ptq(cfg, ...) -> PTQResult``.

    load cfg + weights -> fuse -> FP32 eval (val) -> prepare -> calibrate (train images)
      -> [sensitivity -> partial quantization] -> diagnosis -> INT8 eval (val)
      -> runs/ptq/<name>/{report.md, report.json, *.png, quant.pt}

Data discipline: calibration, the automatic method choice, the sensitivity ranking and the
``max_drop`` search only ever see *train* images. ``max_drop`` is measured as COCO mAP on a
selection set of labeled train images (disjoint from the calibration images where the split has
enough), so the number of layers kept in float is not tuned on the validation images whose mAP
the report gives. Validation images are only evaluated (FP32 once, INT8 once).

Everything is written into a hidden temporary folder next to the output and renamed into place at
the end, so a failed run leaves no partial report. Runs are deterministic for a seed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..config import Config, ConfigError, DataConfig, EvalConfig, QuantConfig, load_config, load_data_config
from ..report import stat_drop, write_report
from .calibrate import AUTO_METHODS, METHODS, calibrate, calibrate_auto, parse_method

SENSITIVITY_CHOICES = ("off", "fast", "map")
CALIB_CHOICES = METHODS + ("auto",)


class PTQError(ValueError):
    """Bad input to the PTQ pipeline; the message names the file / key / value."""


@dataclass
class PTQOptions:
    """Command-line overrides of ``cfg.quant`` / ``cfg.eval`` plus what the run produces."""
    calib: Optional[str] = None                 # max | percentile | entropy | mse | auto (default cfg.quant.calib)
    percentile: Optional[float] = None
    calib_images: Optional[int] = None
    seed: Optional[int] = None
    skip_layers: Optional[int] = None           # keep the k most sensitive layers in float
    skip_names: Sequence[str] = ()              # explicit layers kept in float (added to cfg.quant.skip_layers)
    max_drop: Optional[float] = None            # smallest k whose selection-set mAP drop <= this (points)
    max_skip: Optional[int] = None              # --max-drop never keeps more than this many layers in float
    sensitivity: str = "fast"                   # off | fast | map (map: confirm top layers with mAP)
    sensitivity_mode: str = "quantize-one"      # quantize-one | skip-one
    sensitivity_images: int = 16                # calibration images scored per layer (Lite-S ranking on 8 vs
    #                                             32 images: Spearman 0.99); also used by the diagnosis
    auto_images: int = 32                       # calibration images scoring the --calib auto candidates
    auto_methods: Sequence[str] = AUTO_METHODS  # the candidates of --calib auto
    confirm_top: int = 5                        # layers confirmed with mAP when sensitivity == "map"
    select_images: int = 128                    # labeled train images for the max_drop search
    diagnose: bool = True
    max_images: Optional[int] = None            # evaluate only the first N val images
    ann: Optional[str] = None                   # val_ann | val_ann_official
    batch_size: Optional[int] = None
    workers: Optional[int] = None
    name: Optional[str] = None
    out: str = "runs/ptq"
    save_model: bool = True
    plots: bool = True
    print_placement: bool = False
    progress: bool = True


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

    def to_dict(self) -> dict:
        return self.report


# --------------------------------------------------------------------------- validation


def _check_file(path: Optional[str], what: str) -> None:
    if not path:
        raise PTQError(f"{what} is not set")
    if not Path(path).exists():
        raise PTQError(f"{what} not found: {path}")


def validate_inputs(cfg: Config, data_cfg: DataConfig, qcfg: QuantConfig, eval_cfg: EvalConfig,
                    opts: PTQOptions) -> None:
    """Every cheap check before any model is built or image read."""
    where = cfg.path or "config"
    _check_file(cfg.model.weights, f"{where}: model.weights")
    _check_file(data_cfg.train_images, f"{data_cfg.path}: train_images (calibration)")
    _check_file(data_cfg.val_images, f"{data_cfg.path}: val_images")
    if eval_cfg.val_ann not in ("val_ann", "val_ann_official"):
        raise ConfigError(f"{where}: eval.val_ann must be 'val_ann' or 'val_ann_official', got '{eval_cfg.val_ann}'")
    _check_file(getattr(data_cfg, eval_cfg.val_ann), f"{data_cfg.path}: {eval_cfg.val_ann}")
    if qcfg.calib not in CALIB_CHOICES:
        raise ConfigError(f"{where}: quant.calib: unknown method '{qcfg.calib}'; expected one of {CALIB_CHOICES}")
    if not 0.0 < qcfg.percentile <= 100.0:
        raise ConfigError(f"{where}: quant.percentile must be in (0, 100], got {qcfg.percentile}")
    for key in ("calib_images", "batch_size", "num_bins"):
        if getattr(qcfg, key) < 1:
            raise ConfigError(f"{where}: quant.{key} must be >= 1, got {getattr(qcfg, key)}")
    if qcfg.max_drop is not None and qcfg.max_drop < 0:
        raise ConfigError(f"{where}: quant.max_drop must be >= 0 (mAP points), got {qcfg.max_drop}")
    if not all(isinstance(s, str) for s in qcfg.skip_layers):
        raise ConfigError(f"{where}: quant.skip_layers must be a list of layer names, got {qcfg.skip_layers!r}")
    if opts.skip_layers is not None and opts.skip_layers < 0:
        raise PTQError(f"--skip-layers must be >= 0, got {opts.skip_layers}")
    if opts.skip_layers is not None and qcfg.max_drop is not None:
        raise PTQError("--skip-layers and --max-drop both choose how many layers stay in float: give one")
    for method in opts.auto_methods:
        try:
            parse_method(method)
        except ValueError as err:
            raise PTQError(f"--auto-methods: {err}") from err
    if opts.max_skip is not None and opts.max_skip < 0:
        raise PTQError(f"--max-skip must be >= 0, got {opts.max_skip}")
    if opts.sensitivity not in SENSITIVITY_CHOICES:
        raise PTQError(f"--sensitivity must be one of {SENSITIVITY_CHOICES}, got '{opts.sensitivity}'")
    if opts.max_images is not None and opts.max_images < 1:
        raise PTQError(f"--max-images must be >= 1, got {opts.max_images}")
    if min(opts.sensitivity_images, opts.select_images, opts.auto_images) < 1:
        raise PTQError("--sensitivity-images, --select-images and --auto-images must be >= 1")


def resolve(cfg: Config | str | os.PathLike, opts: PTQOptions) -> tuple[Config, DataConfig, QuantConfig, EvalConfig]:
    """Config + overrides -> (cfg, data_cfg, quant cfg, eval cfg), validated."""
    if not isinstance(cfg, Config):
        cfg = load_config(cfg)
    if not cfg.data:
        raise PTQError(f"{cfg.path}: no 'data' (dataset YAML) in the config")
    if not Path(cfg.data).is_file():
        raise PTQError(f"{cfg.path}: data: dataset YAML not found: {cfg.data}")
    data_cfg = load_data_config(cfg.data)
    q_over = {k: v for k, v in (("calib", opts.calib), ("percentile", opts.percentile),
                                ("calib_images", opts.calib_images), ("seed", opts.seed),
                                ("max_drop", opts.max_drop)) if v is not None}
    if opts.skip_names:
        q_over["skip_layers"] = list(cfg.quant.skip_layers) + list(opts.skip_names)
    qcfg = dataclasses.replace(cfg.quant, **q_over)
    e_over = {k: v for k, v in (("val_ann", opts.ann), ("batch_size", opts.batch_size),
                                ("workers", opts.workers)) if v is not None}
    eval_cfg = dataclasses.replace(cfg.eval, **e_over)
    validate_inputs(cfg, data_cfg, qcfg, eval_cfg, opts)
    return cfg, data_cfg, qcfg, eval_cfg


# --------------------------------------------------------------------------- building blocks


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def load_fp32_model(cfg: Config) -> nn.Module:
    """Build, load weights, fuse to deploy form; eval mode."""
    from ..checkpoint import load_weights
    from ..models import build_model
    model = build_model(cfg.model)
    load_weights(model, cfg.model.weights)
    return model.fuse().eval()


def calibration_batches(data_cfg: DataConfig, qcfg: QuantConfig, img_size: int, workers: int) -> tuple[list, list[str]]:
    """The calibration images (train split) as a list of batches, and their file names."""
    from ..data.coco import calibration_loader
    try:
        loader = calibration_loader(data_cfg, qcfg.calib_images, img_size, qcfg.batch_size, workers, seed=qcfg.seed)
    except FileNotFoundError as err:
        raise PTQError(f"calibration: {err}") from err
    files = [name for _, name in loader.dataset.entries]
    batches = [images for images, _ in loader]
    if not batches:
        raise PTQError(f"calibration: none of the {len(files)} chosen images in {data_cfg.train_images} "
                       f"could be read")
    return batches, files


def evaluate_stats(model: nn.Module, data_cfg: DataConfig, eval_cfg: EvalConfig, img_size: int,
                   max_images: Optional[int], progress: bool):
    from ..eval.coco_eval import evaluate_model
    return evaluate_model(model, data_cfg, eval_cfg, img_size, max_images=max_images, progress=progress)


def selection_data(data_cfg: DataConfig, calib_files: Sequence[str], n: int, seed: int,
                   tmp_dir: Path) -> tuple[DataConfig, dict]:
    """A DataConfig whose "val" is ``n`` *labeled train* images (calibration images last resort),
    with a filtered annotation file in ``tmp_dir``: the set the ``max_drop`` search measures on."""
    from ..data.coco import read_coco_json
    from ..data.yolo import train_ground_truth
    train_ann = data_cfg.train_ann or train_ground_truth(data_cfg)      # YOLO labels: built on demand
    if not train_ann or not Path(train_ann).is_file():
        raise PTQError(f"{data_cfg.path}: train_ann is needed for --max-drop / --sensitivity map "
                       f"(mAP on labeled train images), got {data_cfg.train_ann!r}")
    gt = read_coco_json(train_ann)
    unlabeled = set(gt.get("unlabeled_image_ids", []))
    labeled_ids = {a["image_id"] for a in gt.get("annotations", [])}
    images = [im for im in sorted(gt["images"], key=lambda e: e["id"])
              if im["id"] not in unlabeled and im["id"] in labeled_ids]
    calib = set(calib_files)
    fresh = [im for im in images if im["file_name"] not in calib]
    reused = [im for im in images if im["file_name"] in calib]
    random.Random(seed).shuffle(fresh)
    random.Random(seed).shuffle(reused)
    chosen = (fresh + reused)[:n]
    if not chosen:
        raise PTQError(f"{train_ann}: no labeled train image for the selection set")
    ids = {im["id"] for im in chosen}
    sub = {k: v for k, v in gt.items() if k not in ("images", "annotations")}
    sub["images"] = sorted(chosen, key=lambda e: e["id"])
    sub["annotations"] = [a for a in gt["annotations"] if a["image_id"] in ids]
    ann = tmp_dir / "selection_ann.json"
    ann.write_text(json.dumps(sub))
    sel = dataclasses.replace(data_cfg, val_images=data_cfg.train_images, val_ann=str(ann), val_ann_official=None,
                              val_files=None)
    info = {"images": len(chosen), "disjoint_from_calibration": sum(im["file_name"] not in calib for im in chosen),
            "source": train_ann}
    return sel, info


@contextmanager
def _staging_dir(final: Path):
    """A hidden sibling folder renamed to ``final`` on success, removed on failure."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _Timer:
    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - start, 2)


# --------------------------------------------------------------------------- the pipeline


def run_ptq(cfg: Config | str | os.PathLike, options: Optional[PTQOptions] = None, **overrides) -> PTQResult:
    """Calibrate, evaluate and report one model. ``overrides`` are ``PTQOptions`` fields."""
    opts = dataclasses.replace(options or PTQOptions(), **overrides)
    cfg, data_cfg, qcfg, eval_cfg = resolve(cfg, opts)
    name = opts.name or f"{cfg.model.name}_{qcfg.calib}"
    final_dir = Path(opts.out) / name
    img_size = cfg.model.img_size
    timer = _Timer()
    start = time.perf_counter()
    seed_everything(qcfg.seed)
    log = print if opts.progress else (lambda *a, **k: None)

    from .prepare import prepare
    with _staging_dir(final_dir) as stage_dir, tempfile.TemporaryDirectory() as scratch:
        with timer.stage("load"):
            fp32 = load_fp32_model(cfg)
            try:
                qmodel = prepare(fp32, qcfg)
            except ValueError as err:              # unknown skip layer names etc.
                raise PTQError(f"{cfg.path}: quant: {err}") from err
        placement = qmodel.quant_placement
        free = len(placement.layers) - len(qmodel.quant_skip_layers)
        if opts.skip_layers and opts.skip_layers > free:
            raise PTQError(f"--skip-layers {opts.skip_layers}: only {free} quantized layers to choose from")
        if opts.print_placement:
            print(placement.describe())
        with timer.stage("load_calibration_images"):
            batches, calib_files = calibration_batches(data_cfg, qcfg, img_size, eval_cfg.workers)
        n_calib = sum(b.shape[0] for b in batches)

        # calibrate before the FP32 evaluation: NaN / inf activations then fail in seconds
        with timer.stage("calibrate"):
            calib_info = _calibrate(qmodel, fp32, batches, qcfg, opts)
        log(f"calibration: {calib_info['method']} on {n_calib} train images")

        with timer.stage("eval_fp32"):
            fp32_eval = evaluate_stats(fp32, data_cfg, eval_cfg, img_size, opts.max_images, opts.progress)
        log(f"FP32 AP {fp32_eval.stats['AP'] * 100:.2f} on {fp32_eval.n_images} images")

        sensitivity, partial, selection = None, {"mode": None}, None
        if opts.sensitivity != "off" or opts.skip_layers or qcfg.max_drop is not None:
            from .sensitivity import layer_sensitivity
            with timer.stage("sensitivity"):
                sensitivity = layer_sensitivity(qmodel, fp32, _first_images(batches, opts.sensitivity_images),
                                                opts.sensitivity_mode, progress=opts.progress)
            if opts.sensitivity == "map" or qcfg.max_drop is not None:
                with timer.stage("selection_fp32"):
                    selection = _Selection(fp32, data_cfg, calib_files, opts, qcfg, eval_cfg, img_size, Path(scratch))
            with timer.stage("partial_search" if qcfg.max_drop is not None else "partial"):
                partial = _partial_quantization(qmodel, sensitivity, selection, qcfg, opts)
            if opts.sensitivity == "map":
                with timer.stage("sensitivity_map"):
                    _confirm_with_map(qmodel, sensitivity, selection, opts.confirm_top, opts.progress)

        diagnosis = None
        if opts.diagnose:
            from .diagnose import diagnose
            with timer.stage("diagnose"):
                diagnosis = diagnose(qmodel, _first_images(batches, max(8, opts.sensitivity_images)))

        with timer.stage("eval_int8"):
            int8_eval = evaluate_stats(qmodel, data_cfg, eval_cfg, img_size, opts.max_images, opts.progress)
        log(f"INT8 AP {int8_eval.stats['AP'] * 100:.2f}")

        skipped = list(qmodel.quant_skip_layers)
        drop = stat_drop(fp32_eval.stats, int8_eval.stats)
        report = _report_dict(name, cfg, data_cfg, qcfg, eval_cfg, opts, fp32_eval, int8_eval, drop, calib_info,
                              n_calib, calib_files, skipped, partial, sensitivity, diagnosis, selection,
                              placement, timer.times)
        if opts.save_model:
            from .qcheckpoint import save_quantized
            with timer.stage("save"):
                save_quantized(qmodel, stage_dir / "quant.pt",
                               meta={"name": name, "calib_method": calib_info["method"], "config": str(cfg.path),
                                     "fp32_AP": fp32_eval.stats["AP"], "int8_AP": int8_eval.stats["AP"],
                                     "calib_images": n_calib, "seed": qcfg.seed})
            report["files"].append("quant.pt")
        timer.times["total"] = round(time.perf_counter() - start, 2)
        report["timings"] = dict(timer.times)
        write_report(report, stage_dir, plots=opts.plots)
    return PTQResult(name=name, out_dir=final_dir, fp32=fp32_eval.stats, int8=int8_eval.stats, drop=drop,
                     calib_method=calib_info["method"], skipped_layers=skipped, report=report,
                     timings=dict(timer.times), qmodel=qmodel)


def _partial_quantization(qmodel: nn.Module, sensitivity: dict, selection: Optional["_Selection"],
                          qcfg: QuantConfig, opts: PTQOptions) -> dict:
    """Keep the most sensitive layers in float: a fixed count (--skip-layers) or the smallest count
    whose AP drop on the selection set (labeled train images) is <= --max-drop. Layers named in
    the config / --skip stay in float throughout and are not counted."""
    from .prepare import set_layers_quantized
    from .sensitivity import search_skip_count
    explicit = set(qmodel.quant_skip_layers)
    ranked = [r["layer"] for r in sensitivity["ranking"] if r["layer"] not in explicit]

    def keep_in_float(layers: Sequence[str]) -> None:
        set_layers_quantized(qmodel, ranked, True)
        if layers:
            set_layers_quantized(qmodel, list(layers), False)

    if opts.skip_layers:
        keep_in_float(ranked[:opts.skip_layers])
        return {"mode": f"--skip-layers {opts.skip_layers} (most sensitive by the fast metric)",
                "k": opts.skip_layers}
    if qcfg.max_drop is None:
        return {"mode": None}

    def measure(layers: list[str]) -> float:
        keep_in_float(layers)
        return selection.drop(qmodel)

    k, trace = search_skip_count(ranked, measure, qcfg.max_drop, max_k=opts.max_skip, progress=opts.progress)
    keep_in_float(ranked[:k])
    note = (f"searched on {selection.info['images']} labeled train images "
            f"({selection.info['disjoint_from_calibration']} not used for calibration), "
            f"FP32 AP there {selection.fp32_ap * 100:.2f}; never on val")
    if all(t["drop"] > qcfg.max_drop for t in trace):
        note += f"; target not reached: kept the {k} most sensitive layers in float"
    return {"mode": f"--max-drop {qcfg.max_drop}", "k": k, "search": trace,
            "metric": "AP drop (points) on labeled train images", "note": note}


def _first_images(batches: list, n: int) -> list:
    out, seen = [], 0
    for b in batches:
        if seen >= n:
            break
        out.append(b[: n - seen])
        seen += out[-1].shape[0]
    return out


def _calibrate(qmodel: nn.Module, fp32: nn.Module, batches: list, qcfg: QuantConfig, opts: PTQOptions) -> dict:
    if qcfg.calib == "auto":
        info = calibrate_auto(qmodel, batches, fp32, list(opts.auto_methods), num_bins=qcfg.num_bins,
                              score_batches=max(1, -(-opts.auto_images // qcfg.batch_size)),
                              progress=opts.progress)
        return {"requested": "auto", "method": info["method"], "auto_errors": info["errors"],
                "auto_metric": info["metric"], "auto_images": info["images"]}
    calibrate(qmodel, batches, qcfg.calib, qcfg.percentile, num_bins=qcfg.num_bins, progress=opts.progress)
    return {"requested": qcfg.calib, "method": qmodel.quant_calib_method}


class _Selection:
    """mAP on labeled train images (never val): what --max-drop and --sensitivity map measure."""

    def __init__(self, fp32, data_cfg, calib_files, opts, qcfg, eval_cfg, img_size, scratch: Path):
        self.data, self.info = selection_data(data_cfg, calib_files, opts.select_images, qcfg.seed, scratch)
        self.eval_cfg = dataclasses.replace(eval_cfg, val_ann="val_ann")
        self.img_size = img_size
        self.fp32_ap = self.ap(fp32)

    def ap(self, model: nn.Module) -> float:
        return evaluate_stats(model, self.data, self.eval_cfg, self.img_size, None, progress=False).stats["AP"]

    def drop(self, qmodel: nn.Module) -> float:
        return (self.fp32_ap - self.ap(qmodel)) * 100.0


def _confirm_with_map(qmodel, sensitivity: dict, selection: _Selection, top: int, progress: bool) -> None:
    """For the ``top`` most sensitive layers: selection-set AP drop with that layer alone in float
    (everything else as currently configured); stored as ``map_drop`` on the ranking rows."""
    from tqdm import tqdm
    from .prepare import set_layers_quantized
    current = list(qmodel.quant_skip_layers)
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


def _report_dict(name, cfg, data_cfg, qcfg, eval_cfg, opts, fp32_eval, int8_eval, drop, calib_info, n_calib,
                 calib_files, skipped, partial, sensitivity, diagnosis, selection, placement, timings) -> dict:
    import pytorch_quantization
    stats = lambda s: {k: float(s[k]) for k in s}          # noqa: E731
    notes = []
    if opts.max_images:
        notes.append(f"quick run: evaluated only the first {opts.max_images} val images")
    if fp32_eval.failed_files or int8_eval.failed_files:
        notes.append(f"unreadable val images skipped: {sorted(set(fp32_eval.failed_files + int8_eval.failed_files))}")
    return {
        "name": name,
        "model": {"name": cfg.model.name, "arch": cfg.model.arch, "block": cfg.model.block,
                  "weights": cfg.model.weights, "img_size": cfg.model.img_size},
        "config": {"path": cfg.path, "quant": dataclasses.asdict(qcfg), "eval": dataclasses.asdict(eval_cfg),
                   "options": {k: (list(v) if isinstance(v, tuple) else v)
                               for k, v in dataclasses.asdict(opts).items()}},
        "data": {"config": data_cfg.path, "ann_key": eval_cfg.val_ann, "ann_file": fp32_eval.ann_file,
                 "eval_images": fp32_eval.n_images, "max_images": opts.max_images},
        "calibration": {**calib_info, "images": n_calib, "seed": qcfg.seed, "percentile": qcfg.percentile,
                        "num_bins": qcfg.num_bins, "split": "train", "files": list(calib_files)},
        "fp32": stats(fp32_eval.stats),
        "int8": stats(int8_eval.stats),
        "drop": drop,
        "skipped_layers": skipped,
        "partial": partial,
        "selection": selection.info if selection else None,
        "sensitivity": sensitivity,
        "diagnosis": diagnosis,
        "placement": {"sites": len(placement.sites), "quantized_layers": len(placement.layers),
                      "float_layers": dict(placement.float_layers)},
        "timings": dict(timings),
        "files": ["report.md", "report.json"],
        "notes": notes,
        "env": {"python": platform.python_version(), "torch": torch.__version__,
                "pytorch_quantization": getattr(pytorch_quantization, "__version__", "?")},
    }
