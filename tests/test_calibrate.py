"""Calibration (yoloq.quant.calibrate) and quantized checkpoints (yoloq.quant.checkpoint).

Amax rules are checked against known distributions and against pytorch-quantization's own
reference searches; the end-to-end check uses the shared Lite-S weights and train images.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pytorch_quantization.calib.histogram import _compute_amax_entropy
from pytorch_quantization.tensor_quant import fake_tensor_quant
from scipy.stats import norm
from torch import nn

from yoloq.quant.state import quant_state  # noqa: E402
from yoloq.config import QuantConfig, load_config
from yoloq.models import build_model
from yoloq.quant.calibrate import (AUTO_METHODS, CalibrationError, RangeHistogram, amax_entropy, amax_mse,
                                   amax_percentile, apply_calibration, calibrate, calibrate_auto, output_error)
from yoloq.quant.prepare import input_quantizers, prepare, quant_layers, set_layers_quantized, weight_quantizers
from yoloq.quant.checkpoint import QuantCheckpointError, load_quantized, save_quantized
from conftest import REPO, SHARED  # noqa: E402



def one_conv():
    return nn.Sequential(nn.Conv2d(3, 4, 1)).eval()


def hist_of(x: torch.Tensor, bins: int = 2048) -> RangeHistogram:
    h = RangeHistogram(bins)
    for part in x.split(len(x) // 4):
        h.collect(part)
    return h


# --------------------------------------------------------------------------- histogram


def test_histogram_keeps_width_and_counts_exactly():
    h = RangeHistogram(100)
    h.collect(torch.tensor([0.0, 0.5, 1.0]))           # width 0.01
    h.collect(torch.tensor([-2.0, 0.25]))               # range grows: bins appended, same width
    assert h.width == pytest.approx(0.01)
    assert h.hist.numel() == 200 and float(h.hist.sum()) == 5
    assert float(h.hist[199]) == 1 and float(h.hist[25]) == 1


def test_histogram_merges_bins_when_range_explodes():
    h = RangeHistogram(64)
    h.collect(torch.rand(1000) * 1e-3)
    h.collect(torch.tensor([10.0]))
    assert h.hist.numel() <= 8 * 64 and float(h.hist.sum()) == 1001


# --------------------------------------------------------------------------- amax rules


def test_max_on_uniform_data_is_the_max():
    torch.manual_seed(0)
    q = prepare(one_conv())
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    calibrate(q, [x[:2], x[2:]], method="max", progress=False)
    assert float(q[0]._input_quantizer.amax) == pytest.approx(float(x.abs().max()))
    w = q[0].weight.detach().abs().amax(dim=(1, 2, 3))
    torch.testing.assert_close(q[0]._weight_quantizer.amax.flatten(), w)


def test_percentile_on_gaussian_matches_quantile():
    torch.manual_seed(0)
    h = hist_of(torch.randn(2_000_000))
    for p in (99.9, 99.99):
        analytic = norm.ppf(0.5 + p / 200)                   # quantile of |x|
        assert amax_percentile(h.hist, h.width, p) == pytest.approx(analytic, abs=0.05)


def test_mse_on_gaussian_near_analytic_optimum():
    # 8-bit narrow range: argmin 2*E[(|x|-a)^2; |x|>a] + (a/127)^2/12 is 3.92 sigma
    torch.manual_seed(0)
    sigma = 2.0
    h = hist_of(torch.randn(1_000_000) * sigma)
    amax = amax_mse(h.hist, h.width)
    assert 3.6 * sigma < amax < 4.3 * sigma


def _reference_mse(hist: torch.Tensor, width: float) -> float:
    """pytorch-quantization's _compute_amax_mse loop, on CPU."""
    c = (torch.arange(hist.numel(), dtype=torch.float64) + 0.5) * width
    errs = [float(((fake_tensor_quant(c.float(), c[i].float(), 8, False).double() - c) ** 2 * hist).mean())
            for i in range(128, hist.numel())]
    return float(c[128 + int(np.argmin(errs))])


