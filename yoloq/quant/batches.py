"""Calibration data as every quantization step reads it: a list of ``[B,3,H,W]`` image batches.

Steps accept a tensor batch or a loader item ``(images, meta...)``; :func:`image_batch` unwraps
one, :func:`image_batches` a whole iterable, and :func:`first_images` takes the first ``n``
images as batches (what a step that needs fewer images than calibration uses). Steps that record
what the layers see run the batches inside :func:`hooks_attached`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from yoloq.device import module_device
from yoloq.errors import InputError


class BatchError(InputError):
    """Calibration batches of the wrong kind; the message names what was expected."""


def image_batch(batch, what: str = "calibration") -> torch.Tensor:
    """A tensor batch, or the first element of a loader item ``(images, ...)``."""
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else ""
        raise BatchError(f"{what} batches must be [B,3,H,W] tensors (or (images, ...) tuples), "
                         f"got {type(batch).__name__}{shape}")
    return batch


def image_batches(batches: Iterable, what: str = "calibration") -> list[torch.Tensor]:
    """Every batch of ``batches`` unwrapped; an empty iterable is an error."""
    out = [image_batch(b, what) for b in batches]
    if not out:
        raise BatchError(f"{what} got no images (empty batches)")
    return out


def first_images(batches: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """The first ``n`` images of ``batches``, as batches (the last one cut short if needed)."""
    out, seen = [], 0
    for b in batches:
        if seen >= n:
            break
        out.append(b[: n - seen])
        seen += out[-1].shape[0]
    return out


def count_images(batches: Iterable[torch.Tensor]) -> int:
    return int(sum(b.shape[0] for b in batches))


@contextmanager
def hooks_attached(model: nn.Module, handles: list) -> Iterator[torch.device]:
    """``model`` in eval mode while the hooks ``handles`` (registered by the caller) record a forward
    pass; yields the model's device. On exit, also on an error, the hooks are removed and the
    model's training mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield module_device(model)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
