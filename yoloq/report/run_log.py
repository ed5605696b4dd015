"""Run logs for training (and QAT): per-epoch CSV, TensorBoard scalars, one place for both.

    log = RunLogger(out_dir, enabled=is_rank0, resume_step=step_of_checkpoint)
    log.scalars({"loss/cls": 0.4, "lr": 0.01}, step)      # TensorBoard, per step
    log.epoch(history)                                     # results.csv rewritten from the history
    log.close()

The CSV is rewritten in full from the epoch history after every epoch (temp file + rename), so a
resumed run's file has exactly one row per epoch. TensorBoard events after the checkpoint's step
are discarded on resume (``purge_step``). Without the ``tensorboard`` package the logger warns
once and keeps the CSV only.

:func:`library_log` keeps a library's own log lines (pytorch-quantization logs through absl, e.g.
one "Overwriting amax" warning per quantizer whenever a state dict is loaded) out of the terminal
and in a file of the run folder.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Optional

from yoloq.io import atomic_write_text


def history_csv(history: list[dict]) -> str:
    """Epoch rows -> CSV text; columns are the union of the rows' keys in first-seen order."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


class RunLogger:
    def __init__(self, out_dir: Optional[str | os.PathLike], enabled: bool = True, tensorboard: bool = True,
                 resume_step: Optional[int] = None, csv_name: str = "results.csv"):
        self.enabled = enabled and out_dir is not None
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.csv_name = csv_name
        self.writer = None
        if self.enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed: logging to CSV only (pip install tensorboard)",
                              stacklevel=2)
            else:
                self.writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=resume_step)

    def scalars(self, values: dict, step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                if value is not None:
                    self.writer.add_scalar(key, float(value), step)

    def epoch(self, history: list[dict]) -> None:
        if not self.enabled:
            return
        atomic_write_text(self.out_dir / self.csv_name, history_csv(history))
        if self.writer is not None and history:
            row = history[-1]
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"epoch/{key}", float(value), int(row["epoch"]))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@contextlib.contextmanager
def library_log(path: Optional[str | os.PathLike], logger: str = "absl", level: int = logging.WARNING):
    """While active, ``logger``'s records (absl: pytorch-quantization's) go to ``path`` (created at the
    first record; None: dropped) instead of the terminal."""
    log = logging.getLogger(logger)
    handler = logging.FileHandler(path, delay=True) if path is not None else logging.NullHandler()
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(filename)s:%(lineno)d] %(message)s"))
    propagate = log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate
        handler.close()
