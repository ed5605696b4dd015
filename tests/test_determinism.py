"""Determinism (issue 25 item 1): the same run gives the same numbers, and with
``--thread-invariant`` the same numbers with any thread count. oneDNN's convolutions differ in the
last bits with the thread count on some layer shapes (measured on Lite-S at 320, docs/results.md),
and fake quantization turns a few of those into whole-level flips; PyTorch's own kernels do not."""
from __future__ import annotations

import json

import pytest
import torch

from yoloq.recipes.common import conv_kernels, thread_invariant_kernels
from conftest import needs_shared


def with_threads(n: int, fn):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(saved)


@needs_shared
def test_thread_invariant_kernels_give_the_same_bits_with_1_and_2_threads():
    """The calibrated real Lite-S at 320 (the shapes where oneDNN's results move with the threads)."""
    from yoloq.config import load_config
    from yoloq.models import load_model
    from yoloq.quant import Calibrate, quantize
    fp32 = load_model(load_config("yolov6lite_s").model)
    x = torch.rand(2, 3, 320, 320, generator=torch.Generator().manual_seed(0))
    qmodel = quantize(fp32, [Calibrate("max")], [x])
    with torch.no_grad(), thread_invariant_kernels():
        outputs = [with_threads(n, lambda: qmodel(x)) for n in (1, 2)]
        assert conv_kernels(True).startswith("pytorch")
    assert torch.equal(outputs[0], outputs[1])
    assert torch.backends.mkldnn.enabled == torch.backends.mkldnn.is_available()        # put back after


@pytest.mark.slow
@needs_shared
def test_two_runs_with_different_thread_counts_give_the_same_report(tmp_path):
    """The default pipeline twice with --thread-invariant: one thread and ``device`` left to ``auto``,
    then two threads with ``device="cpu"`` given (issue 24's acceptance: on a CPU machine the flag
    changes nothing). Every number of the report is the same."""
    from test_ptq import TINY, write_cfg
    from yoloq.recipes.ptq import run_ptq
    cfg = write_cfg(tmp_path, quant={"calib": "auto", "channel_scale": "all", "channel_scale_alpha": 0.9,
                                     "bias_correction": True})
    # PyTorch's own conv kernels are several times slower than oneDNN's: the sensitivity pass (one
    # forward per layer and image) on 1 image keeps the two runs to a few minutes
    small = {**TINY, "max_images": 4, "quant": {**TINY["quant"], "sensitivity_images": 1, "auto_images": 4,
                                                "transform_images": 4}}
    for n, device in ((1, "auto"), (2, "cpu")):
        with_threads(n, lambda: run_ptq(cfg, out=str(tmp_path / "runs"), name=f"t{n}", thread_invariant=True,
                                        device=device, **small))
    one, two = (json.loads((tmp_path / "runs" / f"t{n}" / "report.json").read_text()) for n in (1, 2))
    assert (one["env"]["threads"], two["env"]["threads"]) == (1, 2) and two["env"]["device"] == "cpu"
    for key in ("fp32", "int8", "drop", "calibration", "diagnosis"):
        assert one[key] == two[key], key
    assert [r["score"] for r in one["sensitivity"]["ranking"]] == [r["score"] for r in two["sensitivity"]["ranking"]]
    steps = [{s: {k: v for k, v in st.items() if k != "seconds"} for s, st in r["transforms"]["steps"].items()}
             for r in (one, two)]
    assert steps[0] == steps[1]
    assert two["memory"]["peak_rss_mib"] > 0
