"""yoloq bench-cost: the cost model's arithmetic on recorded timings, the child-process measurement,
the random checkpoint with the head prior, and one tiny real run (slow)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, needs_shared
from yoloq.bench.cost import (COCO_VAL2017, RATIO_LIMIT, SHARED_VAL, CostError, RunRecord, Scale, findings,
                              model_cost, model_cost_from_dict, stage_table, summary_table)
from yoloq.bench.cost_run import (CANDIDATE_FRACTION, PRIOR_PROB, cpu_snapshot, fixed_counts, other_cpus,
                                  random_checkpoint, run_child, too_few_calibration_images)
from yoloq.cli.bench_cost import split_passthrough

# Lite-S default run on the 500 val images, 2 quiet cores (docs/results.md): 77.1 s = 5.4x 14.3 s
RECORDED = {"load": 0.8, "channel_scale": 0.6, "calibrate": 16.6, "bias_correction": 6.5, "eval_fp32": 14.3,
            "sensitivity": 15.0, "diagnose": 0.6, "eval_int8": 22.6}


def linear_run(scale: Scale, fixed: dict, per_eval: dict, per_calib: dict, other: float = 1.0,
               startup: float = 4.0, rss: float = 900.0) -> RunRecord:
    """A run whose stages follow known linear costs."""
    t = dict(fixed)
    t.update({k: a + b * scale.eval_images for k, (a, b) in per_eval.items()})
    t.update({k: a + b * scale.calib_images for k, (a, b) in per_calib.items()})
    total = sum(t.values()) + other
    return RunRecord(scale, {**t, "total": total}, wall_s=total + startup, peak_rss_mb=rss)


FIXED = {"load": 0.8, "channel_scale": 0.6, "bias_correction": 6.5, "sensitivity": 15.0, "diagnose": 0.6}
PER_EVAL = {"eval_fp32": (2.0, 0.0246), "eval_int8": (2.5, 0.0402)}
PER_CALIB = {"load_calibration_images": (0.2, 0.011), "calibrate": (6.0, 0.041)}


def fitted(small=Scale(16, 64), large=Scale(48, 128), **kw):
    return model_cost("lite", 320, "trained", linear_run(small, FIXED, PER_EVAL, PER_CALIB, **kw),
                      linear_run(large, FIXED, PER_EVAL, PER_CALIB, **kw))


def test_fit_recovers_fixed_and_per_image_costs_and_extrapolates():
    cost = fitted()
    for name, (a, b) in {**PER_EVAL, **PER_CALIB}.items():
        assert cost.stage(name).fixed_s == pytest.approx(a)
        assert cost.stage(name).per_image_s == pytest.approx(b)
    for name, seconds in FIXED.items():
        assert cost.stage(name).driver == "fixed" and cost.stage(name).at(COCO_VAL2017) == pytest.approx(seconds)
    full = linear_run(COCO_VAL2017, FIXED, PER_EVAL, PER_CALIB)
    assert cost.total(COCO_VAL2017) == pytest.approx(full.timings["total"])
    assert cost.wall(COCO_VAL2017) == pytest.approx(full.wall_s)
    assert cost.ratio(COCO_VAL2017) == pytest.approx(full.timings["total"] / full.timings["eval_fp32"])


def test_a_measured_scale_is_reproduced_exactly_and_the_readme_ratio_follows():
    """The large run recorded at 500 eval / 256 calibration images: the model at that scale gives
    its total and the README's 5.4x."""
    stages = {**RECORDED, "eval_fp32": 2.0, "eval_int8": 3.0, "calibrate": 6.0}
    small = RunRecord(Scale(50, 64), {**stages, "total": sum(stages.values()) + 0.1}, 40.0, 800.0)
    large = RunRecord(SHARED_VAL, {**RECORDED, "total": 77.1}, 81.0, 900.0)
    cost = model_cost("yolov6lite_s", 320, "trained", small, large)
    assert cost.total(SHARED_VAL) == pytest.approx(77.1)
    assert cost.ratio(SHARED_VAL) == pytest.approx(77.1 / 14.3)
    assert round(cost.ratio(SHARED_VAL), 1) == 5.4


def test_fixed_stages_missing_from_the_large_run_keep_the_small_runs_time():
    cost = fitted()
    large = cost.large
    skipped = FIXED["sensitivity"] + FIXED["diagnose"]           # the large run skips them: its total is shorter
    timings = {k: v for k, v in large.timings.items() if k not in ("sensitivity", "diagnose")}
    timings["total"] -= skipped
    trimmed = RunRecord(large.scale, timings, large.wall_s - skipped, large.peak_rss_mb)
    again = model_cost("lite", 320, "trained", cost.small, trimmed)
    assert again.stage("sensitivity").at(COCO_VAL2017) == pytest.approx(FIXED["sensitivity"])
    assert again.stage("sensitivity").large_s is None and not again.growing_stages()


