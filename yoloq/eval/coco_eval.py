"""COCO bbox evaluation of any predictor (PyTorch model, onnxruntime session, TensorRT engine).

Protocol (upstream YOLOv6): letterbox to the square input size (pad 114), RGB/255, multi-label
NMS (conf > 0.03, IoU 0.65, at most 300 detections), boxes mapped back to the original image,
class index -> COCO category id (80 -> 91), COCOeval (bbox) from pycocotools or faster-coco-eval.

Under torchrun (an initialized process group) :func:`evaluate` shards the images over the
processes (contiguous runs of whole batches), gathers the detections and runs COCOeval once on
rank 0: every rank gets the same result, equal to a one-process evaluation.
"""
from __future__ import annotations

import contextlib
import io
import json
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from yoloq import distributed as dist
from yoloq.errors import InputError
from yoloq.config import AnnKey, Backend, DataConfig, EvalConfig, choices
from yoloq.data.ground_truth import validate_ground_truth
from yoloq.data.coco import (COCO80_TO_91, DEFAULT_INTERPOLATION, CocoDetectionDataset, ImageMeta, make_loader,
                             read_annotation_images, read_coco_json)      # COCO80_TO_91: also yoloq.eval's
from yoloq.device import module_device
from yoloq.eval.detections import CocoDetections, batch_rows
from yoloq.eval.loop import predict_shard, shard_indices, timing_summary
from yoloq.eval.per_class import ground_truth_counts, per_class_ap, pr_curves
from yoloq.io import atomic_write_text

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = choices(Backend)
ANN_KEYS = choices(AnnKey)


@dataclass
class EvalResult:
    stats: dict                     # the 12 COCO stats by name (-1 where COCOeval has no GT to score)
    detections: CocoDetections      # COCO results (list-like: dicts with image_id, category_id, bbox, score)
    n_images: int                   # images evaluated (failed ones excluded)
    failed_files: list              # images that could not be read
    seconds: float                  # loading + inference + NMS (not COCOeval); the slowest process
    images_per_s: float
    backend: str
    ann_file: str = ""
    img_size: int = 0
    interpolation: str = DEFAULT_INTERPOLATION
    eval_seconds: float = 0.0       # COCOeval time
    per_class: list = field(default_factory=list)   # AP / AP50 / GT boxes per category (yoloq.eval.per_class)
    pr_curve: dict = field(default_factory=dict)    # overall precision at 101 recall points (AP50, AP)
    timing: dict = field(default_factory=dict)      # per-image ms: preprocess / inference / nms; processes
    extra: dict = field(default_factory=dict)
    image_ids: list = field(default_factory=list)   # the images evaluated (what a paired bootstrap resamples)
    matches: Optional[object] = field(default=None, repr=False, compare=False)   # yoloq.eval.bootstrap.MatchTable
    #                                 of the COCOeval match (pycocotools backend); not written to JSON


@dataclass
class CocoScores:
    """What one COCOeval run gives: the 12 stats, AP per class, the overall PR curves."""
    stats: dict
    per_class: list = field(default_factory=list)
    pr_curve: dict = field(default_factory=dict)
    matches: Optional[object] = None        # yoloq.eval.bootstrap.MatchTable (pycocotools backend)


# --------------------------------------------------------------------------- categories & boxes
def category_ids(categories: Sequence[dict], where: str = "annotation file", nc: int = 80) -> list[int]:
    """Class index -> category id: the file's categories sorted by id (must be ``nc``: 80 for COCO)."""
    ids = sorted(int(c["id"]) for c in categories)
    if len(ids) != nc:
        raise InputError(f"{where}: expected {nc} categories{' for COCO detection' if nc == 80 else ''}, "
                         f"found {len(ids)}")
    return ids


def scale_boxes(boxes: torch.Tensor, meta: ImageMeta) -> torch.Tensor:
    """Letterboxed x1,y1,x2,y2 -> original image pixels (undo padding and ratio, clip to image)."""
    pad = boxes.new_tensor([meta.pad[0], meta.pad[1], meta.pad[0], meta.pad[1]])
    out = (boxes - pad) / meta.ratio
    out[:, 0::2] = out[:, 0::2].clamp(0, meta.orig_w)
    out[:, 1::2] = out[:, 1::2].clamp(0, meta.orig_h)
    return out


def to_coco_detections(dets: torch.Tensor, meta: ImageMeta, cat_ids: Sequence[int]) -> list[dict]:
    """NMS rows (x1,y1,x2,y2,score,cls) of one image -> COCO result dicts."""
    index = torch.zeros(dets.shape[0], dtype=torch.long)
    return CocoDetections(batch_rows(dets, index, [meta], cat_ids)).to_list()


