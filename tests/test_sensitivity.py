"""Per-layer sensitivity, partial-quantization search and diagnosis on small toy models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import toy_convnet as toy
from yoloq.quant.state import quant_state  # noqa: E402
from yoloq.quant.calibrate import calibrate
from yoloq.quant.diagnose import Thresholds, channel_spread, diagnose, weight_stats
from yoloq.quant.prepare import prepare
from yoloq.quant.sensitivity import layer_sensitivity, search_skip_count, top_layers


def calibrated(model: nn.Module) -> tuple[nn.Module, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(2, 3, 16, 16, generator=g) for _ in range(3)]
    q = prepare(model)
    calibrate(q, images, "max", progress=False)
    return q, images


@pytest.mark.parametrize("mode", ["quantize-one", "skip-one"])
def test_outlier_layer_ranks_first(mode):
    fp32 = toy()
    q, images = calibrated(fp32)
    result = layer_sensitivity(q, fp32, images, mode=mode, progress=False)
    ranking = result["ranking"]
    assert [r["rank"] for r in ranking] == [1, 2, 3, 4]
    assert ranking[0]["layer"] == "2"
    assert ranking[0]["score"] > ranking[1]["score"] + 3.0          # clearly ahead, in dB
    assert top_layers(result, 1) == ["2"]
    assert quant_state(q).skip_layers == []                                # model state restored


def test_without_outlier_the_layer_is_not_special():
    fp32 = toy(sensitive=False)
    q, images = calibrated(fp32)
    ranking = layer_sensitivity(q, fp32, images, progress=False)["ranking"]
    assert min(r["sqnr_db"] for r in ranking) > 20.0


def test_sensitivity_restores_explicit_skips_and_checks_args():
    fp32 = toy()
    q, images = calibrated(fp32)
    from yoloq.quant.prepare import set_layers_quantized
    set_layers_quantized(q, ["4"], False)
    layer_sensitivity(q, fp32, images, progress=False)
    assert quant_state(q).skip_layers == ["4"]
    with pytest.raises(ValueError, match="mode"):
        layer_sensitivity(q, fp32, images, mode="bogus")
    with pytest.raises(ValueError, match="not quantized"):
        layer_sensitivity(q, fp32, images, layers=["nope"])
    with pytest.raises(ValueError, match="only 4"):
        top_layers({"ranking": [{"layer": str(i)} for i in range(4)]}, 5)


def test_search_finds_smallest_k():
    layers = [f"l{i}" for i in range(20)]
    drops = {k: 10.0 / (k + 1) for k in range(21)}                 # decreasing: 10, 5, 3.3, 2.5, 2, ...
    seen = []

    def measure(skipped):
        seen.append(len(skipped))
        return drops[len(skipped)]

    k, trace = search_skip_count(layers, measure, max_drop=1.5, progress=False)
    assert k == 6 and drops[6] <= 1.5 < drops[5]
    assert [t["k"] for t in trace] == seen and len(seen) <= 8     # 0,1,2,4,8 then bisection
    assert search_skip_count(layers, measure, max_drop=20.0, progress=False)[0] == 0
    k, trace = search_skip_count(layers, measure, max_drop=0.01, progress=False)
    assert k == 20 and trace[-1]["k"] == 20                         # not reachable: best effort


def test_weight_stats_and_spread():
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    base = weight_stats(w)
    assert base["w_channel_spread"] < 5 and base["w_outlier_ratio"] == 0.0
    assert base["w_sqnr_db"] > 35
    w[0] *= 1000.0                                                  # one channel dwarfs the rest
    wide = weight_stats(w)
    assert wide["w_channel_spread"] > 100
    assert wide["w_sqnr_db"] > 35                                   # per-channel scales absorb it
    assert wide["w_sqnr_per_tensor_db"] < wide["w_sqnr_db"] - 10    # per-tensor would not (QARepVGG)
    assert channel_spread(torch.tensor([0.0, 1.0, 4.0])) == pytest.approx(4.0)   # dead channel ignored


def test_diagnose_flags_the_broken_layer():
    fp32 = toy()
    q, images = calibrated(fp32)
    with torch.no_grad():
        q[4].weight[0] *= 1000.0
    rows = {r["layer"]: r for r in diagnose(q, images, Thresholds())["layers"]}
    assert list(rows) == ["0", "2", "4", "6"]
    assert "activation channel spread" in rows["2"]["flags"]       # the near-dead input channel
    assert "weight outliers" in rows["2"]["flags"]
    assert "weight channel spread" in rows["4"]["flags"]
    assert "weight channel spread" in rows["0"]["flags"]          # its near-dead output channel
    assert "activation channel spread" in rows["6"]["flags"]      # reads conv 4's huge channel
    assert rows["0"]["act_sqnr_db"] > 30
    clean, images = calibrated(toy(sensitive=False))
    assert all(not r["flags"] for r in diagnose(clean, images)["layers"])
    assert quant_state(q).skip_layers == []


def test_diagnose_reads_what_a_channel_scaled_quantizer_sees():
    """A conv whose input is divided per channel (channel scaling) is diagnosed on x / s, the
    tensor its quantizer calibrated on: with max calibration on the same images the measured
    absmax equals the amax, and the near-dead channel no longer spreads the range."""
    from yoloq.quant.channel_scale import set_input_scale
    fp32 = toy()
    plain, images = calibrated(fp32)
    before = {r["layer"]: r for r in diagnose(plain, images)["layers"]}["2"]
    q = prepare(fp32)
    with torch.no_grad():
        x = torch.cat(images)
        conv2_input = fp32[1](fp32[0](x))
    set_input_scale(q, "2", conv2_input.abs().amax(dim=(0, 2, 3)).clamp_min(1e-3))
    calibrate(q, images, "max", progress=False)
    row = {r["layer"]: r for r in diagnose(q, images)["layers"]}["2"]
    assert row["act_absmax"] == pytest.approx(row["act_amax"], rel=1e-3)
    assert before["act_channel_spread"] > 100 * row["act_channel_spread"]
