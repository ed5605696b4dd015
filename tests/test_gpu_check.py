"""The GPU check (tools/gpu_pack.py here, tools/gpu_check.py on a device machine): the pack's data,
the repeated 5,000-image dataset, the comparison with the CPU reference, the whole script's CPU
path (slow) and, on a machine with CUDA and a pack, the check itself (gpu)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, needs_shared, tiny_coco
from yoloq.bench.gpu_check import FP32_TOL, INT8_TOL, compare, repeated_dataset
from yoloq.bench.gpu_pack import LIMIT_BYTES, PackError, check_size, clear, pack_data

PACK = REPO / ".carry"


def _tiny(root: Path) -> Path:
    root.mkdir()
    return tiny_coco(root)


def _packed(tmp_path, max_side=40):
    data_yaml = _tiny(tmp_path / "src")
    info = pack_data(str(data_yaml), tmp_path / "pack" / "data", max_side, None, None)
    return data_yaml, info


def test_packed_images_are_shrunk_and_their_boxes_scaled_alike(tmp_path):
    import cv2
    data_yaml, info = _packed(tmp_path)
    assert info == {"source": str(data_yaml), "val_images": 6, "train_images": 6, "max_side": 40}
    src = json.loads((tmp_path / "src" / "val.json").read_text())
    out = json.loads((tmp_path / "pack" / "data" / "annotations" / "instances_val2017.json").read_text())
    for a, b in zip(src["annotations"], out["annotations"]):
        assert b["bbox"] == pytest.approx([v * 0.5 for v in a["bbox"]])           # 80x64 -> 40x32
        assert b["area"] == pytest.approx(a["area"] * 0.25)
    entry = out["images"][0]
    assert (entry["width"], entry["height"]) == (40, 32)
    assert cv2.imread(str(tmp_path / "pack" / "data" / "val2017" / entry["file_name"])).shape == (32, 40, 3)
    from yoloq.data import load_data_config
    data_cfg = load_data_config(str(tmp_path / "pack" / "data" / "data.yaml"))
    assert Path(data_cfg.train_images).is_dir() and Path(data_cfg.val_ann).is_file() and data_cfg.nc == 80


def test_ground_truth_as_detections_scores_ap_1_on_the_packed_and_repeated_data(tmp_path):
    """Scaled boxes stay consistent with the scaled images' ground truth; the repeated set keeps
    every annotation with its image."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    _packed(tmp_path)
    data_yaml = repeated_dataset(tmp_path / "pack" / "data", tmp_path / "rep", 13, 9)
    gt_json = json.loads((tmp_path / "rep" / "val.json").read_text())
    assert len(gt_json["images"]) == 13 and len({e["id"] for e in gt_json["images"]}) == 13
    assert len({e["file_name"] for e in gt_json["images"]}) == 13 and len(gt_json["annotations"]) == 13
    assert len(list((tmp_path / "rep" / "train").iterdir())) == 9
    gt = COCO(str(tmp_path / "rep" / "val.json"))
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt_json["annotations"]]
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
    from yoloq.data import load_data_config
    from yoloq.data.coco import CocoDetectionDataset
    cfg = load_data_config(str(data_yaml))
    ds = CocoDetectionDataset(cfg.val_images, cfg.val_ann, 64)
    assert len(ds) == 13 and ds[12][0].shape == (3, 64, 64)


def _report(fp32, int8, method="mse"):
    return {"fp32": {"AP": fp32}, "int8": {"AP": int8}, "calibration": {"method": method}}


def test_compare_passes_within_the_tolerances_and_fails_outside():
    ref = _report(0.2312, 0.2270)
    ok = compare(ref, _report(0.2312 + 0.9 * FP32_TOL / 100, 0.2270 - 0.9 * INT8_TOL / 100))
    assert ok["passed"] and ok["int8_AP"]["diff"] == pytest.approx(-0.9 * INT8_TOL)
    assert not compare(ref, _report(0.2312 + 1.2 * FP32_TOL / 100, 0.2270))["passed"]
    assert not compare(ref, _report(0.2312, 0.2270 + 1.2 * INT8_TOL / 100))["passed"]
    assert not compare(ref, _report(0.2312 - 1.2 * FP32_TOL / 100, 0.2270))["passed"]
    assert not compare(ref, _report(0.2312, 0.2270 - 1.2 * INT8_TOL / 100))["passed"]
    assert compare(ref, _report(0.2312, 0.2270, "entropy"))["calib_method"] == {"cpu": "mse", "device": "entropy"}


