"""COCO bbox evaluation of any predictor (PyTorch model, onnxruntime session, TensorRT engine).

Protocol (upstream YOLOv6): letterbox to the square input size (pad 114), RGB/255, multi-label
NMS (conf > 0.03, IoU 0.65, at most 300 detections), boxes mapped back to the original image,
class index -> COCO category id (80 -> 91), COCOeval (bbox) from pycocotools or faster-coco-eval.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tqdm import tqdm

from yoloq.errors import InputError
from yoloq.io import atomic_write_text
from yoloq.config import AnnKey, Backend, DataConfig, EvalConfig, choices
from yoloq.data.ground_truth import validate_ground_truth
from yoloq.data.coco import (DEFAULT_INTERPOLATION, CocoDetectionDataset, ImageMeta, make_loader,
                         read_annotation_images, read_coco_json)
from yoloq.eval.nms import non_max_suppression

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = choices(Backend)
ANN_KEYS = choices(AnnKey)

# The 80 COCO detection classes as their category ids (1..90 with gaps), in class-index order.
_UNUSED_COCO_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
COCO80_TO_91 = [i for i in range(1, 91) if i not in _UNUSED_COCO_IDS]


@dataclass
class EvalResult:
    stats: dict                     # the 12 COCO stats by name (-1 where COCOeval has no GT to score)
    detections: list                # COCO results format: image_id, category_id, bbox [x,y,w,h], score
    n_images: int                   # images evaluated (failed ones excluded)
    failed_files: list              # images that could not be read
    seconds: float                  # loading + inference + NMS (not COCOeval)
    images_per_s: float
    backend: str
    ann_file: str = ""
    img_size: int = 0
    interpolation: str = DEFAULT_INTERPOLATION
    eval_seconds: float = 0.0       # COCOeval time
    extra: dict = field(default_factory=dict)


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
    dets = dets.detach().cpu()
    if dets.numel() == 0:
        return []
    xyxy = scale_boxes(dets[:, :4].double(), meta)
    xywh = torch.cat((xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]), 1).tolist()
    scores = dets[:, 4].tolist()
    classes = dets[:, 5].long().tolist()
    return [{"image_id": meta.image_id, "category_id": cat_ids[c],
             "bbox": [round(v, 3) for v in box], "score": round(s, 5)}
            for box, s, c in zip(xywh, scores, classes)]


# --------------------------------------------------------------------------- COCOeval backends
def coco_stats(ann_file: str, detections: list, backend: str = "pycocotools",
               img_ids: Optional[Sequence[int]] = None) -> dict:
    """Run COCOeval (bbox) and return the 12 stats by name; restricted to ``img_ids`` if given."""
    if backend not in BACKENDS:
        raise InputError(f"eval.backend: unknown backend '{backend}'; expected one of {BACKENDS}")
    if not detections:
        warnings.warn(f"no detections to evaluate against {ann_file}: all COCO stats are 0", stacklevel=2)
        return {name: 0.0 for name in STAT_NAMES}
    # Both libraries print progress on stdout; keep the caller's output to our own table.
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "pycocotools":
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
            gt = COCO(str(ann_file))
            evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
        else:
            from faster_coco_eval import COCO, COCOeval_faster
            gt = COCO(str(ann_file))
            evaluator = COCOeval_faster(gt, gt.loadRes(detections), "bbox", print_function=print)
        if img_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in img_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats[:12])}


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
                gt: Optional[dict] = None, interpolation: str = DEFAULT_INTERPOLATION) -> CocoDetectionDataset:
    """The val images of ``ann_file`` (only the first ``max_images`` by id, if given), letterboxed as
    :func:`evaluate` sees them. ``gt``: the already-read annotation JSON, to avoid reading it twice."""
    files = None
    if max_images is not None:
        if max_images < 1:
            raise InputError(f"max_images must be >= 1, got {max_images}")
        files = [e["file_name"] for e in read_annotation_images(ann_file, gt)[:max_images]]
    return CocoDetectionDataset(data_cfg.val_images, ann_file, img_size, files=files, interpolation=interpolation)


def evaluate(predict: Callable, data_cfg: DataConfig, eval_cfg: EvalConfig, img_size: int,
             ann_key: Optional[str] = None, max_images: Optional[int] = None,
             progress: bool = True, interpolation: str = DEFAULT_INTERPOLATION) -> EvalResult:
    """COCO bbox evaluation of ``predict`` (``Tensor[B,3,S,S] -> Tensor|ndarray [B,N,4+nc]``).

    ``ann_key`` picks the ground truth from the data YAML (default ``eval_cfg.val_ann``);
    ``max_images`` evaluates only the first N images (by id) of that file. ``interpolation`` is
    the letterbox resampling ("pil" reproduces the reference numbers; see yoloq.data.coco).
    """
    ann_key = ann_key or eval_cfg.val_ann
    ann_file = resolve_ann_file(data_cfg, ann_key)
    gt = read_coco_json(ann_file)
    validate_ground_truth(gt, ann_file)
    cat_ids = category_ids(gt.get("categories", []), ann_file, data_cfg.nc)
    dataset = val_dataset(data_cfg, ann_file, img_size, max_images, gt, interpolation)
    loader = make_loader(dataset, eval_cfg.batch_size, eval_cfg.workers)

    detections, evaluated_ids = [], []
    start = time.perf_counter()
    for images, metas in tqdm(loader, total=len(loader), disable=not progress,
                              desc=f"eval {Path(ann_file).name}", unit="batch"):
        preds = predict(images)
        _check_prediction_shape(preds, len(metas), len(cat_ids))
        per_image = non_max_suppression(preds, eval_cfg.conf_thres, eval_cfg.iou_thres, eval_cfg.max_det)
        for dets, meta in zip(per_image, metas):
            detections.extend(to_coco_detections(dets, meta, cat_ids))
            evaluated_ids.append(meta.image_id)
    seconds = time.perf_counter() - start
    if not evaluated_ids:
        first = dataset.failed[0] if dataset.failed else "?"
        raise InputError(f"none of the {len(dataset)} images listed in {ann_file} could be read from "
                         f"{data_cfg.val_images} (first: {first}); check val_images in {data_cfg.path}")

    start = time.perf_counter()
    stats = coco_stats(ann_file, detections, eval_cfg.backend, evaluated_ids)
    return EvalResult(stats=stats, detections=detections, n_images=len(evaluated_ids),
                      failed_files=list(dataset.failed), seconds=seconds,
                      images_per_s=len(evaluated_ids) / max(seconds, 1e-9), backend=eval_cfg.backend,
                      ann_file=str(ann_file), img_size=int(img_size), interpolation=interpolation,
                      eval_seconds=time.perf_counter() - start)


def _check_prediction_shape(preds, batch: int, nc: int) -> None:
    shape = tuple(preds.shape) if hasattr(preds, "shape") else None
    if shape is None or len(shape) != 3 or shape[0] != batch or shape[2] != 4 + nc:
        raise InputError(f"predictor returned shape {shape}; expected [{batch}, N, {4 + nc}] "
                         f"(x1,y1,x2,y2 + {nc} class scores)")


def evaluate_model(model: torch.nn.Module, data_cfg: DataConfig, eval_cfg: EvalConfig, img_size: int,
                   **kwargs) -> EvalResult:
    """:func:`evaluate` for an nn.Module: eval mode, no gradients, inputs on the model's device."""
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    model.eval()

    def predict(images: torch.Tensor):
        return model(images.to(device))

    try:
        with torch.no_grad():
            return evaluate(predict, data_cfg, eval_cfg, img_size, **kwargs)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- output
def result_to_dict(result: EvalResult) -> dict:
    return asdict(result)


def save_result(result: EvalResult, path: str | os.PathLike) -> Path:
    """Write the result (stats + detections) as JSON atomically (``yoloq.io``: temp file + rename,
    the normal file mode)."""
    return atomic_write_text(path, json.dumps(result_to_dict(result)))


def format_stats_table(stats: dict) -> str:
    """The 12 COCO stats as a two-column Markdown table (values in %)."""
    lines = ["| metric | value |", "|---|---|"]
    for name in STAT_NAMES:
        value = stats.get(name, float("nan"))
        lines.append(f"| {name} | {value * 100:.2f} |" if value >= 0 else f"| {name} | n/a |")
    return "\n".join(lines)
