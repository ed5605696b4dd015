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
from conftest import needs_shared


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


def _bootstrap_weights(n_images, rows, seed):
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n_images, n_images), minlength=n_images).astype(float)
                     for _ in range(rows)])


def _loop_interval(reference, candidate, resamples, level=0.95, seed=0):
    """The bootstrap as first written: one resample at a time through MatchTable.ap."""
    n = len(reference.image_ids)
    rng = np.random.default_rng(seed)
    drops = []
    for _ in range(resamples):
        w = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        drops.append(reference.ap(w) - candidate.ap(w))
    tail = (1 - level) / 2 * 100
    return np.percentile(np.asarray(drops) * 100, [tail, 100 - tail])


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_ap_equals_the_per_resample_ap(tmp_path, seed):
    """ap_batch (true-positive columns only, recall points counted per column) = ap row by row,
    on resamples that drop images, double them and leave categories without ground truth; the
    crowd boxes give columns ignored at some IoU thresholds and not at others."""
    gt_path, anns, ids = _synthetic(tmp_path, n_images=30, seed=20 + seed)
    dets = _detections(anns, len(ids), noise=0.07, seed=30 + seed)
    table = match_table(str(gt_path), dets, ids)
    assert any(len(ign) for c in table.categories for ign in c.ignored_cols)
    weights = np.concatenate([np.ones((1, len(ids))), _bootstrap_weights(len(ids), 60, seed)])
    weights[-1, :] = 0.0
    weights[-1, :3] = [1, 2, 0]                                   # most categories without ground truth
    expected = np.array([table.ap(w) for w in weights])
    np.testing.assert_allclose(table.ap_batch(weights), expected, rtol=0, atol=1e-13)


