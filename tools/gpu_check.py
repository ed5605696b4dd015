#!/usr/bin/env python3
"""The GPU check (issue 24 item 6), for one short call on a device machine with torch and
onnxruntime but no ../shared, no TensorRT (maybe), no network: run from the repository root with
the pack of tools/gpu_pack.py carried along.

    python3 tools/gpu_check.py --pack .carry --out "$OUT"            # on the GPU machine
    python3 tools/gpu_check.py --pack /tmp/pack --out /tmp/gc --device cpu --eval-images 16 \\
        --calib-images 16 --budget 900 -- --sensitivity-images 4   # the CPU path, here (tests)

Steps, each written to <out>/gpu_check.json as soon as it ends (so a run cut short still reports):
  0. the environment (Python, torch, CUDA device, TensorRT) and the wheels: the modules yoloq needs
     that are missing are installed from <pack>/wheels (pip --no-index --no-deps --target), then
     yoloq itself (pip --no-deps --no-build-isolation --target; the tree on PYTHONPATH if that fails);
  1. the default Lite-S PTQ with --device on the packed data vs the CPU reference of the pack
     (tolerances in yoloq/bench/gpu_check.py: FP32 AP 0.05, INT8 AP 0.5 points);
  2. the default PTQ of yolov6s@640 (random weights with the head prior) on --eval-images images
     (the pack's val images repeated; default 5,000) with 256 calibration images, timed;
  3. tools/trt.py build / eval of the Lite-S result when TensorRT is importable.
The steps share --budget seconds (default 540, under the device's 10-minute command limit); a step
that runs out is stopped and reported. Output: gpu_check.json, gpu_check.log (every command's
output), and the two report.json files. Exit 0 when step 1 passed and step 2 finished.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# module -> wheel in the pack (None: not packed, the device image is expected to have it)
NEEDED = {"torch": None, "numpy": None, "torchvision": None, "cv2": None, "scipy": None, "absl": None,
          "matplotlib": None, "yaml": "pyyaml", "tqdm": "tqdm", "pytorch_quantization": "pytorch-quantization",
          "pycocotools": "pycocotools"}
OPTIONAL = {"onnx": None, "onnxruntime": None, "faster_coco_eval": "faster-coco-eval", "onnxslim": "onnxslim",
            "colorama": "colorama"}


def build_parser():
    p = argparse.ArgumentParser(prog="tools/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pack", type=Path, default=REPO / ".carry", help="the pack of tools/gpu_pack.py")
    p.add_argument("--out", type=Path, required=True, help="result folder ($OUT on the device)")
    p.add_argument("--device", default="cuda", help="device of the PTQ runs (cpu: this script's CPU path)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all steps (default %(default)s)")
    p.add_argument("--work", type=Path, help="scratch folder (default: a new one under /tmp)")
    p.add_argument("--eval-images", type=int, default=5000, help="step 2's eval images (default %(default)s)")
    p.add_argument("--calib-images", type=int, default=256, help="step 2's calibration images (default %(default)s)")
    p.add_argument("--scale-model", default="yolov6s_repvgg", help="step 2's config (default %(default)s)")
    p.add_argument("--skip-scale", action="store_true", help="skip step 2")
    p.add_argument("--no-install", action="store_true", help="use the installed packages and the tree as they are")
    return p


def probe() -> dict:
    env = {"python": platform.python_version(), "executable": sys.executable, "machine": platform.machine(),
           "cpus": os.cpu_count(), "tensorrt": importlib.util.find_spec("tensorrt") is not None}
    try:
        import torch
        env.update(torch=torch.__version__, cuda=torch.cuda.is_available())
        if torch.cuda.is_available():
            env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count())
    except ImportError as err:
        env["torch"] = f"missing ({err})"
    return env


def _pip(args: list, log: Path) -> int:
    with open(log, "a") as f:
        f.write(f"\n$ pip {' '.join(args)}\n")
        f.flush()
        return subprocess.run([sys.executable, "-m", "pip", *args], stdout=f, stderr=subprocess.STDOUT).returncode


def install(pack: Path, site: Path, log: Path) -> dict:
    """Missing wheels into ``site/deps``, yoloq into ``site/pkg``; both put on the paths."""
    missing = [m for m in {**NEEDED, **OPTIONAL} if importlib.util.find_spec(m) is None]
    wheels = sorted({w for m, w in {**NEEDED, **OPTIONAL}.items() if m in missing and w})
    info = {"missing_before": missing, "installed": [], "yoloq": "tree"}
    paths = []
    if wheels:
        code = _pip(["install", "-q", "--no-index", "--no-deps", "--no-compile", "--find-links", str(pack / "wheels"),
                     "--target", str(site / "deps"), *wheels], log)
        info["installed"] = wheels if code == 0 else []
        info["wheel_install_exit"] = code
        paths.append(site / "deps")
    source = site / "src"                 # a copy: building in the tree would leave build/ and *.egg-info there
    shutil.copytree(REPO / "yoloq", source / "yoloq", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", source)
    code = _pip(["install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "--no-compile",
                 "--target", str(site / "pkg"), str(source)], log)
    paths.append(site / "pkg" if code == 0 else REPO)
    info["yoloq"] = "installed (pip --no-deps)" if code == 0 else f"tree on PYTHONPATH (pip exit {code})"
    for p in reversed(paths):
        sys.path.insert(0, str(p))
    os.environ["PYTHONPATH"] = os.pathsep.join([*map(str, paths), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    importlib.invalidate_caches()
    info["missing_after"] = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    return info


class Result:
    """gpu_check.json, rewritten after every step."""

    def __init__(self, out: Path):
        self.path, self.data = out / "gpu_check.json", {}

    def set(self, key: str, value) -> None:
        self.data[key] = value
        tmp = self.path.with_name(".gpu_check.json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def run_steps(a, result: Result, log: Path, work: Path, deadline: float) -> bool:
    from yoloq.bench import gpu_check as gc
    left = lambda: max(1.0, deadline - time.perf_counter())      # noqa: E731
    env, cwd = dict(os.environ), work                            # children import the installed yoloq
    lite = gc.lite_check(a.pack, a.device, work, log, env, left(), cwd)
    result.set("lite_s", lite)
    if "report_path" in lite and Path(lite["report_path"]).is_file():
        shutil.copy(lite["report_path"], a.out / "lite_s_report.json")
    scale = {"skipped": "--skip-scale"}
    if not a.skip_scale:
        scale = gc.scale_timing(a.pack, a.device, work, log, env, left(), cwd, model=a.scale_model,
                                eval_images=a.eval_images, calib_images=a.calib_images, extra=tuple(a.ptq_args))
        if Path(scale.get("report_path", "")).is_file():
            shutil.copy(scale["report_path"], a.out / "scale_report.json")
    result.set("scale", scale)
    result.set("tensorrt", gc.trt_check(lite, a.pack, work, log, env, left(), cwd))
    return bool(lite.get("passed")) and (a.skip_scale or scale.get("exit_code") == 0)


def main(argv=None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    own, ptq_args = (raw[:raw.index("--")], raw[raw.index("--") + 1:]) if "--" in raw else (raw, [])
    a = build_parser().parse_args(own)
    a.ptq_args = ptq_args
    start = time.perf_counter()
    a.pack, a.out = a.pack.resolve(), a.out.resolve()
    if not (a.pack / "reference.json").is_file():
        print(f"error: {a.pack}/reference.json not found: make the pack with tools/gpu_pack.py", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    work = (a.work or Path(f"/tmp/yoloq_gpu_check_{os.getpid()}")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log, result = a.out / "gpu_check.log", Result(a.out)
    result.set("command", " ".join(["tools/gpu_check.py", *raw]))
    result.set("env", probe())
    result.set("install", {"skipped": "--no-install"} if a.no_install else install(a.pack, work / "site", log))
    if a.no_install:
        sys.path.insert(0, str(REPO))
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    missing = result.data["install"].get("missing_after", [])
    if missing:
        result.set("passed", False)
        print(f"error: modules still missing after the install: {missing}; see {log}", file=sys.stderr)
        return 1
    passed = run_steps(a, result, log, work, start + a.budget)
    result.set("seconds", round(time.perf_counter() - start, 1))
    result.set("passed", passed)
    print(json.dumps({k: result.data.get(k) for k in ("env", "passed", "seconds")}, default=str))
    for key in ("lite_s", "scale", "tensorrt"):
        print(key, json.dumps({k: v for k, v in result.data.get(key, {}).items()
                               if k not in ("timings", "cpu_timings", "eval_timing")}, default=str))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