@pytest.mark.parametrize("dist", ["relu_gauss", "laplace", "outliers"])
def test_mse_and_entropy_match_pytorch_quantization(dist):
    torch.manual_seed(1)
    data = {"relu_gauss": torch.relu(torch.randn(100_000)) * 3,
            "laplace": torch.distributions.Laplace(0.0, 1.0).sample((100_000,)),
            "outliers": torch.cat([torch.rand(50_000), torch.rand(20) * 40])}[dist]
    h = hist_of(data, 512)
    assert amax_mse(h.hist, h.width) == pytest.approx(_reference_mse(h.hist, h.width))
    edges = (torch.arange(h.hist.numel() + 1, dtype=torch.float64) * h.width).numpy()
    ref = float(_compute_amax_entropy(h.hist.numpy().astype(np.int64), edges, 8, False))
    assert amax_entropy(h.hist, h.width) == pytest.approx(ref, rel=1e-6)


def test_entropy_on_gaussian_is_reasonable():
    torch.manual_seed(0)
    h = hist_of(torch.randn(1_000_000))
    assert 3.0 < amax_entropy(h.hist, h.width) < float(h.width * h.hist.numel())


# --------------------------------------------------------------------------- calibrate()


class NaNMiddle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_nan_activation_names_the_layer():
    model = NaNMiddle().eval()
    with torch.no_grad():
        model.a.bias[1] = float("nan")
    q = prepare(model)
    with pytest.raises(CalibrationError, match=r"batch 0: NaN in the input of b "):
        calibrate(q, [torch.rand(1, 3, 8, 8)], progress=False)
    with pytest.raises(CalibrationError, match="no images"):
        calibrate(prepare(NaNMiddle().eval()), [], progress=False)
    with pytest.raises(ValueError, match="calibrate_auto"):
        calibrate(prepare(NaNMiddle().eval()), [torch.rand(1, 3, 8, 8)], method="auto", progress=False)


def test_statistics_collected_once_and_deterministic():
    torch.manual_seed(0)
    model = NaNMiddle().eval()
    x = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    q1, q2 = prepare(model), prepare(model)
    calibrate(q1, x, method="entropy", progress=False)
    calibrate(q2, x, method="max", progress=False)
    apply_calibration(q2, "entropy")                      # same statistics, no data pass
    for (n, a), (_, b) in zip(input_quantizers(q1).items(), input_quantizers(q2).items()):
        assert float(a.amax) == float(b.amax), n
    assert quant_state(q2).calib.method == "entropy"
    assert apply_calibration(q2, "percentile-99.9") != apply_calibration(q2, "max")


def test_skipped_layers_are_still_calibrated():
    model = NaNMiddle().eval()
    q = prepare(model, skip_layers=["b"])
    calibrate(q, [torch.rand(2, 3, 8, 8)], progress=False)
    assert q.b._input_quantizer._disabled and quant_state(q).skip_layers == ["b"]
    set_layers_quantized(q, ["b"], True)                  # e.g. sensitivity turning it back on
    assert float(q.b._input_quantizer.amax) > 0


def test_calibrate_auto_reports_every_method():
    torch.manual_seed(0)
    model = build_model(load_config(REPO / "configs/yolov6n_repvgg.yaml").model).fuse().eval()
    q = prepare(model)
    batches = [torch.rand(1, 3, 64, 64) for _ in range(2)]
    result = calibrate_auto(q, batches, model, score_batches=1, progress=False)
    assert set(result["errors"]) == set(AUTO_METHODS) and result["images"] == 1
    best = max(result["errors"].values(), key=lambda e: e["sqnr_db"])
    assert result["errors"][result["method"]] == best and quant_state(q).calib.method == result["method"]
    assert all(math.isfinite(e["sqnr_db"]) for e in result["errors"].values())


