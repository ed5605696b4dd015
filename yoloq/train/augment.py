"""Training augmentation with boxes: mosaic, mixup, HSV, random affine, horizontal flip, letterbox.

A :class:`Sample` is a BGR uint8 image with its boxes (``[n, 4]`` x1, y1, x2, y2 pixels) and class
indices. Every geometric step moves the boxes with the pixels: the box of an object after a
transform is the axis-aligned hull of its transformed corners, clipped to the image, and boxes
that lose most of their area (or become slivers) are dropped with their classes.

:class:`Augmenter` chains the steps as YOLOv6 does: with probability ``mosaic`` four images on a
2S x 2S canvas then a random affine that crops it to S x S (and with probability ``mixup`` a blend
with a second mosaic), else a letterbox to S then the same random affine; then HSV jitter and a
horizontal flip. All randomness comes from the ``numpy.random.Generator`` passed in, so one
generator state gives one result (:class:`yoloq.train.dataset.AugmentedDataset` seeds it from
(seed, epoch, index), so the result does not depend on workers or sampling order).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from yoloq.config import AugmentConfig, ConfigError
from yoloq.data.coco import PAD_VALUE, letterbox

MIN_BOX_SIDE = 2.0          # pixels: thinner boxes after a transform are dropped
MIN_AREA_KEPT = 0.1         # fraction of the (scaled) area a box must keep
MAX_ASPECT = 20.0


@dataclass
class Sample:
    image: np.ndarray        # H x W x 3 uint8, BGR
    boxes: np.ndarray        # [n, 4] float32 xyxy pixels
    classes: np.ndarray      # [n] int64

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)


# --------------------------------------------------------------------------- single steps


def resize_longest(sample: Sample, size: int) -> Sample:
    """Scale so the longer side is ``size`` (aspect kept), boxes scaled with it."""
    h, w = sample.image.shape[:2]
    r = size / max(h, w)
    if r == 1:
        return sample
    new = (max(1, round(w * r)), max(1, round(h * r)))
    image = cv2.resize(sample.image, new, interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)
    sx, sy = new[0] / w, new[1] / h
    return Sample(image, sample.boxes * np.array([sx, sy, sx, sy], np.float32), sample.classes)


def letterbox_sample(sample: Sample, size: int) -> Sample:
    """Evaluation-style letterbox (aspect kept, pad 114, centred) with the boxes mapped along."""
    image, ratio, (pad_w, pad_h) = letterbox(sample.image, size, interpolation="linear")
    boxes = sample.boxes * ratio + np.array([pad_w, pad_h, pad_w, pad_h], np.float32)
    return Sample(image, boxes, sample.classes)


def flip_horizontal(sample: Sample) -> Sample:
    w = sample.image.shape[1]
    boxes = sample.boxes.copy()
    boxes[:, [0, 2]] = w - sample.boxes[:, [2, 0]]
    return Sample(np.ascontiguousarray(sample.image[:, ::-1]), boxes, sample.classes)


def hsv_jitter(image: np.ndarray, rng: np.random.Generator, h_gain: float, s_gain: float,
               v_gain: float) -> np.ndarray:
    """Random multiplicative gains on hue (wrapping, OpenCV's 0..179), saturation and value."""
    gains = rng.uniform(-1, 1, 3) * np.array([h_gain, s_gain, v_gain]) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(image, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float64)
    lut_h = ((x * gains[0]) % 180).astype(np.uint8)
    lut_s = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    """Box of the visible part of each transformed box (``matrix`` 2x3 or 3x3).

    Without rotation or shear a box stays a box: its moved corners, clipped to the image. With
    them it becomes a parallelogram; clipping its corner hull would keep corners that left the
    image, so the parallelogram itself is intersected with the image first (OpenCV), then boxed.
    """
    if len(boxes) == 0:
        return boxes.reshape(0, 4)
    corners = boxes[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 2)
    moved = (corners @ matrix[:2, :2].T + matrix[:2, 2]).reshape(-1, 4, 2)
    out = np.concatenate((moved.min(1), moved.max(1)), 1)
    if matrix[0, 1] != 0 or matrix[1, 0] != 0:
        frame = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
        for i, quad in enumerate(moved.astype(np.float32)):
            area, visible = cv2.intersectConvexConvex(quad, frame)
            if area > 0 and visible is not None:
                pts = visible.reshape(-1, 2)
                out[i] = [*pts.min(0), *pts.max(0)]
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out.astype(np.float32)


def keep_boxes(before: np.ndarray, after: np.ndarray, area_scale: float = 1.0) -> np.ndarray:
    """Boolean mask of boxes worth keeping after a transform (not slivers, most area left)."""
    w0, h0 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w1, h1 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    aspect = np.maximum(w1 / (h1 + 1e-9), h1 / (w1 + 1e-9))
    kept_area = (w1 * h1) / (w0 * h0 * area_scale + 1e-9)
    return (w1 > MIN_BOX_SIDE) & (h1 > MIN_BOX_SIDE) & (kept_area > MIN_AREA_KEPT) & (aspect < MAX_ASPECT)


def affine_matrix(rng: np.random.Generator, in_wh: tuple[int, int], out_size: int, degrees: float,
                  translate: float, scale: float, shear: float) -> tuple[np.ndarray, float]:
    """3x3 matrix: centre the input at the origin, rotate + scale, shear, move to a random spot
    near the output centre. Returns (matrix, scale factor)."""
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -in_wh[0] / 2, -in_wh[1] / 2
    angle = rng.uniform(-degrees, degrees)
    s = rng.uniform(1 - scale, 1 + scale)
    rotate = np.eye(3)
    rotate[:2] = cv2.getRotationMatrix2D((0, 0), angle, s)
    skew = np.eye(3)
    skew[0, 1] = math.tan(math.radians(rng.uniform(-shear, shear)))
    skew[1, 0] = math.tan(math.radians(rng.uniform(-shear, shear)))
    move = np.eye(3)
    move[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_size
    move[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_size
    return move @ skew @ rotate @ centre, s


def random_affine(sample: Sample, rng: np.random.Generator, out_size: int, degrees: float = 0.0,
                  translate: float = 0.1, scale: float = 0.5, shear: float = 0.0) -> Sample:
    """Random rotation / scale / shear / translation into an ``out_size`` square (pad 114)."""
    h, w = sample.image.shape[:2]
    matrix, s = affine_matrix(rng, (w, h), out_size, degrees, translate, scale, shear)
    image = cv2.warpAffine(sample.image, matrix[:2], (out_size, out_size), flags=cv2.INTER_LINEAR,
                           borderValue=(PAD_VALUE, PAD_VALUE, PAD_VALUE))
    boxes = transform_boxes(sample.boxes, matrix, out_size, out_size)
    keep = keep_boxes(sample.boxes, boxes, s * s) if len(boxes) else np.zeros(0, bool)
    return Sample(image, boxes[keep], sample.classes[keep])


def mosaic(samples: list[Sample], rng: np.random.Generator, size: int) -> Sample:
    """Four samples (each scaled to longer side ``size``) around a random centre of a 2S x 2S
    canvas: top-left, top-right, bottom-left, bottom-right. Boxes are clipped to the visible part."""
    if len(samples) != 4:
        raise ValueError(f"mosaic needs 4 samples, got {len(samples)}")
    s2 = 2 * size
    xc, yc = (int(v) for v in rng.uniform(size / 2, 3 * size / 2, 2))
    canvas = np.full((s2, s2, 3), PAD_VALUE, np.uint8)
    boxes, classes = [], []
    for k, sample in enumerate(samples):
        sample = resize_longest(sample, size)
        h, w = sample.image.shape[:2]
        x1 = max(xc - w, 0) if k in (0, 2) else xc
        y1 = max(yc - h, 0) if k in (0, 1) else yc
        x2 = xc if k in (0, 2) else min(xc + w, s2)
        y2 = yc if k in (0, 1) else min(yc + h, s2)
        sx = w - (x2 - x1) if k in (0, 2) else 0          # source offset: left/top tiles show the
        sy = h - (y2 - y1) if k in (0, 1) else 0          # image's bottom-right part
        canvas[y1:y2, x1:x2] = sample.image[sy:sy + (y2 - y1), sx:sx + (x2 - x1)]
        b = sample.boxes + np.array([x1 - sx, y1 - sy] * 2, np.float32)
        b[:, [0, 2]] = b[:, [0, 2]].clip(x1, x2)
        b[:, [1, 3]] = b[:, [1, 3]].clip(y1, y2)
        visible = (b[:, 2] - b[:, 0] > 0) & (b[:, 3] - b[:, 1] > 0)
        boxes.append(b[visible])
        classes.append(sample.classes[visible])
    return Sample(canvas, np.concatenate(boxes), np.concatenate(classes))


def mixup(a: Sample, b: Sample, rng: np.random.Generator) -> Sample:
    """Blend two same-size samples with a Beta(32, 32) ratio; both sets of boxes are kept."""
    if a.image.shape != b.image.shape:
        raise ValueError(f"mixup needs images of one size, got {a.image.shape} and {b.image.shape}")
    r = rng.beta(32.0, 32.0)
    image = (a.image.astype(np.float32) * r + b.image.astype(np.float32) * (1 - r)).round().astype(np.uint8)
    return Sample(image, np.concatenate((a.boxes, b.boxes)), np.concatenate((a.classes, b.classes)))


# --------------------------------------------------------------------------- the pipeline

Loader = Callable[[int], Sample]     # index -> the dataset's original sample


class Augmenter:
    """The YOLOv6 training pipeline for one ``size`` x ``size`` output (see the module docstring)."""

    def __init__(self, cfg: AugmentConfig, size: int):
        for key in ("mosaic", "mixup", "fliplr"):
            value = getattr(cfg, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"augment.{key} is a probability in [0, 1], got {value}")
        self.cfg, self.size = cfg, int(size)

    def _mosaic(self, load: Loader, index: int, count: int, rng: np.random.Generator) -> Sample:
        others = rng.integers(0, count, 3)
        return mosaic([load(index)] + [load(int(i)) for i in others], rng, self.size)

    def _geometric(self, sample: Sample, rng: np.random.Generator) -> Sample:
        c = self.cfg
        return random_affine(sample, rng, self.size, c.degrees, c.translate, c.scale, c.shear)

    def __call__(self, load: Loader, index: int, count: int, rng: np.random.Generator,
                 use_mosaic: bool = True) -> Sample:
        c = self.cfg
        if use_mosaic and c.mosaic > 0 and rng.random() < c.mosaic:
            sample = self._geometric(self._mosaic(load, index, count, rng), rng)
            if c.mixup > 0 and rng.random() < c.mixup:
                other = self._geometric(self._mosaic(load, int(rng.integers(0, count)), count, rng), rng)
                sample = mixup(sample, other, rng)
        else:
            sample = self._geometric(letterbox_sample(resize_longest(load(index), self.size), self.size), rng)
        if c.hsv_h or c.hsv_s or c.hsv_v:
            sample = Sample(hsv_jitter(sample.image, rng, c.hsv_h, c.hsv_s, c.hsv_v), sample.boxes, sample.classes)
        if c.fliplr > 0 and rng.random() < c.fliplr:
            sample = flip_horizontal(sample)
        return sample
