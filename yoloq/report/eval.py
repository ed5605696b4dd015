"""Evaluation outputs people read: the per-class AP table (Markdown), the precision-recall plot and
the per-image timing line, for ``yoloq eval`` and the PTQ / QAT reports."""
from __future__ import annotations

from typing import Optional, Sequence

from yoloq.report.common import figure_bytes, md_table, pct, pyplot


def per_class_table(rows: Sequence[dict], compare: Optional[Sequence[dict]] = None,
                    labels: tuple[str, str] = ("FP32", "INT8")) -> str:
    """Markdown: one line per class (AP, AP50 in %, ground-truth boxes). With ``compare`` (the
    per-class rows of a second model, e.g. INT8 next to FP32) the two side by side and the AP drop
    in points, classes with the largest drop first."""
    if compare is None:
        return md_table(("class", "id", "AP", "AP50", "GT boxes"),
                        ((r["name"], r["category_id"], pct(r["AP"]), pct(r["AP50"]), r["gt"]) for r in rows))
    other = {r["category_id"]: r for r in compare}
    paired = [(r, other.get(r["category_id"])) for r in rows]

    def drop(pair) -> float:
        a, b = pair
        return (a["AP"] - b["AP"]) * 100 if b is not None and a["AP"] >= 0 and b["AP"] >= 0 else float("-inf")

    first, second = labels
    header = ("class", f"{first} AP", f"{second} AP", "drop", f"{first} AP50", f"{second} AP50", "GT boxes")
    body = [(a["name"], pct(a["AP"]), pct(b["AP"]) if b else "n/a",
             f"{drop((a, b)):.2f}" if drop((a, b)) != float("-inf") else "n/a",
             pct(a["AP50"]), pct(b["AP50"]) if b else "n/a", a["gt"])
            for a, b in sorted(paired, key=drop, reverse=True)]
    return md_table(header, body)


def plot_pr_curves(curves: dict, title: str = "precision-recall", compare: Optional[dict] = None,
                   labels: tuple[str, str] = ("FP32", "INT8")) -> bytes:
    """PNG: overall precision against recall at IoU 0.5 (AP50) and averaged over IoU 0.5:0.95 (AP),
    as COCOeval interpolates them; ``compare`` draws a second model's curves dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    runs = [(labels[0], curves, "-")] + ([(labels[1], compare, "--")] if compare else [])
    for label, c, style in runs:
        prefix = f"{label} " if compare else ""
        ax.plot(c["recall"], c["AP50"], style, color="tab:blue", label=f"{prefix}IoU 0.5 (AP50)")
        ax.plot(c["recall"], c["AP"], style, color="tab:orange", label=f"{prefix}IoU 0.5:0.95 (AP)")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (mean over classes)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    return figure_bytes(fig)


def timing_line(timing: dict) -> str:
    """Upstream's per-image speed line: pre-process, inference and NMS milliseconds."""
    return (f"speed per image (batch {timing.get('batch_size', '?')}, {timing.get('device', '?')}): "
            f"pre-process {timing['preprocess_ms']:.2f} ms, inference {timing['inference_ms']:.2f} ms, "
            f"NMS {timing['nms_ms']:.2f} ms")
