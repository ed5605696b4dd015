"""The report of ``yoloq bench-backbones`` (``yoloq.bench.backbones``) as Markdown: the per-backbone
table, every (pipeline, seed) row, and each backbone's drop against RepVGG's."""
from __future__ import annotations

from yoloq.report.common import md_table

NAMES = {"repvgg": "RepVGG", "qarepvgg": "QARepVGG (V2)", "repopt": "RepOpt-VGG"}


def _ap(stats: dict) -> str:
    return f"{stats['AP'] * 100:.2f}"


def _pipeline_label(summary: dict, pipeline: str) -> str:
    return f"plain {summary['plain_calibration']}" if pipeline == "plain" else "default"


def _spread(rows: list) -> str:
    drops = [r["drop"]["drop"] for r in rows]
    return f"{min(drops):.2f} to {max(drops):.2f} (mean {sum(drops) / len(drops):.2f})"


def _sqnr(rows: list) -> str:
    values = [r["output_error"]["sqnr_db"] for r in rows]
    text = f"{sum(values) / len(values):.1f}"
    return text + (f" ({min(values):.1f} to {max(values):.1f})" if len(values) > 1 else "")


def main_table(summary: dict) -> str:
    """backbone | FP32 AP | per pipeline: INT8 AP, drop (95% CI) on the first seed [, drop over the seeds]."""
    pipelines, seeds = list(summary["pipelines"]), summary["seeds"]
    header = ["backbone", "FP32 AP"]
    for p in pipelines:
        label = _pipeline_label(summary, p)
        header += [f"INT8 AP ({label})", f"drop ({label})"]
        if len(seeds) > 1:
            header.append(f"drop over {len(seeds)} calibration seeds ({label})")
        header.append(f"output SQNR dB ({label})")
    table = []
    for b in summary["backbones"]:
        row = [NAMES.get(b["backbone"], b["backbone"]), _ap(b["fp32"])]
        for p in pipelines:
            rows = [r for r in b["rows"] if r["pipeline"] == p]
            first = next(r for r in rows if r["seed"] == seeds[0])
            row += [_ap(first["int8"]), first["drop_text"]]
            if len(seeds) > 1:
                row.append(_spread(rows))
            row.append(_sqnr(rows))
        table.append(row)
    return md_table(header, table)


def seed_table(summary: dict) -> str:
    table = []
    for b in summary["backbones"]:
        for r in b["rows"]:
            table.append([NAMES.get(b["backbone"], b["backbone"]), _pipeline_label(summary, r["pipeline"]), r["seed"],
                          r["calib_method"], r["transforms"], _ap(r["int8"]), r["drop_text"],
                          f"{r['output_error']['sqnr_db']:.1f}"])
    return md_table(["backbone", "pipeline", "seed", "calibration", "transforms", "INT8 AP", "drop (95% CI)",
                     "output SQNR dB"], table)


def versus_table(summary: dict) -> str:
    rows = summary["versus_reference"]
    table = [[NAMES.get(r["backbone"], r["backbone"]), _pipeline_label(summary, r["pipeline"]),
              f"{r['difference']:+.2f} ({r['level'] * 100:.0f}% CI {r['low']:+.2f} to {r['high']:+.2f})"]
             for r in rows]
    seeds = len(summary["seeds"])
    what = f"mean of {seeds} calibration seeds" if seeds > 1 else f"seed {summary['seeds'][0]}"
    return md_table(["backbone", "pipeline", f"drop − {NAMES['repvgg']}'s drop ({what})"], table)


def _setup_text(summary: dict) -> list[str]:
    """What was trained, evaluated and calibrated on, in words."""
    recipe, ev = summary["recipe"], summary["eval"]
    seeds = ", ".join(str(s) for s in summary["seeds"])
    on_train = ev["split"] == "train"
    trained = (f"; trained by this call: {', '.join(summary['trained_now'])}" if summary["trained_now"] else "")
    evaluated = (f"on those {ev['images']} training images" if on_train else f"on {ev['images']} val images")
    return [
        f"Each model trained from scratch with one recipe: {recipe['epochs']} epochs, batch {recipe['batch_size']}, "
        f"the first {recipe['train_images']} labelled train images at {recipe['img_size']} px, evaluated on the "
        f"{recipe['eval_split']} split (docs/training.md overfit setting when that is 150 / 16 / 256 / train); "
        f"runs in `{summary['runs']}`{trained}.",
        f"FP32 and INT8 are evaluated {evaluated} (`{ev['ann_file']}`) at {ev['img_size']} px; calibration: "
        f"{summary['calib_images']} other train images (none of them an evaluation image), calibration seeds "
        f"{seeds}. AP in %, drops in AP points with the paired-bootstrap interval over the evaluation images "
        f"({summary['resamples']} resamples); the main table shows seed {summary['seeds'][0]}. Output SQNR: the "
        f"INT8 detector's raw outputs against FP32's on the first {ev['sqnr_images']} evaluation images (mean of "
        "class-score SQNR and score-weighted box SQNR, `yoloq.quant.metrics.output_error`; higher is better; mean "
        "over the seeds, range in brackets): a continuous measure of the quantization error, far less noisy than "
        "AP on a few images."]


def render_markdown(summary: dict) -> str:
    lines = [
        f"# RepVGG-family backbones under PTQ ({summary['model']})", "", *_setup_text(summary),
        "Pipelines: " + "; ".join(f"{_pipeline_label(summary, p)} = " + ", ".join(f"{k}={v}" for k, v in o.items())
                                  for p, o in summary["pipelines"].items()) + ".", "",
        main_table(summary), ""]
    notes = [f"{b['backbone']}: {d}" for b in summary["backbones"] for d in b["run"]["differs"]]
    if notes:
        lines += ["Runs whose run.json differs from the recipe: " + "; ".join(notes) + ".", ""]
    if summary["versus_reference"]:
        lines += ["Drop against RepVGG's, each drop averaged over the calibration seeds, paired on the same "
                  "resampled images (the interval is over images only; negative: loses less than RepVGG):", "",
                  versus_table(summary), ""]
    lines += ["Every run:", "", seed_table(summary), ""]
    return "\n".join(lines)
