"""The pack the GPU check carries to a device machine (``tools/gpu_pack.py``): a device image with
torch and onnxruntime but without ``../shared``, TensorRT, a network or some of yoloq's
dependencies needs, in one ignored folder (``.carry/`` by default, <= 64 MiB with the tree)::

    wheels/        the dependencies the device may lack (pytorch-quantization, pycocotools,
                   faster-coco-eval, onnxslim, pyyaml, tqdm, colorama): pure-Python ones once,
                   compiled ones for CPython 3.10-3.13; the check installs only what is missing
    data/          data.yaml, val2017/ + annotations/instances_val2017.json (the val images),
                   train2017/ (the train images, for calibration) - every image shrunk to
                   ``max_side`` px on its longer side (320: the Lite models' input size, so their
                   letterbox does not resize them again), boxes, areas and sizes scaled alike
    weights/       the Lite-S checkpoint
    reference.json the CPU result of the default Lite-S PTQ on data/ (its command, FP32 / INT8
                   stats, calibration method, timings): what the GPU result is compared with
    manifest.json  what is in the pack, with sizes

opencv-python-headless (about 50 MB), matplotlib and tensorboard are not packed: the device image
has them (KINDS.md of the device tool), and the check says so when one is missing.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from yoloq.errors import InputError

LIMIT_BYTES = 64 * 2 ** 20
# (distribution, version, pure Python): the versions tested here
WHEELS = [("pytorch-quantization", "2.1.3", True), ("pycocotools", "2.0.11", False),
          ("faster-coco-eval", "1.8.0", False), ("onnxslim", "0.1.98", True), ("pyyaml", "6.0.3", False),
          ("tqdm", "4.70.1", True), ("colorama", "0.4.6", True)]
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
JPEG_QUALITY = 90


class PackError(InputError):
    """The pack cannot be made (a missing input, a failed download, over the size limit)."""


def download_wheels(dest: Path, wheels: Sequence[tuple] = WHEELS, pythons: Sequence[str] = PYTHONS) -> list[str]:
    """``pip download`` of every wheel into ``dest`` (compiled ones for each of ``pythons``)."""
    dest.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    for name, version, pure in wheels:
        targets = [[]] if pure else [["--python-version", v, "--implementation", "cp",
                                      *[a for p in PLATFORMS for a in ("--platform", p)]] for v in pythons]
        for target in targets:
            done = subprocess.run(base + target + [f"{name}=={version}"], capture_output=True, text=True)
            if done.returncode != 0:
                raise PackError(f"pip download {name}=={version} {' '.join(target[:2])} failed: "
                                f"{done.stderr.strip().splitlines()[-1:]}")
    return sorted(p.name for p in dest.glob("*.whl"))


# --------------------------------------------------------------------------- data


def _scaled_image(src: Path, dst: Path, max_side: int) -> Optional[tuple[int, int, int, int]]:
    """Write ``src`` shrunk to ``max_side`` (never enlarged) as a JPEG: (w, h, new_w, new_h), or
    None for an unreadable file."""
    import cv2
    from yoloq.data.coco import read_image
    img = read_image(src)
    if img is None:
        return None
    h, w = img.shape[:2]
    r = min(1.0, max_side / max(h, w))
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    if (nw, nh) != (w, h):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    if not cv2.imwrite(str(dst), img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
        raise PackError(f"could not write {dst}")
    return w, h, nw, nh


def _scaled_annotation(ann: dict, sx: float, sy: float) -> dict:
    x, y, w, h = ann["bbox"]
    out = {k: v for k, v in ann.items() if k != "segmentation"}     # bbox evaluation reads no masks
    out["bbox"] = [x * sx, y * sy, w * sx, h * sy]
    out["area"] = float(ann.get("area", w * h)) * sx * sy
    return out


def pack_val(images_dir: Path, ann_file: Path, out: Path, max_side: int, limit: Optional[int] = None) -> int:
    """The val images of ``ann_file`` (the first ``limit`` by id) shrunk, with their annotations
    scaled alike, into ``out/val2017`` and ``out/annotations/instances_val2017.json``."""
    gt = json.loads(ann_file.read_text())
    entries = sorted(gt["images"], key=lambda e: e["id"])[:limit]
    (out / "val2017").mkdir(parents=True, exist_ok=True)
    images, scale = [], {}
    for e in entries:
        name = Path(e["file_name"]).with_suffix(".jpg").name
        dims = _scaled_image(images_dir / e["file_name"], out / "val2017" / name, max_side)
        if dims is None:
            continue
        w, h, nw, nh = dims
        scale[e["id"]] = (nw / w, nh / h)
        images.append({**e, "file_name": name, "width": nw, "height": nh})
    anns = [_scaled_annotation(a, *scale[a["image_id"]]) for a in gt["annotations"] if a["image_id"] in scale]
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"info": {"description": f"{ann_file.name}, images shrunk to {max_side} px (yoloq gpu pack)"},
         "images": images, "annotations": anns, "categories": gt["categories"]}))
    return len(images)


def pack_train(images_dir: Path, names: Sequence[str], out: Path, max_side: int) -> int:
    (out / "train2017").mkdir(parents=True, exist_ok=True)
    written = 0
    for name in names:
        written += _scaled_image(images_dir / name, out / "train2017" / Path(name).with_suffix(".jpg").name,
                                 max_side) is not None
    return written


def write_data_yaml(out: Path, names: Sequence[str], nc: int) -> Path:
    import yaml
    path = out / "data.yaml"
    path.write_text("# the GPU check's data (tools/gpu_pack.py): paths relative to this file\n" + yaml.safe_dump({
        "train_images": "train2017", "val_images": "val2017", "val_ann": "annotations/instances_val2017.json",
        "nc": nc, "names": list(names)}, sort_keys=False))
    return path


def pack_data(data_yaml: str, out: Path, max_side: int, val_images: Optional[int], train_images: Optional[int],
              seed: int = 0) -> dict:
    """Shrunk copies of a dataset's val images (first ``val_images`` by id, all when None) and of
    ``train_images`` train images (the calibration choice for ``seed``, so the default's 256 are
    among them; all when None)."""
    from yoloq.data import load_data_config
    from yoloq.data.coco import calibration_images, list_images
    data_cfg = load_data_config(data_yaml)
    n_val = pack_val(Path(data_cfg.val_images), Path(data_cfg.val_ann), out, max_side, val_images)
    names = calibration_images(data_cfg, train_images, seed) if train_images else list_images(data_cfg.train_images)
    n_train = pack_train(Path(data_cfg.train_images), names, out, max_side)
    write_data_yaml(out, data_cfg.names, data_cfg.nc)
    return {"source": str(data_yaml), "val_images": n_val, "train_images": n_train, "max_side": max_side}


# --------------------------------------------------------------------------- the whole pack


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def reference_result(report: dict, args: Sequence[str], wall_s: float) -> dict:
    """What the GPU result is compared with, from the CPU run's report.json."""
    return {"args": list(args), "fp32": report["fp32"], "int8": report["int8"], "drop": report["drop"],
            "calibration": {k: report["calibration"].get(k) for k in ("requested", "method", "images")},
            "eval_images": report["data"]["eval_images"], "timings": report["timings"], "wall_s": round(wall_s, 1),
            "env": report.get("env", {})}


def check_size(root: Path, tree_bytes: int) -> int:
    total = folder_bytes(root) + tree_bytes
    if total > LIMIT_BYTES:
        raise PackError(f"{root} ({folder_bytes(root) / 2 ** 20:.1f} MiB) and the working tree "
                        f"({tree_bytes / 2 ** 20:.1f} MiB) are {total / 2 ** 20:.1f} MiB, over the device's "
                        f"{LIMIT_BYTES / 2 ** 20:.0f} MiB: pack fewer images (--val-images / --train-images)")
    return total


def clear(root: Path) -> None:
    """Empty a pack folder (only one that looks like a pack, or an empty one)."""
    if root.exists():
        if any(root.iterdir()) and not (root / "manifest.json").is_file() and not (root / "data").is_dir():
            raise PackError(f"{root} exists and is not a GPU pack; refusing to empty it")
        shutil.rmtree(root)
