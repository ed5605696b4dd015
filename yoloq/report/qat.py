"""The QAT report: per-epoch curves (CSV, PNG) and Markdown / JSON side by side with FP32 and PTQ."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional

from yoloq.io import atomic_write_bytes, atomic_write_text, to_json
from yoloq.report.common import drop_text, figure_bytes, md_table, num, pct, pyplot

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


CSV_COLUMNS = ("epoch", "loss", "cwd", "cls", "box", "det", "alpha_l2", "lr", "quantizer_lr", "AP", "AP50",
               "act_scale_ratio_mean", "weight_scale_ratio_mean", "train_seconds", "eval_seconds")


def curves_csv(history: list) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in CSV_COLUMNS})
    return buf.getvalue()


def plot_curves(history: list, fp32: dict, ptq: dict, step_losses: Optional[list] = None) -> bytes:
    """Loss per step (the loss curve), loss parts per epoch, val AP per epoch against FP32 and PTQ."""
    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(15, 4))
    if step_losses:
        ax0.plot(range(1, len(step_losses) + 1), step_losses, lw=0.8)
        ax0.set_yscale("log")
    ax0.set_xlabel("step")
    ax0.set_ylabel("training loss")
    for key in ("loss", "cwd", "cls", "box", "det"):
        if any(key in r for r in history):
            ax1.plot(epochs, [r.get(key) for r in history], "o-", label=key)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss parts (mean over the epoch)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    if any("AP" in r for r in history):
        ax2.plot(epochs, [r.get("AP", float("nan")) * 100 for r in history], "o-", label="QAT")
    for label, stats, style in (("FP32", fp32, "--"), ("PTQ", ptq, ":")):
        if "AP" in stats:
            ax2.axhline(stats["AP"] * 100, linestyle=style, color="gray" if label == "FP32" else "red", label=label)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("val AP (%)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return figure_bytes(fig)


def render_qat_markdown(report: dict) -> str:
    fp32, ptq, qat, last = report["fp32"], report["ptq"], report["qat"], report["qat_last"]
    qc = report["config"]["qat"]
    out = [f"# QAT report: {report['name']}", "",
           f"- model: `{report['model']['name']}`, input {report['model']['img_size']}",
           f"- from PTQ: `{report['from'].get('checkpoint') or 'FP32 weights ' + str(report['from'].get('weights'))}` "
           f"(calibration {report['from']['calib_method']})",
           f"- quantizer: **{qc['quantizer']}**" + (f" ({qc['lsq_mode']})" if qc["quantizer"] == "lsqplus" else "")
           + f", {report['train']['epochs_run']} epochs on {report['train']['images']} train images "
           f"({report['train']['labels']}{', augmented' if report['train'].get('augmented') else ''}), "
           f"batch {qc['batch_size']}, {qc['optimizer']} lr {qc['lr']:g} / quantizer lr {qc['quantizer_lr']:g}",
           f"- best epoch: {report['best_epoch']}", "",
           "## FP32 / PTQ / QAT (COCO bbox, %)", ""]
    rows = [(k, pct(fp32.get(k)), pct(ptq.get(k)), pct(qat.get(k)), pct(last.get(k)),
             num(report["drop"]["ptq"].get(k)), num(report["drop"]["qat"].get(k))) for k in STATS]
    out += [md_table(("metric", "FP32", "PTQ", "QAT best", "QAT last", "PTQ drop", "QAT drop"), rows), ""]
    cis = report.get("drop_ci") or {}
    if any(cis.values()):
        ci = next(c for c in cis.values() if c)
        out += ["AP drop vs FP32, paired bootstrap over the " f"{ci['images']} evaluated images ({ci['resamples']} "
                "resamples): " + "; ".join(f"{label} **{drop_text(c['drop'], c)}**" for label, c in
                                           (("PTQ", cis.get("ptq")), ("QAT best", cis.get("qat"))) if c), ""]
    out += ["## Epochs", ""]
    rows = [(r["epoch"], f"{r.get('loss', 0):.4f}", f"{r.get('cwd', 0):.4f}", f"{r.get('cls', 0):.4f}",
             f"{r.get('box', 0):.4f}", pct(r.get("AP")), f"{r.get('train_seconds', 0):.0f}") for r in report["history"]]
    out += [md_table(("epoch", "loss", "CWD", "cls KL", "box L1", "val AP", "train s"), rows), ""]
    out += ["## Time per stage", "", md_table(("stage", "seconds"), [(k, f"{v:.1f}") for k, v in
                                                                     report["timings"].items()]), ""]
    out += [f"- {n}" for n in report["notes"]] + ["", "![curves](curves.png)", ""]
    return "\n".join(out)


def write_qat_report(report: dict, history: list, out_dir: Path, plots: bool = True) -> None:
    atomic_write_text(out_dir / "curves.csv", curves_csv(history))
    if plots and history:
        atomic_write_bytes(out_dir / "curves.png", plot_curves(history, report["fp32"], report["ptq"],
                                                               report["train"].get("step_losses")))
    atomic_write_text(out_dir / "report.json", to_json(report))
    atomic_write_text(out_dir / "report.md", render_qat_markdown(report))
