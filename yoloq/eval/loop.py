"""The prediction loop of an evaluation: batches -> predictor -> NMS -> COCO result rows, timed the
way upstream YOLOv6 reports it, over this process's shard of the images.

Throughput: letterboxing runs in the DataLoader's worker processes and images travel as uint8
(4x less than float), into pinned memory when the predictor runs on a GPU; the batch is copied with
``non_blocking`` and turned into RGB/255 floats on the device. NMS runs on the predictions' device
for the whole batch at once, and only the <= ``max_det`` rows per image ever reach the CPU, as one
float64 array per batch: no raw output is kept past its batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from yoloq.config import EvalConfig
from yoloq.errors import InputError
from yoloq.eval.detections import batch_rows
from yoloq.eval.nms import batched_detections


@dataclass
class NmsOutput:
    """What a predictor returns when its model already ran NMS (end-to-end exports): ``rows [K, 6]``
    (x1, y1, x2, y2 in letterboxed pixels, score, class index) and ``image [K]``, the index of each
    row's image in the batch."""
    rows: torch.Tensor
    image: torch.Tensor


@dataclass
class ShardOutput:
    """One process's part of an evaluation."""
    rows: np.ndarray                              # [K, 7] COCO result rows (yoloq.eval.detections)
    image_ids: list = field(default_factory=list)  # images evaluated, in order
    failed: list = field(default_factory=list)     # images that could not be read
    seconds: dict = field(default_factory=lambda: {"preprocess": 0.0, "inference": 0.0, "nms": 0.0})
    wall: float = 0.0


def shard_indices(n_images: int, batch_size: int, rank: int, world: int) -> range:
    """The images of process ``rank`` of ``world``: a contiguous run of whole batches, so that
    every image sits in the same batch (same numerics) as in a one-process evaluation and the
    shards, concatenated in rank order, are the one-process order."""
    n_batches = -(-n_images // batch_size)
    first, last = n_batches * rank // world, n_batches * (rank + 1) // world
    return range(first * batch_size, min(last * batch_size, n_images))


def check_prediction_shape(preds, batch: int, nc: int) -> None:
    shape = tuple(preds.shape) if hasattr(preds, "shape") else None
    if shape is None or len(shape) != 3 or shape[0] != batch or shape[2] != 4 + nc:
        raise InputError(f"predictor returned shape {shape}; expected [{batch}, N, {4 + nc}] "
                         f"(x1,y1,x2,y2 + {nc} class scores)")


def suppress(preds, batch: int, nc: int, eval_cfg: EvalConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """NMS rows and their image indices, from raw predictions or from a model's own NMS."""
    if isinstance(preds, NmsOutput):
        rows, image = preds.rows, preds.image.long()
        keep = rows[:, 4] > eval_cfg.conf_thres
        rows, image = rows[keep], image[keep]
        order = torch.sort(image, stable=True).indices
        rows, image = rows[order], image[order]
        counts = torch.bincount(image, minlength=batch)
        rank = torch.arange(image.numel(), device=image.device) - (torch.cumsum(counts, 0) - counts)[image]
        return rows[rank < eval_cfg.max_det], image[rank < eval_cfg.max_det]
    check_prediction_shape(preds, batch, nc)
    rows, image, _ = batched_detections(preds, eval_cfg.conf_thres, eval_cfg.iou_thres, eval_cfg.max_det)
    return rows, image


def to_device(images: torch.Tensor, device: Optional[torch.device]) -> torch.Tensor:
    if device is not None:
        images = images.to(device, non_blocking=True)
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


def _sync(device: Optional[torch.device], preds=None) -> None:
    on_cuda = (device is not None and device.type == "cuda") or (
        isinstance(preds, torch.Tensor) and preds.is_cuda)
    if on_cuda:
        torch.cuda.synchronize()


def predict_shard(predict: Callable, loader, cat_ids: Sequence[int], eval_cfg: EvalConfig,
                  device: Optional[torch.device] = None, progress: bool = True, desc: str = "eval") -> ShardOutput:
    """Run ``predict`` over ``loader`` (a ``yoloq.data.coco.SkippingLoader``). Pre-process time is
    waiting for the batch plus the copy to ``device``; inference the predictor; NMS the suppression
    and the mapping to COCO rows (as upstream splits them)."""
    out, parts = ShardOutput(rows=np.zeros((0, 7))), []
    start = tick = time.perf_counter()
    for images, metas in tqdm(loader, total=len(loader), disable=not progress, desc=desc, unit="batch"):
        images = to_device(images, device)
        _sync(device)
        loaded = time.perf_counter()
        preds = predict(images)
        _sync(device, preds)
        predicted = time.perf_counter()
        rows, image = suppress(preds, len(metas), len(cat_ids), eval_cfg)
        del preds                                    # only the NMS rows outlive the batch
        parts.append(batch_rows(rows, image, metas, cat_ids))
        out.image_ids.extend(m.image_id for m in metas)
        done = time.perf_counter()
        for key, seconds in (("preprocess", loaded - tick), ("inference", predicted - loaded), ("nms", done - predicted)):
            out.seconds[key] += seconds
        tick = done
    out.rows = np.concatenate(parts) if parts else out.rows
    out.failed = list(loader.dataset.failed)
    out.wall = time.perf_counter() - start
    return out


def timing_summary(shards: Sequence[ShardOutput], batch_size: int, device: str) -> dict:
    """Per-image milliseconds over all shards (sums of every process's time / all images), the wall
    time (the slowest process) and the process count."""
    n = max(1, sum(len(s.image_ids) for s in shards))
    total = {key: sum(s.seconds[key] for s in shards) for key in ("preprocess", "inference", "nms")}
    return {"preprocess_ms": 1000 * total["preprocess"] / n, "inference_ms": 1000 * total["inference"] / n,
            "nms_ms": 1000 * total["nms"] / n, "wall_s": max(s.wall for s in shards), "batch_size": batch_size,
            "device": device, "processes": len(shards)}
