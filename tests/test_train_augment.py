"""Augmentation with labels (yoloq.train.augment) and the labelled dataset (yoloq.train.dataset).

Box consistency is checked by rendering every box as a filled mask, pushing masks and boxes through
the same pipeline, and comparing each output box with the bounding box of its mask's pixels.
"""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from yoloq.config import AugmentConfig
from yoloq.train import augment
from yoloq.train.augment import (Augmenter, Sample, flip_horizontal, keep_boxes, letterbox_sample, mixup, mosaic,
                                 random_affine, resize_longest)
from yoloq.train.dataset import (AugmentedDataset, LabelledImages, check_labelled, collate_targets,
                                 first_labelled, read_coco_records)
from yoloq.train.errors import TrainError

TOL = 3.0     # pixels: bilinear resampling blurs mask edges by about one pixel per scaling step


def masked_sample(rng: np.random.Generator, channel: int, n: int = 2) -> Sample:
    """A random-size image whose boxes (class = channel) are drawn as 255 in that channel only."""
    h, w = int(rng.integers(120, 320)), int(rng.integers(120, 320))
    image = np.zeros((h, w, 3), np.uint8)
    boxes = []
    for _ in range(n):
        bw, bh = rng.integers(w // 8, w // 3), rng.integers(h // 8, h // 3)
        x1, y1 = rng.integers(2, w - bw - 2), rng.integers(2, h - bh - 2)
        boxes.append([x1, y1, x1 + bw, y1 + bh])
    boxes = np.array(boxes, np.float32)
    # keep one box per channel-connected blob: drop boxes that overlap an earlier one
    keep = [0] + [i for i in range(1, n) if not _overlaps(boxes[i], boxes[:i])]
    boxes = boxes[keep]
    for x1, y1, x2, y2 in boxes.astype(int):
        image[y1:y2, x1:x2, channel] = 255
    return Sample(image, boxes, np.full(len(boxes), channel))


def _overlaps(box, others, margin=3):
    return any(box[0] < o[2] + margin and o[0] < box[2] + margin and box[1] < o[3] + margin and o[1] < box[3] + margin
               for o in others)


def mask_boxes(image: np.ndarray, channel: int) -> list[np.ndarray]:
    """Bounding boxes (x1, y1, x2, y2, pixel edges) of the 4-connected blobs of one mask channel."""
    binary = (image[:, :, channel] > 127).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=4)
    return [np.array([x, y, x + w, y + h], np.float32) for x, y, w, h, _ in stats[1:n]]


def _contains(outer, inner) -> bool:
    return bool(inner[0] >= outer[0] - TOL and inner[1] >= outer[1] - TOL
                and inner[2] <= outer[2] + TOL and inner[3] <= outer[3] + TOL)


def _big(b, side=4.0) -> bool:
    return b[2] - b[0] >= side and b[3] - b[1] >= side


def assert_boxes_follow_masks(sample: Sample) -> None:
    """Every box lies on a blob of its class's channel, and every blob is exactly the hull of
    the boxes on it (one box, or several when same-channel mosaic tiles touch): no box lost,
    shifted, shrunk or invented. Slivers under 4 px are not checked (resampling can erase them)."""
    for channel in range(3):
        blobs = mask_boxes(sample.image, channel)
        boxes = sample.boxes[sample.classes == channel]
        for box in filter(_big, boxes):
            assert any(_contains(b, box) for b in blobs), f"box {box} (class {channel}) is on no mask blob: {blobs}"
        for blob in filter(_big, blobs):
            on_it = np.array([b for b in boxes if _contains(blob, b)]).reshape(-1, 4)
            assert len(on_it), f"mask blob {blob} (channel {channel}) lost its box"
            hull = np.array([*on_it[:, :2].min(0), *on_it[:, 2:].max(0)])
            assert np.abs(hull - blob).max() <= TOL, f"blob {blob} vs its boxes' hull {hull}"


