"""Block reconstruction (yoloq.quant.reconstruct): AdaRound rounding, learned activation steps,
QDrop, block discovery, and that the result is an ordinary prepared model (grid, sharing,
checkpoint, ONNX export)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pytorch_quantization.tensor_quant import fake_tensor_quant
from torch import nn

from yoloq.config import ConfigError, ModelConfig, QuantConfig, load_config
from yoloq.models import build_model
from yoloq.quant.adaround import (AdaRoundWeight, LearnedStepQuantizer, annealed_beta, level_multiplier,
                                  rectified_sigmoid)
from yoloq.quant.calibrate import calibrate
from yoloq.quant.checkpoint import load_quantized, save_quantized
from yoloq.quant.prepare import prepare, quant_layers
from yoloq.quant.recon_blocks import ReconstructionError, find_blocks
from yoloq.quant.reconstruct import ReconOptions, block_error, reconstruct
from yoloq.quant.recipe_config import recipe_from_config
from yoloq.quant.state import quant_state
from conftest import LITE_S_WEIGHTS, needs_shared


def rand_images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class ToyNet(nn.Module):
    """stem -> (left, right) -> concat -> head. The stem output is read by a conv of ``left`` and
    one of ``right`` (two blocks, one shared quantizer); ``left.2`` gets a few huge weights that
    set its per-channel scales, so round-to-nearest loses most of its other weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.left = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)
        with torch.no_grad():
            self.left[2].weight[:, 0, 0, 0] = 3.0

    def forward(self, x):
        s = self.stem(x)
        return self.head(torch.cat((self.left(s), self.right(s)), 1))


def calibrated(model: nn.Module, batches) -> nn.Module:
    q = prepare(model)
    calibrate(q, batches, "max", progress=False)
    return q


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: threads only add overhead (and contention on shared CPUs); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy():
    fp32 = ToyNet().eval()
    batches = [rand_images(8, 16, s) for s in range(3)]
    before = calibrated(fp32, batches)
    after = copy.deepcopy(before)
    info = reconstruct(after, fp32, batches, ReconOptions(method="qdrop", iters=250, lr=1e-2, progress=False))
    return fp32, batches, before, after, info


# --------------------------------------------------------------------------- the rounding pieces


def test_adaround_starts_at_the_float_weight_and_round_to_nearest():
    w = torch.randn(4, 3, 3, 3)
    amax = w.abs().amax(dim=(1, 2, 3))
    r = AdaRoundWeight(w, amax)
    soft = torch.clamp(r.soft_levels(), -127, 127) / r.multiplier
    assert torch.allclose(soft, w, atol=1e-5)
    r.hard = True
    # pytorch-quantization's weight fake quantization (narrow range) of the float weight
    assert torch.equal(r(w), fake_tensor_quant(w, amax.view(-1, 1, 1, 1), 8, False, True))
    with torch.no_grad():
        r.v.copy_(torch.where(r.v >= 0, 10.0, -10.0))                       # every h exactly 0 or 1
    assert float(r.regularizer(2.0).detach()) == 0.0 and r.undecided_fraction() == 0.0
    assert float(rectified_sigmoid(torch.tensor(0.0))) == pytest.approx(0.5)


def test_regularizer_schedule_warmup_then_20_to_2():
    assert annealed_beta(0, 100, 0.2) is None and annealed_beta(19, 100, 0.2) is None
    assert annealed_beta(20, 100, 0.2) == pytest.approx(20.0) and annealed_beta(99, 100, 0.2) == pytest.approx(2.0)
    assert 2.0 < annealed_beta(60, 100, 0.2) < 20.0


