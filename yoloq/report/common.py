"""Pieces every report shares: COCO stat formatting, Markdown tables, headless matplotlib.

Reports are plain JSON-able dicts; ``fp32`` / ``int8`` hold COCO stats as fractions (0..1,
pycocotools' scale) and drops are in mAP *points* (x100) so Markdown and JSON agree on units.
"""
from __future__ import annotations

import io
import math
from typing import Iterable, Sequence

MAIN_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# --------------------------------------------------------------------------- stats


def stat_drop(fp32: dict, int8: dict, names: Sequence[str] = MAIN_STATS) -> dict:
    """``fp32 - int8`` per stat, in mAP points (x100), for stats both sides have (>= 0)."""
    out = {}
    for k in names:
        a, b = fp32.get(k), int8.get(k)
        if a is not None and b is not None and a >= 0 and b >= 0:
            out[k] = (a - b) * 100.0
    return out


def drop_text(drop, ci=None) -> str:
    """An AP drop in points with its bootstrap interval when there is one: ``0.46 (95% CI 0.21–0.70)``
    (``ci``: the ``drop_ci`` record of a report, ``yoloq.eval.bootstrap.DropInterval.to_dict``)."""
    if not ci:
        return num(drop)
    return f"{num(drop)} ({ci['level'] * 100:.0f}% CI {ci['low']:.2f}–{ci['high']:.2f})"


def pct(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return "n/a" if v < 0 else f"{v * 100:.2f}"


def num(v, fmt: str = "{:.2f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return fmt.format(v) if isinstance(v, (int, float)) else str(v)


def md_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)



# --------------------------------------------------------------------------- figures


def figure_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)      # headless: never needs a display
    import matplotlib.pyplot as plt
    return plt
