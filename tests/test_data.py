"""Letterbox geometry, COCO dataset/loader failure handling, calibration image selection."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from yoloq.errors import InputError
from yoloq.config import DataConfig
from yoloq.data import load_data_config
from yoloq.data import CocoDetectionDataset, FailedItem, calibration_images, calibration_loader, letterbox, make_loader
from yoloq.data.coco import INTERPOLATIONS
from yoloq.eval.coco_eval import scale_boxes
from conftest import COCO, REPO, needs_coco  # noqa: E402


# --------------------------------------------------------------------------- letterbox
@pytest.mark.parametrize("h,w,size", [(480, 640, 320), (640, 427, 320), (333, 500, 640), (100, 61, 320),
                                      (640, 640, 320), (427, 640, 640)])
def test_letterbox_box_roundtrip_and_content(h, w, size):
    """A box drawn on the image lands where ratio/pad say, and maps back to the original."""
    img = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = int(w * 0.2), int(h * 0.3), int(w * 0.7), int(h * 0.9)
    img[y1:y2, x1:x2] = 255
    out, ratio, (pad_w, pad_h) = letterbox(img, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    assert ratio == pytest.approx(size / max(h, w))
    # Longer side fills the square exactly; padding is centred and filled with 114.
    assert min(pad_w, pad_h) == 0 and abs(size - 2 * max(pad_w, pad_h) - round(min(h, w) * ratio)) <= 1
    if pad_h > 0:
        assert (out[0] == 114).all() and (out[-1] == 114).all()
    if pad_w > 0:
        assert (out[:, 0] == 114).all() and (out[:, -1] == 114).all()

    box = torch.tensor([[x1, y1, x2, y2]], dtype=torch.float64)
    mapped = box * ratio + torch.tensor([pad_w, pad_h, pad_w, pad_h])
    ys, xs = np.nonzero(out[:, :, 0] > 200)
    found = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float64)
    assert torch.allclose(found, mapped[0], atol=1.5), (found, mapped)

    class Meta:
        orig_h, orig_w = h, w
    Meta.ratio, Meta.pad = ratio, (pad_w, pad_h)
    assert torch.allclose(scale_boxes(mapped, Meta), box, atol=1e-9)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_letterbox_interpolations_agree_roughly(interpolation):
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), (9, 9), 3)
    out, _, pad = letterbox(img, 320, interpolation=interpolation)
    ref, _, ref_pad = letterbox(img, 320, interpolation="linear")
    assert pad == ref_pad
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 3


def test_letterbox_rejects_bad_input():
    with pytest.raises(ValueError, match="HxWx3"):
        letterbox(np.zeros((10, 10), np.uint8), 32)
    with pytest.raises(ValueError, match="interpolation 'cubic'"):
        letterbox(np.zeros((10, 12, 3), np.uint8), 32, interpolation="cubic")


# --------------------------------------------------------------------------- dataset
def _write_image(path: Path, h=48, w=64, value=80):
    img = np.full((h, w, 3), value, np.uint8)
    img[:, : w // 2, 2] = 250      # left half red (BGR) -> checks the RGB conversion
    assert cv2.imwrite(str(path), img)


def _write_ann(path: Path, names):
    images = [{"id": i + 1, "file_name": n, "width": 64, "height": 48} for i, n in enumerate(names)]
    cats = [{"id": i, "name": f"c{i}"} for i in range(1, 81)]
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": cats}))
    return path


def test_dataset_item_is_rgb_letterboxed(tmp_path):
    _write_image(tmp_path / "a.jpg")
    ds = CocoDetectionDataset(tmp_path, _write_ann(tmp_path / "ann.json", ["a.jpg"]), img_size=32)
    img, meta = ds[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert 0 <= img.min() and img.max() <= 1
    assert (meta.image_id, meta.orig_h, meta.orig_w, meta.ratio, meta.pad) == (1, 48, 64, 0.5, (0.0, 4.0))
    assert img[0, 16, 4] > 0.9 and img[2, 16, 4] < 0.4          # red lands in channel 0 (R)
    assert img[0, 0, 0] == pytest.approx(114 / 255)             # padding row


@pytest.mark.parametrize("workers", [0, 1])
def test_missing_and_corrupt_images_warn_and_are_counted(tmp_path, workers):
    _write_image(tmp_path / "good.jpg")
    (tmp_path / "corrupt.jpg").write_bytes(b"\x00garbage, not a jpeg" * 10)
    ann = _write_ann(tmp_path / "ann.json", ["good.jpg", "corrupt.jpg", "missing.jpg"])
    ds = CocoDetectionDataset(tmp_path, ann, img_size=32)
    assert isinstance(ds[1], FailedItem) and isinstance(ds[2], FailedItem)
    with pytest.warns(UserWarning) as record:
        batches = list(make_loader(ds, batch_size=3, workers=workers))
    messages = " ".join(str(w.message) for w in record)
    assert "corrupt.jpg" in messages and "missing.jpg" in messages
    assert sorted(Path(f).name for f in ds.failed) == ["corrupt.jpg", "missing.jpg"]
    assert len(batches) == 1
    images, metas = batches[0]
    assert images.shape == (1, 3, 32, 32) and [m.image_id for m in metas] == [1]


def test_all_failed_batch_is_skipped(tmp_path):
    ann = _write_ann(tmp_path / "ann.json", ["missing1.jpg", "missing2.jpg"])
    ds = CocoDetectionDataset(tmp_path, ann, img_size=32)
    with pytest.warns(UserWarning) as record:
        assert list(make_loader(ds, batch_size=1, workers=0)) == []
    assert ["missing1.jpg" in str(record[0].message), "missing2.jpg" in str(record[1].message)] == [True, True]
    assert len(ds.failed) == 2


def test_folder_mode_and_file_subset(tmp_path):
    for name in ("000000000007.jpg", "b.png", "a.jpg"):
        _write_image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = CocoDetectionDataset(tmp_path, img_size=32)
    assert [n for _, n in ds.entries] == ["000000000007.jpg", "a.jpg", "b.png"]
    assert ds.image_ids[0] == 7
    sub = CocoDetectionDataset(tmp_path, img_size=32, files=["b.png"])
    assert len(sub) == 1 and sub[0][1].file.endswith("b.png")
    with pytest.raises(ValueError, match="nope.jpg"):
        CocoDetectionDataset(tmp_path, img_size=32, files=["nope.jpg"])


def test_bad_annotation_file_is_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        CocoDetectionDataset(tmp_path, bad)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        CocoDetectionDataset(tmp_path, tmp_path / "absent.json")


@needs_coco
def test_real_val_images_match_annotation_sizes():
    dc = load_data_config(REPO / "data" / "coco_shared.yaml")
    entries = json.loads(Path(dc.val_ann_official).read_text())["images"]
    sizes = {e["id"]: (e["height"], e["width"]) for e in entries}
    ds = CocoDetectionDataset(dc.val_images, dc.val_ann_official, img_size=320)
    assert len(ds) == 206
    images, metas = next(iter(make_loader(ds, batch_size=4, workers=0)))
    assert images.shape == (4, 3, 320, 320)
    for meta in metas:
        assert (meta.orig_h, meta.orig_w) == sizes[meta.image_id]


# --------------------------------------------------------------------------- calibration
def _split_config(tmp_path, n_train=6, n_val=3) -> DataConfig:
    for split, n in (("train", n_train), ("val", n_val)):
        (tmp_path / split).mkdir()
        for i in range(n):
            _write_image(tmp_path / split / f"{split}_{i}.jpg")
    return DataConfig(train_images=str(tmp_path / "train"), val_images=str(tmp_path / "val"),
                      path=str(tmp_path / "d.yaml"))


def test_calibration_is_deterministic_and_train_only(tmp_path):
    dc = _split_config(tmp_path)
    (Path(dc.train_images) / "train_broken.jpg").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # the broken file may or may not be drawn first
        picks = calibration_images(dc, 4, seed=0)
        assert picks == calibration_images(dc, 4, seed=0)
        assert any(calibration_images(dc, 4, seed=s) != picks for s in range(1, 6))
    assert len(picks) == 4 and all(p.startswith("train_") and p != "train_broken.jpg" for p in picks)
    with pytest.warns(UserWarning) as record:
        assert len(calibration_images(dc, 50, seed=0)) == 6
    messages = " ".join(str(w.message) for w in record)
    assert "train_broken.jpg" in messages and "only 6 readable" in messages
    loader = calibration_loader(dc, 5, img_size=32, batch_size=2, workers=0, seed=0)
    files = [m.file for _, metas in loader for m in metas]
    assert len(files) == 5 and all(Path(f).parent == Path(dc.train_images) for f in files)


def test_calibration_refuses_val_folder_and_unreadable_folder(tmp_path):
    dc = _split_config(tmp_path)
    same = DataConfig(train_images=dc.val_images, val_images=dc.val_images, path="d.yaml")
    with pytest.raises(ValueError, match="same folder"):
        calibration_images(same, 2)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(InputError, match=str(broken)), pytest.warns(UserWarning, match="x.jpg"):
        calibration_images(DataConfig(train_images=str(broken), path="d.yaml"), 2)


@needs_coco
def test_calibration_on_shared_data_never_touches_val():
    dc = load_data_config(REPO / "data" / "coco_shared.yaml")
    val_names = {p.name for p in Path(dc.val_images).iterdir()}
    picks = calibration_images(dc, 64, seed=3)
    assert len(picks) == 64 and not set(picks) & val_names
    assert all((Path(dc.train_images) / p).is_file() for p in picks)
