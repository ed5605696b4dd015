"""What an evaluation reports besides the 12 stats: AP per class (consistent with COCOeval's own
summary), the PR curves, the Markdown table, ``eval --save-json`` (a COCO results file that
pycocotools scores exactly as yoloq did), per-image timing, ``--ckpt`` (quant.pt) and the PTQ
report's per-class section; PTQ under torchrun writes one run with the one-process numbers."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from conftest import COCO, REPO, needs_coco, tiny_coco
from yoloq.data import load_data_config
from yoloq.data.coco import letterbox
from yoloq.eval import COCO80_TO_91, coco_evaluation, evaluate_model
from yoloq.report.eval import per_class_table, plot_pr_curves
from yoloq.report.ptq import render_markdown, render_plots

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
OFFICIAL = COCO / "annotations" / "instances_val2017_official.json"


# --------------------------------------------------------------------------- per class, PR curves
def _gt_detections(ann_file, drop_category=None):
    data = json.loads(Path(ann_file).read_text())
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 0.5 + 0.5 * ((a["id"] * 7919) % 1000) / 1000}
            for a in data["annotations"] if not a.get("iscrowd", 0) and a["category_id"] != drop_category]


@needs_coco
@pytest.mark.parametrize("backend", ["pycocotools", "faster-coco-eval"])
def test_per_class_ap_and_pr_curves_agree_with_cocoeval(backend):
    scores = coco_evaluation(str(OFFICIAL), _gt_detections(OFFICIAL, drop_category=1), backend)
    rows = {r["category_id"]: r for r in scores.per_class}
    assert list(rows) == COCO80_TO_91 and rows[1]["name"] == "person" and rows[1]["gt"] > 100
    assert rows[1]["AP"] == 0.0 and rows[1]["AP50"] == 0.0                    # its detections were removed
    with_gt = [r for r in scores.per_class if r["gt"] > 0]
    assert all(r["AP"] == pytest.approx(1.0) for r in with_gt if r["category_id"] != 1)
    assert all(r["AP"] == -1.0 for r in scores.per_class if r["gt"] == 0)
    # COCOeval's summary AP is the mean over the classes with ground truth, and the mean of the PR curve
    assert scores.stats["AP"] == pytest.approx(np.mean([r["AP"] for r in with_gt]), abs=1e-12)
    assert scores.stats["AP50"] == pytest.approx(np.mean(scores.pr_curve["AP50"]), abs=1e-12)
    assert scores.stats["AP"] == pytest.approx(np.mean(scores.pr_curve["AP"]), abs=1e-12)
    assert len(scores.pr_curve["recall"]) == 101                                # person: precision 0 throughout
    assert scores.pr_curve["AP50"][0] == pytest.approx((len(with_gt) - 1) / len(with_gt))


def test_per_class_table_alone_and_fp32_against_int8():
    fp32 = [{"category_id": 1, "name": "person", "AP": 0.5, "AP50": 0.7, "gt": 10},
            {"category_id": 2, "name": "bicycle", "AP": 0.3, "AP50": 0.4, "gt": 3},
            {"category_id": 3, "name": "car", "AP": -1.0, "AP50": -1.0, "gt": 0}]
    int8 = [dict(fp32[0], AP=0.45), dict(fp32[1], AP=0.1), dict(fp32[2])]
    alone = per_class_table(fp32).splitlines()
    assert alone[2] == "| person | 1 | 50.00 | 70.00 | 10 |" and alone[4] == "| car | 3 | n/a | n/a | 0 |"
    paired = per_class_table(fp32, int8).splitlines()
    assert paired[0].startswith("| class | FP32 AP | INT8 AP | drop |")
    assert paired[2].startswith("| bicycle | 30.00 | 10.00 | 20.00 |")             # largest drop first
    assert paired[3].startswith("| person | 50.00 | 45.00 | 5.00 |") and "| car | n/a | n/a | n/a |" in paired[4]
    curve = {"recall": [0, 0.5, 1], "AP50": [1, 0.8, 0], "AP": [0.9, 0.5, 0]}
    assert plot_pr_curves(curve, compare=curve)[:4] == b"\x89PNG"


def test_ptq_report_has_the_per_class_section_and_pr_plot():
    row = {"category_id": 1, "name": "person", "AP": 0.5, "AP50": 0.7, "gt": 10}
    timing = {"preprocess_ms": 1.0, "inference_ms": 2.0, "nms_ms": 0.5, "batch_size": 8, "device": "cpu"}
    curve = {"recall": [0, 1], "AP50": [1, 0], "AP": [1, 0]}
    report = {"name": "r", "fp32": {"AP": 0.5}, "int8": {"AP": 0.4}, "drop": {"AP": 10.0},
              "per_class": {"fp32": [row], "int8": [dict(row, AP=0.4)]},
              "pr_curve": {"fp32": curve, "int8": curve}, "eval_timing": {"fp32": timing, "int8": timing}}
    md = render_markdown(report)
    assert "## AP per class" in md and "| person | 50.00 | 40.00 | 10.00 | 70.00 | 70.00 | 10 |" in md
    assert "FP32 evaluation speed per image (batch 8, cpu): pre-process 1.00 ms, inference 2.00 ms, NMS 0.50 ms" in md
    assert "pr_curve.png" in render_plots(report)


# --------------------------------------------------------------------------- the eval command
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_coco(tmp_path_factory.mktemp("tiny"))


class Oracle(nn.Module):
    """The same predictions for every image: the 6 ground-truth boxes of the tiny val set (letterboxed;
    all its images are 80x64) with their classes, so each image finds its own box among 5 others."""

    def __init__(self, data_yaml: Path):
        super().__init__()
        val = json.loads((data_yaml.parent / "val.json").read_text())
        _, ratio, (pw, ph) = letterbox(np.zeros((64, 80, 3), np.uint8), 64)
        preds = torch.zeros(len(val["annotations"]), 84)
        for k, a in enumerate(val["annotations"]):
            x, y, w, h = a["bbox"]
            preds[k, :4] = torch.tensor([x * ratio + pw, y * ratio + ph, (x + w) * ratio + pw, (y + h) * ratio + ph])
            preds[k, 4 + COCO80_TO_91.index(a["category_id"])] = 0.5 + 0.05 * k
        self.register_buffer("preds", preds)

    def forward(self, x):
        return self.preds[None].expand(x.shape[0], -1, -1) + 0 * x.mean()


def _config(tmp_path, data_yaml) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "toy", "img_size": 64}, "data": str(data_yaml),
                                    "eval": {"batch_size": 4, "workers": 0}}))
    return path


def _run(args, capsys):
    from yoloq.cli import main
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _cocoeval_of_file(ann_file, results_file) -> list:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    gt = COCO(str(ann_file))
    evaluator = COCOeval(gt, gt.loadRes(str(results_file)), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return list(evaluator.stats[:12])


def test_eval_save_json_is_a_coco_results_file_pycocotools_scores_the_same(tmp_path, tiny, capsys):
    onnx = tmp_path / "oracle.onnx"
    torch.onnx.export(Oracle(tiny).eval(), torch.zeros(1, 3, 64, 64), str(onnx), input_names=["images"],
                      output_names=["outputs"], opset_version=13, dynamo=False,
                      dynamic_axes={"images": {0: "batch"}, "outputs": {0: "batch"}})
    out = _run(["eval", "--cfg", _config(tmp_path, tiny), "--onnx", onnx, "--out", tmp_path / "r.json",
                "--save-json", "--no-progress"], capsys)
    result = json.loads((tmp_path / "r.json").read_text())
    coco_file = tmp_path / "r_predictions.json"
    assert f"wrote {coco_file} (COCO results, 36 detections)" in out
    saved = json.loads(coco_file.read_text())
    assert len(saved) == 36 and set(saved[0]) == {"image_id", "category_id", "bbox", "score"}
    assert 0.2 < result["stats"]["AP"] < 1.0
    stats = _cocoeval_of_file(tiny.parent / "val.json", coco_file)
    assert stats == pytest.approx([result["stats"][k] for k in result["stats"]], abs=1e-12)
    # the rest of the eval output: timing as upstream prints it, AP per class, the PR plot
    assert "speed per image (batch 4, cpu): pre-process" in out and "ms, inference" in out and "ms, NMS" in out
    assert "AP per class (%):" in out and "| class | id | AP | AP50 | GT boxes |" in out
    assert (tmp_path / "r_pr.png").read_bytes()[:4] == b"\x89PNG"
    assert len(result["per_class"]) == 80 and set(result["timing"]) >= {"preprocess_ms", "inference_ms", "nms_ms"}


def test_eval_ckpt_and_fp32_weights_save_json(tmp_path, tiny, capsys):
    """--save-json for a quantized quant.pt (--ckpt) and for FP32 weights: each file scores as printed."""
    from yoloq.config import load_config
    from yoloq.models import build_model
    from yoloq.quant.calibrate import calibrate
    from yoloq.quant.checkpoint import save_quantized
    from yoloq.quant.prepare import prepare
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": {"name": "tiny", "arch": "yolov6", "depth_multiple": 0.33,
                                                  "width_multiple": 0.0625, "img_size": 64},
                                        "data": str(tiny), "eval": {"batch_size": 4, "workers": 0, "conf_thres": 0.3}}))
    cfg = load_config(cfg_path)
    torch.manual_seed(0)
    fp32 = build_model(cfg.model).fuse().eval()
    torch.save(fp32.state_dict(), tmp_path / "fp32.pt")
    qmodel = prepare(fp32)
    calibrate(qmodel, [torch.rand(4, 3, 64, 64)], "max", progress=False)
    save_quantized(qmodel, tmp_path / "quant.pt", meta={"name": "tiny"})
    direct = evaluate_model(qmodel, load_data_config(tiny), cfg.eval, 64, progress=False)
    for flag, path, name in (("--ckpt", tmp_path / "quant.pt", "int8"), ("--weights", tmp_path / "fp32.pt", "fp32")):
        out = _run(["eval", "--cfg", cfg_path, flag, path, "--out", tmp_path / f"{name}.json", "--save-json",
                    tmp_path / f"{name}_coco.json", "--no-progress", "--device", "cpu", "--no-plots"], capsys)
        result = json.loads((tmp_path / f"{name}.json").read_text())
        saved = json.loads((tmp_path / f"{name}_coco.json").read_text())
        assert len(saved) == len(result["detections"]) > 0 and f"{len(saved)} detections" in out
        if saved:
            stats = _cocoeval_of_file(tiny.parent / "val.json", tmp_path / f"{name}_coco.json")
            assert stats == pytest.approx(list(result["stats"].values()), abs=1e-12)
        if name == "int8":
            assert "fake-quantized INT8" in out and result["stats"] == direct.stats
            assert saved == direct.detections.to_list()


# --------------------------------------------------------------------------- PTQ under torchrun
@pytest.mark.slow
def test_torchrun_ptq_shards_its_evaluations_and_rank_0_alone_writes(tmp_path, tiny):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": "tiny", "arch": "yolov6", "depth_multiple": 0.33,
                                             "width_multiple": 0.0625, "img_size": 64},
                                   "data": str(tiny), "eval": {"batch_size": 2, "workers": 0},
                                   "quant": {"calib": "max", "calib_images": 4, "batch_size": 2, "transform_images": 4,
                                             "sensitivity_images": 2, "diagnose": False}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    common = [str(REPO / "tools" / "ptq.py"), "--cfg", str(cfg), "--random-weights", "--no-progress",
              "--out", str(tmp_path / "runs"), "--workers", "0"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), *common, "--name", "two"], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1 and sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["two"]
    one = subprocess.run([sys.executable, *common, "--name", "one"], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (json.loads((tmp_path / "runs" / n / "report.json").read_text()) for n in ("two", "one"))
    assert a["fp32"] == b["fp32"] and a["int8"] == b["int8"]
    assert a["eval_timing"]["fp32"]["processes"] == 2 and b["eval_timing"]["fp32"]["processes"] == 1
    assert "## AP per class" in (tmp_path / "runs" / "two" / "report.md").read_text()
    assert (tmp_path / "runs" / "two" / "pr_curve.png").is_file()