def test_learned_step_matches_lsq_gradients_and_the_deployed_quantizer():
    from yoloq.quant.learnable import LSQFunction
    from yoloq.quant.prepare import set_amax
    from yoloq.quant.scheme import new_input_quantizer
    x = (torch.randn(4, 3, 8, 8) * 2).requires_grad_()
    q = LearnedStepQuantizer(torch.tensor(3.0), learn=True)
    y = q(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    s_ref = torch.tensor(3.0 / 127, requires_grad=True)
    y_ref = LSQFunction.apply(x_ref, s_ref, None, -128, 127, 1.0, False)
    (y_ref * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad)
    assert float(q.scale.grad) == pytest.approx(float(s_ref.grad), rel=1e-5)
    deployed = new_input_quantizer()
    set_amax(deployed, q.amax())
    assert torch.equal(deployed(x.detach()), y.detach())          # bit for bit after the hand-over


def test_qdrop_keeps_about_p_of_the_elements_in_float():
    x = torch.randn(64, 8, 16, 16)
    q = LearnedStepQuantizer(torch.tensor(2.0), learn=True, drop_prob=0.5)
    q.generator = torch.Generator().manual_seed(0)
    quantized = q(x)
    assert not torch.equal(quantized, x)
    q.dropping = True
    mixed = q(x)
    kept_float = (mixed == x) & (quantized != x)
    share = float(kept_float.sum()) / float((quantized != x).sum())
    assert 0.45 < share < 0.55
    assert torch.equal(torch.where(mixed == x, quantized, mixed), quantized)   # the rest is quantized
    # gradients: 1 for every element kept in float, and only the quantized ones move the step
    q.generator = torch.Generator().manual_seed(1)
    xg = (x * 100).requires_grad_()                      # many elements clipped
    y = q(xg)
    y.sum().backward()
    v = (xg / q.scale).detach()
    outside = (v < -128) | (v > 127)
    kept, quantized = y == xg, y != xg
    assert (kept & outside).any() and bool((xg.grad[kept] == 1).all())
    assert bool((xg.grad[quantized & outside] == 0).all()) and bool((xg.grad[quantized & ~outside] == 1).all())
    expected = float(torch.where(quantized & outside, torch.clamp(torch.round(v), -128, 127), 0.).sum()
                     + torch.where(quantized & ~outside, torch.round(v) - v, 0.).sum())
    assert float(q.scale.grad) == pytest.approx(expected, rel=1e-3)


# --------------------------------------------------------------------------- on a small model


def test_reconstruction_lowers_the_block_error(toy):
    fp32, batches, before, after, info = toy
    assert [b["block"] for b in info["blocks"]] == ["stem", "left", "right", "head"]
    kept = [b for b in info["blocks"] if b["kept"]]
    assert kept and all(b["loss_after"] < b["loss_before"] for b in kept)
    assert all(b["loss_after"] <= b["loss_before"] for b in info["blocks"])
    left = next(b for b in info["blocks"] if b["block"] == "left")
    assert left["kept"] and left["loss_after"] < 0.8 * left["loss_before"]
    # the whole model moves closer to FP32, also on images reconstruction never saw
    x = rand_images(16, 16, seed=99)
    with torch.no_grad():
        ref = fp32(x)
        err_before, err_after = (float(((m(x) - ref) ** 2).mean()) for m in (before, after))
    assert err_after < 0.8 * err_before


def test_block_error_is_measured_on_the_given_inputs(toy):
    fp32, batches, before, after, _ = toy
    x = torch.cat(batches)
    with torch.no_grad():
        target = fp32.head(torch.cat((fp32.left(fp32.stem(x)), fp32.right(fp32.stem(x))), 1))
        feats = torch.cat((fp32.left(fp32.stem(x)), fp32.right(fp32.stem(x))), 1)
    err = block_error(before.head, (feats,), {}, target, chunk=5)
    expected = float(((before.head(feats) - target) ** 2).sum()) / (x.shape[0] * 16 * 16)   # per image, position
    assert err["loss"] == pytest.approx(expected, rel=1e-5)


def test_weights_end_exactly_on_the_quantization_grid(toy):
    _, _, before, after, _ = toy
    changed = 0
    for name, conv in quant_layers(after).items():
        wq = conv._weight_quantizer
        assert torch.equal(wq(conv.weight), conv.weight), name                  # fake quant reproduces it
        levels = conv.weight * level_multiplier(wq._amax)
        # integer levels up to float rounding (level / (127 / amax) * (127 / amax) is within an ulp)
        assert torch.allclose(levels, torch.round(levels), rtol=0, atol=1e-4) and levels.abs().max() <= 127, name
        assert torch.equal(wq._amax, quant_layers(before)[name]._weight_quantizer._amax)   # scales unchanged
        nearest = quant_layers(before)[name]
        changed += int((nearest._weight_quantizer(nearest.weight) != conv.weight).sum())
    assert changed > 0                                                          # rounding was learned


def test_shared_quantizers_stay_shared_objects_with_one_scale(toy):
    _, _, before, after, info = toy
    state = quant_state(after)
    shared = [s for s in state.placement.sites if len(s.consumers) > 1]
    assert any({c.split(".")[0] for c in s.consumers} == {"left", "right"} for s in shared)
    for site, holder, attr, _ in state.site_slots(after):
        assert getattr(holder, attr) is state.quantizers[site.name], (site.name, attr)
    assert after.left[0]._input_quantizer is after.right[0]._input_quantizer
    right = next(b for b in info["blocks"] if b["block"] == "right")
    assert right["shared_act"] == 1 and right["learned_act"] == 0        # learned by 'left', then kept
    amax_before = {n: float(q._amax) for n, q in quant_state(before).quantizers.items()}
    amax_after = {n: float(q._amax) for n, q in state.quantizers.items()}
    assert amax_after != amax_before and all(v > 0 for v in amax_after.values())


def test_each_method_and_its_block_size():
    fp32 = ToyNet().eval()
    batches = [rand_images(4, 16, 5)]
    for method, names in (("adaround", ["stem", "left.0", "left.2", "right", "head"]),
                          ("brecq", ["stem", "left", "right", "head"])):
        q = calibrated(fp32, batches)
        info = reconstruct(q, fp32, batches, ReconOptions(method=method, iters=40, lr=1e-2, progress=False))
        assert [b["block"] for b in info["blocks"]] == names and info["improved"] >= 1, method


# --------------------------------------------------------------------------- blocks of the real models


def test_blocks_of_lite_and_yolov6_cover_every_conv_once():
    from yoloq.models.lite import CSPBlock, DPBlock, LiteBlockS1, LiteBlockS2
    cfg = ModelConfig(name="yolov6lite_s", arch="lite", backbone="Lite_EffiBackbone", neck="Lite_EffiNeck",
                      width_multiple=0.7, img_size=64)
    for cfg in (cfg, ModelConfig(name="yolov6n", arch="yolov6", depth_multiple=0.33, width_multiple=0.25,
                                 img_size=64)):
        q = prepare(build_model(cfg).fuse().eval())
        layers = quant_state(q).placement.layers
        for size in (1, 12):
            blocks, _ = find_blocks(q, size)
            covered = [layer for b in blocks for layer in b.layers]
            assert sorted(covered) == sorted(layers) and len(covered) == len(set(covered))
            assert all(len(b.layers) <= size for b in blocks)
        if cfg.arch == "lite":
            kinds = {type(q.get_submodule(b.name)) for b in blocks}
            assert {LiteBlockS1, LiteBlockS2, CSPBlock, DPBlock} <= kinds
            assert [b.name for b in blocks][:2] == ["backbone.conv_0", "backbone.lite_effiblock_1"]


def test_conv_called_twice_is_a_clear_error():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(self.conv(x))

    q = calibrated(Twice().eval(), [rand_images(2, 8, 0)])
    with pytest.raises(ReconstructionError, match="'conv' is not called exactly once"):
        find_blocks(q)


# --------------------------------------------------------------------------- config and errors


def test_unknown_method_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"quant.reconstruction.method: 'adarond'.*did you mean 'adaround'"):
        QuantConfig.of(reconstruct="adarond")
    with pytest.raises(ConfigError, match="reconstruction method 'brec'"):
        ReconOptions(method="brec")
    with pytest.raises(ConfigError, match="reconstruction.drop_prob must be in"):
        QuantConfig.of(recon_drop_prob=1.0)
    path = tmp_path / "cfg.yaml"
    path.write_text("quant:\n  reconstruct: qdorp\n")
    with pytest.raises(ConfigError, match=rf"{path}.*quant.reconstruction.method: 'qdorp'.*did you mean 'qdrop'"):
        load_config(path)
    step = recipe_from_config(QuantConfig.of(reconstruct="qdrop", recon_iters=7))[-1]
    assert step.method == "qdrop" and ReconOptions(method=step.method, **dict(step.options)).iters == 7