@pytest.fixture(autouse=True)
def keep_every_visible_box(monkeypatch):
    """Boxes that become slivers or lose most of their area are dropped by design while their
    pixels stay; for the mask comparison keep every visible box (the rule is tested below)."""
    monkeypatch.setattr(augment, "MIN_BOX_SIDE", 0.0)
    monkeypatch.setattr(augment, "MIN_AREA_KEPT", 0.0)


# --------------------------------------------------------------------------- single steps


def test_flip_letterbox_resize_move_boxes_with_the_pixels():
    rng = np.random.default_rng(0)
    for channel in range(3):
        s = masked_sample(rng, channel)
        assert_boxes_follow_masks(s)                      # the rendering itself is right
        assert_boxes_follow_masks(flip_horizontal(s))
        assert_boxes_follow_masks(resize_longest(s, 160))
        assert_boxes_follow_masks(letterbox_sample(s, 256))


@pytest.mark.parametrize("seed", range(6))
def test_random_affine_with_rotation_and_shear_moves_boxes_with_the_pixels(seed):
    rng = np.random.default_rng(seed)
    s = masked_sample(rng, seed % 3, n=3)
    out = random_affine(s, rng, 256, degrees=10, translate=0.1, scale=0.5, shear=2)
    assert out.image.shape == (256, 256, 3)
    assert_boxes_follow_masks(out)


@pytest.mark.parametrize("seed", range(6))
def test_mosaic_keeps_boxes_on_their_tiles(seed):
    rng = np.random.default_rng(seed)
    # tiles 0 and 3 (diagonal) use channel 0, tiles 1 and 2 channel 1: neighbours never share one
    samples = [masked_sample(rng, c) for c in (0, 1, 1, 0)]
    out = mosaic(samples, rng, 160)
    assert out.image.shape == (320, 320, 3)
    assert_boxes_follow_masks(out)
    cropped = random_affine(out, rng, 160, degrees=0, translate=0.1, scale=0.5, shear=0)
    assert_boxes_follow_masks(cropped)


def test_mixup_blends_images_and_keeps_both_label_sets():
    rng = np.random.default_rng(1)
    a = letterbox_sample(masked_sample(rng, 0), 128)
    b = letterbox_sample(masked_sample(rng, 1), 128)
    m = mixup(a, b, np.random.default_rng(5))
    r = np.random.default_rng(5).beta(32.0, 32.0)
    expected = (a.image * r + b.image * (1 - r)).round()
    assert np.abs(m.image.astype(float) - expected).max() <= 1
    assert len(m.boxes) == len(a.boxes) + len(b.boxes) and sorted(set(m.classes)) == [0, 1]


# --------------------------------------------------------------------------- the whole pipeline


class MaskedImages(torch.utils.data.Dataset):
    def __init__(self, n=6, seed=0):
        rng = np.random.default_rng(seed)
        self.samples = [masked_sample(rng, i % 2) for i in range(n)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


GEOMETRIC = AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, degrees=5, translate=0.1, scale=0.5, shear=1, fliplr=0.5,
                          mosaic=0.7, mixup=0.0)


def test_pipeline_keeps_boxes_consistent_and_is_deterministic_per_seed():
    ds = AugmentedDataset(MaskedImages(), Augmenter(GEOMETRIC, 160), seed=3)
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds.sample(i)
            assert s.image.shape == (160, 160, 3)
            assert_boxes_follow_masks(s)
    ds.set_epoch(1)
    img_a, lab_a = ds[2]
    again = AugmentedDataset(MaskedImages(), Augmenter(GEOMETRIC, 160), seed=3)
    again.set_epoch(1)
    img_b, lab_b = again[2]
    assert torch.equal(img_a, img_b) and torch.equal(lab_a, lab_b)         # same seed, epoch, index
    other = AugmentedDataset(MaskedImages(), Augmenter(GEOMETRIC, 160), seed=4)
    other.set_epoch(1)
    assert not torch.equal(other[2][0], img_a)                              # another seed
    again.set_epoch(2)
    assert not torch.equal(again[2][0], img_a)                              # another epoch