def test_output_error_on_detector_layout():
    ref = torch.zeros(1, 3, 6)
    ref[..., :4] = 100.0
    ref[0, 0, 4] = 0.9
    assert output_error(ref, ref)["sqnr_db"] == 200.0
    noisy = ref.clone()
    noisy[0, 1, :4] += 50.0                               # background anchor: weight 0
    assert output_error(ref, noisy)["box_sqnr_db"] == 200.0


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def calibrated_n():
    torch.manual_seed(0)
    model = build_model(load_config(REPO / "configs/yolov6n_qarepvgg.yaml").model).fuse().eval()
    q = prepare(model, QuantConfig.of(skip_layers=["detect.cls_preds.0"]))
    calibrate(q, [torch.rand(2, 3, 64, 64)], method="percentile", progress=False)
    return q


def test_save_load_round_trip(calibrated_n, tmp_path):
    path = tmp_path / "q.pt"
    save_quantized(calibrated_n, path, {"calib": "percentile", "images": 2})
    raw = torch.load(path, weights_only=True)             # plain containers only
    assert raw["calib_method"] == "percentile-99.99" and raw["skip_layers"] == ["detect.cls_preds.0"]
    model, meta = load_quantized(path)
    assert meta == {"calib": "percentile", "images": 2}
    assert quant_state(model).skip_layers == ["detect.cls_preds.0"]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), calibrated_n(x), rtol=0, atol=0)
    for site in quant_state(model).placement.sites:              # sharing restored as objects
        held = {id(model.get_submodule(c)._input_quantizer) for c in site.consumers
                if c not in quant_state(model).skip_layers}
        assert held <= {id(input_quantizers(model)[site.name])}
    for name, wq in weight_quantizers(model).items():
        torch.testing.assert_close(wq.amax, quant_layers(calibrated_n)[name]._weight_quantizer.amax)


def test_malformed_checkpoints_raise_clear_errors(calibrated_n, tmp_path):
    with pytest.raises(QuantCheckpointError, match="not found"):
        load_quantized(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(QuantCheckpointError, match="junk.pt: not a readable"):
        load_quantized(junk)
    plain = tmp_path / "plain.pt"
    torch.save({"model_state_dict": {}}, plain)
    with pytest.raises(QuantCheckpointError, match="not a yoloq quantized checkpoint"):
        load_quantized(plain)
    good = tmp_path / "good.pt"
    save_quantized(calibrated_n, good, {})
    ckpt = torch.load(good, weights_only=True)
    del ckpt["weight_amax"]
    torch.save(ckpt, tmp_path / "partial.pt")
    with pytest.raises(QuantCheckpointError, match="missing key.*weight_amax"):
        load_quantized(tmp_path / "partial.pt")
    with pytest.raises(TypeError, match="meta.fn"):
        save_quantized(calibrated_n, tmp_path / "bad.pt", {"fn": object()})
    assert not (tmp_path / "bad.pt").exists()


# --------------------------------------------------------------------------- real weights, real images


@pytest.mark.slow
def test_quantized_lite_output_close_to_fp32_on_train_images():
    weights = SHARED / "weights" / "yolov6lite_s.pt"
    images = SHARED / "coco" / "train2017"
    if not weights.is_file() or not images.is_dir():
        pytest.skip(f"shared weights/images not found under {SHARED}")
    from yoloq.data.coco import letterbox, list_images, read_image, to_tensor
    model = build_model(load_config(REPO / "configs/yolov6lite_s.yaml").model)
    model.load_state_dict(torch.load(weights, weights_only=True)["model_state_dict"])
    model = model.fuse().eval()
    names = list_images(images)[:16]
    x = torch.stack([to_tensor(letterbox(read_image(images / n), 320)[0]) for n in names])
    q = prepare(model)
    result = calibrate_auto(q, list(x.split(8)), model, score_batches=2, progress=False)
    # measured: entropy ~14 dB (max ~9); a fully-INT8 Lite-S is sensitive (per-tensor
    # activations ahead of depthwise convs): this guards against regressions, not an mAP claim
    assert result["errors"][result["method"]]["sqnr_db"] > 11.0
    for tq in input_quantizers(q).values():
        tq.disable()
    with torch.no_grad():
        weights_only = output_error(model(x[:8]), q(x[:8]))
    assert weights_only["sqnr_db"] > 25.0                # per-channel INT8 weights alone are benign
