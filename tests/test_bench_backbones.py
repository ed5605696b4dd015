"""yoloq bench-backbones: the evaluation data YAML (evaluation images never calibrate), when a run is
used / resumed / trained, the paired comparison of two backbones' drops (pycocotools as the oracle),
the command on random-weight models of a tiny COCO set, its argument errors, and (slow) the
training path from an empty runs folder, RepOpt's three steps included."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_coco
from yoloq.bench.backbone_runs import BACKBONES, run_state, write_eval_data_yaml
from yoloq.bench.backbones import drop_difference
from yoloq.cli import main as yoloq_main
from yoloq.config import load_config
from yoloq.data import load_data_config
from yoloq.data.coco import calibration_images
from yoloq.errors import InputError
from yoloq.eval.bootstrap import match_table
from yoloq.train.dataset import write_subset_annotations

EVAL_IDS = [1, 2]            # the "training images" a run evaluated on (tiny_coco train ids 1..6)


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory):
    return tiny_coco(tmp_path_factory.mktemp("tiny_coco"))


def fake_run(root: Path, name: str, data_yaml: Path) -> Path:
    """A finished run of ``name`` with seeded random weights, evaluated on train images 1 and 2."""
    from yoloq.models.build import build_model
    from yoloq.weights import save_checkpoint
    run_dir = root / name
    torch.manual_seed(0)
    save_checkpoint(build_model(load_config(f"yolov6n_{name}").model).state_dict(), run_dir / "best.pt", epoch=1)
    write_subset_annotations(data_yaml.parent / "train.json", EVAL_IDS, run_dir / "train_subset.json")
    return run_dir


def bench(args, capsys) -> tuple[int, str, str]:
    code = yoloq_main(["bench-backbones"] + [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_data_yaml_evaluates_the_run_images_and_calibrates_on_the_others(tmp_path, data_yaml):
    run_dir = fake_run(tmp_path / "runs", "repvgg", data_yaml)
    ed = write_eval_data_yaml(run_dir, load_data_config(data_yaml), tmp_path / "eval.yaml")
    assert ed.image_ids == EVAL_IDS and ed.files == ["000000000001.png", "000000000002.png"]
    dc = ed.data_cfg
    assert Path(dc.val_ann) == (run_dir / "train_subset.json").resolve()
    assert Path(dc.val_images) == Path(dc.train_images) == (data_yaml.parent / "train").resolve()
    with pytest.warns(UserWarning, match="only 4 readable"):
        chosen = calibration_images(dc, 100, seed=0)       # every image the calibration can ever draw
    assert sorted(chosen) == [f"{i:012d}.png" for i in range(3, 7)]
    # without the generated train split the shared folder is refused, not silently calibrated on
    with pytest.raises(InputError, match="train image\\(s\\) are also val images"):
        calibration_images(dataclasses.replace(dc, train_files=None), 100)


def test_eval_data_yaml_errors_name_the_file(tmp_path, data_yaml):
    run_dir = tmp_path / "runs" / "repvgg"
    run_dir.mkdir(parents=True)
    base = load_data_config(data_yaml)
    with pytest.raises(InputError, match="train_subset.json not found.*eval_split: train"):
        write_eval_data_yaml(run_dir, base, tmp_path / "eval.yaml")
    subset = json.loads((data_yaml.parent / "train.json").read_text())
    subset["images"][0]["file_name"] = "elsewhere.png"      # an evaluation image the train folder lacks
    (run_dir / "train_subset.json").write_text(json.dumps(subset))
    with pytest.raises(InputError, match="elsewhere.png.*--data"):
        write_eval_data_yaml(run_dir, base, tmp_path / "eval.yaml")
    assert not (tmp_path / "eval.yaml").exists()


def test_run_state_uses_finished_runs_and_resumes_the_rest(tmp_path):
    run_dir = tmp_path / "r"
    assert run_state(run_dir, 150) == "new"
    run_dir.mkdir()
    (run_dir / "best.pt").write_bytes(b"")
    assert run_state(run_dir, 150) == "done"                    # best.pt alone: a finished run handed over
    torch.save({"epoch": 40}, run_dir / "last.pt")
    assert run_state(run_dir, 150) == "resume"                  # best.pt of an interrupted run: not final
    torch.save({"epoch": 150}, run_dir / "last.pt")
    assert run_state(run_dir, 150) == "done"
    (run_dir / "best.pt").unlink()
    assert run_state(run_dir, 150) == "resume"                  # finished but best.pt lost: resume writes it


def _detections(gt: dict, drop_images=()) -> list:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"] if a["image_id"] not in drop_images]


def _coco_ap(ann: Path, dets: list) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        e = COCOeval(gt, gt.loadRes(dets), "bbox")
        e.evaluate(), e.accumulate(), e.summarize()
    return float(e.stats[0])


def test_drop_difference_pairs_two_backbones_on_the_same_images(data_yaml):
    ann = data_yaml.parent / "val.json"
    gt = json.loads(ann.read_text())
    ids = [e["id"] for e in gt["images"]]
    table = lambda dets: match_table(str(ann), dets, ids)    # noqa: E731
    perfect, missing = table(_detections(gt)), table(_detections(gt, drop_images={3}))
    lossless = (perfect, [perfect])                           # INT8 identical to FP32: drop 0
    lossy = (perfect, [missing])                              # INT8 lost image 3's box
    expected = (_coco_ap(ann, _detections(gt)) - _coco_ap(ann, _detections(gt, {3}))) * 100   # pycocotools
    assert expected > 1
    d = drop_difference(lossless, lossy, resamples=200)
    assert d["difference"] == pytest.approx(expected, abs=1e-9)
    assert d["low"] <= d["difference"] <= d["high"] and d["low"] >= 0 and d["images"] == len(ids)
    assert drop_difference(lossy, lossless, resamples=200)["difference"] == pytest.approx(-expected, abs=1e-9)
    same = drop_difference(lossy, lossy, resamples=50)
    assert same["difference"] == same["low"] == same["high"] == 0.0           # paired: identical drops cancel
    # two calibration seeds, one lossless and one lossy: the mean drop is half of it
    half = drop_difference(lossless, (perfect, [perfect, missing]), resamples=50)
    assert half["difference"] == pytest.approx(expected / 2, abs=1e-9)
    other = (match_table(str(ann), _detections(gt), ids[:4]), [match_table(str(ann), _detections(gt), ids[:4])])
    with pytest.raises(InputError, match="different images"):
        drop_difference(lossless, other, resamples=10)


@pytest.mark.filterwarnings("ignore:no detections to evaluate")
def test_bench_command_on_random_weight_runs(tmp_path, data_yaml, capsys):
    runs = tmp_path / "runs"
    for name in BACKBONES:
        fake_run(runs, name, data_yaml)
    out = tmp_path / "out"
    code, stdout, err = bench(["--runs", runs, "--data", data_yaml, "--no-train", "--seeds", 0, 1,
                               "--pipelines", "plain", "--calib-images", 3, "--img-size", 64, "--train-images", 2,
                               "--resamples", 20, "--out", out, "--name", "b", "--no-progress"], capsys)
    assert code == 0, err
    folder = out / "b"
    result = json.loads((folder / "backbones.json").read_text())
    assert [b["backbone"] for b in result["backbones"]] == list(BACKBONES)
    assert result["eval"]["image_ids"] == EVAL_IDS and result["trained_now"] == []
    eval_files = {"000000000001.png", "000000000002.png"}
    for b in result["backbones"]:
        assert [(r["pipeline"], r["seed"]) for r in b["rows"]] == [("plain", 0), ("plain", 1)]
        for r in b["rows"]:
            assert r["calib_images"] == 3 and not eval_files & set(r["calib_files"])
            assert r["calib_method"] == "max" and r["transforms"] == "none"
            assert r["drop"]["drop"] == pytest.approx((b["fp32"]["AP"] - r["int8"]["AP"]) * 100, abs=1e-9)
            assert r["drop"]["images"] == 2
            assert 0 < r["output_error"]["sqnr_db"] < 200        # INT8 outputs compared, not FP32 with itself
        assert b["rows"][0]["calib_files"] != b["rows"][1]["calib_files"]      # the seeds draw different images
        assert b["run"]["differs"] == ["no run.json: the training settings are unknown"]   # said, not hidden
    assert [(r["backbone"], r["pipeline"]) for r in result["versus_reference"]] == [("qarepvgg", "plain"),
                                                                                   ("repopt", "plain")]
    for b in result["backbones"]:
        written = load_data_config(folder / b["data_yaml"])
        assert sorted(written.val_files) == sorted(eval_files) and not eval_files & set(written.train_files)
        assert sorted(b["detections"]) == ["fp32", "plain_seed0", "plain_seed1"]
        assert all(isinstance(json.loads((folder / f).read_text()), list) for f in b["detections"].values())
    md = (folder / "backbones.md").read_text()
    assert md in stdout
    assert "| RepVGG | " in md and "| QARepVGG (V2) | " in md and "| RepOpt-VGG | " in md
    assert "drop over 2 calibration seeds (plain max)" in md and "output SQNR dB (plain max)" in md and "drop − RepVGG's drop (mean of 2 calibration" in md


@pytest.mark.filterwarnings("ignore:no detections to evaluate")
def test_bench_command_on_the_val_split(tmp_path, data_yaml, capsys):
    """--eval-split val (runs trained on a full train split): the dataset's val images are evaluated,
    the train folder calibrates; same file names in the two folders are different images."""
    runs = tmp_path / "runs"
    (runs / "repvgg").mkdir(parents=True)
    fake_run(runs, "repvgg", data_yaml)
    (runs / "repvgg" / "train_subset.json").unlink()        # not needed on the val split
    code, stdout, err = bench(["--runs", runs, "--data", data_yaml, "--no-train", "--eval-split", "val",
                               "--backbones", "repvgg", "--seeds", 0, "--pipelines", "plain", "--calib-images", 3,
                               "--img-size", 64, "--resamples", 10, "--out", tmp_path / "out", "--name", "v",
                               "--no-progress"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "out" / "v" / "backbones.json").read_text())
    assert result["eval"]["split"] == "val" and result["eval"]["images"] == 6
    assert Path(result["eval"]["ann_file"]) == (data_yaml.parent / "val.json").resolve()
    row = result["backbones"][0]["rows"][0]
    assert len(row["calib_files"]) == 3 and set(row["calib_files"]) <= {f"{i:012d}.png" for i in range(1, 7)}
    assert "evaluated on 6 val images" in stdout


@pytest.mark.parametrize("args, message", [
    (["--set", "train.lr0=0.1"], "--set train.lr0=0.1: bench-backbones takes only eval / quant keys"),
    (["--img-size", 100], "--img-size 100: must be a multiple of 32"),
    (["--backbones", "hs"], "invalid choice: 'hs'"),
    (["--seeds", "-1"], "expected an integer >= 0"),
])
def test_bench_command_argument_errors(tmp_path, data_yaml, capsys, args, message):
    code, _, err = bench(["--runs", tmp_path / "runs", "--data", data_yaml, "--out", tmp_path / "out"] + args, capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_bench_command_refuses_missing_runs_with_no_train(tmp_path, data_yaml, capsys):
    runs = tmp_path / "runs"
    fake_run(runs, "repvgg", data_yaml)
    code, _, err = bench(["--runs", runs, "--data", data_yaml, "--no-train", "--out", tmp_path / "out",
                          "--no-progress"], capsys)
    assert code == 2 and f"{runs / 'qarepvgg'}: no finished run" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not (runs / "qarepvgg").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:no detections to evaluate")
def test_bench_trains_missing_runs_then_resumes(tmp_path, data_yaml, capsys):
    """From an empty runs folder: repvgg, qarepvgg, hs, its scales and repopt are trained by the
    recipe (1 epoch here), then measured; a run without best.pt is resumed with the same settings."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    args = ["--runs", runs, "--data", data_yaml, "--epochs", 1, "--train-images", 2, "--img-size", 64,
            "--seeds", 0, "--pipelines", "plain", "--calib-images", 2, "--resamples", 10, "--out", out,
            "--device", "cpu", "--no-progress"]
    code, stdout, err = bench(args, capsys)
    assert code == 0, err
    result = json.loads((out / "yolov6n_backbones" / "backbones.json").read_text())
    assert result["trained_now"] == ["repvgg", "qarepvgg", "hs", "repopt"]
    assert (runs / "hs" / "scales.pt").is_file()
    for b in result["backbones"]:
        assert b["run"]["differs"] == [] and b["run"]["trained_with"]["epochs"] == 1
        assert b["eval_images"] == 2
    assert json.loads((runs / "repopt" / "run.json").read_text())["train"]["scales"] == str(runs / "hs" / "scales.pt")
    (runs / "repvgg" / "best.pt").unlink()                  # finished, but best.pt lost: resumed, not retrained
    code, stdout, err = bench(args + ["--backbones", "repvgg"], capsys)
    assert code == 0, err
    assert f"resuming yolov6n_repvgg -> {runs / 'repvgg'}" in stdout and (runs / "repvgg" / "best.pt").is_file()
    result = json.loads((out / "yolov6n_backbones" / "backbones.json").read_text())
    assert result["trained_now"] == ["repvgg"]