# --------------------------------------------------------------------------- COCOeval backends
def _evaluator(ann_file: str, detections: list, backend: str):
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        gt = COCO(str(ann_file))
        return gt, COCOeval(gt, gt.loadRes(detections), "bbox")
    from faster_coco_eval import COCO, COCOeval_faster
    gt = COCO(str(ann_file))
    return gt, COCOeval_faster(gt, gt.loadRes(detections), "bbox", print_function=print)


def coco_evaluation(ann_file: str, detections, backend: str = "pycocotools",
                    img_ids: Optional[Sequence[int]] = None) -> CocoScores:
    """Run COCOeval (bbox) on ``detections`` (a list of COCO result dicts or :class:`CocoDetections`),
    restricted to ``img_ids`` if given: the 12 stats by name, AP per class and the PR curves."""
    if backend not in BACKENDS:
        raise InputError(f"eval.backend: unknown backend '{backend}'; expected one of {BACKENDS}")
    if not len(detections):
        warnings.warn(f"no detections to evaluate against {ann_file}: all COCO stats are 0", stacklevel=2)
        return CocoScores({name: 0.0 for name in STAT_NAMES})
    results = detections.to_list() if isinstance(detections, CocoDetections) else detections
    # Both libraries print progress on stdout; keep the caller's output to our own table.
    with contextlib.redirect_stdout(io.StringIO()):
        gt, evaluator = _evaluator(ann_file, results, backend)
        if img_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in img_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    counts = ground_truth_counts(gt.dataset, evaluator.params.imgIds)
    matches = None
    if backend == "pycocotools":            # kept for a paired bootstrap of a drop (no second matching)
        from yoloq.eval.bootstrap import table_from_evaluator
        matches = table_from_evaluator(evaluator)
    return CocoScores(stats={name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats[:12])},
                      per_class=per_class_ap(evaluator, gt.dataset.get("categories", []), counts),
                      pr_curve=pr_curves(evaluator), matches=matches)


def coco_stats(ann_file: str, detections, backend: str = "pycocotools",
               img_ids: Optional[Sequence[int]] = None) -> dict:
    """The 12 COCO stats by name (see :func:`coco_evaluation`)."""
    return coco_evaluation(ann_file, detections, backend, img_ids).stats


# --------------------------------------------------------------------------- evaluation
def resolve_ann_file(data_cfg: DataConfig, ann_key: str) -> str:
    if ann_key not in ANN_KEYS:
        raise InputError(f"eval.val_ann: unknown annotation key '{ann_key}'; expected one of {ANN_KEYS}")
    ann_file = getattr(data_cfg, ann_key)
    if not ann_file:
        raise InputError(f"{data_cfg.path}: '{ann_key}' is not set")
    if not Path(ann_file).is_file():
        raise FileNotFoundError(f"{data_cfg.path}: '{ann_key}' file not found: {ann_file}")
    return ann_file


def val_dataset(data_cfg: DataConfig, ann_file: str, img_size: int, max_images: Optional[int] = None,
                gt: Optional[dict] = None, interpolation: str = DEFAULT_INTERPOLATION,
                uint8: bool = False) -> CocoDetectionDataset:
    """The val images of ``ann_file`` (only the first ``max_images`` by id, if given), letterboxed as
    :func:`evaluate` sees them. ``gt``: the already-read annotation JSON, to avoid reading it twice."""
    files = None
    if max_images is not None:
        if max_images < 1:
            raise InputError(f"max_images must be >= 1, got {max_images}")
        files = [e["file_name"] for e in read_annotation_images(ann_file, gt)[:max_images]]
    return CocoDetectionDataset(data_cfg.val_images, ann_file, img_size, files=files, interpolation=interpolation,
                                uint8=uint8)