def test_uncalibrated_model_and_missing_cuda_are_clear_errors():
    fp32 = ToyNet().eval()
    with pytest.raises(ReconstructionError, match="calibrated"):
        reconstruct(prepare(fp32), fp32, [rand_images(2, 16, 0)], ReconOptions(iters=1, progress=False))
    if not torch.cuda.is_available():
        from yoloq.device import DeviceError
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            reconstruct(calibrated(fp32, [rand_images(2, 16, 0)]), fp32, [rand_images(2, 16, 0)],
                        ReconOptions(iters=1, device="cuda", progress=False))


# --------------------------------------------------------------------------- checkpoint and export


@pytest.fixture(scope="module")
def tiny_yolov6():
    torch.manual_seed(0)
    cfg = ModelConfig(name="yolov6n", arch="yolov6", depth_multiple=0.33, width_multiple=0.25, img_size=64)
    fp32 = build_model(cfg).fuse().eval()
    batches = [rand_images(4, 64, s) for s in range(2)]
    q = calibrated(fp32, batches)
    info = reconstruct(q, fp32, batches, ReconOptions(method="brecq", iters=8, lr=1e-2, progress=False))
    assert info["improved"] > 0
    return fp32, q


def test_checkpoint_round_trip_keeps_the_learned_model(tiny_yolov6, tmp_path):
    _, q = tiny_yolov6
    save_quantized(q, tmp_path / "quant.pt", meta={"reconstruct": "brecq"})
    loaded, meta = load_quantized(tmp_path / "quant.pt")
    assert meta["reconstruct"] == "brecq"
    for (ka, va), (kb, vb) in zip(q.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    x = rand_images(2, 64, seed=7)
    with torch.no_grad():
        assert torch.equal(q(x), loaded(x))


def test_export_of_a_reconstructed_model_matches_fake_quant_in_onnxruntime(tiny_yolov6, tmp_path):
    pytest.importorskip("onnxruntime")
    from yoloq.runtime import export_onnx
    from yoloq.runtime.onnx_export import to_export_model
    from yoloq.runtime.ort import ort_session
    _, q = tiny_yolov6
    info = export_onnx(q, tmp_path / "recon.onnx", img_size=64, batch=None)
    x = rand_images(3, 64, seed=11)
    with torch.no_grad():
        fq, fp = q(x).numpy(), to_export_model(q, fp32=True)(x).numpy()
    session = ort_session(info.path)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    d = np.abs(out - fq)          # tolerance of tests/test_export.py (one-level flips cascade)
    assert d[..., 4:].max() < 0.01 and d[..., 4:].mean() < 5e-4
    assert np.quantile(d[..., :4], 0.99) < 0.5 and np.abs(fp - fq).max() > 0


# --------------------------------------------------------------------------- the PTQ pipeline


@pytest.mark.slow
@needs_shared
def test_run_ptq_with_reconstruction_stage_and_report(tmp_path):
    from test_ptq import tiny, write_cfg
    from yoloq.recipes.ptq import run_ptq
    assert LITE_S_WEIGHTS.is_file()
    out = tmp_path / "runs"
    res = run_ptq(write_cfg(tmp_path, quant={"reconstruct": "qdrop", "recon_iters": 2, "recon_images": 4}),
                  out=str(out), name="rec", plots=False,
                  **{**tiny(diagnose=False, sensitivity="off"), "max_images": 4})
    rec = res.report["reconstruction"]
    assert rec["method"] == "qdrop" and rec["images"] == 4 and len(rec["blocks"]) == 46
    assert "reconstruct" in res.timings
    md = (out / "rec" / "report.md").read_text()
    assert "## Block reconstruction" in md and "`backbone.lite_effiblock_1`" in md
    loaded, meta = load_quantized(out / "rec" / "quant.pt")
    assert meta["reconstruct"] == "qdrop"
    for (ka, va), (kb, vb) in zip(res.qmodel.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(va, vb), ka
