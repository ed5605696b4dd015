"""yoloq bench-robustness: disjoint calibration sets and set sizes, each row reproducible by one
``yoloq ptq`` command."""
from __future__ import annotations


import pytest

from yoloq.bench.robustness import calibration_sets, spread
from yoloq.data import load_data_config
from conftest import assert_one_line_usage_error, needs_shared, tiny_coco


def test_disjoint_sets_are_disjoint_slices_written_as_data_yamls(tmp_path):
    data = load_data_config(tiny_coco(tmp_path))
    sets = calibration_sets(data, seed=0, sets=2, set_images=3, sizes=[2, 5], write_dir=tmp_path, final_dir=tmp_path)
    assert [s.label for s in sets] == ["disjoint 1/2", "disjoint 2/2", "first 2", "first 5"]
    a, b = (set(s.data.train_files) for s in sets[:2])
    assert len(a) == len(b) == 3 and not a & b
    for s in sets[:2]:                                   # the YAML reads back as the same images
        assert sorted(load_data_config(s.data_yaml).train_files) == sorted(s.data.train_files)
    assert sets[2].data.train_files is None and sets[3].images == 5
    with pytest.raises(Exception, match="need 9 readable train images, found 6"):
        calibration_sets(data, seed=0, sets=3, set_images=3, sizes=[], write_dir=tmp_path, final_dir=tmp_path)


def test_spread_per_kind():
    rows = [{"kind": "disjoint", "drop": 0.4}, {"kind": "disjoint", "drop": 0.7}, {"kind": "size", "drop": 0.5}]
    assert spread(rows) == {"disjoint": {"min": 0.4, "max": 0.7, "range": pytest.approx(0.3)},
                            "size": {"min": 0.5, "max": 0.5, "range": 0.0}}


def test_nothing_to_measure_is_a_one_line_error(tmp_path):
    assert_one_line_usage_error("bench_robustness.py", ["--cfg", "yolov6lite_s", "--sets", "0", "--sizes"], tmp_path,
                                "error: nothing to measure: --sets 0 and no --sizes")


@pytest.mark.slow
@needs_shared
def test_rows_are_what_yoloq_ptq_gives_on_the_same_images(tmp_path):
    """A disjoint set's row = ``yoloq ptq --data calib_set_1.yaml --calib-images N``; a size row =
    ``yoloq ptq --calib-images N``; the α search scores the candidates on each set."""
    from yoloq.cli import main as yoloq_main
    from yoloq.recipes.ptq import run_ptq
    from yoloq.report.ptq import load_report
    alphas = "quant.transforms.channel_scale_alphas=[0.8,0.9]"
    method = "quant.calibration.method=max"                 # auto scores four methods per layer: slow, not the point
    assert yoloq_main(["bench-robustness", "--cfg", "yolov6lite_s", "--set", alphas, method, "--sets", "2",
                       "--set-images", "8", "--sizes", "8", "--max-images", "6", "--bootstrap", "30", "--workers", "0",
                       "--out", str(tmp_path / "b"), "--name", "r", "--no-progress"]) == 0
    bench = load_report(tmp_path / "b" / "r" / "bench.json")
    rows = {r["set"]: r for r in bench["rows"]}
    assert list(rows) == ["disjoint 1/2", "disjoint 2/2", "first 8"] and bench["eval_images"] == 6
    for r in rows.values():
        assert r["drop"] == pytest.approx(bench["fp32_ap"] - r["int8_ap"], abs=1e-9)
        assert r["drop_ci"]["resamples"] == 30 and r["drop_ci"]["low"] <= r["drop"] <= r["drop_ci"]["high"]
        search = r["alpha_search"]
        assert search["chosen"] in (0.8, 0.9) and len(search["trials"]) == 2
        assert ("at_chosen" in r) == (search["chosen"] != r["alpha"])
    common = dict(out=str(tmp_path / "p"), plots=False, save_model=False, max_images=6, progress=False,
                  eval={"workers": 0, "bootstrap": 0}, quant={"calibration.images": 8, "sensitivity.metric": "off",
                                                              "diagnose": False, "calibration.method": "max"})
    by_set = run_ptq("yolov6lite_s", name="set1", data=rows["disjoint 1/2"]["data_yaml"], **common)
    by_size = run_ptq("yolov6lite_s", name="size8", **common)
    assert by_set.int8["AP"] * 100 == pytest.approx(rows["disjoint 1/2"]["int8_ap"], abs=1e-9)
    assert by_size.int8["AP"] * 100 == pytest.approx(rows["first 8"]["int8_ap"], abs=1e-9)
    assert rows["disjoint 1/2"]["int8_ap"] != rows["disjoint 2/2"]["int8_ap"]
