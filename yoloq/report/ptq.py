"""The PTQ report: Markdown, JSON and PNG plots from the dict ``yoloq.recipes.ptq`` builds.

Keys: name, model, config, data, calibration, fp32, int8, drop, drop_ci, skipped_layers, partial,
sensitivity, diagnosis, timings, files, notes. Every file is written atomically (``yoloq.io``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from yoloq.io import atomic_write_bytes, atomic_write_text, to_json
from yoloq.report.common import MAIN_STATS, drop_text, figure_bytes, md_table, num, pct, pyplot


# --------------------------------------------------------------------------- markdown


def render_markdown(report: dict, plots: Sequence[str] = ()) -> str:
    model, calib = report.get("model", {}), report.get("calibration", {})
    fp32, int8, drop = report.get("fp32", {}), report.get("int8", {}), report.get("drop", {})
    out = [f"# PTQ report: {report.get('name', model.get('name', '?'))}", ""]
    out += [f"- model: `{model.get('name')}` ({model.get('arch')}), weights `{model.get('weights')}`, "
            f"input {model.get('img_size')}",
            f"- config: `{report.get('config', {}).get('path')}`",
            f"- evaluation: {report.get('data', {}).get('eval_images')} images of "
            f"`{report.get('data', {}).get('ann_file')}`",
            f"- calibration: method **{calib.get('method')}** (asked: {calib.get('requested')}), "
            f"{calib.get('images')} train images, seed {calib.get('seed')}", ""]

    out += ["## FP32 vs INT8 (COCO bbox, %)", ""]
    rows = [(k, pct(fp32.get(k)), pct(int8.get(k)), num(drop.get(k))) for k in MAIN_STATS]
    out += [md_table(("metric", "FP32", "INT8", "drop"), rows), ""]
    out += _interval_lines(report.get("drop_ci"))
    out += _per_class_section(report)

    errors = calib.get("auto_errors") or {}
    if errors:
        out += ["## Calibration methods (auto)", "",
                f"Metric: {calib.get('auto_metric', 'detector output SQNR vs FP32')}; "
                f"chosen: **{calib.get('method')}**.", ""]
        rows = [(m, num(e.get("sqnr_db")), num(e.get("score_sqnr_db")), num(e.get("box_sqnr_db")))
                for m, e in errors.items()]
        out += [md_table(("method", "SQNR dB", "score SQNR dB", "box SQNR dB"), rows), ""]

    out += transforms_section(report.get("transforms") or {})
    out += _reconstruction_section(report.get("reconstruction") or {})
    out += _partial_section(report)
    out += _sensitivity_section(report.get("sensitivity") or {})
    out += _diagnosis_section(report.get("diagnosis") or {})

    timings = report.get("timings") or {}
    if timings:
        out += ["## Time per stage", ""]
        out += [md_table(("stage", "seconds"), [(k, f"{v:.1f}") for k, v in timings.items()]), ""]
    for note in report.get("notes") or []:
        out.append(f"- {note}")
    if report.get("notes"):
        out.append("")
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(out)


def _interval_lines(ci) -> list[str]:
    """The AP drop with its paired-bootstrap interval (the noise of one evaluation on these images)."""
    if not ci:
        return []
    return [f"AP drop **{drop_text(ci['drop'], ci)}**: paired bootstrap over the {ci['images']} evaluated images "
            f"({ci['resamples']} resamples, seed {ci.get('seed', 0)}; FP32 and INT8 scored on the same resampled "
            "images). An interval this wide is the noise of one evaluation on this many images.", ""]


def _per_class_section(report: dict) -> list[str]:
    """AP per class, FP32 next to INT8, largest drop first; the per-image evaluation times."""
    from yoloq.report.eval import per_class_table, timing_line
    per_class, timing = report.get("per_class") or {}, report.get("eval_timing") or {}
    out = []
    if per_class.get("fp32") and per_class.get("int8"):
        out += ["## AP per class (%, largest drop first)", "", per_class_table(per_class["fp32"], per_class["int8"]), ""]
    for label, key in (("FP32", "fp32"), ("INT8", "int8")):
        if timing.get(key):
            out.append(f"- {label} evaluation {timing_line(timing[key])}")
    return out + ([""] if timing else [])


STEP_TITLES = {"equalize": "cross-layer equalization", "se_float": "squeeze-excite convs in float",
               "channel_scale": "per-channel input scaling", "bias_correction": "bias correction"}


def _step_details(step: str, d: dict) -> str:
    if not d:
        return "-"
    if step == "equalize":
        return f"{d.get('pairs')} conv pairs, {d.get('readers')} compensating convs, {d.get('sweeps')} sweeps"
    if step == "se_float":
        return f"{d.get('count')} convs, {pct(d.get('flop_share'))} % of conv MACs"
    if step == "channel_scale":
        return (f"{d.get('tensors')} tensors, {d.get('layers')} convs ({d.get('depthwise_layers')} depthwise, "
                f"{d.get('dense_layers')} dense); widest input channel spread {num(d.get('max_channel_spread'), '{:.0f}')}x")
    if step == "bias_correction":
        return f"{d.get('layers')} convs on {d.get('images')} images, mean |shift| {num(d.get('mean_abs_shift'), '{:.3g}')}"
    return "-"


def transforms_section(tr: dict) -> list[str]:
    """The PTQ transforms: per step what was asked, what was applied, details and seconds."""
    steps = tr.get("steps") or {}
    if not steps:
        return []
    out = ["## PTQ transforms", "", f"Applied: **{tr.get('plan')}** (order: equalization, prepare, SE float, "
           "channel scaling, calibration, bias correction).", ""]
    rows = []
    for step, st in steps.items():
        applied = st.get("applied")
        shown = ("yes" if applied is True else "no" if applied is False else str(applied))
        if step == "channel_scale" and applied:
            shown += f", alpha {num(st.get('alpha'), '{:g}')}"
        rows.append((STEP_TITLES.get(step, step), str(st.get("asked")).lower(), shown,
                     _step_details(step, st.get("details") or {}), num(st.get("seconds"), "{:.1f}")))
    out += [md_table(("step", "config", "applied", "details", "seconds"), rows), ""]
    trials = tr.get("auto_trials") or []
    if trials:
        out += [f"Automatic choice ({num(tr.get('auto_seconds'), '{:.1f}')} s; metric: {tr.get('auto_metric')}; "
                "greedy, step by step; steps whose work ran during the search show no seconds of their own):", "",
                md_table(("candidate", "SQNR dB"), [(t["plan"], num(t["sqnr_db"])) for t in trials]), ""]
    return out


def _reconstruction_section(rec: dict) -> list[str]:
    blocks = rec.get("blocks") or []
    if not blocks:
        return []
    st = rec.get("settings", {})
    out = ["## Block reconstruction", "",
           f"Method **{rec.get('method')}** ({'per layer' if rec.get('block_size') == 1 else 'per block'}), "
           f"{len(blocks)} blocks, {rec.get('images')} train images, {st.get('iters')} steps per block of "
           f"{st.get('batch_size')} images, lambda {st.get('reg_weight')}"
           + (f", drop probability {st.get('drop_prob')}" if rec.get("method") == "qdrop" else "")
           + f"; {rec.get('device')}, {num(rec.get('seconds'), '{:.1f}')} s "
           f"({num(rec.get('cpu_seconds'), '{:.1f}')} s CPU). {rec.get('improved')} blocks improved; a block whose "
           "loss did not go down keeps its calibrated weights and ranges.",
           "Loss: squared error of the block output vs FP32 (summed over channels, mean over images and "
           "positions) on the "
           "calibration images (inputs from the quantized model with earlier blocks reconstructed).", ""]
    header = ("block", "convs", "act steps learned / shared", "loss before", "loss after",
              "SQNR dB before -> after", "weights re-rounded", "kept")
    rows = [(f"`{b['block']}`", b.get("layers"), f"{b.get('learned_act')} / {b.get('shared_act')}",
             num(b.get("loss_before"), "{:.4g}"), num(b.get("loss_after"), "{:.4g}"),
             f"{num(b.get('sqnr_before_db'))} -> {num(b.get('sqnr_after_db'))}",
             pct(b.get("changed_weights")), "yes" if b.get("kept") else "no") for b in blocks]
    return out + [md_table(header, rows), ""]


def _partial_section(report: dict) -> list[str]:
    skipped = report.get("skipped_layers") or []
    partial = report.get("partial") or {}
    se = set(((((report.get("transforms") or {}).get("steps") or {}).get("se_float") or {}).get("details") or {})
             .get("layers") or [])
    out = ["## Partial quantization", ""]
    if se:
        out.append(f"Squeeze-excite convs in float (se_float, not counted below): {len(se)}.")
        skipped = [s for s in skipped if s not in se]
    out.append(f"Layers kept in floating point ({len(skipped)}): "
               + (", ".join(f"`{s}`" for s in skipped) if skipped else "none") + ".")
    if partial.get("mode"):
        out.append(f"Chosen by: {partial['mode']}" + (f" ({partial['note']})" if partial.get("note") else "") + ".")
    trace = partial.get("search") or []
    if trace:
        out += ["", md_table(("k skipped", f"{partial.get('metric', 'drop')}"),
                             [(t["k"], num(t["drop"])) for t in trace])]
    return out + [""]


def _sensitivity_section(sens: dict, top: int = 20) -> list[str]:
    rows = sens.get("ranking") or []
    if not rows:
        return []
    out = ["## Per-layer sensitivity", "",
           f"Metric: {sens.get('metric')}; mode: {sens.get('mode')}; {sens.get('images')} calibration images; "
           f"{num(sens.get('seconds'), '{:.1f}')} s. Most sensitive first (top {min(top, len(rows))} of {len(rows)}). "
           f"The model as it runs: {num(sens.get('model_sqnr_db'))} dB on the same images.", ""]
    has_map = any("map_drop" in r for r in rows)
    share = ("error vs the model's (only this layer quantized)" if sens.get("mode") == "quantize-one"
             else "share of the model's error removed (this layer in float)")
    header = ["rank", "layer", "output SQNR dB", "score SQNR", "box SQNR", "sensitivity", share] + \
        (["mAP drop, layer in float"] if has_map else [])
    table = []
    for r in rows[:top]:
        row = [r["rank"], f"`{r['layer']}`", num(r.get("sqnr_db")), num(r.get("score_sqnr_db")),
               num(r.get("box_sqnr_db")), num(r.get("score")), _percent(r.get("error_share"))]
        if has_map:
            row.append(num(r.get("map_drop")))
        table.append(row)
    return out + [md_table(header, table), ""]


def _percent(x) -> str:
    return num(None if x is None else x * 100, "{:.0f} %")


def _diagnosis_section(diag: dict, top: int = 25) -> list[str]:
    rows = diag.get("layers") or []
    if not rows:
        return []
    flagged = [r for r in rows if r.get("flags")]
    out = ["## Diagnosis (per-layer ranges and INT8 SQNR)", "",
           f"Thresholds: {json.dumps(diag.get('thresholds', {}))}. {len(flagged)} of {len(rows)} layers flagged. "
           f"Rows: flagged layers first, then lowest activation SQNR.", ""]
    header = ("layer", "w std", "max abs w", "w outliers", "w ch spread", "w SQNR pc", "w SQNR pt",
              "act amax", "act ch spread", "act SQNR", "flags")
    ordered = sorted(rows, key=lambda r: (not r.get("flags"), r.get("act_sqnr_db") or 1e9))
    table = [(f"`{r['layer']}`", num(r.get("w_std"), "{:.3g}"), num(r.get("w_absmax"), "{:.3g}"),
              num(r.get("w_outlier_ratio"), "{:.2e}"), num(r.get("w_channel_spread"), "{:.1f}"),
              num(r.get("w_sqnr_db")), num(r.get("w_sqnr_per_tensor_db")), num(r.get("act_amax"), "{:.3g}"),
              num(r.get("act_channel_spread"), "{:.1f}"), num(r.get("act_sqnr_db")),
              ", ".join(r.get("flags") or []) or "-") for r in ordered[:top]]
    return out + [md_table(header, table), ""]


# --------------------------------------------------------------------------- plots


def plot_stats(fp32: dict, int8: dict, title: str = "FP32 vs INT8") -> bytes:
    plt = pyplot()
    names = [k for k in MAIN_STATS if k in fp32 or k in int8]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    a = [max(fp32.get(k, 0) or 0, 0) * 100 for k in names]
    b = [max(int8.get(k, 0) or 0, 0) * 100 for k in names]
    ax.bar([i - 0.2 for i in x], a, 0.4, label="FP32")
    ax.bar([i + 0.2 for i in x], b, 0.4, label="INT8")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("COCO %")
    ax.set_title(title)
    ax.legend()
    return figure_bytes(fig)


def plot_sensitivity(ranking: Sequence[dict], top: int = 30, mode: str = "quantize-one") -> bytes:
    plt = pyplot()
    rows = list(ranking)[:top][::-1]                 # most sensitive at the top
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.25 * len(rows) + 1)))
    if mode == "skip-one":
        ax.barh([r["layer"] for r in rows], [r.get("score") or 0 for r in rows])
        ax.set_xlabel("output SQNR gain when only this layer stays in float (dB), higher = more sensitive")
    else:
        ax.barh([r["layer"] for r in rows], [r.get("sqnr_db") or 0 for r in rows])
        ax.set_xlabel("detector output SQNR vs FP32, only this layer quantized (dB), lower = more sensitive")
    ax.set_title(f"Per-layer sensitivity (top {len(rows)})")
    ax.tick_params(axis="y", labelsize=7)
    return figure_bytes(fig)


def plot_diagnosis(layers: Sequence[dict]) -> bytes:
    plt = pyplot()
    idx = list(range(len(layers)))
    cap = lambda v: min(v or 0.0, 80.0)      # noqa: E731 - exactly representable weights report 200 dB
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ax1.plot(idx, [cap(r.get("w_sqnr_db")) for r in layers], ".-", label="weight SQNR (per-channel)")
    ax1.plot(idx, [cap(r.get("w_sqnr_per_tensor_db")) for r in layers], ".-", label="weight SQNR (per-tensor)")
    ax1.plot(idx, [cap(r.get("act_sqnr_db")) for r in layers], ".-", label="input activation SQNR")
    flagged = [i for i, r in enumerate(layers) if r.get("flags")]
    if flagged:
        ax1.plot(flagged, [cap(layers[i].get("act_sqnr_db")) for i in flagged], "rx", label="flagged")
    ax1.set_ylabel("INT8 SQNR (dB, capped at 80)")
    ax1.legend(fontsize=7)
    ax2.semilogy(idx, [max(r.get("w_channel_spread") or 1, 1) for r in layers], ".-", label="weight channel spread")
    ax2.semilogy(idx, [max(r.get("act_channel_spread") or 1, 1) for r in layers], ".-", label="activation channel spread")
    ax2.set_ylabel("max/min per-channel amax")
    ax2.set_xlabel("quantized layer (model order)")
    ax2.legend(fontsize=7)
    fig.suptitle("Per-layer INT8 diagnosis")
    return figure_bytes(fig)


def render_plots(report: dict) -> dict[str, bytes]:
    """File name -> PNG bytes for every plot the report has data for."""
    plots = {}
    if report.get("fp32") and report.get("int8"):
        plots["stats.png"] = plot_stats(report["fp32"], report["int8"],
                                        f"{report.get('model', {}).get('name', '')}: FP32 vs INT8")
    sens = report.get("sensitivity") or {}
    if sens.get("ranking"):
        plots["sensitivity.png"] = plot_sensitivity(sens["ranking"], mode=sens.get("mode", "quantize-one"))
    layers = (report.get("diagnosis") or {}).get("layers")
    if layers:
        plots["diagnosis.png"] = plot_diagnosis(layers)
    curves = report.get("pr_curve") or {}
    if curves.get("fp32") and curves.get("int8"):
        from yoloq.report.eval import plot_pr_curves
        plots["pr_curve.png"] = plot_pr_curves(curves["fp32"], f"{report.get('model', {}).get('name', '')}: "
                                               "precision-recall", compare=curves["int8"])
    return plots


# --------------------------------------------------------------------------- one call


def write_report(report: dict, out_dir: str | os.PathLike, plots: bool = True,
                 stem: str = "report") -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and the plots into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    written = []
    pngs = render_plots(report) if plots else {}
    names = [f"{stem}.md", f"{stem}.json"] + list(pngs)
    report["files"] = list(dict.fromkeys(names + [f for f in report.get("files") or [] if f not in names]))
    for name, data in pngs.items():
        written.append(atomic_write_bytes(out_dir / name, data))
    written.append(atomic_write_text(out_dir / f"{stem}.json", to_json(report)))
    written.append(atomic_write_text(out_dir / f"{stem}.md", render_markdown(report, list(pngs))))
    return written


def load_report(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"report not found: {path}")
    return json.loads(path.read_text())


def format_summary(report: dict) -> str:
    """Two-line console summary."""
    fp32, int8, drop = report.get("fp32", {}), report.get("int8", {}), report.get("drop", {})
    se = ((((report.get("transforms") or {}).get("steps") or {}).get("se_float") or {}).get("details") or {})
    n_se = len(se.get("layers") or [])
    plan = (report.get("transforms") or {}).get("plan")
    return (f"{report.get('name')}: FP32 AP {pct(fp32.get('AP'))}  INT8 AP {pct(int8.get('AP'))}  "
            f"drop {drop_text(drop.get('AP'), report.get('drop_ci'))} points (AP50 {pct(fp32.get('AP50'))} -> {pct(int8.get('AP50'))}); "
            f"calib {report.get('calibration', {}).get('method')}, "
            f"{len(report.get('skipped_layers') or []) - n_se} layers in FP"
            + (f" + {n_se} SE convs" if n_se else "") + (f"; transforms: {plan}" if plan and plan != "none" else ""))
