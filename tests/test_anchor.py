"""Regression anchor for the shipped default PTQ pipeline (issue 25): `yoloq ptq --cfg yolov6lite_s`
with the config as shipped (calib auto on 256 train images, per-channel input scaling of every conv
at alpha 0.9, bias correction), real weights, real COCO val images.

The whole 500-image run is the README's headline (FP32 23.12, INT8 22.85, drop 0.27 with one thread);
to keep the suite's time moderate this test evaluates the first 100 val images, whose numbers were
measured for this test with

    yoloq ptq --cfg yolov6lite_s --max-images 100 --thread-invariant --sensitivity off --no-diagnose \\
        --no-plots --no-progress

(sensitivity and diagnosis only report; they do not change the INT8 model of this config).
``--thread-invariant`` takes oneDNN's thread-dependent convolutions out, so the number is the same
with any thread count; what is left to the band is another CPU's arithmetic (see BAND).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, needs_shared

# measured with the command above (first 100 val images, 2026-12-07, torch 2.14.1 CPU)
REFERENCE = {"fp32": 31.75, "int8": 31.64, "drop": 0.10}
FP32_BAND = 0.15    # FP32 has no quantizer to amplify last-bit differences
# INT8 AP / drop: another CPU's arithmetic (thread counts give the same bits). Measured with the
# AVX2 code paths forced on this AVX-512 machine (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
# MKL_ENABLE_INSTRUCTIONS=AVX2, the command above): FP32 31.75, INT8 31.95, drop -0.20, i.e.
# +0.31 / -0.30 from the reference; the band leaves room for that and a little more.
BAND = 0.5
ARGS = ["--cfg", "yolov6lite_s", "--max-images", "100", "--thread-invariant", "--sensitivity", "off",
        "--no-diagnose", "--no-plots", "--no-progress"]          # of `yoloq ptq` (tools/ptq.py)


@pytest.mark.slow
@needs_shared
def test_default_pipeline_keeps_its_documented_accuracy(tmp_path):
    """The shipped default on the first 100 val images: FP32, INT8 and drop within the band of the
    reference. Measured with 1 and 2 threads on one machine: identical (31.75 / 31.64 / 0.10). A
    regression that switches the transforms off or costs one point fails: checked with
    `--channel-scale off --bias-correction off` added, which gives INT8 23.22 (drop 8.53)."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "ptq.py"), *ARGS, "--out", str(tmp_path),
                           "--name", "anchor"], capture_output=True, text=True, timeout=3600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "anchor" / "report.json").read_text())
    assert report["data"]["eval_images"] == 100 and report["calibration"]["images"] == 256
    fp32, int8, drop = report["fp32"]["AP"] * 100, report["int8"]["AP"] * 100, report["drop"]["AP"]
    assert fp32 == pytest.approx(REFERENCE["fp32"], abs=FP32_BAND), fp32
    assert int8 == pytest.approx(REFERENCE["int8"], abs=BAND), (int8, REFERENCE["int8"])
    assert drop == pytest.approx(REFERENCE["drop"], abs=BAND), (drop, REFERENCE["drop"])
