"""The GPU check's steps (``tools/gpu_check.py``, which installs the missing wheels first):

1. ``lite_check``: the default Lite-S PTQ of the pack's reference, with ``--device``, compared with
   the CPU reference. Tolerances, in AP points (x100): FP32 ``FP32_TOL`` - both runs are true
   FP32 (TF32 off during evaluation) and differ only in summation order, ~1e-6 relative, which
   moves no detection across a threshold in practice; INT8 ``INT8_TOL`` - one ulp of difference
   flips a handful of quantized values per layer at rounding ties, and calibration on another
   device accumulates its statistics in another order: two correct executions of the same
   quantized Lite model differ by 0.1-0.3 on 500 images (paired differences under 1e-4 input
   noise: standard deviation up to 0.25, docs/results.md, Deployment), while a wrong scale or
   placement costs whole points; 0.5 is two such standard deviations.
2. ``scale_timing``: the default PTQ of yolov6s@640 (seeded random weights with the head prior,
   ``yoloq.bench.cost_run.random_checkpoint``) on 5,000 eval images: the pack's val images
   repeated under new names and ids (hard links; their annotations repeated alike), so loading,
   the model, NMS and COCOeval do the work of 5,000 images; the images are the pack's, shrunk to
   320 px, so JPEG decoding is cheaper than for COCO's 640 px files. 256 calibration images.
3. ``trt_check``: ``yoloq export`` + ``tools/trt.py build / eval`` of the Lite-S GPU result when
   TensorRT is importable; skipped with the reason otherwise.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from yoloq.bench.cost_run import CHILD, random_checkpoint, run_child, sample_images

FP32_TOL = 0.05
INT8_TOL = 0.5
SCALE_TARGET_S = 600.0             # issue 24: default PTQ of yolov6s@640 on 5,000 images <= 10 min on one GPU
ID_STRIDE = 10 ** 7                # image ids of the k-th copy: id + k * ID_STRIDE (COCO ids < 10^7)
ANN_STRIDE = 10 ** 11              # annotation ids alike (the shared file's reach 1.1e9)


def yoloq_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", CHILD, *args]


def ptq_has_device_flag(env: Optional[dict] = None) -> bool:
    done = subprocess.run(yoloq_cmd("ptq", "-h"), capture_output=True, text=True, env=env)
    return "--device" in done.stdout


def device_args(device: str, env: Optional[dict] = None) -> list[str]:
    """``--device X`` for ``yoloq ptq``; a tree whose ptq predates the flag runs on the CPU anyway,
    so ``cpu`` then goes without it, and anything else is an error."""
    if ptq_has_device_flag(env):
        return ["--device", device]
    if device == "cpu":
        return []
    raise RuntimeError(f"yoloq ptq in this tree has no --device flag (issue 24 item 1), so it cannot run on {device}")


def _ptq(args: list, out: Path, name: str, log: Path, env: dict, timeout: float, cwd: Path) -> dict:
    """One ``yoloq ptq`` run: its report (or None), exit code, wall time, peak RSS."""
    cmd = yoloq_cmd("ptq", *args, "--out", str(out), "--name", name, "--no-progress")
    with open(log, "a") as f:
        f.write(f"\n$ yoloq {' '.join(cmd[3:])}\n")
    code, wall, rss = run_child(cmd, log, env, timeout=timeout, cwd=cwd)
    path = out / name / "report.json"
    report = json.loads(path.read_text()) if code == 0 and path.is_file() else None
    return {"exit_code": code, "timed_out": wall >= timeout, "wall_s": round(wall, 1), "peak_rss_mb": round(rss, 1),
            "report": report, "report_path": str(path)}


def compare(reference: dict, report: dict) -> dict:
    """GPU vs CPU reference, AP in points; ``passed`` when both are within their tolerance."""
    d_fp32 = 100 * (report["fp32"]["AP"] - reference["fp32"]["AP"])
    d_int8 = 100 * (report["int8"]["AP"] - reference["int8"]["AP"])
    return {"fp32_AP": {"cpu": 100 * reference["fp32"]["AP"], "device": 100 * report["fp32"]["AP"],
                        "diff": round(d_fp32, 3), "tolerance": FP32_TOL},
            "int8_AP": {"cpu": 100 * reference["int8"]["AP"], "device": 100 * report["int8"]["AP"],
                        "diff": round(d_int8, 3), "tolerance": INT8_TOL},
            "calib_method": {"cpu": reference["calibration"]["method"],
                             "device": report["calibration"]["method"]},
            "passed": abs(d_fp32) <= FP32_TOL and abs(d_int8) <= INT8_TOL}


def lite_check(pack: Path, device: str, work: Path, log: Path, env: dict, timeout: float, cwd: Path) -> dict:
    reference = json.loads((pack / "reference.json").read_text())
    args = [a.format(pack=pack) for a in reference["args"]] + device_args(device, env)
    run = _ptq(args, work, "lite_s_device", log, env, timeout, cwd)
    result = {k: v for k, v in run.items() if k != "report"}
    if run["report"] is None:
        return {**result, "passed": False, "error": "the run failed or timed out; see the log"}
    report = run["report"]
    return {**result, **compare(reference, report), "timings": report["timings"],
            "cpu_timings": reference["timings"], "memory": find_keys(report, ("peak", "memory", "rss", "cuda"))}


def find_keys(tree: dict, words, prefix: str = "") -> dict:
    """Every number or string under ``tree`` whose key names one of ``words`` (peak RSS / CUDA
    memory, wherever the report keeps them), by dotted path."""
    found = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            found.update(find_keys(value, words, path))
        elif not isinstance(value, list) and any(w in str(key).lower() for w in words):
            found[path] = value
    return found


# --------------------------------------------------------------------------- 5,000 images


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def repeated_dataset(data_dir: Path, dest: Path, eval_images: int, train_images: int) -> Path:
    """A dataset of ``eval_images`` val images (the pack's, repeated under new names / ids, with
    their annotations) and ``train_images`` train images (repeated as needed); returns its YAML."""
    import yaml
    gt = json.loads((data_dir / "annotations" / "instances_val2017.json").read_text())
    by_image = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    (dest / "val").mkdir(parents=True)
    images, anns = [], []
    for i in range(eval_images):
        k, e = divmod(i, len(gt["images"]))
        e = gt["images"][e]
        name = f"r{k:03d}_{e['file_name']}"
        _link(data_dir / "val2017" / e["file_name"], dest / "val" / name)
        images.append({**e, "id": e["id"] + k * ID_STRIDE, "file_name": name})
        anns += [{**a, "id": a["id"] + k * ANN_STRIDE, "image_id": a["image_id"] + k * ID_STRIDE}
                 for a in by_image.get(e["id"], [])]
    (dest / "val.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": gt["categories"]}))
    train = sorted(p.name for p in (data_dir / "train2017").iterdir())
    (dest / "train").mkdir()
    for i in range(train_images):
        k, j = divmod(i, len(train))
        _link(data_dir / "train2017" / train[j], dest / "train" / f"r{k:03d}_{train[j]}")
    source = yaml.safe_load((data_dir / "data.yaml").read_text())
    path = dest / "data.yaml"
    path.write_text(yaml.safe_dump({"train_images": "train", "val_images": "val", "val_ann": "val.json",
                                    "nc": source["nc"], "names": source["names"]}, sort_keys=False))
    return path


def scale_timing(pack: Path, device: str, work: Path, log: Path, env: dict, timeout: float, cwd: Path,
                 model: str = "yolov6s_repvgg", eval_images: int = 5000, calib_images: int = 256,
                 extra: tuple = ()) -> dict:
    """The default PTQ of ``model`` on ``eval_images`` repeated val images, timed."""
    from yoloq.config import load_config
    from yoloq.data import load_data_config
    start = time.perf_counter()
    data_yaml = repeated_dataset(pack / "data", work / "scale_data", eval_images, calib_images)
    cfg = load_config(model)
    data_cfg = load_data_config(data_yaml)
    cfg = cfg.with_overrides(model={"nc": data_cfg.nc})
    ckpt = work / f"{cfg.model.name}_random_prior.pt"
    head = random_checkpoint(cfg, ckpt, sample_images(data_cfg, cfg.model.img_size))
    prepared = time.perf_counter() - start
    args = ["--cfg", model, "--weights", str(ckpt), "--data", str(data_yaml), *device_args(device, env), *extra]
    run = _ptq(args, work, "scale", log, env, max(1.0, timeout - prepared), cwd)
    report = run.pop("report")
    result = {**run, "model": model, "eval_images": eval_images, "calib_images": calib_images,
              "images": "the pack's val images repeated (hard links), shrunk to 320 px", "head": head,
              "prepare_s": round(prepared, 1), "target_s": SCALE_TARGET_S}
    if report is None:
        return {**result, "error": "the run failed or timed out; see the log", "target_met": False}
    timings = report["timings"]
    return {**result, "timings": timings, "target_met": run["wall_s"] <= SCALE_TARGET_S,
            "ratio_to_fp32_eval": round(timings["total"] / max(timings["eval_fp32"], 1e-9), 2),
            "eval_timing": report.get("eval_timing"), "memory": find_keys(report, ("peak", "memory", "rss", "cuda"))}


# --------------------------------------------------------------------------- TensorRT


def trt_check(lite: dict, pack: Path, work: Path, log: Path, env: dict, timeout: float, cwd: Path) -> dict:
    """Export the Lite-S device result and build / evaluate it with TensorRT, when present."""
    if importlib.util.find_spec("tensorrt") is None:
        return {"skipped": "TensorRT is not installed here (the 'tensorrt' module cannot be imported)"}
    ckpt = Path(lite.get("report_path", "")).parent / "quant.pt"
    if not ckpt.is_file():
        return {"skipped": f"no Lite-S result to export ({ckpt} missing)"}
    onnx, engine, out = work / "lite_s.onnx", work / "lite_s.engine", work / "trt_eval.json"
    steps = [yoloq_cmd("export", "--ckpt", str(ckpt), "--out", str(onnx), "--dynamic-batch"),    # = tools/export.py
             yoloq_cmd("trt", "build", "--onnx", str(onnx), "--engine", str(engine)),               # = tools/trt.py
             yoloq_cmd("trt", "eval", "--engine", str(engine), "--cfg", "yolov6lite_s",
                       "--data", str(pack / "data" / "data.yaml"), "--out", str(out))]
    start = time.perf_counter()
    for cmd in steps:
        code, _, _ = run_child(cmd, log, env, timeout=max(1.0, timeout - (time.perf_counter() - start)), cwd=cwd)
        if code != 0:
            return {"error": f"yoloq {' '.join(cmd[3:5])} exited with {code}; see the log"}
    result = json.loads(out.read_text())
    ap = result.get("stats", result).get("AP")
    int8 = lite.get("int8_AP", {}).get("device")
    return {"AP": None if ap is None else 100 * ap, "fake_quant_AP": int8,
            "seconds": round(time.perf_counter() - start, 1),
            "diff": None if ap is None or int8 is None else round(100 * ap - int8, 3), "tolerance": INT8_TOL}