def test_a_fixed_stage_that_grows_with_the_images_is_flagged():
    grows = dict(FIXED)
    runs = []
    for scale in (Scale(16, 64), Scale(48, 128)):
        grows["sensitivity"] = 0.5 * scale.eval_images          # scanning the eval images: wrong
        runs.append(linear_run(scale, grows, PER_EVAL, PER_CALIB))
    cost = model_cost("big", 640, "random (head prior)", *runs)
    assert [s.name for s in cost.growing_stages()] == ["sensitivity"]
    text = "\n".join(findings([cost]))
    assert "'sensitivity' grew from 8.0 s to 24.0 s" in text
    assert "grows with the image counts" in stage_table(cost)
    assert not fitted().growing_stages() and not findings([fitted()])


def test_ratio_over_the_limit_is_reported_in_the_table_and_findings():
    slow_fixed = {**FIXED, "sensitivity": 8.0 * 0.0246 * 5000}     # 8x one FP32 evaluation of 5,000 images
    cost = model_cost("slow", 640, "random (head prior)", linear_run(Scale(16, 64), slow_fixed, PER_EVAL, PER_CALIB),
                      linear_run(Scale(48, 128), slow_fixed, PER_EVAL, PER_CALIB))
    assert cost.ratio(COCO_VAL2017) > RATIO_LIMIT
    row = summary_table([cost]).splitlines()[2]
    assert row.endswith("| **no** |") and f"{cost.ratio(COCO_VAL2017):.2f}x" in row
    assert any(f.startswith("slow: default run =") for f in findings([cost]))
    assert summary_table([fitted()]).splitlines()[2].endswith("| yes |")


def test_summary_row_holds_the_per_image_costs_and_the_extrapolated_times():
    cost = fitted()
    lines = summary_table([cost]).splitlines()
    assert len(lines) == 3 and lines[0].count("|") == lines[2].count("|")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:6] == ["lite", "320", "trained", "25", "40", "52"]            # ms per eval / calib image
    assert cells[8] == f"{(2.0 + 0.0246 * 5000) / 60:.1f} min"


def test_peak_rss_grows_with_the_calibration_images_and_the_kept_detections():
    small = linear_run(Scale(16, 64), FIXED, PER_EVAL, PER_CALIB, rss=1000.0)
    large = linear_run(Scale(48, 128), FIXED, PER_EVAL, PER_CALIB, rss=1320.0)      # 5 MB per calibration image
    cost = model_cost("m", 640, "trained", small, large)
    rows = (5000 - 48) * 300 * 56 / 2 ** 20
    assert cost.peak_rss_mb(COCO_VAL2017) == pytest.approx(1320.0 + 5.0 * 128 + rows)


def test_runs_measured_under_load_are_called_so():
    cost = fitted()
    assert not any("under load" in f for f in findings([cost]))
    cost.large.load_average, cost.large.cpus = 19.9, 2
    assert findings([cost]) == ["lite: measured under load (load average up to 19.9 on 2 CPUs): these timings are "
                                "not the machine's; measure on a quiet one"]
    again = model_cost_from_dict(json.loads(json.dumps(cost.to_dict())))
    assert again.large.loaded() and not again.small.loaded()


def test_the_runs_own_threads_do_not_count_as_load():
    """The load average counts the measured run's own threads and loader workers; the CPU time
    other processes used during the run decides, where it was measured."""
    cost = fitted()
    cost.small.load_average, cost.small.cpus, cost.small.other_cpus = 2.6, 2, 0.05     # the run itself
    cost.large.load_average, cost.large.cpus, cost.large.other_cpus = 3.1, 2, 1.2      # plus a second job
    assert findings([cost]) == ["lite: measured under load (other processes kept 1.20 of 2 CPUs busy): these "
                                "timings are not the machine's; measure on a quiet one"]
    again = model_cost_from_dict(json.loads(json.dumps(cost.to_dict())))
    assert again.large.loaded() and not again.small.loaded()


def test_a_childs_own_cpu_time_is_not_other_work():
    before = cpu_snapshot()
    start = time.perf_counter()
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass"
    subprocess.run([sys.executable, "-c", busy], check=True)
    after = cpu_snapshot()
    assert after.children_s - before.children_s >= 0.9              # the child's busy second is its own
    other = other_cpus(before, after, time.perf_counter() - start)
    assert other is None or 0.0 <= other <= (os.cpu_count() or 1)
    if after.machine_busy_s is not None:                              # Linux: the machine saw at least the child
        assert after.machine_busy_s - before.machine_busy_s >= 0.9


def test_runs_that_cannot_separate_the_costs_are_errors():
    run = linear_run(Scale(16, 64), FIXED, PER_EVAL, PER_CALIB)
    with pytest.raises(CostError, match="needs more eval and calibration images"):
        model_cost("m", 320, "trained", run, linear_run(Scale(48, 64), FIXED, PER_EVAL, PER_CALIB))
    broken = RunRecord(Scale(48, 128), {k: v for k, v in run.timings.items() if k != "calibrate"}, 50.0, 1.0)
    with pytest.raises(CostError, match="stage calibrate is in the small run"):
        model_cost("m", 320, "trained", run, broken)


