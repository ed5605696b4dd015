"""The files of a training run: the settings check of ``--resume``, ``best.pt``'s weights, and the
rule that a failed run leaves nothing new (a folder or logs it made before its first ``last.pt``
are removed again; with a ``last.pt`` there is a run to ``--resume``)."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Optional

from yoloq.io import flat_keys, open_run_folder
from yoloq.safe_load import load_plain
from yoloq.train.errors import TrainError


def read_best(path: Path) -> dict:
    """The weights in ``best.pt`` (a plain checkpoint; QAT runs before the one engine stored 'student')."""
    state = load_plain(path)
    for key in ("model_state_dict", "student"):
        if isinstance(state, dict) and key in state:
            return state[key]
    raise TrainError(f"{path}: not a best.pt of a training run (no weights in it)")


def check_same_run(saved: Optional[dict], now: Optional[dict], path: Path) -> None:
    """--resume continues the interrupted run exactly: refuse when a setting that shapes training
    differs (keys the current fingerprint no longer has do not shape it any more)."""
    if now is None:
        return
    old, new = flat_keys(saved or {}), flat_keys(now)
    diff = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in sorted(new) if old.get(k) != new[k]]
    if diff:
        raise TrainError(f"{path}: the saved run differs from this one: {'; '.join(diff[:8])}"
                         f"{' ...' if len(diff) > 8 else ''}. Resume with the original settings, or start a new "
                         "run with --name instead of --resume")


@contextlib.contextmanager
def logs_removed_on_failure(out_dir: Optional[Path]):
    """A run that ends with an error before it wrote any checkpoint leaves no logs behind (the
    tensorboard/ folder and results.csv it created); with a checkpoint there is a run to resume."""
    if out_dir is None:
        yield
        return
    new = [p for p in (out_dir / "tensorboard", out_dir / "results.csv") if not p.exists()]
    try:
        yield
    except BaseException:
        if not (out_dir / "last.pt").is_file():
            for path in new:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def new_run_folder(out_dir: Path, kind: str, rank: int = 0):
    """The folder of a ``kind`` run ("train", "qat"; rank 0 makes it, with any missing parents, and
    marks it as yoloq's: ``yoloq.io.open_run_folder``): when this call made it and the run fails
    before its first last.pt, what it made is removed again -- a failed run leaves nothing new. With a
    last.pt the folder stays: an interrupted run continues with --resume."""
    if rank != 0:
        yield out_dir
        return
    made = None                                   # the topmost folder this call creates
    for folder in (out_dir, *out_dir.parents):
        if folder.exists():
            break
        made = folder
    open_run_folder(out_dir, kind)
    try:
        yield out_dir
    except BaseException:
        if made is not None and not (out_dir / "last.pt").is_file():
            shutil.rmtree(made, ignore_errors=True)
        raise