def test_pack_size_limit_and_refusal_to_empty_a_foreign_folder(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "big").write_bytes(b"x" * 1024)
    with pytest.raises(PackError, match="over the device's 64 MiB"):
        check_size(tmp_path / "p", LIMIT_BYTES)
    assert check_size(tmp_path / "p", 0) == 1024
    with pytest.raises(PackError, match="is not a GPU pack"):
        clear(tmp_path / "p")
    (tmp_path / "p" / "manifest.json").write_text("{}")
    clear(tmp_path / "p")
    assert not (tmp_path / "p").exists()


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@needs_shared
def test_cpu_path_of_the_whole_check(tmp_path):
    """tools/gpu_pack.py (no wheels: no network in tests) on tiny data with the real Lite-S weights,
    then tools/gpu_check.py --device cpu: the same run on the same device gives the reference's
    mAP exactly; the scale step runs yolov6n at 160 px on 12 repeated images; no TensorRT here."""
    data_yaml = _tiny(tmp_path / "src")
    pack, out = tmp_path / "pack", tmp_path / "out"
    # max calibration: the check's plumbing is the point here (auto scores four methods per layer)
    quick = ["--calib-images", "6", "--transform-images", "6", "--calib", "max", "--sensitivity-images", "2"]
    done = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_pack.py"), "--out", str(pack), "--data",
                           str(data_yaml), "--no-wheels", "--", *quick], capture_output=True, text=True, env=_env(),
                          timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ref = json.loads((pack / "reference.json").read_text())
    assert ref["args"][:2] == ["--cfg", "yolov6lite_s"] and ref["eval_images"] == 6
    done = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--pack", str(pack), "--out", str(out),
                           "--device", "cpu", "--eval-images", "12", "--calib-images", "6", "--scale-model",
                           "yolov6n_repvgg", "--budget", "1700", "--", "--img-size", "160", *quick[2:]],
                          capture_output=True, text=True, env=_env(), timeout=1800)
    result = json.loads((out / "gpu_check.json").read_text())
    assert done.returncode == 0, json.dumps(result, indent=1)[-3000:] + (out / "gpu_check.log").read_text()[-3000:]
    lite = result["lite_s"]
    assert lite["passed"] and lite["fp32_AP"]["diff"] == 0 and lite["int8_AP"]["diff"] == 0
    assert result["install"]["missing_after"] == [] and result["install"]["yoloq"].startswith("installed")
    scale = result["scale"]
    assert scale["exit_code"] == 0 and scale["eval_images"] == 12 and scale["timings"]["eval_fp32"] > 0
    assert json.loads((out / "scale_report.json").read_text())["data"]["eval_images"] == 12
    assert result["tensorrt"] == {
        "skipped": "TensorRT is not installed here (the 'tensorrt' module cannot be imported)"}
    assert (out / "lite_s_report.json").is_file() and "$ yoloq ptq" in (out / "gpu_check.log").read_text()


@pytest.mark.gpu
def test_gpu_check(tmp_path):
    """The check itself (< 10 minutes on one H100 / H200): the default Lite-S PTQ on the GPU equals
    the pack's CPU reference within the tolerances, and the default yolov6s@640 PTQ of 5,000 images
    finishes."""
    if not torch.cuda.is_available():
        pytest.skip("the GPU check needs CUDA; torch.cuda.is_available() is False")
    if not (PACK / "reference.json").is_file():
        pytest.skip(f"no pack at {PACK}: make it with `python tools/gpu_pack.py` where ../shared is")
    done = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--pack", str(PACK), "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=900)
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    print(json.dumps(result, indent=1))
    assert result["lite_s"]["passed"], result["lite_s"]
    assert result["scale"]["exit_code"] == 0, result["scale"]
    assert done.returncode == 0
