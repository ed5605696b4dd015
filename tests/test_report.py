"""yoloq.report: Markdown / JSON / PNG contents and atomic writes."""
from __future__ import annotations

import json

import pytest

from yoloq.io import atomic_write_text, to_json
from yoloq.report.common import MAIN_STATS, stat_drop
from yoloq.report.ptq import format_summary, load_report, render_markdown, write_report

FP32 = {"AP": 0.231, "AP50": 0.351, "AP75": 0.247, "APs": 0.058, "APm": 0.205, "APl": 0.409, "AR100": 0.41}
INT8 = {"AP": 0.219, "AP50": 0.340, "AP75": 0.231, "APs": 0.050, "APm": 0.190, "APl": 0.400, "AR100": 0.40}


def sample_report() -> dict:
    return {
        "name": "lite_s_mse",
        "model": {"name": "yolov6lite_s", "arch": "lite", "weights": "w.pt", "img_size": 320},
        "config": {"path": "configs/yolov6lite_s.yaml"},
        "data": {"ann_file": "instances_val2017.json", "eval_images": 500},
        "calibration": {"requested": "auto", "method": "mse", "images": 256, "seed": 0,
                        "auto_errors": {"max": {"sqnr_db": 10.0, "score_sqnr_db": 5.0, "box_sqnr_db": 15.0},
                                        "mse": {"sqnr_db": 14.5, "score_sqnr_db": 9.0, "box_sqnr_db": 20.0}}},
        "fp32": FP32, "int8": INT8, "drop": stat_drop(FP32, INT8),
        "skipped_layers": ["backbone.conv_0.block.conv"],
        "partial": {"mode": "--max-drop 1.0", "k": 1, "metric": "AP drop", "search": [{"k": 0, "drop": 1.5},
                                                                                     {"k": 1, "drop": 0.8}]},
        "sensitivity": {"mode": "quantize-one", "metric": "output SQNR", "images": 32, "seconds": 3.0,
                        "ranking": [{"rank": 1, "layer": "backbone.conv_0.block.conv", "score": -12.0,
                                     "sqnr_db": 12.0, "score_sqnr_db": 8.0, "box_sqnr_db": 16.0},
                                    {"rank": 2, "layer": "detect.cls_preds.0", "score": -30.0,
                                     "sqnr_db": 30.0, "score_sqnr_db": 28.0, "box_sqnr_db": 32.0}]},
        "diagnosis": {"thresholds": {"sqnr_db": 20.0}, "layers": [
            {"layer": "backbone.conv_0.block.conv", "w_std": 0.1, "w_absmax": 2.0, "w_outlier_ratio": 0.0,
             "w_channel_spread": 300.0, "w_sqnr_db": 40.0, "w_sqnr_per_tensor_db": 12.0, "act_amax": 1.0,
             "act_channel_spread": 2.0, "act_sqnr_db": float("nan"), "flags": ["weight channel spread"]},
            {"layer": "detect.cls_preds.0", "w_std": 0.1, "w_absmax": 0.5, "w_outlier_ratio": 0.0,
             "w_channel_spread": 3.0, "w_sqnr_db": 41.0, "w_sqnr_per_tensor_db": 38.0, "act_amax": 4.0,
             "act_channel_spread": 5.0, "act_sqnr_db": 33.0, "flags": []}]},
        "timings": {"calibrate": 12.5, "eval_int8": 40.0},
        "notes": ["a note"],
    }


def test_stat_drop_is_difference_in_points():
    drop = stat_drop(FP32, INT8)
    assert set(drop) == set(MAIN_STATS)
    for k in MAIN_STATS:
        assert drop[k] == pytest.approx((FP32[k] - INT8[k]) * 100, abs=1e-6)
    assert "AP" not in stat_drop({"AP": -1.0}, {"AP": 0.1})      # -1: COCOeval had nothing to score


def test_write_report_json_markdown_and_plots(tmp_path):
    paths = write_report(sample_report(), tmp_path)
    names = {p.name for p in paths}
    assert names == {"report.json", "report.md", "stats.png", "sensitivity.png", "diagnosis.png"}
    for png in ("stats.png", "sensitivity.png", "diagnosis.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = load_report(tmp_path / "report.json")
    for k in MAIN_STATS:
        assert data["drop"][k] == pytest.approx((data["fp32"][k] - data["int8"][k]) * 100, abs=1e-6)
    assert data["diagnosis"]["layers"][0]["act_sqnr_db"] is None           # NaN -> null (strict JSON)
    assert set(data["files"]) >= names
    md = (tmp_path / "report.md").read_text()
    assert "| AP | 23.10 | 21.90 | 1.20 |" in md
    assert "| AP50 | 35.10 | 34.00 | 1.10 |" in md
    assert "| mse | 14.50 | 9.00 | 20.00 |" in md                            # auto's per-method errors
    assert "| 1 | `backbone.conv_0.block.conv` | 12.00 |" in md                 # sensitivity ranking
    assert "Layers kept in floating point (1): `backbone.conv_0.block.conv`" in md
    assert "| calibrate | 12.5 |" in md
    assert "![stats](stats.png)" in md
    # every Markdown table row has the same number of cells as its header
    for block in md.split("\n\n"):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        if rows:
            assert len({line.count("|") for line in rows}) == 1, block
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_json_is_strict_and_summary_mentions_drop():
    text = to_json({"a": float("inf"), "b": [1.0, float("nan")]})
    assert json.loads(text) == {"a": None, "b": [1.0, None]}
    assert "NaN" not in text and "Infinity" not in text
    assert "drop 1.20 points" in format_summary(sample_report())


def test_markdown_without_optional_sections():
    rep = sample_report()
    for key in ("sensitivity", "diagnosis", "partial", "timings", "notes"):
        rep.pop(key)
    rep["skipped_layers"] = []
    rep["calibration"].pop("auto_errors")
    md = render_markdown(rep)
    assert "Layers kept in floating point (0): none." in md
    assert "Per-layer sensitivity" not in md and "Calibration methods" not in md


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "sub" / "x.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["x.txt"]
    with pytest.raises(TypeError):
        to_json({"bad": object()})
