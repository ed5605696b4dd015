"""Per-layer sensitivity, partial-quantization search and diagnosis on small toy models."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from conftest import CONFIGS, WEIGHTS, toy_convnet as toy
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


@pytest.mark.parametrize("mode", ["quantize-one", "skip-one"])
def test_error_share_is_the_layers_part_of_the_models_error_power(mode):
    """The share is checked against error powers summed by hand: the model as it runs, and the
    model with only the outlier layer quantized (quantize-one) or only it in float (skip-one)."""
    from yoloq.quant.prepare import quant_layers, set_layers_quantized
    fp32 = toy()
    q, images = calibrated(fp32)
    result = layer_sensitivity(q, fp32, images, mode=mode, progress=False)
    x = torch.cat(images)

    def noise() -> float:
        with torch.no_grad():
            return float((q(x).double() - fp32(x).double()).pow(2).sum())

    model_noise = noise()
    layers = list(quant_layers(q))
    set_layers_quantized(q, layers, mode == "skip-one")
    set_layers_quantized(q, ["2"], mode == "quantize-one")
    layer_noise = noise()
    set_layers_quantized(q, layers, True)
    expected = layer_noise / model_noise if mode == "quantize-one" else 1 - layer_noise / model_noise
    top = result["ranking"][0]
    assert top["layer"] == "2" and top["error_share"] == pytest.approx(expected, rel=1e-6)
    assert top["error_share"] > 0.5                      # the outlier layer makes most of the error
    with torch.no_grad():
        signal = float(fp32(x).double().pow(2).sum())
    assert result["model_sqnr_db"] == pytest.approx(10 * math.log10(signal / model_noise), abs=1e-6)


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


# --------------------------------------------------------------------------- reuse of unchanged layers


@functools.lru_cache(maxsize=2)
def _quantized_detector(name: str, size: int = 64, n: int = 4):
    from yoloq.config import QuantConfig, load_config
    from yoloq.models import load_model
    from yoloq.models.common import fold_remaining_bn
    from yoloq.quant.recipe import quantize
    from yoloq.quant.recipe_config import recipe_from_config
    lite = name.startswith("yolov6lite")
    if lite and not (WEIGHTS / f"{name}.pt").is_file():
        pytest.skip(f"shared weights {name}.pt not found")
    fp32 = fold_remaining_bn(load_model(load_config(CONFIGS / f"{name}.yaml").model, random_weights=not lite).eval())
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(4))
    qcfg = QuantConfig.of(calib="max", channel_scale="all", channel_scale_alpha=0.9, bias_correction=True,
                          transform_images=n)
    return quantize(fp32, recipe_from_config(qcfg), [x]), fp32, x


def _full_forward_sensitivity(q, fp32, x, layers, mode):
    """The oracle: one complete forward per toggled layer, nothing reused."""
    from yoloq.quant import backend
    from yoloq.quant.metrics import output_error
    from yoloq.quant.prepare import quant_layers, set_layers_quantized
    every = list(quant_layers(q))
    out = {}
    with torch.no_grad(), backend.quiet():
        ref = fp32(x)
        set_layers_quantized(q, every, mode == "skip-one")
        for layer in layers:
            set_layers_quantized(q, [layer], mode == "quantize-one")
            out[layer] = output_error(ref, q(x))["sqnr_db"]
            set_layers_quantized(q, [layer], mode == "skip-one")
        set_layers_quantized(q, every, True)
    return out


@pytest.mark.parametrize("name,mode", [("yolov6lite_s", "quantize-one"), ("yolov6m_repvgg", "quantize-one"),
                                       ("yolov6m_repvgg", "skip-one")])
def test_reused_layer_outputs_give_the_full_forward_numbers(name, mode):
    """Lite-S (channel-scaled convs, bias correction) and YOLOv6-M (BottleRep residual quantizers
    that follow their conv's status): every layer's SQNR equals a complete forward's."""
    from yoloq.quant.prepare import quant_layers
    q, fp32, x = _quantized_detector(name)
    layers = list(quant_layers(q))[::8]
    got = {r["layer"]: r["sqnr_db"] for r in layer_sensitivity(q, fp32, [x], mode=mode, layers=layers,
                                                               progress=False)["ranking"]}
    expected = _full_forward_sensitivity(q, fp32, x, layers, mode)
    assert got == pytest.approx(expected, abs=1e-9)
    assert len(set(round(v, 6) for v in got.values())) > len(layers) // 2     # the layers really differ


def test_sensitivity_scores_large_models_a_few_images_at_a_time(monkeypatch):
    """Under a memory budget below one image's record, images are scored one at a time and the
    output-error powers add over them: the numbers are those of full forwards image by image."""
    import yoloq.quant.sensitivity as sensitivity
    from yoloq.quant import backend
    from yoloq.quant.metrics import add_powers, error_from_powers, output_powers
    from yoloq.quant.prepare import quant_layers, set_layers_quantized
    q, fp32, x = _quantized_detector("yolov6lite_s")
    every = list(quant_layers(q))
    layers = every[::10]
    monkeypatch.setattr(sensitivity, "CACHE_BUDGET_BYTES", 1)
    chunked = layer_sensitivity(q, fp32, [x], layers=layers, progress=False)
    assert chunked["images"] == 4
    expected = {}
    with torch.no_grad(), backend.quiet():
        set_layers_quantized(q, every, False)
        for layer in layers:
            set_layers_quantized(q, [layer], True)
            powers = None
            for image in x.split(1):
                powers = add_powers(powers, output_powers(fp32(image), q(image)))
            expected[layer] = error_from_powers(powers)["sqnr_db"]
            set_layers_quantized(q, [layer], False)
        set_layers_quantized(q, every, True)
    assert {r["layer"]: r["sqnr_db"] for r in chunked["ranking"]} == pytest.approx(expected, abs=1e-6)


def test_layer_output_cache_runs_what_may_differ():
    """A layer called twice is never reused; a changed layer always runs; outputs handed out are
    copies (an in-place change downstream does not alter the record)."""
    from yoloq.quant.forward_cache import LayerOutputCache

    class Counted(nn.Conv2d):
        runs = 0

        def forward(self, x):
            Counted.runs += 1
            return super().forward(x)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Counted(3, 3, 1), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.a(x)
            y.mul_(2.0)                       # in place on a reused output
            return self.b(self.b(y))

    model = Twice().eval()
    x = torch.rand(1, 3, 4, 4)
    cache = LayerOutputCache(model, {"a": model.a, "b": model.b})
    reference = cache.record(x)
    assert set(cache.records) == {"a"}                 # b ran twice: not kept
    Counted.runs = 0
    with torch.no_grad():
        with cache.reuse():
            assert torch.equal(model(x), reference) and torch.equal(model(x), reference)
        assert Counted.runs == 0                        # a was reused both times
        with cache.reuse([model.a]):
            model(x)
        assert Counted.runs == 1                        # changed: it ran
        model.a.bias.add_(1.0)
        with cache.reuse([model.a]):
            assert not torch.equal(model(x), reference)
        with cache.reuse():
            assert not torch.equal(model(x + 1.0), reference)   # another input: a runs
        assert Counted.runs == 3
    assert "forward" not in vars(model.a)              # class forward restored
