"""RepVGG, QARepVGG and RepOpt-VGG under PTQ: the logic of ``yoloq bench-backbones`` (usage and
flags: ``yoloq.cli.bench_backbones``).

Per backbone: the trained yolov6n of ``yoloq.bench.backbone_runs`` (trained first when missing),
evaluated in FP32 on the images it was evaluated on while training, then quantized by two pipelines
on calibration images that are never evaluation images, each for every calibration seed:

- ``default``: yoloq's shipped default PTQ recipe (what the Lite configs ship: calibration ``auto``,
  per-channel input scaling on all convs with α chosen on calibration images, bias correction);
  the yolov6n configs carry no ``quant`` section, so their own settings would be plain ``max``;
- ``plain``: no transforms (no equalization, channel scaling, bias correction, reconstruction),
  one calibration rule (``max`` unless ``--plain-calib``).

Every drop comes with its paired-bootstrap interval over the evaluation images
(``yoloq.eval.bootstrap``), and each backbone's drop is compared with RepVGG's on the same resampled
images (the claim of the QARepVGG and RepOpt papers is about that difference).
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from yoloq.bench.backbone_runs import (BACKBONES, MODEL, BenchBackbonesError, EvalData, Runs, base_data, config_name,
                                       ensure_run, eval_data_for, run_summary)
from yoloq.config import apply_settings, load_config
from yoloq.device import module_device, resolve_device
from yoloq.eval.bootstrap import DEFAULT_LEVEL, MatchTable, match_table, paired_bootstrap
from yoloq.eval.coco_eval import evaluate_model, val_dataset
from yoloq.io import atomic_write_text, check_output_dir, check_run_name, to_json
from yoloq.models import load_model
from yoloq.quant.metrics import output_error
from yoloq.recipes.common import load_calibration_set, seed_everything
from yoloq.recipes.ptq import resolve, run_quantization

PIPELINES = ("default", "plain")
DEFAULT_PIPELINE = {"calibration.method": "auto", "transforms.equalize": False, "transforms.channel_scale": "all",
                    "transforms.bias_correction": True, "reconstruction.method": "off"}
PLAIN_PIPELINE = {"transforms.equalize": False, "transforms.channel_scale": "off", "transforms.se_float": False,
                  "transforms.bias_correction": False, "reconstruction.method": "off"}
PLAIN_METHODS = ("max", "entropy", "mse", "percentile")
SETTABLE_SECTIONS = ("eval", "quant")           # --set: PTQ and evaluation only; training uses the recipe
REFERENCE = "repvgg"                            # the backbone the others' drops are compared with


def pipeline_overrides(pipeline: str, plain_method: str = "max") -> dict:
    if pipeline == "default":
        return dict(DEFAULT_PIPELINE)
    return {**PLAIN_PIPELINE, "calibration.method": plain_method}


def check_settings(settings: list) -> None:
    """``--set`` may change the evaluation and quantization keys, not the training recipe."""
    for item in settings:
        section = item.partition("=")[0].partition(".")[0].strip()
        if section not in SETTABLE_SECTIONS:
            raise BenchBackbonesError(f"--set {item}: bench-backbones takes only {' / '.join(SETTABLE_SECTIONS)} "
                                      "keys (the training recipe is fixed; see --epochs / --train-images / "
                                      "--img-size)")


@dataclass
class Settings:
    backbones: tuple = BACKBONES
    pipelines: tuple = PIPELINES
    plain_method: str = "max"
    seeds: tuple = (0, 1, 2)
    calib_images: int = 256
    resamples: int = 1000
    sqnr_images: int = 64                       # first N evaluation images for the output SQNR
    workers: int = 0
    settings: list = field(default_factory=list)
    device: str = "auto"
    progress: bool = True


@dataclass
class Measured:
    """One backbone: FP32 and every (pipeline, seed) INT8 result, with their COCO match tables."""
    backbone: str
    weights: str
    eval_data: EvalData
    fp32: dict
    rows: list = field(default_factory=list)
    reference: Optional[MatchTable] = None
    tables: dict = field(default_factory=dict)          # (pipeline, seed) -> MatchTable of the INT8 model
    detections: dict = field(default_factory=dict)      # "fp32" / (pipeline, seed) -> COCO results list
    fp32_outputs: Optional[torch.Tensor] = None         # raw FP32 outputs on the evaluation images


def _stats(stats: dict) -> dict:
    return {k: float(v) for k, v in stats.items()}


def measure_backbone(backbone: str, weights: Path, eval_data: EvalData, s: Settings, img_size: int,
                     bar: Optional[tqdm] = None) -> Measured:
    """FP32 once, then every pipeline for every calibration seed (one calibration set per seed)."""
    cfg = apply_settings(load_config(config_name(backbone)), s.settings)
    cfg, data_cfg = resolve(cfg, model={"weights": str(weights), "img_size": img_size}, eval={"workers": s.workers},
                            quant={"calibration.images": s.calib_images, "loader.workers": s.workers},
                            data=str(eval_data.yaml_path))
    fp32 = load_model(cfg.model).to(resolve_device(s.device))
    fp32_eval = _evaluate(fp32, data_cfg, cfg, eval_data)
    images = _eval_images(data_cfg, eval_data, img_size, s.sqnr_images)
    out = Measured(backbone, str(weights), eval_data, _stats(fp32_eval.stats),
                   detections={"fp32": fp32_eval.detections.to_list()}, fp32_outputs=_outputs(fp32, images))
    out.reference = match_table(eval_data.ann_file, out.detections["fp32"], eval_data.image_ids)
    for seed in s.seeds:
        calib = load_calibration_set(data_cfg, cfg.quant.calibration.images, img_size, cfg.quant.loader.batch_size,
                                     s.workers, seed)
        overlap = _shared_images(data_cfg, calib.files, eval_data.files)
        if overlap:                          # yoloq.data.coco refuses this already; a bench must never show it
            raise BenchBackbonesError(f"{eval_data.yaml_path}: calibration image {overlap[0]} is an evaluation image")
        for pipeline in s.pipelines:
            pcfg = cfg.with_overrides(quant={**pipeline_overrides(pipeline, s.plain_method), "seed": seed})
            row = _quantize_and_score(out, (pipeline, seed), pcfg, data_cfg, fp32, calib, s.resamples, images)
            out.rows.append({"pipeline": pipeline, "seed": seed, **row})
            if bar is not None:
                bar.set_postfix_str(f"{backbone} {pipeline} seed {seed}: drop {row['drop_text']}")
                bar.update()
    return out


def _shared_images(data_cfg, calib_files: list, eval_files: list) -> list[str]:
    calib = {(Path(data_cfg.train_images) / f).resolve() for f in calib_files}
    return sorted(str(p) for p in calib & {(Path(data_cfg.val_images) / f).resolve() for f in eval_files})


def _quantize_and_score(out: Measured, key: tuple, cfg, data_cfg, fp32, calib, resamples: int,
                        images: list) -> dict:
    """One PTQ run of ``fp32`` as ``cfg.quant`` says: its row (INT8 AP, the drop's paired interval
    against ``out``'s FP32); the INT8 model's detections and match table go into ``out`` under ``key``."""
    seed_everything(cfg.quant.seed)
    start = time.perf_counter()
    run = run_quantization(cfg, data_cfg, fp32, calib, progress=False)
    quant_s = time.perf_counter() - start
    int8_eval = _evaluate(run.qmodel, data_cfg, cfg, out.eval_data)
    out.detections[key] = int8_eval.detections.to_list()
    out.tables[key] = match_table(out.eval_data.ann_file, out.detections[key], out.eval_data.image_ids)
    interval = paired_bootstrap(out.reference, out.tables[key], resamples=resamples)
    error = output_error(out.fp32_outputs, _outputs(run.qmodel, images))
    return {"calib_images": calib.images, "calib_files": list(calib.files), "calib_method": run.calib_info["method"],
            "transforms": run.transforms.get("plan", "none"), "int8": _stats(int8_eval.stats),
            "drop": interval.to_dict(), "drop_text": interval.text(), "quant_seconds": round(quant_s, 1),
            "output_error": error}


def _eval_images(data_cfg, eval_data: EvalData, img_size: int, limit: int, chunk: int = 16) -> list:
    """The first ``limit`` evaluation images letterboxed as the evaluation sees them, in batches of
    ``chunk`` (their raw outputs are kept for every INT8 model's SQNR)."""
    dataset = val_dataset(data_cfg, eval_data.ann_file, img_size, max_images=limit)
    images = [dataset[i][0] for i in range(len(dataset))]        # all readable: _evaluate checked
    return [torch.stack(images[i:i + chunk]) for i in range(0, len(images), chunk)]


@torch.no_grad()
def _outputs(model, batches: list) -> torch.Tensor:
    """The raw detector outputs ``[B, N, 4 + nc]`` of ``model`` (on its device) for ``batches``."""
    model.eval()
    device = module_device(model)
    return torch.cat([model(b.to(device)).cpu() for b in batches])


def _evaluate(model, data_cfg, cfg, eval_data: EvalData):
    result = evaluate_model(model, data_cfg, cfg.eval, cfg.model.img_size, progress=False)
    if result.failed_files:
        raise BenchBackbonesError(f"{eval_data.ann_file}: evaluation image(s) could not be read: "
                                  f"{result.failed_files[:3]}")
    return result


# --------------------------------------------------------------------------- comparison with RepVGG


def drop_difference(reference: tuple, candidate: tuple, resamples: int, level: float = DEFAULT_LEVEL,
                    seed: int = 0) -> dict:
    """drop(candidate) − drop(reference) in AP points and its percentile interval. Each side is
    ``(FP32 match table, [INT8 match tables])``: its drop is FP32 AP minus the mean INT8 AP over the
    list (calibration seeds). Every table is scored on the same resampled images each time, so the
    interval is that of the paired difference over images; the spread over calibration seeds is
    not in it (negative: the candidate loses less to INT8)."""
    (ref_fp, ref_q), (cand_fp, cand_q) = reference, candidate
    ids = ref_fp.image_ids
    if not ref_q or not cand_q:
        raise ValueError("drop_difference needs at least one INT8 table on each side")
    if not all(t.image_ids == ids for t in [cand_fp, *ref_q, *cand_q]):
        raise BenchBackbonesError("the backbones were evaluated on different images: their drops cannot be paired")

    def diff(w=None) -> float:
        drop = lambda fp, qs: fp.ap(w) - sum(q.ap(w) for q in qs) / len(qs)      # noqa: E731
        return (drop(cand_fp, cand_q) - drop(ref_fp, ref_q)) * 100

    rng, n = np.random.default_rng(seed), len(ids)
    draws = np.array([diff(np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64))
                      for _ in range(resamples)])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return {"difference": diff(), "low": float(low), "high": float(high), "level": level, "resamples": resamples,
            "images": n}


def differences(measured: list[Measured], s: Settings) -> list[dict]:
    """Each backbone's drop against RepVGG's, per pipeline, the drops averaged over the seeds."""
    ref = next((m for m in measured if m.backbone == REFERENCE), None)
    if ref is None:
        return []
    rows = []
    for m in measured:
        if m is ref:
            continue
        for pipeline in s.pipelines:
            side = lambda x: (x.reference, [x.tables[(pipeline, seed)] for seed in s.seeds])   # noqa: E731
            d = drop_difference(side(ref), side(m), s.resamples)
            rows.append({"backbone": m.backbone, "reference": REFERENCE, "pipeline": pipeline,
                         "seeds": list(s.seeds), **d})
    return rows


# --------------------------------------------------------------------------- the run


def bench(runs: Runs, s: Settings) -> tuple[dict, dict]:
    """Train what is missing, measure every backbone: the summary, and the files beside it
    ({relative path: text}: each backbone's data YAML, every model's detections)."""
    check_settings(s.settings)
    resolve_device(s.device)
    if runs.recipe.img_size % 32:
        raise BenchBackbonesError(f"--img-size {runs.recipe.img_size}: must be a multiple of 32 (the largest stride)")
    base = base_data(runs)
    weights = {b: ensure_run(runs, b) for b in s.backbones}          # the long part first, PTQ after
    measured, files = [], {}
    steps = len(s.backbones) * len(s.seeds) * len(s.pipelines)
    with tempfile.TemporaryDirectory() as tmp, \
            tqdm(total=steps, desc="PTQ runs", disable=not s.progress, dynamic_ncols=True) as bar:
        for b in s.backbones:
            eval_data = eval_data_for(runs, b, base, Path(tmp))
            measured.append(measure_backbone(b, weights[b], eval_data, s, runs.recipe.img_size, bar))
            files[f"data/{b}.yaml"] = eval_data.yaml_path.read_text()
    result = summary(measured, runs, s)
    for m in measured:
        for key, dets in m.detections.items():
            files[_detections_file(m.backbone, key)] = json.dumps(dets)
    return result, files


def _detections_file(backbone: str, key) -> str:
    return f"detections/{backbone}_{key if key == 'fp32' else '_seed'.join(map(str, key))}.json"


def summary(measured: list[Measured], runs: Runs, s: Settings) -> dict:
    first = measured[0].eval_data
    return {
        "model": MODEL, "recipe": runs.recipe.to_dict(), "runs": str(runs.root), "trained_now": list(runs.trained),
        "eval": {"split": runs.recipe.eval_split, "ann_file": first.ann_file, "images": len(first.image_ids),
                 "image_ids": first.image_ids, "img_size": runs.recipe.img_size,
                 "sqnr_images": min(s.sqnr_images, len(first.image_ids))},
        "pipelines": {p: pipeline_overrides(p, s.plain_method) for p in s.pipelines},
        "plain_calibration": s.plain_method, "seeds": list(s.seeds), "calib_images": s.calib_images,
        "resamples": s.resamples, "settings": list(s.settings),
        "backbones": [{"backbone": m.backbone, "weights": m.weights, "eval_ann": m.eval_data.ann_file,
                       "eval_images": len(m.eval_data.image_ids), "fp32": m.fp32, "rows": m.rows,
                       "run": run_summary(Path(m.weights).parent, runs.recipe), "data_yaml": f"data/{m.backbone}.yaml",
                       "detections": {"fp32" if k == "fp32" else f"{k[0]}_seed{k[1]}": _detections_file(m.backbone, k)
                                      for k in m.detections}}
                      for m in measured],
        "versus_reference": differences(measured, s),
    }


def run(runs: Runs, s: Settings, out: str, name: str) -> int:
    """``yoloq bench-backbones``: the benchmark, then <out>/<name>/: backbones.md, backbones.json,
    data/<backbone>.yaml, detections/<backbone>_<fp32 | pipeline_seedN>.json (COCO results)."""
    from yoloq.bench.backbones_table import render_markdown
    folder = check_output_dir(Path(out) / check_run_name(name), "--out")      # before the work, not after
    start = time.perf_counter()
    result, files = bench(runs, s)
    result["seconds"] = round(time.perf_counter() - start, 1)
    markdown = render_markdown(result)
    for path, text in files.items():
        atomic_write_text(folder / path, text)
    atomic_write_text(folder / "backbones.json", to_json(result))
    atomic_write_text(folder / "backbones.md", markdown)
    print(markdown)
    print(f"wrote {folder}/ in {result['seconds']:.0f} s")
    return 0
