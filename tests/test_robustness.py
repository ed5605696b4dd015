"""yoloq bench-robustness: disjoint calibration sets and set sizes, each row reproducible by one
``yoloq ptq`` command."""
from __future__ import annotations


import pytest

from yoloq.bench.robustness import calibration_sets, spread
from yoloq.data import load_data_config
from conftest import REPO, assert_one_line_usage_error, needs_shared, tiny_coco


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


def test_row_checkpoint_keeps_rows_and_refuses_what_would_mix_or_drop_them(tmp_path):
    from yoloq.bench.row_checkpoint import RowCheckpoint, checkpoint_path
    from yoloq.errors import InputError
    final = tmp_path / "r"
    settings = {"config": {"quant": {"seed": 0}}, "sets": 3, "env": {"threads": 2}}
    first = RowCheckpoint(final, settings, resume=False)
    kept = first.add("disjoint 1/3", {"int8_ap": 22.5, "drop_ci": {"low": -0.1, "high": float("nan")}, "n": (1, 2)})
    assert checkpoint_path(final).is_file() and kept == {"int8_ap": 22.5, "drop_ci": {"low": -0.1, "high": None},
                                                         "n": [1, 2]}          # as bench.json will hold it
    again = RowCheckpoint(final, settings, resume=True)
    assert again.get("disjoint 1/3") == kept and again.get("disjoint 2/3") is None
    with pytest.raises(InputError, match=r"r\.rows\.json: an interrupted run of r left 1 finished row\(s\); --resume"):
        RowCheckpoint(final, settings, resume=False)           # hours of rows are never dropped silently
    other = {**settings, "env": {"threads": 1}}
    with pytest.raises(InputError, match=r"other settings than the interrupted run: env\.threads: 2 -> 1\."):
        RowCheckpoint(final, other, resume=True)
    again.remove()
    assert not checkpoint_path(final).exists() and RowCheckpoint(final, other, resume=True).rows == {}
    checkpoint_path(final).write_text("{not json")
    with pytest.raises(InputError, match=r"r\.rows\.json: unreadable row checkpoint .*delete it to start over"):
        RowCheckpoint(final, settings, resume=True)


@pytest.mark.slow
@needs_shared
def test_an_interrupted_run_resumes_to_what_an_uninterrupted_run_writes(tmp_path):
    """A real interruption (SIGINT after the first row is on disk): no run folder, the row kept; a
    rerun without --resume is refused; --resume computes only the missing row, and its bench.json
    rows equal those of a run that was never interrupted."""
    import json
    import signal
    import subprocess
    import sys
    import time
    from yoloq.bench.row_checkpoint import checkpoint_path
    settings = ["--set", "quant.calibration.method=max", "--sets", "2", "--set-images", "8", "--sizes",
                "--no-alpha-search", "--max-images", "6", "--bootstrap", "30", "--workers", "0", "--no-progress"]
    out, final = tmp_path / "b", tmp_path / "b" / "r"
    cmd = [sys.executable, str(REPO / "tools" / "bench_robustness.py"), "--cfg", "yolov6lite_s", *settings,
           "--out", str(out), "--name", "r"]
    ckpt = checkpoint_path(final)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not (ckpt.is_file() and json.loads(ckpt.read_text())["rows"]):
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.communicate()[1]}"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and not final.exists()
    kept = json.loads(ckpt.read_text())["rows"]
    assert [r["label"] for r in kept] == ["disjoint 1/2"]

    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume continues it" in refused.stderr and not final.exists()

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    bench = json.loads((final / "bench.json").read_text())
    assert bench["resumed_rows"] == 1 and bench["rows"][0] == kept[0]["row"] and not ckpt.exists()

    whole = subprocess.run([*cmd[:-4], "--out", str(tmp_path / "w"), "--name", "r"], capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    uninterrupted = json.loads((tmp_path / "w" / "r" / "bench.json").read_text())["rows"]

    def numbers(row):                               # where the row was written and how long it took differ
        return {k: v for k, v in row.items() if k not in ("data_yaml", "seconds")}
    assert [numbers(r) for r in bench["rows"]] == [numbers(r) for r in uninterrupted]
    assert bench["rows"][0]["int8_ap"] != bench["rows"][1]["int8_ap"]
