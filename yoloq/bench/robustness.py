"""How much the default PTQ result depends on its calibration images (``yoloq bench-robustness``).

    yoloq bench-robustness --cfg yolov6lite_s          # 3 disjoint sets of 128, and 32 / 64 / 256 images

One row per calibration set, each quantized with the config's quant section exactly as
``yoloq ptq`` does, evaluated on the same val images against one FP32 evaluation: INT8 AP, the drop
and its paired-bootstrap interval over the images. With the α search (default on) each row also
shows the migration strength ``--channel-scale-alpha auto`` picks on that set (its candidates'
calibration-side scores), and the drop at that α where it differs from the config's.

The sets: the train images in the order ``yoloq ptq`` draws them (shuffled by the config's seed)
are cut into ``sets`` consecutive disjoint slices of ``set_images`` (a data YAML listing each
slice as ``train_files`` is written next to the table, so a row is one ``yoloq ptq --data`` away);
``sizes`` are the first N of that order, i.e. ``yoloq ptq --calib-images N`` (nested sets).
Validation images are only evaluated. Every finished row is kept beside the run folder
(``yoloq.bench.row_checkpoint``): ``resume`` continues an interrupted run from its last row.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import yaml
from tqdm import tqdm

from yoloq.bench.baseline import FP32Baseline
from yoloq.bench.row_checkpoint import RowCheckpoint
from yoloq.config import Config, DataConfig
from yoloq.device import resolve_device
from yoloq.errors import InputError
from yoloq.io import atomic_write_text, check_run_folder, staging_dir, to_json
from yoloq.recipes.common import load_calibration_set, run_environment, thread_invariant_kernels
from yoloq.recipes.ptq import resolve, run_quantization
from yoloq.report.common import drop_text, md_table, num
from yoloq.version import __version__


KIND = "bench-robustness"


@dataclass
class CalibSet:
    label: str
    kind: str                            # "disjoint" | "size"
    images: int
    data: DataConfig                     # train_files set for a disjoint slice
    data_yaml: Optional[str] = None      # the file that reproduces a disjoint slice with yoloq ptq --data


def calibration_sets(data_cfg: DataConfig, seed: int, sets: int, set_images: int, sizes: Sequence[int],
                     write_dir: Path, final_dir: Path) -> list[CalibSet]:
    """The disjoint slices (each written as a data YAML into ``write_dir``, named as it will be in
    ``final_dir``) and the nested sizes."""
    from yoloq.data.coco import calibration_images
    out: list[CalibSet] = []
    if sets:
        with warnings.catch_warnings():             # too few images: the error below says so
            warnings.simplefilter("ignore")
            order = calibration_images(data_cfg, sets * set_images, seed)
        if len(order) < sets * set_images:
            raise InputError(f"{data_cfg.path}: {sets} disjoint sets of {set_images} need {sets * set_images} "
                             f"readable train images, found {len(order)}")
        for k in range(sets):
            files = order[k * set_images:(k + 1) * set_images]
            data_k = dataclasses.replace(data_cfg, train_files=files)
            atomic_write_text(write_dir / f"calib_set_{k + 1}.yaml", data_yaml(data_k))
            out.append(CalibSet(f"disjoint {k + 1}/{sets}", "disjoint", set_images, data_k,
                                str(final_dir / f"calib_set_{k + 1}.yaml")))
    out += [CalibSet(f"first {n}", "size", n, data_cfg) for n in sizes]
    return out


def data_yaml(data_cfg: DataConfig) -> str:
    """A dataset YAML of ``data_cfg`` (absolute paths, its train_files)."""
    fields = {f.name: getattr(data_cfg, f.name) for f in dataclasses.fields(data_cfg) if f.name != "path"}
    return yaml.safe_dump({k: v for k, v in fields.items() if v is not None}, sort_keys=False, width=1000)


class RobustnessBench(FP32Baseline):
    """The FP32 model and its evaluation, shared by every calibration set."""

    def __init__(self, cfg: Config, data_cfg: DataConfig, *, bootstrap: int, alpha_search: bool,
                 max_images: Optional[int], device: str, progress: bool):
        super().__init__(cfg, data_cfg, device=device, max_images=max_images, bootstrap=bootstrap)
        self.alpha_search, self.progress = alpha_search, progress
        self.fp32_eval = self.val(self.fp32)

    def row(self, cs: CalibSet) -> dict:
        """Quantize with ``cs`` as ``yoloq ptq`` would, evaluate, and (optionally) choose α on it."""
        cfg = self.cfg.with_overrides(quant={"calibration.images": cs.images})
        start = time.perf_counter()
        calib = load_calibration_set(cs.data, cs.images, cfg.model.img_size, cfg.quant.loader.batch_size,
                                     cfg.eval.workers, cfg.quant.seed)
        run = run_quantization(cfg, cs.data, self.fp32, calib)
        row = {"set": cs.label, "kind": cs.kind, "images": calib.images, "data_yaml": cs.data_yaml,
               "alpha": cfg.quant.transforms.channel_scale_alpha, "calib_method": run.calib_info["method"],
               **self.scored(run.qmodel)}
        if self.alpha_search:
            row["alpha_search"] = self.choose_alpha(cfg, calib)
            chosen = row["alpha_search"]["chosen"]
            if chosen != row["alpha"]:
                at = cfg.with_overrides(quant={"transforms.channel_scale_alpha": chosen})
                row["at_chosen"] = self.scored(run_quantization(at, cs.data, self.fp32, calib).qmodel)
        row["seconds"] = time.perf_counter() - start
        return row

    def scored(self, qmodel) -> dict:
        result = self.val(qmodel)
        drop = self.drop(self.fp32_eval, result)
        return {"int8_ap": result.stats["AP"] * 100, "drop": drop["drop"], "drop_ci": drop["ci"]}

    def choose_alpha(self, cfg: Config, calib) -> dict:
        """What ``--channel-scale-alpha auto`` picks on these calibration images (search only)."""
        from yoloq.quant.recipe_config import choose_alpha
        return choose_alpha(self.fp32, cfg.quant, calib.batches)


def run_robustness(cfg: "Config | str", *, sets: int = 3, set_images: int = 128, sizes: Sequence[int] = (32, 64, 256),
                   alpha_search: bool = True, bootstrap: int = 1000, max_images: Optional[int] = None,
                   weights: Optional[str] = None, data: Optional[str] = None, workers: Optional[int] = None,
                   device: str = "auto", thread_invariant: bool = False, out: str = "runs/bench_robustness",
                   name: Optional[str] = None, progress: bool = True, resume: bool = False) -> dict:
    """Every calibration set's row (see the module doc); writes ``<out>/<name>/`` (bench.md,
    bench.json, the disjoint sets' data YAMLs) through a staging folder. ``resume``: take the rows an
    interrupted run with the same settings finished, compute the rest."""
    if sets < 0 or set_images < 1 or any(n < 1 for n in sizes) or bootstrap < 0:
        raise InputError(f"--sets >= 0, --set-images >= 1, --sizes >= 1 and --bootstrap >= 0 expected, got "
                         f"{sets}, {set_images}, {list(sizes)}, {bootstrap}")
    if not sets and not sizes:
        raise InputError("nothing to measure: --sets 0 and no --sizes")
    resolved, data_cfg = resolve(cfg, model={"weights": weights}, data=data, eval={"workers": workers})
    final = check_run_folder(out, name or f"{resolved.model.name}_robustness", KIND)
    env = {**run_environment(resolve_device(device)), "thread_invariant": thread_invariant}
    settings = {"config": dataclasses.asdict(resolved), "data": dataclasses.asdict(data_cfg), "sets": sets,
                "set_images": set_images, "sizes": list(sizes), "alpha_search": alpha_search, "bootstrap": bootstrap,
                "max_images": max_images, "env": env, "yoloq": __version__}
    done = RowCheckpoint(final, settings, resume=resume)
    start = time.perf_counter()
    with staging_dir(final, KIND) as stage, thread_invariant_kernels(thread_invariant):
        bench = RobustnessBench(resolved, data_cfg, bootstrap=bootstrap, alpha_search=alpha_search,
                                max_images=max_images, device=device, progress=progress)
        todo = calibration_sets(data_cfg, resolved.quant.seed, sets, set_images, sizes, stage, final)
        rows, resumed = [], sum(cs.label in done.rows for cs in todo)
        if resumed and progress:
            tqdm.write(f"resuming: {resumed} of {len(todo)} rows from {done.path}")
        for cs in tqdm(todo, desc=f"{resolved.model.name}: calibration sets", disable=not progress):
            rows.append(done.get(cs.label) or done.add(cs.label, bench.row(cs)))
            if progress:
                tqdm.write(row_line(rows[-1]))
        summary = {"name": final.name, "model": resolved.model.name, "config": resolved.path,
                   "seed": resolved.quant.seed, "eval_images": bench.fp32_eval.n_images,
                   "ann_file": bench.fp32_eval.ann_file, "fp32_ap": bench.fp32_eval.stats["AP"] * 100,
                   "bootstrap": bootstrap, "rows": rows, "spread": spread(rows), "env": env,
                   "resumed_rows": resumed, "seconds": time.perf_counter() - start, "out_dir": str(final)}
        atomic_write_text(stage / "bench.json", to_json(summary))
        atomic_write_text(stage / "bench.md", render_markdown(summary))
    done.remove()                                       # the run folder is complete
    return summary


def spread(rows: list[dict]) -> dict:
    """min / max / range of the drop over the disjoint sets, and over the sizes."""
    out = {}
    for kind in ("disjoint", "size"):
        drops = [r["drop"] for r in rows if r["kind"] == kind]
        if drops:
            out[kind] = {"min": min(drops), "max": max(drops), "range": max(drops) - min(drops)}
    return out


def row_line(r: dict) -> str:
    alpha = r.get("alpha_search")
    chosen = f"; auto alpha {alpha['chosen']:g}" if alpha else ""
    return f"{r['set']:>16s}: INT8 AP {r['int8_ap']:.2f}, drop {drop_text(r['drop'], r['drop_ci'])}{chosen}"


def render_markdown(s: dict) -> str:
    head = [f"# Calibration-set robustness: {s['model']}", "",
            f"FP32 AP {s['fp32_ap']:.2f} on {s['eval_images']} images of `{s['ann_file']}`; each row quantized "
            f"with the config's quant section (`{s['config']}`) on its own calibration images; drop in AP points "
            f"with its paired-bootstrap interval ({s['bootstrap']} resamples). Threads: {s['env']['threads']}"
            + (", thread-invariant kernels" if s["env"].get("thread_invariant") else "") + ".", ""]
    table = []
    for r in s["rows"]:
        search = r.get("alpha_search")
        trials = ", ".join(f"{t['alpha']:g}: {t['sqnr_db']:.2f}"
                           for t in (search or {}).get("trials", []))
        at = r.get("at_chosen")
        table.append((r["set"], r["images"], f"{r['int8_ap']:.2f}", drop_text(r["drop"], r["drop_ci"]),
                      r["calib_method"], num(search["chosen"], "{:g}") if search else "-", trials or "-",
                      drop_text(at["drop"], at["drop_ci"]) if at else "same"))
    lines = head + [md_table(("calibration set", "images", f"INT8 AP (α {num(s['rows'][0]['alpha'], '{:g}')})",
                              "drop", "calib", "α auto", "α candidates: SQNR dB", "drop at auto α"), table), ""]
    for kind, label in (("disjoint", "disjoint sets"), ("size", "set sizes")):
        if kind in s["spread"]:
            sp = s["spread"][kind]
            lines.append(f"- drop over the {label}: {sp['min']:.2f} to {sp['max']:.2f} (range {sp['range']:.2f})")
    return "\n".join(lines + [""])
