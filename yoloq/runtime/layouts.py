"""Output layouts of detector ONNX files / engines: yoloq's own and upstream YOLOv6's, so a model
exported by upstream's ``deploy/ONNX/export_onnx.py`` is evaluated with yoloq's protocol and can
be compared with yoloq's export.

=============== ============================================================================
layout          outputs (letterboxed input pixels)
=============== ============================================================================
``yoloq``       one ``[B, N, 4+nc]``: x1, y1, x2, y2, nc class scores (sigmoid)
``xywh-obj``    one ``[B, N, 5+nc]``: cx, cy, w, h, objectness, nc class scores; upstream's plain
                export (``outputs``; objectness is 1 for the anchor-free heads of 2.0 and later,
                a real score for 0.1's anchor head); the score of a class is objectness x class
``xywh``        one ``[B, N, 4+nc]``: cx, cy, w, h, nc class scores (no objectness column)
``end2end-trt`` ``num_dets [B, 1]``, ``det_boxes [B, K, 4]`` (x1, y1, x2, y2), ``det_scores [B, K]``,
                ``det_classes [B, K]``: upstream's ``--end2end`` export with TensorRT's NMS plugin
                (EfficientNMS_TRT / BatchedNMSDynamic_TRT; they run in TensorRT, not onnxruntime)
``end2end-ort`` one ``[M, 7]``: batch index, x1, y1, x2, y2, class, score: upstream's ``--end2end
                --max-wh`` export with ONNX NonMaxSuppression (runs in onnxruntime)
=============== ============================================================================

``auto`` picks by output names and shapes: the four end-to-end names, a rank-2 ``[M, 7]`` output,
``5+nc`` columns (upstream) or ``4+nc`` (yoloq; ``xywh`` only when asked for, since the shape
alone cannot tell the two box codings apart). End-to-end outputs already went through the
model's own NMS (with its own thresholds, upstream's defaults conf 0.4, IoU 0.45, 100 boxes);
evaluation then only drops rows under its confidence threshold and keeps at most ``max_det``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from yoloq.errors import InputError
from yoloq.eval.loop import NmsOutput

LAYOUTS = ("auto", "yoloq", "xywh-obj", "xywh", "end2end-trt", "end2end-ort")
END2END_TRT_NAMES = ("num_dets", "det_boxes", "det_scores", "det_classes")


def choose_layout(requested: str, names: Sequence[str], ranks: Sequence[Optional[int]], where: str) -> str:
    """The layout of a model with outputs ``names`` (their ranks, None when unknown) for a requested
    layout (``auto`` or one of :data:`LAYOUTS`); errors name the file and what was found."""
    if requested not in LAYOUTS:
        raise InputError(f"unknown output layout '{requested}'; expected one of {LAYOUTS}")
    if set(END2END_TRT_NAMES) <= set(names):
        found = "end2end-trt"
    elif len(names) == 1 and ranks[0] == 2:
        found = "end2end-ort"
    elif ranks and ranks[0] == 3:
        found = "raw"                      # yoloq / xywh-obj / xywh: decided by the column count
    else:
        raise InputError(f"{where}: outputs {list(names)} (ranks {list(ranks)}) match no known detector layout; "
                         f"expected one of {LAYOUTS[1:]} (see yoloq.runtime.layouts)")
    if requested == "auto":
        return found
    if (requested in ("yoloq", "xywh-obj", "xywh")) != (found == "raw") or (found != "raw" and requested != found):
        raise InputError(f"{where}: --onnx-layout {requested} does not fit outputs {list(names)} "
                         f"(ranks {list(ranks)}); these look like '{found}'")
    return requested


def _xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    half = boxes[..., 2:4] / 2
    return torch.cat((boxes[..., :2] - half, boxes[..., :2] + half), -1)


def raw_layout(columns: int, nc: int) -> str:
    """Which raw layout ``columns`` per box mean for ``nc`` classes ("" when neither)."""
    return "yoloq" if columns == 4 + nc else "xywh-obj" if columns == 5 + nc else ""


def raw_to_yoloq(out, layout: str, nc: int, where: str):
    """A raw ``[B, N, C]`` output (array or tensor) -> yoloq's ``[B, N, 4+nc]`` (x1, y1, x2, y2,
    class scores); yoloq's own layout is returned as it is."""
    columns = out.shape[-1]
    if layout == "raw":
        layout = raw_layout(columns, nc)
    expected = 5 + nc if layout == "xywh-obj" else 4 + nc
    if not layout or columns != expected:
        raise InputError(f"{where}: output has {columns} columns per box; for {nc} classes expected {4 + nc} "
                         f"(yoloq: x1,y1,x2,y2 + scores, or xywh with --onnx-layout xywh) or {5 + nc} "
                         f"(upstream YOLOv6: cx,cy,w,h, objectness + scores)")
    if layout == "yoloq":
        return out
    out = torch.as_tensor(np.asarray(out)) if not isinstance(out, torch.Tensor) else out
    if layout == "xywh":
        return torch.cat((_xywh_to_xyxy(out[..., :4]), out[..., 4:]), -1)
    return torch.cat((_xywh_to_xyxy(out[..., :4]), out[..., 5:] * out[..., 4:5]), -1)


