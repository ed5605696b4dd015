"""YOLO-format labels -> COCO ground truth, cached beside the labels.

Layout (upstream YOLOv6 / YOLOv5): the label file of ``.../images/<rel>/name.jpg`` is
``.../labels/<rel>/name.txt`` (the last ``/images/`` of the path becomes ``/labels/``, the suffix
becomes ``.txt``); one ``class cx cy w h`` line per box, coordinates normalized to 0..1 by the image
width / height. An image without a label file (or with an empty one) is background, as upstream.

Evaluation needs COCO ground truth: :func:`coco_ground_truth` builds it (image sizes read from the
image headers, stored pixel layout as COCO does, EXIF orientation ignored like the loader) and
caches it as JSON beside the labels, rebuilt when any image, label file or the image list changes
(a fingerprint of paths, sizes and mtimes stored in the JSON). The cache goes to
``~/.cache/yoloq`` (``$XDG_CACHE_HOME``) when the dataset folder is not writable.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image

from yoloq.data.coco import COCO80_TO_91
from yoloq.errors import InputError
from yoloq.io import OutputPathError, atomic_write_text


GT_FORMAT_VERSION = 1
CACHE_SUFFIX = ".yoloq-gt.json"


class YoloLabelError(InputError):
    """A YOLO label file is malformed; the message names the file and line."""


# --------------------------------------------------------------------------- label files
def label_path(image: str | Path) -> Path:
    """Upstream's rule: the last ``/images/`` of the path -> ``/labels/``, suffix -> ``.txt``."""
    text = str(image)
    marker, replacement = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    head, sep, tail = text.rpartition(marker)
    if sep:
        text = head + replacement + tail
    return Path(text).with_suffix(".txt")


def _label_error(path: Path, line_no: int, problem: str, nc: int) -> YoloLabelError:
    return YoloLabelError(f"{path}:{line_no}: {problem}; expected 'class cx cy w h' with an integer class "
                          f"in 0..{nc - 1} and cx, cy, w, h normalized to 0..1 (w, h > 0)")


def _parse_line(line: str, path: Path, line_no: int, nc: int) -> tuple:
    fields = line.split()
    if len(fields) != 5:
        raise _label_error(path, line_no, f"{len(fields)} columns ('{line.strip()[:60]}')", nc)
    try:
        values = [float(f) for f in fields]
    except ValueError:
        raise _label_error(path, line_no, f"not a number in '{line.strip()[:60]}'", nc) from None
    cls, cx, cy, w, h = values
    if not all(math.isfinite(v) for v in values):
        raise _label_error(path, line_no, "a value that is not finite", nc)
    if not cls.is_integer() or not 0 <= cls < nc:
        raise _label_error(path, line_no, f"class {fields[0]} out of range", nc)
    if not all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)):
        raise _label_error(path, line_no, f"box {' '.join(fields[1:])} not normalized", nc)
    if w <= 0.0 or h <= 0.0:
        raise _label_error(path, line_no, f"zero-size box (w={fields[3]}, h={fields[4]})", nc)
    return int(cls), cx, cy, w, h


def read_labels(path: str | Path, nc: int) -> list[tuple[int, float, float, float, float]]:
    """The boxes ``(class, cx, cy, w, h)`` of one label file; [] when it does not exist (background);
    a folder or a broken link in its place is a YoloLabelError.
    Exact duplicate lines are dropped with a warning (as upstream); bad lines raise YoloLabelError."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise YoloLabelError(f"{path}: a broken symbolic link where the image's label file belongs")
        return []
    if not path.is_file():
        raise YoloLabelError(f"{path}: not a file (a directory?) where the image's label file belongs; expected a "
                             f".txt file of 'class cx cy w h' lines, or no file for a background image")
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise YoloLabelError(f"{path}: not a text label file ({err})") from err
    rows, seen = [], set()
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row = _parse_line(line, path, line_no, nc)
        if row in seen:
            warnings.warn(f"{path}:{line_no}: duplicate box dropped (as upstream YOLOv6 does)", stacklevel=2)
            continue
        seen.add(row)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- COCO ground truth
def category_ids(nc: int, is_coco: bool) -> list[int]:
    """Class index -> category id: COCO's 80 -> 91 map when ``is_coco``, else the index (as upstream)."""
    if is_coco:
        if nc != 80:
            raise InputError(f"is_coco: true needs nc = 80 (COCO's detection classes), got nc = {nc}")
        return list(COCO80_TO_91)
    return list(range(nc))