def evaluate(predict: Callable, data_cfg: DataConfig, eval_cfg: EvalConfig, img_size: int,
             ann_key: Optional[str] = None, max_images: Optional[int] = None,
             progress: bool = True, interpolation: str = DEFAULT_INTERPOLATION,
             device: Optional[torch.device] = None, shard: Optional[bool] = None) -> EvalResult:
    """COCO bbox evaluation of ``predict`` (``Tensor[B,3,S,S] -> Tensor|ndarray [B,N,4+nc]``, or a
    :class:`yoloq.eval.loop.NmsOutput` for models with their own NMS).

    ``ann_key`` picks the ground truth from the data YAML (default ``eval_cfg.val_ann``);
    ``max_images`` evaluates only the first N images (by id) of that file. ``interpolation`` is
    the letterbox resampling ("pil" reproduces the reference numbers; see yoloq.data.coco).
    ``device``: where ``predict`` wants its input (batches are copied there non-blocking from pinned
    memory; None: left on the CPU). ``shard``: split the images over the torch.distributed
    processes (None: when a process group is initialized; every rank must then call this).
    """
    ann_key = ann_key or eval_cfg.val_ann
    ann_file = resolve_ann_file(data_cfg, ann_key)
    gt = read_coco_json(ann_file)
    validate_ground_truth(gt, ann_file)
    cat_ids = category_ids(gt.get("categories", []), ann_file, data_cfg.nc)
    dataset = val_dataset(data_cfg, ann_file, img_size, max_images, gt, interpolation, uint8=True)
    sharded = dist.active() if shard is None else bool(shard) and dist.active()
    rank, world = (dist.rank(), dist.world_size()) if sharded else (0, 1)
    loader = make_loader(dataset, eval_cfg.batch_size, eval_cfg.workers,
                         indices=shard_indices(len(dataset), eval_cfg.batch_size, rank, world) if sharded else None,
                         pin_memory=device is not None and torch.device(device).type == "cuda")
    desc = f"eval {Path(ann_file).name}" + (f" [rank {rank}/{world}]" if sharded else "")
    mine = predict_shard(predict, loader, cat_ids, eval_cfg, None if device is None else torch.device(device),
                         progress and rank == 0, desc)
    shards = dist.all_gather(mine) if sharded else [mine]
    detections = CocoDetections.concat([s.rows for s in shards])
    evaluated_ids = [i for s in shards for i in s.image_ids]
    failed = [f for s in shards for f in s.failed]
    if not evaluated_ids:
        first = failed[0] if failed else "?"
        raise InputError(f"none of the {len(dataset)} images listed in {ann_file} could be read from "
                         f"{data_cfg.val_images} (first: {first}); check val_images in {data_cfg.path}")
    timing = timing_summary(shards, eval_cfg.batch_size, str(device or "cpu"))
    start = time.perf_counter()
    compute = lambda: coco_evaluation(ann_file, detections, eval_cfg.backend, evaluated_ids)   # noqa: E731
    scores = dist.on_main_then_broadcast(compute) if sharded else compute()
    return EvalResult(stats=scores.stats, detections=detections, n_images=len(evaluated_ids), failed_files=failed,
                      seconds=timing["wall_s"], images_per_s=len(evaluated_ids) / max(timing["wall_s"], 1e-9),
                      backend=eval_cfg.backend, ann_file=str(ann_file), img_size=int(img_size),
                      interpolation=interpolation, eval_seconds=time.perf_counter() - start,
                      per_class=scores.per_class, pr_curve=scores.pr_curve, timing=timing,
                      image_ids=sorted(int(i) for i in evaluated_ids), matches=scores.matches)


@contextlib.contextmanager
def full_fp32(device: torch.device):
    """On a GPU, convolutions and matmuls in true FP32: PyTorch lets cuDNN use TF32 (10-bit
    mantissa) by default on Ampere and later, which is not the FP32 model. Restored afterwards."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def evaluate_model(model: torch.nn.Module, data_cfg: DataConfig, eval_cfg: EvalConfig, img_size: int,
                   **kwargs) -> EvalResult:
    """:func:`evaluate` for an nn.Module, on whatever device the model is on
    (``yoloq.device.module_device``): eval mode, no gradients, FP32 without TF32 on a GPU; the
    batches are moved there."""
    was_training = model.training
    model.eval()
    kwargs.setdefault("device", module_device(model))
    try:
        with torch.no_grad(), full_fp32(kwargs["device"]):
            return evaluate(model, data_cfg, eval_cfg, img_size, **kwargs)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- output
def result_to_dict(result: EvalResult) -> dict:
    """The result as JSON-able data (detections as the COCO results list)."""
    out = {f.name: getattr(result, f.name) for f in fields(result) if f.name != "matches"}
    out["detections"] = result.detections.to_list()
    return out


def save_result(result: EvalResult, path) -> Path:
    """Write the result (stats + detections) as JSON atomically (temp file + rename)."""
    return atomic_write_text(path, json.dumps(result_to_dict(result)))


def save_coco_json(result: EvalResult, path) -> Path:
    """The detections as a COCO results file (what the COCO evaluation server and
    ``COCO.loadRes`` take), written atomically."""
    return atomic_write_text(path, json.dumps(result.detections.to_list()))


def format_stats_table(stats: dict) -> str:
    """The 12 COCO stats as a two-column Markdown table (values in %)."""
    lines = ["| metric | value |", "|---|---|"]
    for name in STAT_NAMES:
        value = stats.get(name, float("nan"))
        lines.append(f"| {name} | {value * 100:.2f} |" if value >= 0 else f"| {name} | n/a |")
    return "\n".join(lines)
