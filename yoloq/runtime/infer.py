"""Detections on images, a folder or a video: the logic of ``yoloq infer``.

The predictor is any of the evaluation's (a PyTorch model, FP32 or fake-quantized INT8, an ONNX file
in onnxruntime, a TensorRT engine); images go through the evaluation protocol (letterbox, NMS with
the config's thresholds) and the boxes are mapped back to the original pixels. Results are drawn
with OpenCV and, with ``save_txt``, written as YOLO labels (``class cx cy w h [conf]``, normalized).
Everything lands in a staged run folder (``yoloq.io.staging_dir``): an interrupted run leaves nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

from yoloq.config import EvalConfig
from yoloq.data.coco import IMAGE_SUFFIXES, ImageMeta, letterbox, read_image, to_uint8_tensor
from yoloq.errors import InputError
from yoloq.eval.detections import to_original
from yoloq.eval.loop import suppress, to_device
from yoloq.io import staging_dir

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv")


@dataclass
class Frame:
    """One picture to run on: its BGR pixels and where its outputs go (relative names)."""
    image: np.ndarray
    name: str                      # output image name (or the video's name for its frames)
    index: int = 0                 # frame number within a video


@dataclass
class InferResult:
    out_dir: Path
    images: int = 0                # pictures processed (video frames included)
    detections: int = 0
    files: list = field(default_factory=list)


# --------------------------------------------------------------------------- sources
def list_sources(source: str | Path) -> list[Path]:
    """An image, a video, or a folder (its images and videos, sorted)."""
    source = Path(source)
    if source.is_dir():
        found = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
        if not found:
            raise InputError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)}) or videos in this folder")
        return found
    if not source.is_file():
        raise FileNotFoundError(f"source not found: {source}")
    if source.suffix.lower() not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
        raise InputError(f"{source}: not an image ({', '.join(IMAGE_SUFFIXES)}) or video ({', '.join(VIDEO_SUFFIXES)})")
    return [source]


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def read_still(path: Path) -> np.ndarray:
    image = read_image(path)
    if image is None:
        raise InputError(f"{path}: cannot be decoded as an image")
    return image


def video_frames(path: Path) -> tuple[Iterator[np.ndarray], float, int]:
    """(frames, frames per second, frame count as the container states it) of a video file."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise InputError(f"{path}: OpenCV cannot open this video")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)

    def frames() -> Iterator[np.ndarray]:
        try:
            while True:
                ok, frame = capture.read()
                if not ok:
                    return
                yield frame
        finally:
            capture.release()
    return frames(), fps, count


# --------------------------------------------------------------------------- detection
def detect(predict: Callable, images: Sequence[np.ndarray], img_size: int, eval_cfg: EvalConfig, nc: int,
           device: Optional[torch.device] = None) -> list[np.ndarray]:
    """BGR images -> per image ``[k, 6]`` rows ``x1, y1, x2, y2, score, class`` in its own pixels
    (the evaluation's letterbox and NMS; ``device``: where ``predict`` wants its input)."""
    boxed, metas = [], []
    for i, image in enumerate(images):
        canvas, ratio, pad = letterbox(image, img_size)
        boxed.append(to_uint8_tensor(canvas))
        metas.append(ImageMeta(i, "", image.shape[0], image.shape[1], ratio, pad))
    batch = to_device(torch.stack(boxed), device)
    with torch.no_grad():
        preds = predict(batch)
    rows, index = suppress(preds, len(images), nc, eval_cfg)
    if rows.shape[0] == 0:
        return [np.zeros((0, 6)) for _ in images]
    xyxy = to_original(rows, index, metas).numpy()
    rows = np.column_stack((xyxy, rows[:, 4:6].detach().cpu().double().numpy()))
    index = index.cpu().numpy()
    return [rows[index == i] for i in range(len(images))]


# --------------------------------------------------------------------------- drawing and labels
def class_colour(cls: int) -> tuple[int, int, int]:
    """A fixed, well-separated BGR colour per class (golden-ratio hues)."""
    hue = int((cls * 0.618033988749895 % 1.0) * 179)
    pixel = cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return int(pixel[0]), int(pixel[1]), int(pixel[2])


def draw(image: np.ndarray, dets: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """A copy of ``image`` with each detection's box and ``name score`` label."""
    out = image.copy()
    thickness = max(1, round(sum(image.shape[:2]) / 600))
    for x1, y1, x2, y2, score, cls in dets:
        colour = class_colour(int(cls))
        p1, p2 = (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2)))
        cv2.rectangle(out, p1, p2, colour, thickness, cv2.LINE_AA)
        label = f"{names[int(cls)] if int(cls) < len(names) else int(cls)} {score:.2f}"
        (w, h), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness, max(1, thickness - 1))
        top = p1[1] - h - base if p1[1] - h - base >= 0 else p1[1]
        cv2.rectangle(out, (p1[0], top), (p1[0] + w, top + h + base), colour, -1)
        cv2.putText(out, label, (p1[0], top + h), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness, (255, 255, 255),
                    max(1, thickness - 1), cv2.LINE_AA)
    return out