def end2end_trt(outputs: dict, batch: int) -> NmsOutput:
    """``num_dets / det_boxes / det_scores / det_classes`` -> :class:`NmsOutput` (the first
    ``num_dets[b]`` rows of image b; the rest is padding)."""
    counts = torch.as_tensor(np.asarray(outputs["num_dets"])).reshape(batch, -1)[:, 0].long()
    boxes = torch.as_tensor(np.asarray(outputs["det_boxes"])).float()
    scores = torch.as_tensor(np.asarray(outputs["det_scores"])).float()
    classes = torch.as_tensor(np.asarray(outputs["det_classes"])).float()
    k = boxes.shape[1]
    valid = torch.arange(k)[None, :] < counts.clamp(max=k)[:, None]                # [B, K]
    image = torch.arange(batch)[:, None].expand(batch, k)[valid]
    rows = torch.cat((boxes[valid], scores[valid][:, None], classes[valid][:, None]), 1)
    return NmsOutput(rows, image)


def end2end_ort(out, batch: int) -> NmsOutput:
    """``[M, 7]`` rows (batch index, x1, y1, x2, y2, class, score) -> :class:`NmsOutput`."""
    out = torch.as_tensor(np.asarray(out)).float().reshape(-1, 7)
    image = out[:, 0].long()
    if image.numel() and (image.min() < 0 or image.max() >= batch):
        raise InputError(f"end-to-end output names image {int(image.max())} in a batch of {batch}")
    return NmsOutput(torch.cat((out[:, 1:5], out[:, 6:7], out[:, 5:6]), 1), image)


def merge(parts: Sequence, sizes: Sequence[int]):
    """The outputs of consecutive sub-batches (``sizes[i]`` images in ``parts[i]``) as one batch's."""
    if not isinstance(parts[0], NmsOutput):
        return np.concatenate([np.asarray(p) for p in parts], 0)
    offsets = np.cumsum([0, *sizes[:-1]])
    return NmsOutput(torch.cat([p.rows for p in parts]),
                     torch.cat([p.image + int(offset) for p, offset in zip(parts, offsets)]))


def convert(layout: str, outputs: dict, batch: int, nc: int, where: str):
    """A model's named outputs (arrays or tensors) -> what ``yoloq.eval.evaluate`` consumes: a
    ``[B, N, 4+nc]`` array / tensor, or an :class:`NmsOutput` for end-to-end models."""
    if layout == "end2end-trt":
        return end2end_trt(outputs, batch)
    if len(outputs) != 1:
        raise InputError(f"{where}: expected one output for layout '{layout}', got {list(outputs)}")
    (only,) = outputs.values()
    if layout == "end2end-ort":
        return end2end_ort(only, batch)
    return raw_to_yoloq(only, layout, nc, where)
