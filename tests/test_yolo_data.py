"""Upstream YOLOv6 datasets: data YAML (folders / .txt lists), YOLO labels -> COCO ground truth (cached),
calibration on the train images, and the same mAP as the COCO-JSON route on real COCO images."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from yoloq.config import ConfigError, DataConfig, EvalConfig, load_config
from yoloq.data import load_data_config
from yoloq.data.coco import CocoDetectionDataset, calibration_images, calibration_loader
from yoloq.data.yolo_labels import label_path, read_labels
from yoloq.eval.coco_eval import COCO80_TO_91, coco_stats, evaluate_model
from conftest import COCO, LITE_S_WEIGHTS as LITE_S, REPO, needs_coco, needs_shared  # noqa: E402


def image(path: Path, w: int, h: int, value: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), value, np.uint8))
    return path


def text(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def data_yaml(path: Path, **entries) -> Path:
    entries.setdefault("nc", 2)
    entries.setdefault("names", ["cat", "dog"] if entries["nc"] == 2 else [f"c{i}" for i in range(entries["nc"])])
    return text(path, yaml.safe_dump(entries))


def small_dataset(root: Path) -> Path:
    """train: 3 images in nested folders; val: a.jpg (2 boxes), sub/b.png (empty label file), c.jpg (no label)."""
    for rel in ("x/t1.jpg", "x/t2.jpg", "y/z/t3.jpg"):
        image(root / "images" / "train" / rel, 40, 30)
        text(label_path(root / "images" / "train" / rel), "1 0.5 0.5 0.5 0.5\n")
    image(root / "images" / "val" / "a.jpg", 64, 48)
    text(root / "labels" / "val" / "a.txt", "0 0.5 0.5 0.25 0.5\n1 0.25 0.75 0.5 0.5\n")
    image(root / "images" / "val" / "sub" / "b.png", 32, 32)
    text(root / "labels" / "val" / "sub" / "b.txt", "")
    image(root / "images" / "val" / "c.jpg", 20, 10)
    return data_yaml(root / "data.yaml", train="images/train", val="images/val", test="images/test", is_coco=False)


def gt_of(dc: DataConfig) -> dict:
    return json.loads(Path(dc.val_ann).read_text())


# --------------------------------------------------------------------------- layout and ground truth
def test_label_path_follows_upstreams_images_to_labels_rule():
    assert label_path("/d/images/val/a.jpg") == Path("/d/labels/val/a.txt")
    assert label_path("/d/images/x/images/b.v2.png") == Path("/d/images/x/labels/b.v2.txt")   # the last /images/
    assert label_path("/d/pics/c.jpg") == Path("/d/pics/c.txt")                             # no /images/: beside


def test_data_yaml_becomes_a_data_config_with_coco_ground_truth(tmp_path):
    dc = load_data_config(small_dataset(tmp_path / "ds"))
    assert dc.train_images == str(tmp_path / "ds" / "images" / "train")
    assert dc.train_files == ["x/t1.jpg", "x/t2.jpg", "y/z/t3.jpg"]
    assert dc.val_images == str(tmp_path / "ds" / "images" / "val")
    assert dc.val_files == ["a.jpg", "c.jpg", "sub/b.png"]
    assert dc.nc == 2 and dc.names == ["cat", "dog"] and dc.train_ann == "" and dc.val_ann_official is None
    assert Path(dc.val_ann) == tmp_path / "ds" / "labels" / "val.yoloq-gt.json"      # cached beside the labels
    gt = gt_of(dc)
    assert [(im["id"], im["file_name"], im["width"], im["height"]) for im in gt["images"]] == [
        (1, "a.jpg", 64, 48), (2, "c.jpg", 20, 10), (3, "sub/b.png", 32, 32)]
    assert [c["id"] for c in gt["categories"]] == [0, 1] and gt["categories"][1]["name"] == "dog"
    assert gt["annotations"] == [
        {"id": 1, "image_id": 1, "category_id": 0, "bbox": [24.0, 12.0, 16.0, 24.0], "area": 384.0, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0.0, 24.0, 32.0, 24.0], "area": 768.0, "iscrowd": 0}]


def test_ground_truth_is_a_valid_cocoeval_file_for_any_class_count(tmp_path):
    """Boxes equal to the labels score AP 1 with both backends (0-based category ids, as upstream)."""
    dc = load_data_config(small_dataset(tmp_path))
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt_of(dc)["annotations"]]
    for backend in ("pycocotools", "faster-coco-eval"):
        assert coco_stats(dc.val_ann, dets, backend)["AP"] == pytest.approx(1.0)


def test_is_coco_maps_class_indices_to_coco_category_ids(tmp_path):
    image(tmp_path / "images" / "val" / "000000000042.jpg", 50, 50)
    text(tmp_path / "labels" / "val" / "000000000042.txt", "0 .5 .5 .2 .2\n11 .5 .5 .2 .2\n79 .5 .5 .2 .2\n")
    dc = load_data_config(data_yaml(tmp_path / "coco.yaml", val=str(tmp_path / "images" / "val"), nc=80,
                                    is_coco=True))
    gt = gt_of(dc)
    assert [c["id"] for c in gt["categories"]] == COCO80_TO_91
    assert [a["category_id"] for a in gt["annotations"]] == [1, 13, 90]
    assert gt["images"][0]["id"] == 42                              # COCO file names keep their ids
    with pytest.raises(ConfigError, match="is_coco: true maps COCO's 80 classes.*nc = 2"):
        load_data_config(data_yaml(tmp_path / "bad.yaml", val=str(tmp_path / "images" / "val"), is_coco=True))


def test_cache_is_reused_and_rebuilt_when_labels_or_images_change(tmp_path):
    path = small_dataset(tmp_path)
    first = load_data_config(path)
    cache = Path(first.val_ann)
    stamp = cache.stat().st_mtime_ns
    assert load_data_config(path).val_ann == first.val_ann and cache.stat().st_mtime_ns == stamp   # reused
    label = tmp_path / "labels" / "val" / "c.txt"                   # c.jpg was background
    text(label, "1 0.5 0.5 1.0 1.0\n")
    gt = gt_of(load_data_config(path))
    assert [a["bbox"] for a in gt["annotations"] if a["image_id"] == 2] == [[0.0, 0.0, 20.0, 10.0]]
    image(tmp_path / "images" / "val" / "d.jpg", 8, 8)              # a new image
    assert [im["file_name"] for im in gt_of(load_data_config(path))["images"]][-2:] == ["d.jpg", "sub/b.png"]
    label.unlink()                                                   # back to background
    assert not [a for a in gt_of(load_data_config(path))["annotations"] if a["image_id"] == 2]
    assert not list(cache.parent.glob(".*.tmp"))                     # atomic writes leave no temp file


def test_unwritable_dataset_caches_in_the_user_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = small_dataset(tmp_path / "ds")
    (tmp_path / "ds" / "labels" / "val.yoloq-gt.json").mkdir()      # the preferred cache file cannot be written
    dc = load_data_config(path)
    assert Path(dc.val_ann).parent == tmp_path / "cache" / "yoloq"
    assert len(gt_of(dc)["annotations"]) == 2


# --------------------------------------------------------------------------- bad labels and YAMLs
@pytest.mark.parametrize("line, problem", [
    ("2 0.5 0.5 0.1 0.1", "class 2 out of range"),
    ("-1 0.5 0.5 0.1 0.1", "class -1 out of range"),
    ("0.5 0.5 0.5 0.1 0.1", "class 0.5 out of range"),
    ("0 1.5 0.5 0.1 0.1", "box 1.5 0.5 0.1 0.1 not normalized"),
    ("0 0.5 0.5 -0.1 0.1", "box 0.5 0.5 -0.1 0.1 not normalized"),
    ("0 0.5 0.5 0.0 0.1", "zero-size box"),
    ("0 0.5 0.5 0.1", "4 columns"),
    ("0 0.5 0.5 0.1 0.1 0.3 0.3", "7 columns"),
    ("0 0.5 half 0.1 0.1", "not a number"),
    ("0 nan 0.5 0.1 0.1", "a value that is not finite"),
])
def test_bad_label_lines_are_named_by_file_and_line(tmp_path, line, problem):
    image(tmp_path / "images" / "val" / "a.jpg", 16, 16)
    label = text(tmp_path / "labels" / "val" / "a.txt", f"0 0.5 0.5 0.2 0.2\n{line}\n")
    with pytest.raises(ConfigError) as err:
        load_data_config(data_yaml(tmp_path / "d.yaml", val=str(tmp_path / "images" / "val")))
    assert f"{label}:2: {problem}" in str(err.value)
    assert "expected 'class cx cy w h'" in str(err.value)
    assert not list((tmp_path / "labels").glob("*.json"))            # nothing half-written


def test_a_split_without_any_label_file_is_warned_about(tmp_path):
    image(tmp_path / "images" / "val" / "a.jpg", 16, 16)
    with pytest.warns(UserWarning, match=r"no label file for any of the 1 images.*labels/val/a.txt.*background"):
        dc = load_data_config(data_yaml(tmp_path / "d.yaml", val="images/val"))
    assert gt_of(dc)["annotations"] == [] and len(gt_of(dc)["images"]) == 1


def test_duplicate_boxes_are_dropped_with_a_warning(tmp_path):
    label = text(tmp_path / "a.txt", "0 0.5 0.5 0.2 0.2\n\n0 0.5 0.5 0.2 0.2\n1 0.1 0.1 0.1 0.1\n")
    with pytest.warns(UserWarning, match=f"{label}:3: duplicate box dropped"):
        assert read_labels(label, nc=2) == [(0, 0.5, 0.5, 0.2, 0.2), (1, 0.1, 0.1, 0.1, 0.1)]
    assert read_labels(tmp_path / "missing.txt", nc=2) == []          # no label file: background


def test_yaml_errors_name_key_and_value(tmp_path):
    image(tmp_path / "images" / "val" / "a.jpg", 16, 16)
    val = str(tmp_path / "images" / "val")
    cases = [
        (dict(val=val, nc=2, names=["a"]), "'names' must be a list of nc = 2 class names, got 1"),
        (dict(val=val, nc=0, names=[]), "'nc' must be the number of classes"),
        (dict(val=val, nc=1, names=["a"], is_coco="yes"), "'is_coco' must be true/false"),
        (dict(val=val, nc=1, names=["a"], download="x"), "unknown key(s) download"),
        (dict(val="no/such/dir", nc=1, names=["a"]), "val: 'no/such/dir' not found (tried "),
        (dict(val=str(tmp_path / "images" / "val" / "a.jpg"), nc=1, names=["a"]), "must be an image folder or a .txt"),
        (dict(val=str(tmp_path / "empty"), nc=1, names=["a"]), "val: no images found in"),
        (dict(val=3, nc=1, names=["a"]), "'val' must be an image folder, a .txt image list or a list of those"),
    ]
    (tmp_path / "empty").mkdir()
    for entries, message in cases:
        path = text(tmp_path / "d.yaml", yaml.safe_dump(entries))
        with pytest.raises(ConfigError) as err:
            load_data_config(path)
        assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_image_lists_and_relative_paths(tmp_path, monkeypatch):
    """A .txt list (relative lines against the list's folder, a missing entry warned and left out), a
    list of sources, and relative YAML paths resolved against the YAML's folder when the current
    directory does not hold them."""
    for rel in ("images/val/a.jpg", "images/val/deep/b.jpg", "images/extra/c.jpg"):
        image(tmp_path / "ds" / rel, 16, 16)
    text(tmp_path / "ds" / "labels" / "val" / "deep" / "b.txt", "1 0.5 0.5 0.5 0.5\n")
    text(tmp_path / "ds" / "val.txt", "./images/val/deep/b.jpg\nimages/val/a.jpg\n\n# comment\nimages/val/gone.jpg\n")
    monkeypatch.chdir(tmp_path)                                       # ds/ is not relative to here
    path = data_yaml(tmp_path / "ds" / "d.yaml", val=["val.txt", "images/extra"])
    with pytest.warns(UserWarning, match="1 listed image.*not found.*gone.jpg"):
        dc = load_data_config(path)
    assert dc.val_images == str(tmp_path / "ds" / "images")
    assert dc.val_files == ["extra/c.jpg", "val/a.jpg", "val/deep/b.jpg"]
    assert Path(dc.val_ann) == tmp_path / "ds" / "val.yoloq-gt.json"  # beside the list
    gt = gt_of(dc)
    assert [(a["image_id"], a["category_id"]) for a in gt["annotations"]] == [(3, 1)]
    ds = CocoDetectionDataset(dc.val_images, dc.val_ann, img_size=32)
    assert [Path(ds[i][1].file).name for i in range(len(ds))] == ["c.jpg", "a.jpg", "b.jpg"]
    text(tmp_path / "ds" / "bad.txt", "images/val/a.jpg\nnotes.md\n")
    with pytest.raises(ConfigError, match=r"bad.txt:2: 'notes.md' is not an image file"):
        load_data_config(data_yaml(tmp_path / "ds" / "d2.yaml", val="bad.txt"))


def test_relative_paths_resolve_like_upstream(tmp_path, monkeypatch):
    """Against the current directory first (upstream runs from its checkout), then the YAML's folder,
    then its parent (upstream YAMLs sit in <YOLOv6>/data/ next to ../custom_dataset)."""
    for rel in ("yolov6/data/images/val/beside_yaml.jpg", "cwd/images/val/in_cwd.jpg",
                "custom_dataset/images/val/custom.jpg"):
        image(tmp_path / rel, 8, 8)
        text(label_path(tmp_path / rel), "0 0.5 0.5 0.5 0.5\n")
    near = data_yaml(tmp_path / "yolov6" / "data" / "near.yaml", val="images/val")
    far = data_yaml(tmp_path / "yolov6" / "data" / "far.yaml", val="../custom_dataset/images/val")
    monkeypatch.chdir(tmp_path / "cwd")
    assert load_data_config(near).val_files == ["in_cwd.jpg"]
    monkeypatch.chdir(tmp_path)
    assert load_data_config(near).val_files == ["beside_yaml.jpg"]
    assert load_data_config(far).val_files == ["custom.jpg"]
    monkeypatch.chdir(tmp_path / "yolov6")                          # where upstream would run it
    assert load_data_config(far).val_images == str(tmp_path / "custom_dataset" / "images" / "val")


# --------------------------------------------------------------------------- calibration / PTQ
def test_calibration_reads_the_yolo_train_images_only(tmp_path):
    dc = load_data_config(small_dataset(tmp_path))
    chosen = calibration_images(dc, 2, seed=0)
    assert len(chosen) == 2 and set(chosen) <= set(dc.train_files)
    assert calibration_images(dc, 2, seed=0) == chosen
    batches = list(calibration_loader(dc, 3, img_size=32, batch_size=2, workers=0))
    files = sorted(Path(m.file).relative_to(dc.train_images).as_posix() for _, metas in batches for m in metas)
    assert files == dc.train_files and sum(b.shape[0] for b, _ in batches) == 3
    text(tmp_path / "leak.txt", f"{tmp_path}/images/train/x/t1.jpg\n{tmp_path}/images/val/a.jpg\n")
    leaky = data_yaml(tmp_path / "leak.yaml", train="leak.txt", val="images/val")
    with pytest.raises(ValueError, match="1 train image\\(s\\) are also val images.*a.jpg"):
        calibration_images(load_data_config(leaky), 2)


def test_ptq_selection_set_uses_the_yolo_train_labels(tmp_path):
    """--max-drop / --sensitivity map measure mAP on labeled train images: built from the YOLO labels."""
    from yoloq.recipes.partial import selection_data
    dc = load_data_config(small_dataset(tmp_path))
    text(tmp_path / "labels" / "train" / "y" / "z" / "t3.txt", "")     # t3 becomes background: not selectable
    sel, info = selection_data(dc, calib_files=["x/t1.jpg"], n=5, seed=0, tmp_dir=tmp_path)
    chosen = json.loads(Path(sel.val_ann).read_text())["images"]
    assert sorted(im["file_name"] for im in chosen) == ["x/t1.jpg", "x/t2.jpg"]
    assert info["disjoint_from_calibration"] == 1 and info["source"].endswith("train.yoloq-gt.json")
    assert sel.val_images == dc.train_images


# --------------------------------------------------------------------------- the proof on real COCO images
def coco_as_yolo(root: Path, n_images: int = 30) -> tuple[Path, Path, list[int]]:
    """``n_images`` official val images without crowd boxes (two of them with no boxes: one without a
    label file, one with an empty one) written in YOLO format, and a COCO-JSON reference with the very
    boxes the label files encode (normalized floats written exactly, decoded back here)."""
    official = json.loads((COCO / "annotations" / "instances_val2017_official.json").read_text())
    anns = defaultdict(list)
    for a in official["annotations"]:
        anns[a["image_id"]].append(a)
    images = [im for im in sorted(official["images"], key=lambda e: e["id"])
              if not any(a["iscrowd"] for a in anns[im["id"]])]
    empty = [im for im in images if not anns[im["id"]]][:2]
    chosen = [im for im in images if anns[im["id"]]][:n_images - len(empty)] + empty
    index = {cat: i for i, cat in enumerate(sorted(c["id"] for c in official["categories"]))}
    ref = {"images": [], "annotations": [], "categories": official["categories"]}
    for im in chosen:
        (root / "images" / "val2017").mkdir(parents=True, exist_ok=True)
        os.symlink(COCO / "val2017" / im["file_name"], root / "images" / "val2017" / im["file_name"])
        ref["images"].append({k: im[k] for k in ("id", "file_name", "width", "height")})
        W, H, lines = im["width"], im["height"], []
        for a in anns[im["id"]]:
            x, y, w, h = a["bbox"]
            lines.append(f"{index[a['category_id']]} {(x + w / 2) / W!r} {(y + h / 2) / H!r} {w / W!r} {h / H!r}")
            cx, cy, nw, nh = (float(v) for v in lines[-1].split()[1:])
            x1, y1, x2, y2 = (cx - nw / 2) * W, (cy - nh / 2) * H, (cx + nw / 2) * W, (cy + nh / 2) * H
            assert max(abs(x1 - x), abs(y1 - y), abs(x2 - x1 - w), abs(y2 - y1 - h)) < 1e-9   # faithful conversion
            ref["annotations"].append({"id": len(ref["annotations"]) + 1, "image_id": im["id"], "iscrowd": 0,
                                       "category_id": a["category_id"], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                       "area": (x2 - x1) * (y2 - y1)})
        if im is not empty[0]:                                         # the first empty image has no label file
            text(root / "labels" / "val2017" / f"{Path(im['file_name']).stem}.txt", "".join(f"{l}\n" for l in lines))
    names = yaml.safe_load((REPO / "data" / "coco_shared.yaml").read_text())["names"]
    data = data_yaml(root / "coco_yolo.yaml", val="images/val2017", nc=80, names=names, is_coco=True)
    text(root / "reference.json", json.dumps(ref))
    return data, root / "reference.json", [im["id"] for im in chosen]


@pytest.mark.slow
@needs_shared
def test_same_map_as_the_coco_json_route_on_real_images(tmp_path):
    from yoloq.weights import load_weights
    from yoloq.models import build_model
    data, reference, ids = coco_as_yolo(tmp_path)
    cfg = load_config("yolov6lite_s")
    model = build_model(cfg.model)
    load_weights(model, str(LITE_S))
    model = model.fuse().eval()
    eval_cfg = EvalConfig(batch_size=8, workers=0)
    coco_route = DataConfig(val_images=str(COCO / "val2017"), val_ann=str(reference), nc=80)
    yolo_route = load_data_config(data)
    assert yolo_route.val_images == str(tmp_path / "images" / "val2017")
    via_json = evaluate_model(model, coco_route, eval_cfg, cfg.model.img_size, progress=False)
    via_yolo = evaluate_model(model, yolo_route, eval_cfg, cfg.model.img_size, progress=False)
    assert via_yolo.n_images == via_json.n_images == len(ids) == 30
    assert via_yolo.detections == via_json.detections
    assert via_yolo.stats == via_json.stats                             # exactly, all 12 COCO numbers
    assert 0.2 < via_yolo.stats["AP"] < 0.5                             # a real model on real images
    gt = json.loads(Path(yolo_route.val_ann).read_text())
    ref = json.loads(reference.read_text())
    assert sorted(im["id"] for im in gt["images"]) == sorted(ids)
    assert [(im["id"], im["width"], im["height"]) for im in sorted(gt["images"], key=lambda e: e["id"])] == \
        [(im["id"], im["width"], im["height"]) for im in sorted(ref["images"], key=lambda e: e["id"])]