def yolo_lines(dets: np.ndarray, width: int, height: int, save_conf: bool = False) -> list[str]:
    """YOLO label lines ``class cx cy w h [conf]``, coordinates normalized by the image size."""
    lines = []
    for x1, y1, x2, y2, score, cls in dets:
        values = [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height]
        text = f"{int(cls)} " + " ".join(f"{v:.6f}" for v in values)
        lines.append(text + (f" {score:.5f}" if save_conf else ""))
    return lines


# --------------------------------------------------------------------------- the run
@dataclass
class InferOptions:
    img_size: int
    eval_cfg: EvalConfig                 # conf_thres, iou_thres, max_det, batch_size
    nc: int
    names: Sequence[str] = ()
    device: Optional[torch.device] = None
    save_txt: bool = False
    save_conf: bool = False
    progress: bool = True


class _Writer:
    """Writes one picture's outputs into the staging folder (drawn image, YOLO labels)."""

    def __init__(self, folder: Path, opts: InferOptions, result: InferResult):
        self.folder, self.opts, self.result = folder, opts, result
        self.used: set[str] = set()

    def unique_stem(self, stem: str) -> str:
        name, k = stem, 1
        while name in self.used:
            k += 1
            name = f"{stem}_{k}"
        self.used.add(name)
        return name

    def labels(self, stem: str, dets: np.ndarray, image: np.ndarray) -> None:
        if self.opts.save_txt:
            path = self.folder / "labels" / f"{stem}.txt"
            path.parent.mkdir(exist_ok=True)
            lines = yolo_lines(dets, image.shape[1], image.shape[0], self.opts.save_conf)
            path.write_text("".join(line + "\n" for line in lines))
        self.result.images += 1
        self.result.detections += len(dets)

    def still(self, path: Path, image: np.ndarray, dets: np.ndarray) -> None:
        stem = self.unique_stem(path.stem)
        out = self.folder / f"{stem}{path.suffix.lower()}"
        if not cv2.imwrite(str(out), draw(image, dets, self.opts.names)):
            raise InputError(f"{out}: OpenCV cannot write this image format")
        self.result.files.append(out.name)
        self.labels(stem, dets, image)


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _run_stills(predict: Callable, paths: list[Path], writer: _Writer, bar) -> None:
    opts = writer.opts
    for chunk in _batches(iter(paths), opts.eval_cfg.batch_size):
        images = [read_still(p) for p in chunk]
        for path, image, dets in zip(chunk, images, detect(predict, images, opts.img_size, opts.eval_cfg, opts.nc,
                                                           opts.device)):
            writer.still(path, image, dets)
            bar.update(1)


def _run_video(predict: Callable, path: Path, writer: _Writer, bar) -> None:
    opts = writer.opts
    frames, fps, count = video_frames(path)
    stem = writer.unique_stem(path.stem)
    out = writer.folder / f"{stem}.mp4"
    video, index = None, 0
    bar.total = (bar.total or 0) + count
    try:
        for chunk in _batches(frames, opts.eval_cfg.batch_size):
            for image, dets in zip(chunk, detect(predict, chunk, opts.img_size, opts.eval_cfg, opts.nc, opts.device)):
                if video is None:
                    video = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                            (image.shape[1], image.shape[0]))
                    if not video.isOpened():
                        raise InputError(f"{out}: OpenCV cannot write an mp4v video here")
                video.write(draw(image, dets, opts.names))
                index += 1
                writer.labels(f"{stem}_{index:06d}", dets, image)
                bar.update(1)
    finally:
        if video is not None:
            video.release()
    if index == 0:
        raise InputError(f"{path}: no frame could be read from this video")
    writer.result.files.append(out.name)


def run_infer(predict: Callable, source: str | Path, out_dir: str | Path, opts: InferOptions) -> InferResult:
    """Detect on ``source`` (image, folder, video) and write drawn copies (videos as mp4) and, with
    ``opts.save_txt``, ``labels/<name>.txt`` into ``out_dir``, staged: all of it or nothing."""
    paths = list_sources(source)
    stills = [p for p in paths if not is_video(p)]
    result = InferResult(out_dir=Path(out_dir))
    with staging_dir(Path(out_dir), "infer") as folder:
        writer = _Writer(folder, opts, result)
        with tqdm(total=len(stills), disable=not opts.progress, desc="infer", unit="img") as bar:
            _run_stills(predict, stills, writer, bar)
            for video in (p for p in paths if is_video(p)):
                _run_video(predict, video, writer, bar)
    return result