def image_ids(files: Sequence[str]) -> list[int]:
    """COCO ids from the file stems when all are distinct integers (COCO's own names), else 1..N."""
    stems = [Path(f).stem for f in files]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(files) + 1))


def _image_size(path: Path) -> Optional[tuple[int, int]]:
    """(width, height) of the stored pixels from the header; None if unreadable."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - any Pillow failure means "not usable"
        return None


def _annotations(boxes, width: int, height: int, image_id: int, cat_ids: Sequence[int], first_id: int) -> list[dict]:
    """COCO annotations of one image's normalized boxes (the corner arithmetic of upstream's converter)."""
    out = []
    for k, (cls, cx, cy, w, h) in enumerate(boxes):
        x1, y1 = (cx - w / 2) * width, (cy - h / 2) * height
        x2, y2 = (cx + w / 2) * width, (cy + h / 2) * height
        bw, bh = max(0.0, x2 - x1), max(0.0, y2 - y1)
        out.append({"id": first_id + k, "image_id": image_id, "category_id": cat_ids[cls],
                    "bbox": [x1, y1, bw, bh], "area": bw * bh, "iscrowd": 0})
    return out


def build_ground_truth(root: Path, files: Sequence[str], nc: int, names: Sequence[str], is_coco: bool) -> dict:
    """COCO instances dict of the images ``root/files`` and their YOLO labels. Unreadable images are
    left out with a warning (upstream drops them too); annotation ids start at 1 (COCOeval treats a
    matched ground-truth id 0 as unmatched)."""
    cat_ids = category_ids(nc, is_coco)
    gt = {"images": [], "annotations": [],
          "categories": [{"id": cat_ids[i], "name": str(names[i]) if i < len(names) else str(i)} for i in range(nc)]}
    skipped, labeled = [], 0
    for image_id, rel in zip(image_ids(files), files):
        size = _image_size(root / rel)
        if size is None:
            skipped.append(rel)
            continue
        gt["images"].append({"id": image_id, "file_name": rel, "width": size[0], "height": size[1]})
        labeled += label_path(root / rel).is_file()
        boxes = read_labels(label_path(root / rel), nc)
        gt["annotations"] += _annotations(boxes, size[0], size[1], image_id, cat_ids, len(gt["annotations"]) + 1)
    if skipped:
        warnings.warn(f"{len(skipped)} unreadable image(s) under {root} left out of the ground truth, "
                      f"e.g. {skipped[0]}", stacklevel=2)
    if gt["images"] and not labeled:     # almost surely a layout mistake, not a background-only split
        warnings.warn(f"no label file for any of the {len(gt['images'])} images under {root} (expected e.g. "
                      f"{label_path(root / gt['images'][0]['file_name'])}): every image counts as background",
                      stacklevel=2)
    return gt


# --------------------------------------------------------------------------- cache
def fingerprint(root: Path, files: Sequence[str], nc: int, names: Sequence[str], is_coco: bool) -> str:
    """Changes when the image list, any image or label file (path, size, mtime) or the classes change."""
    digest = hashlib.sha256(json.dumps([GT_FORMAT_VERSION, str(root), nc, list(map(str, names)), is_coco]).encode())
    for rel in files:
        for path in (root / rel, label_path(root / rel)):
            try:
                st = path.stat()
                digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except FileNotFoundError:
                digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()


def _user_cache_file(anchor: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "yoloq"
    return base / f"gt-{hashlib.sha256(str(anchor).encode()).hexdigest()[:16]}{CACHE_SUFFIX}"


def _read_cache(path: Path, expected: str) -> bool:
    try:
        with open(path) as f:
            return json.load(f).get("yoloq_fingerprint") == expected
    except (OSError, ValueError, AttributeError, RecursionError):     # any unreadable cache is rebuilt
        return False


def coco_ground_truth(cache: Path, root: Path, files: Sequence[str], nc: int, names: Sequence[str],
                      is_coco: bool) -> Path:
    """Path of the cached COCO ground truth of ``root/files`` (built when missing or stale).
    ``cache`` is the preferred location (beside the labels); a user cache dir when not writable."""
    expected = fingerprint(root, files, nc, names, is_coco)
    fallback = _user_cache_file(cache)
    for path in (cache, fallback):
        if _read_cache(path, expected):
            return path
    gt = build_ground_truth(root, files, nc, names, is_coco)
    gt["yoloq_fingerprint"] = expected
    for path in (cache, fallback):
        try:
            atomic_write_text(path, json.dumps(gt))
            return path
        except OSError:
            continue
    raise OutputPathError(f"cannot write the ground-truth cache {cache} nor {fallback}")
