"""torch.distributed helpers shared by evaluation and the recipes (torchrun: gloo on CPU, nccl on CUDA).

Every function works without a process group (one process: rank 0 of 1), so callers need no
branches. Objects travel with ``all_gather_object`` / ``broadcast_object_list`` (pickled), so they
must be small: compact arrays, not millions of dicts.
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch.distributed as dist


def active() -> bool:
    """A process group with more than one process is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main_process() -> bool:
    return rank() == 0


def all_gather(obj: Any) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a process group)."""
    if not active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (other ranks may pass anything, e.g. None)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main_then_broadcast(compute: Callable[[], Any]) -> Any:
    """Run ``compute()`` on rank 0 only and hand its result to every rank. An error on rank 0 is
    re-raised on every rank (as a RuntimeError naming it) so that no rank waits forever."""
    result, error = None, None
    if is_main_process():
        try:
            result = compute()
        except Exception as err:          # noqa: BLE001 - re-raised below, on every rank
            error = err
    shared = broadcast_from_main((result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if shared[1] is not None:
        raise RuntimeError(f"rank 0 failed: {shared[1]}")
    return shared[0]


@contextmanager
def output_dir_on_main(staged: Callable[[], ContextManager[Path]]) -> Iterator[Path]:
    """Rank 0 writes into ``staged()`` (a staging folder renamed into place); the other ranks write
    the same files into a temporary folder that is thrown away, so only one copy of a run lands."""
    if is_main_process():
        with staged() as folder:
            yield folder
    else:
        with tempfile.TemporaryDirectory(prefix=f"yoloq_rank{rank()}_") as folder:
            yield Path(folder)
