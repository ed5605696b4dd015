"""PTQ / QAT reports: Markdown, JSON and PNG plots from one plain dict.

A report is a JSON-able dict (see ``yoloq.quant.ptq.PTQResult.to_dict``) with the keys

    name, model, config, data, calibration, fp32, int8, drop, skipped_layers, partial,
    sensitivity, diagnosis, timings, files, notes

``fp32`` / ``int8`` hold COCO stats as fractions (0..1, pycocotools' scale); ``drop`` is
``fp32 - int8`` per stat in mAP *points* (x100) so the Markdown and the JSON agree on units.
Every file is written atomically (temp file in the same folder + ``os.replace``).
"""
from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

MAIN_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# --------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj):
    if hasattr(obj, "tolist"):            # numpy / torch scalars and arrays
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"report: {type(obj).__name__} is not JSON-serialisable")


def _finite(obj):
    """JSON has no NaN / inf: write them as null (strict parsers refuse the bare tokens)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def to_json(report: dict) -> str:
    return json.dumps(_finite(json.loads(json.dumps(report, default=_json_default))), indent=2) + "\n"


# --------------------------------------------------------------------------- stats


def stat_drop(fp32: dict, int8: dict, names: Sequence[str] = MAIN_STATS) -> dict:
    """``fp32 - int8`` per stat, in mAP points (x100), for stats both sides have (>= 0)."""
    out = {}
    for k in names:
        a, b = fp32.get(k), int8.get(k)
        if a is not None and b is not None and a >= 0 and b >= 0:
            out[k] = (a - b) * 100.0
    return out


def _pct(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return "n/a" if v < 0 else f"{v * 100:.2f}"


def _num(v, fmt: str = "{:.2f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return fmt.format(v) if isinstance(v, (int, float)) else str(v)


def md_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


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
    rows = [(k, _pct(fp32.get(k)), _pct(int8.get(k)), _num(drop.get(k))) for k in MAIN_STATS]
    out += [md_table(("metric", "FP32", "INT8", "drop"), rows), ""]

    errors = calib.get("auto_errors") or {}
    if errors:
        out += ["## Calibration methods (auto)", "",
                f"Metric: {calib.get('auto_metric', 'detector output SQNR vs FP32')}; "
                f"chosen: **{calib.get('method')}**.", ""]
        rows = [(m, _num(e.get("sqnr_db")), _num(e.get("score_sqnr_db")), _num(e.get("box_sqnr_db")))
                for m, e in errors.items()]
        out += [md_table(("method", "SQNR dB", "score SQNR dB", "box SQNR dB"), rows), ""]

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


def _partial_section(report: dict) -> list[str]:
    skipped = report.get("skipped_layers") or []
    partial = report.get("partial") or {}
    out = ["## Partial quantization", ""]
    out.append(f"Layers kept in floating point ({len(skipped)}): "
               + (", ".join(f"`{s}`" for s in skipped) if skipped else "none") + ".")
    if partial.get("mode"):
        out.append(f"Chosen by: {partial['mode']}" + (f" ({partial['note']})" if partial.get("note") else "") + ".")
    trace = partial.get("search") or []
    if trace:
        out += ["", md_table(("k skipped", f"{partial.get('metric', 'drop')}"),
                             [(t["k"], _num(t["drop"])) for t in trace])]
    return out + [""]


def _sensitivity_section(sens: dict, top: int = 20) -> list[str]:
    rows = sens.get("ranking") or []
    if not rows:
        return []
    out = ["## Per-layer sensitivity", "",
           f"Metric: {sens.get('metric')}; mode: {sens.get('mode')}; {sens.get('images')} calibration images; "
           f"{_num(sens.get('seconds'), '{:.1f}')} s. Most sensitive first (top {min(top, len(rows))} of {len(rows)}).", ""]
    has_map = any("map_drop" in r for r in rows)
    header = ["rank", "layer", "output SQNR dB", "score SQNR", "box SQNR", "sensitivity"] + \
        (["mAP drop, layer in float"] if has_map else [])
    table = []
    for r in rows[:top]:
        row = [r["rank"], f"`{r['layer']}`", _num(r.get("sqnr_db")), _num(r.get("score_sqnr_db")),
               _num(r.get("box_sqnr_db")), _num(r.get("score"))]
        if has_map:
            row.append(_num(r.get("map_drop")))
        table.append(row)
    return out + [md_table(header, table), ""]


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
    table = [(f"`{r['layer']}`", _num(r.get("w_std"), "{:.3g}"), _num(r.get("w_absmax"), "{:.3g}"),
              _num(r.get("w_outlier_ratio"), "{:.2e}"), _num(r.get("w_channel_spread"), "{:.1f}"),
              _num(r.get("w_sqnr_db")), _num(r.get("w_sqnr_per_tensor_db")), _num(r.get("act_amax"), "{:.3g}"),
              _num(r.get("act_channel_spread"), "{:.1f}"), _num(r.get("act_sqnr_db")),
              ", ".join(r.get("flags") or []) or "-") for r in ordered[:top]]
    return out + [md_table(header, table), ""]


# --------------------------------------------------------------------------- plots


def _figure_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)      # headless: never needs a display
    import matplotlib.pyplot as plt
    return plt


def plot_stats(fp32: dict, int8: dict, title: str = "FP32 vs INT8") -> bytes:
    plt = _pyplot()
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
    return _figure_bytes(fig)


def plot_sensitivity(ranking: Sequence[dict], top: int = 30, mode: str = "quantize-one") -> bytes:
    plt = _pyplot()
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
    return _figure_bytes(fig)


def plot_diagnosis(layers: Sequence[dict]) -> bytes:
    plt = _pyplot()
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
    return _figure_bytes(fig)


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
    return (f"{report.get('name')}: FP32 AP {_pct(fp32.get('AP'))}  INT8 AP {_pct(int8.get('AP'))}  "
            f"drop {_num(drop.get('AP'))} points (AP50 {_pct(fp32.get('AP50'))} -> {_pct(int8.get('AP50'))}); "
            f"calib {report.get('calibration', {}).get('method')}, "
            f"{len(report.get('skipped_layers') or [])} layers in FP")
