"""The channel-scaling migration strength α, measured where it may be chosen (``yoloq bench-alpha``).

    yoloq bench-alpha --cfg yolov6lite_l                 # the search's candidates: α 0.5 / 0.65 / 0.8 / 0.9
    yoloq bench-alpha --cfg yolov6lite_l --val           # + val, as a diagnostic only

For each candidate α the model is quantized with the config's quant section at that α, exactly as
``yoloq ptq --channel-scale-alpha A`` does, and measured three ways:

- the calibration-side score that ``--channel-scale-alpha auto`` ranks the candidates by (detector
  output SQNR on ``calibration.auto_images`` calibration images, each candidate calibrated on the
  ``transforms.images`` images as the run calibrates), and the same SQNR of the model the run
  really builds (calibrated on all its calibration images);
- the COCO AP on the labelled *train* images that are not calibration images (held out), with the
  drop's paired-bootstrap interval, and the AP difference to the config's α with its own paired
  interval (is the candidate distinguishable from the default at all?);
- with ``--val``, the val drop, reported as a diagnostic: nothing here chooses on val.

The held-out train images are the honest place to judge a calibration-side criterion: they are
labelled, never calibrated on and never the images the report scores.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from yoloq.bench.baseline import FP32Baseline
from yoloq.config import Config
from yoloq.device import resolve_device
from yoloq.errors import InputError
from yoloq.eval.coco_eval import EvalResult, evaluate_model
from yoloq.io import atomic_write_text, check_run_folder, staging_dir, to_json
from yoloq.quant.metrics import output_error
from yoloq.quant.recipe_config import choose_alpha, proxy_method
from yoloq.recipes.common import load_calibration_set, run_environment, thread_invariant_kernels
from yoloq.recipes.partial import selection_data
from yoloq.recipes.ptq import resolve, run_quantization
from yoloq.report.common import drop_text, md_table, num

KIND = "bench-alpha"


class AlphaBench(FP32Baseline):
    """The FP32 model, the calibration images and the held-out train set, shared by every α."""

    def __init__(self, cfg: Config, data_cfg, scratch: Path, *, val: bool, max_images: Optional[int],
                 held_out_images: Optional[int], bootstrap: int, device: str):
        super().__init__(cfg, data_cfg, device=device, max_images=max_images, bootstrap=bootstrap)
        q = cfg.quant
        self.calib = load_calibration_set(data_cfg, q.calibration.images, cfg.model.img_size, q.loader.batch_size,
                                          cfg.eval.workers, q.seed)
        self.held_data, self.held_info = selection_data(data_cfg, self.calib.files, held_out_images, q.seed, scratch,
                                                        held_out=True)
        self.held_eval_cfg = dataclasses.replace(cfg.eval, val_ann="val_ann")
        self.scored_images = torch.cat(self.calib.first(q.calibration.auto_images))
        with torch.no_grad():
            self.reference_outputs = self.fp32(self.scored_images)
        self.fp32_held = self.held_out(self.fp32)
        self.fp32_val = self.val(self.fp32) if val else None

    def held_out(self, model) -> EvalResult:
        return evaluate_model(model, self.held_data, self.held_eval_cfg, self.cfg.model.img_size, progress=False)

    def measure(self, alpha: float) -> tuple[dict, EvalResult]:
        """Quantize at ``alpha`` as ``yoloq ptq`` does; the row and the held-out evaluation."""
        cfg = self.cfg.with_overrides(quant={"transforms.channel_scale_alpha": alpha})
        run = run_quantization(cfg, self.data_cfg, self.fp32, self.calib)
        with torch.no_grad():
            sqnr = output_error(self.reference_outputs, run.qmodel(self.scored_images))["sqnr_db"]
        held = self.held_out(run.qmodel)
        row = {"alpha": alpha, "calib_method": run.calib_info["method"], "sqnr_db": sqnr,
               "held_out_ap": held.stats["AP"] * 100, "held_out": self.drop(self.fp32_held, held)}
        if self.fp32_val is not None:
            row["val_ap"] = self.val(run.qmodel).stats["AP"] * 100
            row["val_drop"] = (self.fp32_val.stats["AP"] * 100) - row["val_ap"]
        return row, held


def run_alpha_bench(cfg: "Config | str", *, alphas: Optional[Sequence[float]] = None, val: bool = False,
                    held_out_images: Optional[int] = None, bootstrap: int = 1000, max_images: Optional[int] = None,
                    weights: Optional[str] = None, data: Optional[str] = None, workers: Optional[int] = None,
                    device: str = "auto", thread_invariant: bool = False, out: str = "runs/bench_alpha",
                    name: Optional[str] = None, progress: bool = True) -> dict:
    """One row per α (see the module doc); writes ``<out>/<name>/bench.{md,json}`` through a staging folder."""
    if alphas is not None and (not alphas or any(not 0.0 <= a <= 1.0 for a in alphas)):
        raise InputError(f"--alphas: numbers in [0, 1] expected, got {list(alphas)}")
    if bootstrap < 0:
        raise InputError(f"--bootstrap: >= 0 expected, got {bootstrap}")
    resolved, data_cfg = resolve(cfg, model={"weights": weights}, data=data, eval={"workers": workers})
    configured = resolved.quant.transforms.channel_scale_alpha
    alphas = list(dict.fromkeys(float(a) for a in (alphas or resolved.quant.transforms.channel_scale_alphas)))
    if configured is not None and configured not in alphas:
        alphas.append(float(configured))              # the comparison column needs the config's own α
    final = check_run_folder(out, name or f"{resolved.model.name}_alpha", KIND)
    start = time.perf_counter()
    with staging_dir(final, KIND) as stage, thread_invariant_kernels(thread_invariant), \
            tempfile.TemporaryDirectory() as scratch:
        bench = AlphaBench(resolved, data_cfg, Path(scratch), val=val, max_images=max_images,
                           held_out_images=held_out_images, bootstrap=bootstrap, device=device)
        qcfg = _with_alphas(resolved.quant, alphas)
        search = choose_alpha(bench.fp32, qcfg, bench.calib.batches)
        rows = measure_all(bench, alphas, {t["alpha"]: t for t in search["trials"]},
                           configured if configured is not None else search["chosen"], progress)
        summary = {"name": final.name, "model": resolved.model.name, "config": resolved.path,
                   "seed": resolved.quant.seed, "config_alpha": configured, "auto_alpha": search["chosen"],
                   "proxy_method": proxy_method(qcfg), "calibration_images": bench.calib.images,
                   "scored_images": int(bench.scored_images.shape[0]), "held_out": bench.held_info,
                   "fp32_held_out_ap": bench.fp32_held.stats["AP"] * 100,
                   "fp32_val_ap": bench.fp32_val.stats["AP"] * 100 if bench.fp32_val else None,
                   "val_images": bench.fp32_val.n_images if bench.fp32_val else None, "bootstrap": bootstrap,
                   "rows": rows,
                   "env": {**run_environment(resolve_device(device)), "thread_invariant": thread_invariant},
                   "seconds": time.perf_counter() - start, "out_dir": str(final)}
        atomic_write_text(stage / "bench.json", to_json(summary))
        atomic_write_text(stage / "bench.md", render_markdown(summary))
    return summary


def measure_all(bench: AlphaBench, alphas: list, trials: dict, reference: float, progress: bool) -> list[dict]:
    """Every α's row, with the search's score of it (``trials``: α -> the search's trial) and the
    held-out AP difference to ``reference`` (the α the config runs)."""
    rows, held = [], {}
    for alpha in tqdm(alphas, desc=f"{bench.cfg.model.name}: alpha", disable=not progress):
        row, held[alpha] = bench.measure(alpha)
        trial = trials.get(alpha, {})
        rows.append({**row, "proxy_sqnr_db": trial.get("sqnr_db"), "proxy_calib": trial.get("calib")})
        if progress:
            tqdm.write(row_line(rows[-1]))
    for row in rows:                                    # positive: this α is worse than the reference
        row["vs_default"] = bench.drop(held[reference], held[row["alpha"]])
    return rows


def _with_alphas(qcfg, alphas: list):
    """``qcfg`` with ``alphas`` as the search's candidates."""
    return dataclasses.replace(qcfg, transforms=dataclasses.replace(qcfg.transforms, channel_scale_alphas=list(alphas)))


def row_line(r: dict) -> str:
    h = r["held_out"]
    return (f"alpha {r['alpha']:g}: held-out train AP {r['held_out_ap']:.2f}, drop {drop_text(h['drop'], h['ci'])}, "
            f"SQNR {r['sqnr_db']:.2f} dB (search's proxy {num(r['proxy_sqnr_db'])})")


def render_markdown(s: dict) -> str:
    held = s["held_out"]
    head = [f"# Channel-scaling α: {s['model']}", "",
            f"Quantized at each α with the config's quant section (`{s['config']}`) on {s['calibration_images']} "
            f"calibration images. Held-out train: {held['images']} labelled train images that are not calibration "
            f"images (FP32 AP {s['fp32_held_out_ap']:.2f}); drop in AP points with its paired-bootstrap interval "
            f"({s['bootstrap']} resamples). SQNR: detector output vs FP32 on the first {s['scored_images']} "
            f"calibration images. Config α {num(s['config_alpha'], '{:g}')} (none: auto's pick); "
            f"`--channel-scale-alpha auto` picks "
            f"{num(s['auto_alpha'], '{:g}')}. Threads: {s['env']['threads']}"
            + (", thread-invariant kernels" if s["env"].get("thread_invariant") else "") + ".", ""]
    val = s["fp32_val_ap"] is not None
    cols = ["α", "calib", f"auto's score: SQNR dB ({s['proxy_method']} calibration; the rule it chose)",
            "SQNR dB (the run's model)",
            "held-out train AP", "held-out drop (95% CI)", "vs config α (95% CI)"]
    if val:
        cols.append(f"val drop ({s['val_images']} images; diagnostic, not a choice)")
    table = []
    for r in s["rows"]:
        vs = r.get("vs_default")
        score = num(r["proxy_sqnr_db"]) + (f" ({r['proxy_calib']})" if r.get("proxy_calib") else "")
        line = [f"{r['alpha']:g}", r["calib_method"], score, num(r["sqnr_db"]),
                f"{r['held_out_ap']:.2f}", drop_text(r["held_out"]["drop"], r["held_out"]["ci"]),
                drop_text(vs["drop"], vs["ci"]) if vs else "-"]
        if val:
            line.append(num(r.get("val_drop")))
        table.append(tuple(line))
    notes = ["", "\"vs config α\": held-out AP at the α the config runs minus at this α (positive: this α is "
             "worse), with the paired interval over the same images."]
    return "\n".join(head + [md_table(tuple(cols), table)] + notes + [""])
