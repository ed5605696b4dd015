"""yoloq bench-alpha: each α quantized as ``yoloq ptq --channel-scale-alpha A`` builds it, judged on
labelled train images that are not calibration images."""
from __future__ import annotations

import json

import pytest

from yoloq.recipes.partial import selection_data
from yoloq.data import load_data_config
from conftest import assert_one_line_usage_error, needs_shared, tiny_coco


def test_alpha_outside_0_1_is_a_one_line_error(tmp_path):
    assert_one_line_usage_error("bench_alpha.py", ["--cfg", "yolov6lite_s", "--alphas", "0.8", "1.5"], tmp_path,
                                "error: --alphas: numbers in [0, 1] expected, got [0.8, 1.5]")


def test_held_out_set_never_holds_a_calibration_image(tmp_path):
    data = load_data_config(tiny_coco(tmp_path))
    gt = json.loads(open(data.train_ann).read())
    names = sorted(im["file_name"] for im in gt["images"])
    calib = names[:2]
    held, info = selection_data(data, calib, None, 0, tmp_path, held_out=True)
    chosen = {im["file_name"] for im in json.loads(open(held.val_ann).read())["images"]}
    assert chosen and not chosen & set(calib) and info["images"] == info["disjoint_from_calibration"] == len(chosen)
    mixed, _ = selection_data(data, calib, len(names), 0, tmp_path)       # the max-drop set reuses them last
    assert set(calib) <= {im["file_name"] for im in json.loads(open(mixed.val_ann).read())["images"]}
    with pytest.raises(Exception, match="outside the calibration images"):
        selection_data(data, names, None, 0, tmp_path, held_out=True)


@pytest.mark.slow
@needs_shared
def test_rows_are_the_models_yoloq_ptq_builds(tmp_path):
    """The config's α row = ``yoloq ptq`` at that α (same val AP); the held-out drop and the
    comparison with the config's α are computed on the same held-out images; auto's pick is the
    candidate with the best proxy score."""
    from yoloq.cli import main as yoloq_main
    from yoloq.recipes.ptq import run_ptq
    from yoloq.report.ptq import load_report
    small = ["quant.calibration.images=16", "quant.calibration.method=max", "quant.transforms.images=8",
             "quant.calibration.auto_images=8"]
    assert yoloq_main(["bench-alpha", "--cfg", "yolov6lite_s", "--alphas", "0.8", "--set", *small,
                       "--held-out-images", "12", "--val", "--max-images", "6", "--bootstrap", "30",
                       "--workers", "0", "--out", str(tmp_path / "b"), "--name", "a", "--no-progress"]) == 0
    bench = load_report(tmp_path / "b" / "a" / "bench.json")
    rows = {r["alpha"]: r for r in bench["rows"]}
    assert list(rows) == [0.8, 0.9] and bench["config_alpha"] == 0.9        # the config's own α is added
    assert bench["held_out"]["images"] == bench["held_out"]["disjoint_from_calibration"] == 12
    for r in rows.values():
        assert r["held_out"]["drop"] == pytest.approx(bench["fp32_held_out_ap"] - r["held_out_ap"], abs=1e-9)
        ci = r["held_out"]["ci"]
        assert ci["resamples"] == 30 and ci["images"] == 12 and ci["low"] <= r["held_out"]["drop"] <= ci["high"]
        assert r["vs_default"]["drop"] == pytest.approx(rows[0.9]["held_out_ap"] - r["held_out_ap"], abs=1e-9)
    assert rows[0.9]["vs_default"]["drop"] == 0.0
    assert bench["auto_alpha"] == max(rows, key=lambda a: rows[a]["proxy_sqnr_db"])
    assert {r["proxy_calib"] for r in rows.values()} == {"max"}             # scored under the run's calibration
    ptq = run_ptq("yolov6lite_s", name="p", out=str(tmp_path / "p"), plots=False, save_model=False, max_images=6,
                  progress=False, eval={"workers": 0, "bootstrap": 0},
                  quant={"calibration.images": 16, "calibration.method": "max", "transforms.images": 8,
                         "calibration.auto_images": 8, "sensitivity.metric": "off", "diagnose": False})
    assert ptq.int8["AP"] * 100 == pytest.approx(rows[0.9]["val_ap"], abs=1e-9)
    assert "| 0.8 | max |" in (tmp_path / "b" / "a" / "bench.md").read_text()