def test_boxes_that_become_slivers_or_lose_most_area_are_dropped(monkeypatch):
    monkeypatch.undo()                                                      # the real thresholds
    before = np.array([[0, 0, 100, 100], [0, 0, 100, 100], [0, 0, 100, 100], [0, 0, 10, 10]], np.float32)
    after = np.array([[0, 0, 100, 100], [0, 0, 100, 9], [0, 0, 1.5, 50], [0, 0, 20, 20]], np.float32)
    # kept / 9% of the area left / 1.5 px wide / grown (a scale-up): kept
    assert keep_boxes(before, after, area_scale=1.0).tolist() == [True, False, False, True]


def test_augmented_items_and_collate():
    ds = AugmentedDataset(MaskedImages(4), Augmenter(AugmentConfig(mosaic=1.0, mixup=1.0), 128), seed=0)
    images, targets = collate_targets([ds[0], ds[1]])
    assert images.shape == (2, 3, 128, 128) and images.dtype == torch.float32 and images.max() <= 1
    assert targets.shape[1] == 6 and set(targets[:, 0].tolist()) <= {0.0, 1.0}
    assert (targets[:, 4] > targets[:, 2]).all() and (targets[:, 2:] >= 0).all() and (targets[:, 2:] <= 128).all()
    plain = AugmentedDataset(MaskedImages(4), Augmenter(AugmentConfig(), 128), augment=False)
    image, labels = plain[0]
    assert_boxes_follow_masks(Sample(image.numpy().transpose(1, 2, 0)[:, :, ::-1].copy(), labels[:, 1:].numpy(),
                                     labels[:, 0].numpy()))
    with pytest.raises(ValueError, match="augment.mosaic"):
        Augmenter(AugmentConfig(mosaic=1.5), 128)


# --------------------------------------------------------------------------- COCO records


def write_coco(tmp_path, annotations, extra=None):
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    images = []
    for i in (1, 2, 3):
        cv2.imwrite(str(folder / f"{i:012d}.jpg"), np.full((40, 60, 3), 100, np.uint8))
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": 60, "height": 40})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}], **(extra or {})}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return folder, ann


def test_read_coco_records(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 10]},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1},   # crowd: skipped
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [1, 1, 0, 4]},                 # zero width
            {"id": 4, "image_id": 3, "category_id": 3, "bbox": [2, 2, 4, 4]}]
    folder, ann = write_coco(tmp_path, anns, {"unlabeled_image_ids": [3]})
    records = read_coco_records(folder, ann)
    assert [r.image_id for r in records] == [1, 2]                  # image 3 is unlabeled, not empty
    assert records[0].boxes.tolist() == [[10, 5, 30, 15]] and records[0].classes.tolist() == [1]  # id 7 -> index 1
    assert len(records[1].boxes) == 0                               # a background image
    assert [r.image_id for r in first_labelled(records, 5)] == [1]
    sample = LabelledImages(records)[0]
    assert sample.image.shape == (40, 60, 3)
    check_labelled(records, "ann.json", nc=2)
    with pytest.raises(TrainError, match="class index 1 but the model has nc=1"):
        check_labelled(records, "ann.json", nc=1)


def test_a_dataset_without_labels_is_refused(tmp_path):
    folder, ann = write_coco(tmp_path, [])
    with pytest.raises(TrainError, match="none of its 3 images has a box; training needs labels"):
        check_labelled(read_coco_records(folder, ann), str(ann), nc=80)
    folder, ann = write_coco(tmp_path, [], {"unlabeled_image_ids": [1, 2, 3]})
    with pytest.raises(TrainError, match="no labelled images"):
        check_labelled(read_coco_records(folder, ann), str(ann), nc=80)
    bad = [{"id": 1, "image_id": 1, "category_id": 99, "bbox": [0, 0, 2, 2]}]
    folder, ann = write_coco(tmp_path, bad)
    with pytest.raises(TrainError, match="category_id 99, not in 'categories'"):
        read_coco_records(folder, ann)
