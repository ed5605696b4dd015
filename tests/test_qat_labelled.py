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
    from yoloq.config import load_data_config
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
