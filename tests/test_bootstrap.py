"""The paired bootstrap of an AP difference: unit weights reproduce pycocotools exactly (an
independent oracle: COCOeval.accumulate/summarize), and the interval behaves as an interval."""
import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from yoloq.eval.bootstrap import drop_interval, match_table, paired_bootstrap


def _synthetic(tmp_path, n_images=40, seed=0):
    """Ground truth with 4 categories of mixed sizes (some crowd), written as COCO JSON."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480})
        for _ in range(int(rng.integers(0, 6))):
            w, h = rng.uniform(8, 200, 2)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.integers(1, 5)),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.05)})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": c, "name": str(c)} for c in range(1, 5)]}))
    return path, anns, [im["id"] for im in images]


def _detections(anns, n_images, noise, seed):
    """Jittered copies of the ground truth (some missed, some wrong class) plus false positives;
    scores rounded so that ties occur."""
    rng = np.random.default_rng(seed)
    dets = []
    for a in anns:
        if rng.random() < 0.2:
            continue
        x, y, w, h = a["bbox"]
        jitter = rng.normal(0, noise, 4) * [w, h, w, h]
        cat = a["category_id"] if rng.random() > 0.1 else int(rng.integers(1, 5))
        dets.append({"image_id": a["image_id"], "category_id": cat, "score": round(float(rng.uniform(0.2, 1)), 2),
                     "bbox": [x + jitter[0], y + jitter[1], max(1, w + jitter[2]), max(1, h + jitter[3])]})
    for _ in range(3 * n_images):
        w, h = rng.uniform(8, 150, 2)
        dets.append({"image_id": int(rng.integers(1, n_images + 1)), "category_id": int(rng.integers(1, 5)),
                     "score": round(float(rng.uniform(0.03, 0.6)), 2),
                     "bbox": [float(rng.uniform(0, 500)), float(rng.uniform(0, 380)), w, h]})
    return dets


def _pycocotools_stats(gt_path, dets, image_ids):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unit_weights_reproduce_pycocotools(tmp_path, seed):
    gt_path, anns, ids = _synthetic(tmp_path, seed=seed)
    dets = _detections(anns, len(ids), noise=0.08, seed=seed + 10)
    table = match_table(str(gt_path), dets, ids)
    stats = _pycocotools_stats(gt_path, dets, ids)
    assert table.ap() == pytest.approx(stats[0], abs=1e-12)
    assert table.ap(iou_index=0) == pytest.approx(stats[1], abs=1e-12)


def test_integer_weights_equal_a_duplicated_image_set(tmp_path):
    """Weight 2 on an image = that image twice: checked against pycocotools on a GT file where the
    image really is duplicated (new ids), with score ties broken apart so the orders agree."""
    gt_path, anns, ids = _synthetic(tmp_path, n_images=12, seed=3)
    dets = _detections(anns, len(ids), noise=0.05, seed=4)
    for k, d in enumerate(dets):
        d["score"] = round(d["score"] + k * 1e-7, 9)
    table = match_table(str(gt_path), dets, ids)
    weights = np.ones(len(ids))
    weights[[0, 5]] = 2.0
    weights[[3]] = 0.0
    gt = json.loads(gt_path.read_text())
    dup = {1: 1001, 6: 1006}
    gt["images"] = [im for im in gt["images"] if im["id"] != 4] + [
        {**im, "id": dup[im["id"]]} for im in gt["images"] if im["id"] in dup]
    extra = [{**a, "id": 10_000 + a["id"], "image_id": dup[a["image_id"]]} for a in gt["annotations"]
             if a["image_id"] in dup]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] != 4] + extra
    dup_path = tmp_path / "dup.json"
    dup_path.write_text(json.dumps(gt))
    dup_dets = [d for d in dets if d["image_id"] != 4] + [{**d, "image_id": dup[d["image_id"]], "score": d["score"] - 5e-8}
                                                         for d in dets if d["image_id"] in dup]
    stats = _pycocotools_stats(dup_path, dup_dets, [im["id"] for im in gt["images"]])
    assert table.ap(weights) == pytest.approx(stats[0], abs=1e-3)


def test_interval_contains_the_drop_and_shrinks_with_identical_models(tmp_path):
    gt_path, anns, ids = _synthetic(tmp_path, n_images=60, seed=5)
    good = _detections(anns, len(ids), noise=0.03, seed=6)
    worse = _detections(anns, len(ids), noise=0.12, seed=6)
    interval = drop_interval(str(gt_path), good, worse, ids, resamples=200, seed=1)
    assert interval.drop > 0 and interval.low <= interval.drop <= interval.high
    assert interval.low < interval.high
    same = paired_bootstrap(match_table(str(gt_path), good, ids), match_table(str(gt_path), good, ids), 50)
    assert same.drop == 0 and same.low == 0 and same.high == 0
    assert "95% CI" in interval.text()
    again = drop_interval(str(gt_path), good, worse, ids, resamples=200, seed=1)
    assert again == interval                                   # seeded: reproducible


def test_no_detections_scores_zero(tmp_path):
    gt_path, anns, ids = _synthetic(tmp_path, n_images=10, seed=7)
    assert match_table(str(gt_path), [], ids).ap() == 0.0


def test_unpaired_inputs_are_refused(tmp_path):
    gt_path, anns, ids = _synthetic(tmp_path, n_images=10, seed=8)
    dets = _detections(anns, len(ids), noise=0.05, seed=9)
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(match_table(str(gt_path), dets, ids), match_table(str(gt_path), dets, ids[:5]))


def test_weighted_recall_thresholds_are_compared_exactly(tmp_path):
    """Recall = 3/10 must not reach the recall point 0.3 (COCO compares the float values as they
    are); a vectorised shortcut that shifted rows by a constant changed such ties."""
    gt_path, anns, ids = _synthetic(tmp_path, n_images=40, seed=11)
    dets = _detections(anns, len(ids), noise=0.06, seed=12)
    table = match_table(str(gt_path), dets, ids)
    rng = np.random.default_rng(0)
    for _ in range(20):
        w = np.bincount(rng.integers(0, len(ids), len(ids)), minlength=len(ids)).astype(float)
        expected = []
        for cat in table.categories:
            n_gt = float(np.dot(w, cat.gt_per_image))
            if n_gt == 0:
                continue
            wd = w[cat.image_index]
            values = []
            for tp_row, fp_row in zip(np.cumsum(cat.true_pos * wd, 1), np.cumsum(cat.false_pos * wd, 1)):
                rc = tp_row / n_gt
                pr = list(tp_row / (fp_row + tp_row + np.spacing(1)))
                for i in range(len(pr) - 1, 0, -1):          # COCOeval.accumulate's loop, as written there
                    pr[i - 1] = max(pr[i - 1], pr[i])
                q = [pr[i] if i < len(pr) else 0.0 for i in np.searchsorted(rc, table.recall_points, side="left")]
                values.append(np.mean(q))
            expected.append(np.mean(values))
        assert table.ap(w) == pytest.approx(np.mean(expected), abs=1e-12)