def test_json_round_trip_and_from_json_prints_the_same_tables(tmp_path):
    from yoloq.cli.bench_cost import _save, render
    cost = fitted()
    out = tmp_path / "cost.json"
    _save(str(out), [cost], COCO_VAL2017, cost.small.scale, cost.large.scale, ["--models", "lite"])
    again = model_cost_from_dict(json.loads(out.read_text())["models"][0])
    assert again.total(COCO_VAL2017) == pytest.approx(cost.total(COCO_VAL2017))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "tools" / "bench_cost.py"), "--from-json", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == render([cost], COCO_VAL2017).strip()
    assert (tmp_path / "cost.md").read_text().strip() == done.stdout.strip()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    done = subprocess.run([sys.executable, str(REPO / "tools" / "bench_cost.py"), "--from-json", str(bad)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: --from-json") and len(done.stderr.splitlines()) == 1


def test_passthrough_and_fixed_count_checks():
    assert split_passthrough(["--models", "a", "--", "--sensitivity-images", "4"]) == (
        ["--models", "a"], ["--sensitivity-images", "4"])
    assert split_passthrough(["--models", "a"]) == (["--models", "a"], [])
    from yoloq.config import load_config
    counts = fixed_counts(load_config("yolov6lite_s").with_overrides(
        quant={"transforms": {"images": 64}, "calibration": {"auto_images": 32}, "sensitivity": {"images": 16}}).quant)
    assert counts == {"transform_images": 64, "auto_images": 32, "sensitivity_images": 16}
    assert too_few_calibration_images(counts, 48) == ["transform_images = 64 > 48 calibration images"]
    assert too_few_calibration_images(counts, 64) == []


def test_run_child_reports_peak_rss_and_stops_at_the_timeout(tmp_path):
    code, wall, rss = run_child([sys.executable, "-c", "b = bytearray(600 * 2**20); b[::4096] = b'x' * len(b[::4096])"],
                                tmp_path / "a.log")
    assert code == 0 and 600 <= rss < 1000
    code, wall, rss = run_child([sys.executable, "-c", "pass"], tmp_path / "c.log")
    assert code == 0 and rss < 100                             # the child's, not this process's
    code, wall, _ = run_child([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "b.log", timeout=1)
    assert code < 0 and wall < 30


def test_random_checkpoint_has_the_head_prior_and_a_realistic_candidate_count(tmp_path):
    from yoloq.config import load_config
    from yoloq.models.build import load_model
    cfg = load_config("yolov6n_repvgg").with_overrides(model={"img_size": 160})
    torch.manual_seed(1)
    images = torch.rand(2, 3, 160, 160)
    info = random_checkpoint(cfg, tmp_path / "n.pt", images)
    assert info["candidate_fraction"] == pytest.approx(CANDIDATE_FRACTION, rel=0.05)   # trained Lite-S / L: 1.6 / 1.2 %
    state = torch.load(tmp_path / "n.pt", weights_only=True)
    assert torch.allclose(state["detect.cls_preds.0.bias"], torch.full((80,), -math.log((1 - PRIOR_PROB) / PRIOR_PROB)))
    model = load_model(cfg.model, weights=str(tmp_path / "n.pt"))            # what --weights does
    scores = model(images)[..., 4:]
    assert (scores > cfg.eval.conf_thres).float().mean().item() == pytest.approx(info["candidate_fraction"], rel=0.01)


@pytest.mark.slow
@needs_shared
def test_tiny_real_run_prints_the_table(tmp_path):
    """Two real `yoloq ptq` runs of Lite-S on a few images, with the costly fixed stages made cheap
    (not the default: the bench's plumbing is the point here)."""
    out = tmp_path / "cost.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "tools" / "bench_cost.py"), "--models", "yolov6lite_s",
                           "--eval-images", "2", "4", "--calib-images", "4", "8", "--out", str(out), "--no-progress",
                           "--", "--calib", "max", "--channel-scale", "off", "--bias-correction", "off",
                           "--sensitivity-images", "2"],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    print(done.stdout)
    assert "| yolov6lite_s | 320 | trained |" in done.stdout
    # --sensitivity-images 2 after `--` counts (2 <= 4 images); the default's other counts do not fit
    assert ("NOT the default's cost: auto_images = 32 > 4 calibration images; transform_images = 64 > 4 "
            "calibration images") in done.stdout
    data = json.loads(out.read_text())["models"][0]
    assert data["small"]["scale"] == {"eval_images": 2, "calib_images": 4} and data["small"]["peak_rss_mb"] > 100
    stages = {s["name"] for s in data["stages"]}
    assert {"eval_fp32", "eval_int8", "calibrate", "sensitivity", "other", "startup"} <= stages
