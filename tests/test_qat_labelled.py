"""QAT beyond label-free distillation: the YOLOv6 loss on labelled train images (det+distill),
augmented views, the RepOptimizer for RepOpt models, and the logs a user watches (TensorBoard,
CSV, loss curve)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

from conftest import tiny_coco
from yoloq.config import load_config
from yoloq.models import build_model
from yoloq.quant import Calibrate, quantize, save_quantized
from yoloq.recipes.qat.run import repopt_masks, run_qat


def _setup(tmp_path, block: str = "repvgg", qat: dict | None = None):
    """A tiny yolov6n-structured model at 64 px, random weights, PTQ-calibrated and saved; its config
    on the tiny labelled COCO set."""
    (tmp_path / "data").mkdir()
    data = tiny_coco(tmp_path / "data")
    torch.manual_seed(0)
    model_cfg = {"name": f"tiny_{block}", "arch": "yolov6", "block": block, "depth_multiple": 0.33,
                 "width_multiple": 0.0625, "img_size": 64}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": model_cfg, "data": str(data), "eval": {"batch_size": 4, "workers": 0},
                                        "qat": {"epochs": 2, "images": 4, "batch_size": 2, "workers": 0,
                                                "collapse_ratio": 0.0, **(qat or {})},
                                        "augment": {"close_mosaic_epochs": 1}}))
    cfg = load_config(cfg_path)
    fp32 = build_model(cfg.model)
    weights = tmp_path / "fp32.pt"
    torch.save({"model_state_dict": fp32.state_dict()}, weights)
    cfg_dict = yaml.safe_load(cfg_path.read_text())
    cfg_dict["model"]["weights"] = str(weights)
    cfg_path.write_text(yaml.safe_dump(cfg_dict))
    fused = fp32.eval().fuse()
    qmodel = quantize(fused, [Calibrate()], [torch.rand(2, 3, 64, 64) for _ in range(2)])
    save_quantized(qmodel, tmp_path / "ptq" / "quant.pt", meta={"name": "tiny"})
    return cfg_path, tmp_path / "ptq"


@pytest.mark.filterwarnings("ignore:no detections to evaluate")
def test_labelled_augmented_qat_writes_its_logs(tmp_path):
    cfg, ptq = _setup(tmp_path, qat={"loss": "det+distill", "augment": True})
    result = run_qat(cfg, from_dir=str(ptq), out=str(tmp_path / "qat"), name="lab", progress=False, max_images=2)
    rep = result.report
    assert rep["train"]["labels"].startswith("labelled") and rep["train"]["augmented"] and rep["train"]["images"] == 4
    assert all(r["det"] > 0 and r["loss"] > r["det"] * 0.99 for r in result.history)     # the YOLOv6 term is in
    assert len(rep["train"]["step_losses"]) == 2 * 2                                       # 2 epochs x 2 steps
    out = tmp_path / "qat" / "lab"
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    csv = (out / "results.csv").read_text().splitlines()
    assert len(csv) == 3 and "act_scale_ratio_mean" in csv[0] and "det" in csv[0]
    assert (out / "curves.png").stat().st_size > 1000
    assert json.loads((out / "report.json").read_text())["config"]["qat"]["loss"] == "det+distill"


def test_augmented_views_change_per_epoch_and_repeat_per_seed(tmp_path):
    from yoloq.data import load_data_config
    from yoloq.recipes.qat.data import qat_data
    cfg_path, _ = _setup(tmp_path, qat={"augment": True})
    cfg = load_config(cfg_path)
    data = qat_data(cfg, load_data_config(cfg.data), 64)
    dataset = data.loader.dataset
    assert not data.labelled and data.augmented and data.images == 4
    dataset.set_epoch(0)
    a, a_again = dataset[0][0], dataset[0][0]
    dataset.set_epoch(1)
    b = dataset[0][0]
    assert torch.equal(a, a_again) and not torch.equal(a, b)


def test_labelled_qat_needs_labels(tmp_path):
    from yoloq.recipes.qat import QATError
    cfg_path, ptq = _setup(tmp_path, qat={"loss": "det+distill"})
    raw = yaml.safe_load(cfg_path.read_text())
    data = yaml.safe_load(open(raw["data"]).read())
    data["train_ann"] = ""
    nolabels = tmp_path / "data" / "nolabels_at_all.yaml"
    nolabels.write_text(yaml.safe_dump(data))
    with pytest.raises(QATError, match="needs labelled train images"):
        run_qat(cfg_path, from_dir=str(ptq), out=str(tmp_path / "qat"), progress=False, data=str(nolabels))


def test_repopt_qat_masks_are_the_repopt_update_of_the_folded_kernel(tmp_path):
    """One SGD step on a BN-folded kernel with mask a^2 M equals folding after one RepOpt step
    (mask M) on the unfolded kernel, a = gamma / sigma (the BN is fixed during QAT)."""
    from yoloq.quant.checkpoint import load_quantized
    from yoloq.train.repopt import extract_scales, save_scales
    hs = build_model(load_config("yolov6n_hs").with_overrides(model={"width_multiple": 0.0625}).model)
    for m in hs.modules():                                   # trained-looking scales
        if hasattr(m, "scale_conv"):
            with torch.no_grad():
                m.scale_conv.weight.uniform_(0.5, 1.5)
                m.scale_1x1.weight.uniform_(0.1, 0.9)
    scales = save_scales(extract_scales(hs), tmp_path / "scales.pt")
    cfg_path, ptq = _setup(tmp_path, block="repopt", qat={"scales": str(scales)})
    cfg = load_config(cfg_path)
    student, _ = load_quantized(ptq / "quant.pt")
    masks = repopt_masks(cfg, student)
    name = "backbone.ERBlock_2.0"
    fp32 = build_model(cfg.model)
    fp32.load_state_dict(torch.load(cfg.model.weights, weights_only=True)["model_state_dict"])
    block = fp32.get_submodule(name)
    folded = student.get_submodule(f"{name}.conv").weight
    a = (block.bn.weight / torch.sqrt(block.bn.running_var + block.bn.eps)).detach().view(-1, 1, 1, 1)
    g_folded = torch.randn_like(folded)                      # dL/dW_fold; dL/dW = a * dL/dW_fold
    from yoloq.train.repopt import load_scales, target_masks
    m = target_masks(fp32, load_scales(scales))[block.conv.weight]
    lr = 0.1
    step_unfolded = a * (block.conv.weight.detach() - lr * m * (a * g_folded))
    step_folded = folded.detach() - lr * masks[folded] * g_folded
    assert torch.allclose(step_folded, step_unfolded, rtol=1e-5, atol=1e-6)
    from yoloq.recipes.qat import QATError
    no_scales = dataclasses.replace(cfg, qat=dataclasses.replace(cfg.qat, scales=None))
    with pytest.raises(QATError, match="set qat.scales"):
        repopt_masks(no_scales, student)


# --------------------------------------------------------------------------- inputs, failures, noise


def test_resume_without_last_pt_scales_on_a_non_repopt_model_and_a_missing_device_are_refused(tmp_path):
    from yoloq.recipes.qat import QATError
    cfg, ptq = _setup(tmp_path)
    out = tmp_path / "qat"
    with pytest.raises(QATError, match=r"--resume: no checkpoint to continue at .*never/last.pt"):
        run_qat(cfg, from_dir=str(ptq), out=str(out), name="never", resume=True, progress=False)
    with pytest.raises(QATError, match="'tiny_repvgg' .* is not a RepOpt model"):
        run_qat(cfg, from_dir=str(ptq), out=str(out), name="s", progress=False, qat={"scales": str(cfg)})
    from yoloq.device import DeviceError
    for device in ("tpu", "cuda:99"):
        with pytest.raises(DeviceError, match=f"device '{device}'"):
            run_qat(cfg, from_dir=str(ptq), out=str(out), name="d", progress=False, device=device)
    assert not out.exists()


def test_a_diverged_run_leaves_nothing(tmp_path):
    from yoloq.quant.learnable import QuantizerDivergenceError
    cfg, ptq = _setup(tmp_path)
    out = tmp_path / "qat"
    with pytest.raises(QuantizerDivergenceError, match=r"epoch 1 step \d: .*NaN/inf"):
        run_qat(cfg, from_dir=str(ptq), out=str(out), name="div", progress=False, max_images=2,
                qat={"quantizer": "pact", "lr": 1e30})
    assert not out.exists()                                   # no tensorboard/, results.csv, last.pt


def _cli(args, env_extra=None):
    import os
    import subprocess
    import sys
    from conftest import REPO
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(REPO / "tools" / "qat.py")] + [str(a) for a in args], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.filterwarnings("ignore:no detections to evaluate")
def test_pact_qat_keeps_the_library_log_out_of_the_terminal(tmp_path):
    """pytorch-quantization warns once per quantizer ("Overwriting amax") when a state dict is loaded:
    those lines go to the run folder's pytorch_quantization.log, not the terminal."""
    cfg, ptq = _setup(tmp_path, qat={"epochs": 1})
    proc = _cli(["--cfg", cfg, "--from", ptq, "--quantizer", "pact", "--out", tmp_path / "qat", "--name", "p",
                 "--max-images", 2, "--no-progress", "--no-plots", "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Overwriting amax" not in proc.stderr + proc.stdout
    log = tmp_path / "qat" / "p" / "pytorch_quantization.log"
    assert "Overwriting amax" in log.read_text()


def test_qat_from_fp32_weights_runs_the_config_ptq_first(tmp_path):
    """--weights: the config's PTQ in memory (the same student `yoloq ptq` saves), then QAT."""
    from yoloq.data import load_data_config
    from yoloq.quant.checkpoint import load_quantized
    from yoloq.recipes.ptq import run_ptq
    from yoloq.recipes.qat.run import ptq_student
    cfg_path, _ = _setup(tmp_path, qat={"epochs": 1})
    raw = yaml.safe_load(cfg_path.read_text())
    raw["quant"] = {"calib_images": 4, "batch_size": 2, "workers": 0, "sensitivity": "off", "diagnose": False,
                    "bias_correction": True, "transform_images": 4}
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_path)
    weights = cfg.model.weights
    run_ptq(cfg, out=str(tmp_path / "ptq_runs"), name="ref", progress=False, plots=False, max_images=2)
    saved, _ = load_quantized(tmp_path / "ptq_runs" / "ref" / "quant.pt")
    student, meta = ptq_student(cfg, load_data_config(cfg.data), weights, progress=False)
    ref = saved.state_dict()
    assert meta["weights"] == str(weights) and set(student.state_dict()) == set(ref)
    for key, value in student.state_dict().items():
        assert torch.equal(value, ref[key]), key
    proc = _cli(["--cfg", cfg_path, "--weights", weights, "--out", tmp_path / "qat", "--max-images", 2,
                 "--no-progress", "--no-plots", "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "qat" / "tiny_repvgg_lsqplus-symmetric" / "report.json").read_text())
    assert report["from"]["weights"] == str(weights) and report["from"]["checkpoint"] is None
    both = _cli(["--cfg", cfg_path, "--weights", weights, "--from", tmp_path / "ptq", "--out", tmp_path / "qat"])
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_export_and_bench_fidelity_with_fp32_weights_say_which_command_to_run(tmp_path, capsys):
    from yoloq.cli import main as yoloq_main
    cfg, _ = _setup(tmp_path)
    weights = load_config(cfg).model.weights
    for args in (["export", "--cfg", cfg, "--weights", weights, "--out", tmp_path / "x.onnx"],
                 ["bench-fidelity", "--cfg", cfg, "--weights", weights]):
        code = yoloq_main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 2 and f"yoloq ptq --cfg {cfg} --weights {weights}" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.onnx").exists()