def test_batched_bootstrap_equals_the_loop(tmp_path):
    gt_path, anns, ids = _synthetic(tmp_path, n_images=50, seed=40)
    ref = match_table(str(gt_path), _detections(anns, len(ids), noise=0.03, seed=41), ids)
    cand = match_table(str(gt_path), _detections(anns, len(ids), noise=0.1, seed=41), ids)
    fast = paired_bootstrap(ref, cand, resamples=230, seed=3)           # more than one chunk
    np.testing.assert_allclose([fast.low, fast.high], _loop_interval(ref, cand, 230, seed=3), rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- in the PTQ report


def test_report_shows_the_interval_next_to_the_drop():
    from yoloq.report.ptq import format_summary, render_markdown
    ci = {"reference_ap": 23.1, "candidate_ap": 22.6, "drop": 0.5, "low": 0.21, "high": 0.83, "level": 0.95,
          "resamples": 1000, "images": 500, "seed": 0}
    report = {"name": "r", "fp32": {"AP": 0.231}, "int8": {"AP": 0.226}, "drop": {"AP": 0.5}, "drop_ci": ci}
    assert "AP drop **0.50 (95% CI 0.21–0.83)**" in render_markdown(report)
    assert "drop 0.50 (95% CI 0.21–0.83) points" in format_summary(report)
    del report["drop_ci"]
    assert "CI" not in render_markdown(report) and "drop 0.50 points" in format_summary(report)


def test_bootstrap_key_is_checked():
    from yoloq.config import ConfigError
    from yoloq.config.sections import EvalConfig
    with pytest.raises(ConfigError, match="eval.bootstrap"):
        EvalConfig(bootstrap=-1)
    with pytest.raises(ConfigError, match="eval.bootstrap"):
        EvalConfig(bootstrap=0.5)


@pytest.mark.slow
@needs_shared
def test_ptq_report_carries_the_drop_interval(tmp_path):
    """run_ptq on 8 val images: drop_ci's drop (from the bootstrap's own match table) is the
    report's pycocotools drop, the interval holds it, report.md and the summary print it; with
    eval.bootstrap 0 there is none."""
    from yoloq.recipes.ptq import run_ptq
    from yoloq.report.ptq import format_summary
    common = dict(out=str(tmp_path / "runs"), plots=False, save_model=False, max_images=8, progress=False,
                  quant={"calibration.images": 8, "calibration.method": "max", "sensitivity.metric": "off",
                         "diagnose": False})
    res = run_ptq("yolov6lite_s", name="ci", eval={"workers": 0, "bootstrap": 50}, **common)
    ci = res.report["drop_ci"]
    assert ci["images"] == 8 and ci["resamples"] == 50 and ci["level"] == 0.95
    assert ci["drop"] == pytest.approx(res.report["drop"]["AP"], abs=1e-9)
    assert ci["low"] <= ci["drop"] <= ci["high"] and ci["low"] < ci["high"]
    text = f"{ci['drop']:.2f} (95% CI {ci['low']:.2f}–{ci['high']:.2f})"
    assert text in (tmp_path / "runs" / "ci" / "report.md").read_text() and text in format_summary(res.report)
    assert "bootstrap" in res.timings
    off = run_ptq("yolov6lite_s", name="off", eval={"workers": 0, "bootstrap": 0}, **common)
    assert off.report["drop_ci"] is None and "bootstrap" not in off.timings


@pytest.mark.slow
@needs_shared
def test_batched_bootstrap_equals_the_loop_on_real_detections():
    """Lite-S FP32 and a plainly calibrated INT8 model on 40 val images: real detections (hundreds
    per image, scores tied at 4 decimals, crowd boxes). The batched bootstrap gives the interval of
    the per-resample loop, and each resample's AP equals MatchTable.ap; the table an evaluation
    keeps equals a fresh match."""
    from yoloq.eval.coco_eval import evaluate_model
    from yoloq.models import load_model
    from yoloq.quant.recipe import Calibrate, Prepare, quantize
    from yoloq.recipes.common import load_calibration_set
    from yoloq.recipes.ptq import resolve
    cfg, data_cfg = resolve("yolov6lite_s", eval={"workers": 0})
    fp32 = load_model(cfg.model).eval()
    calib = load_calibration_set(data_cfg, 8, cfg.model.img_size, 8, 0, 0)
    int8 = quantize(fp32, [Prepare(), Calibrate("max")], calib.batches)
    ref_eval, cand_eval = (evaluate_model(m, data_cfg, cfg.eval, cfg.model.img_size, max_images=40, progress=False)
                           for m in (fp32, int8))
    ref, cand = ref_eval.matches, cand_eval.matches
    fresh = match_table(ref_eval.ann_file, ref_eval.detections.to_list(), ref_eval.image_ids)
    assert ref.ap() == fresh.ap() == pytest.approx(ref_eval.stats["AP"], abs=1e-12)
    weights = _bootstrap_weights(40, 30, seed=5)
    for table in (ref, cand):
        np.testing.assert_allclose(table.ap_batch(weights), [table.ap(w) for w in weights], rtol=0, atol=1e-13)
    fast = paired_bootstrap(ref, cand, resamples=150, seed=2)
    np.testing.assert_allclose([fast.low, fast.high], _loop_interval(ref, cand, 150, seed=2), rtol=0, atol=1e-9)


@pytest.mark.slow
@needs_shared
def test_bench_ptq_rows_carry_the_drop_interval(tmp_path):
    from yoloq.cli import main as yoloq_main
    from yoloq.report.ptq import load_report
    yoloq_main(["bench-ptq", "--cfg", "yolov6lite_s", "--calib-images", "4", "--max-images", "6", "--workers", "0",
                "--methods", "max", "--skip-ort", "--bootstrap", "40", "--out", str(tmp_path / "b"), "--name", "t",
                "--no-progress"])
    bench = load_report(tmp_path / "b" / "t" / "bench.json")
    (row,) = bench["rows"]
    ci = row["drop_ci"]
    assert ci["images"] == 6 and ci["resamples"] == 40 and ci["drop"] == pytest.approx(row["drop"]["AP"], abs=1e-9)
    assert ci["low"] <= ci["drop"] <= ci["high"]
    assert f"{ci['drop']:.2f} (95% CI {ci['low']:.2f}–{ci['high']:.2f})" in (tmp_path / "b" / "t" / "bench.md").read_text()


@pytest.mark.slow
@needs_shared
def test_qat_report_carries_the_ptq_and_qat_drop_intervals(tmp_path):
    """FP32, PTQ and the best QAT epoch are evaluated on the same images: both drops get their
    interval, each the report's own drop, and report.md prints them."""
    from yoloq.recipes.ptq import run_ptq
    from yoloq.recipes.qat.run import run_qat
    run_ptq("yolov6lite_s", out=str(tmp_path / "ptq"), name="p", progress=False, plots=False, max_images=6,
            eval={"workers": 0, "bootstrap": 0},
            quant={"calibration.method": "max", "calibration.images": 8, "sensitivity.metric": "off",
                   "diagnose": False, "transforms.images": 8})
    result = run_qat("yolov6lite_s", from_dir=str(tmp_path / "ptq" / "p"), max_images=6, out=str(tmp_path / "qat"),
                     progress=False, eval={"workers": 0, "bootstrap": 40},
                     qat={"quantizer": "pact", "epochs": 1, "images": 8, "batch_size": 4, "workers": 0})
    r = result.report
    for key in ("ptq", "qat"):
        ci = r["drop_ci"][key]
        assert ci["images"] == 6 and ci["resamples"] == 40
        assert ci["drop"] == pytest.approx(r["drop"][key]["AP"], abs=1e-9) and ci["low"] <= ci["drop"] <= ci["high"]
    ci = r["drop_ci"]["qat"]
    assert f"QAT best **{ci['drop']:.2f} (95% CI {ci['low']:.2f}–{ci['high']:.2f})**" in \
        (result.out_dir / "report.md").read_text()
