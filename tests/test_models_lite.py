"""YOLOv6-Lite S/M/L: upstream key layout, fusion equivalence, fx tracing, block semantics.

Random weights only (the real-weight checks live in test_checkpoint.py). Fusion is checked in eval
mode after randomising every BatchNorm and the conv biases, so no BN is an identity.
Tolerance: max |fused - unfused| <= 1e-4 * max(1, max |unfused|) (float32).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
from torch import nn

from yoloq.config import ConfigError, ModelConfig, load_config
from yoloq.models import build_model
from yoloq.models.detector import Decode
from yoloq.models.lite import (DPBlock, LiteBlockS1, SEBlock, YOLOv6Lite, build_lite, channel_shuffle,
                               lite_channels)
from conftest import REPO, read_spec  # noqa: E402

SIZES = {"s": 0.7, "m": 1.1, "l": 1.5}
TOL = 1e-4


def lite(size: str = "s", nc: int = 80) -> YOLOv6Lite:
    return build_lite(ModelConfig(name=f"yolov6lite_{size}", arch="lite", backbone="Lite_EffiBackbone",
                                  neck="Lite_EffiNeck", width_multiple=SIZES[size], nc=nc, img_size=320))


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and biases everywhere (the prediction convs start at zero)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        elif isinstance(m, nn.Conv2d):
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.out_channels, generator=g) * 0.1)
            if not m.weight.abs().sum():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.05)
    return model.eval()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= TOL * max(1.0, b.abs().max().item())


class DecodeLeafTracer(fx.Tracer):
    def is_leaf_module(self, m, name):
        return isinstance(m, Decode) or super().is_leaf_module(m, name)


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("size", list(SIZES))
def test_state_dict_matches_upstream_keys_shapes_and_order(size):
    spec = read_spec(f"yolov6lite_{size}_train.txt")
    ours = [(k, tuple(v.shape)) for k, v in lite(size).state_dict().items()]
    assert len(ours) == len(spec) == 820
    for (k, s), (sk, ss) in zip(ours, spec):
        assert (k, s) == (sk, ss), f"first difference: ours {k} {s} vs upstream {sk} {ss}"


@pytest.mark.parametrize("size,params", [("s", 557_942), ("m", 791_381), ("l", 1_098_789)])
def test_parameter_counts_match_spec(size, params):
    assert sum(p.numel() for p in lite(size).parameters()) == params


def test_channel_rule_matches_spec_table():
    assert lite_channels(0.7) == ([24, 32, 48, 96, 176], [16, 24, 48, 88])
    assert lite_channels(1.1) == ([24, 32, 64, 144, 288], [16, 32, 72, 144])
    assert lite_channels(1.5) == ([24, 48, 96, 192, 384], [24, 48, 96, 192])


def test_configs_build_lite_models():
    for size in SIZES:
        cfg = load_config(REPO / "configs" / f"yolov6lite_{size}.yaml")
        model = build_model(cfg.model)
        assert isinstance(model, YOLOv6Lite) and model.strides == [8, 16, 32, 64] and model.nc == 80
        assert model.cfg is cfg.model
        assert [name for name, _ in model.named_children()] == ["backbone", "neck", "detect", "decode"]


@pytest.mark.parametrize("field,value", [("backbone", "EfficientRep"), ("neck", "RepBiFPANNeck"),
                                         ("use_dfl", True)])
def test_wrong_family_fields_are_config_errors(field, value):
    cfg = lite().cfg
    bad = copy.copy(cfg)
    setattr(bad, field, value)
    with pytest.raises(ConfigError, match=field.split("_")[0]):
        build_lite(bad)


def test_no_inplace_activations():
    acts = [m for m in lite().modules() if isinstance(m, (nn.Hardswish, nn.ReLU, nn.Hardsigmoid))]
    assert acts and not any(getattr(m, "inplace", False) for m in acts)


# --------------------------------------------------------------------------- forward semantics


def test_fresh_model_output_shape_and_decode():
    """Fresh head: class prior 0.01, boxes = cell centre -/+ 1 cell (bias 1, weight 0)."""
    model = lite(nc=5).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 128, 192))
    n = sum((128 // s) * (192 // s) for s in (8, 16, 32, 64))
    assert out.shape == (2, n, 4 + 5)
    assert torch.allclose(out[..., 4:], torch.full_like(out[..., 4:], 0.01), atol=1e-6)
    # first row: level stride 8, cell (0, 0): centre (4, 4), distance 8 on each side
    assert torch.allclose(out[0, 0, :4], torch.tensor([-4.0, -4.0, 12.0, 12.0]), atol=1e-4)
    # last row: stride 64 level, cell (1, 2) of a 2x3 grid: centre (160, 96), distance 64
    assert torch.allclose(out[0, -1, :4], torch.tensor([96.0, 32.0, 224.0, 160.0]), atol=1e-3)


def test_detect_returns_cls_logits_and_ltrb_per_level():
    model = randomise(lite(nc=7))
    with torch.no_grad():
        feats = model.neck(model.backbone(torch.rand(1, 3, 128, 128)))
        outs = model.detect(feats)
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    assert [(c.shape[1], r.shape[1]) for c, r in outs] == [(7, 4)] * 4


def test_channel_shuffle_interleaves_halves():
    x = torch.arange(8.0).view(1, 8, 1, 1)
    assert channel_shuffle(x).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_stride1_block_passes_first_half_unchanged():
    block = randomise(LiteBlockS1(16, 8))
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        y = block(x)
    assert torch.equal(y[:, 0::2], x[:, :8])


def test_se_block_gates_input():
    se = randomise(SEBlock(16))
    x = torch.randn(2, 16, 5, 5)
    pooled = x.mean((2, 3), keepdim=True)
    hidden = torch.relu(nn.functional.conv2d(pooled, se.conv1.weight, se.conv1.bias))
    gate = torch.clamp(nn.functional.conv2d(hidden, se.conv2.weight, se.conv2.bias) + 3, 0, 6) / 6
    with torch.no_grad():
        assert torch.allclose(se(x), x * gate, atol=1e-6)


# --------------------------------------------------------------------------- fusion and tracing


def test_dpblock_fuse_keeps_conv_bias_and_output():
    block = randomise(DPBlock(8, 5, 2))
    x = torch.randn(2, 8, 11, 11)
    with torch.no_grad():
        ref = block(x)
        fused = copy.deepcopy(block).fuse()
        out = fused(x)
    assert fused.bn_1 is None and fused.bn_2 is None
    assert sorted(fused.state_dict()) == ["conv_dw_1.bias", "conv_dw_1.weight", "conv_pw_1.bias", "conv_pw_1.weight"]
    assert close(out, ref)


@pytest.mark.parametrize("size", ["s", "l"])
def test_fuse_is_equivalent_and_removes_every_bn(size):
    model = randomise(lite(size), seed=1)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        ref = model(x)
        fused = copy.deepcopy(model)
        assert fused.fuse() is fused
        out = fused(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert not any(".bn" in k for k in fused.state_dict())
    assert close(out[..., :4], ref[..., :4]) and close(out[..., 4:], ref[..., 4:])
    assert fused.fuse() is fused           # idempotent


@pytest.mark.parametrize("fuse", [False, True])
def test_fx_trace_with_decode_leaf(fuse):
    model = randomise(lite())
    if fuse:
        model.fuse()
    graph = DecodeLeafTracer().trace(model)
    traced = fx.GraphModule(model, graph)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))
    leaves = [n.target for n in graph.nodes if n.op == "call_module"]
    assert "decode" in leaves
    assert any(t.endswith("se.hardsigmoid") for t in leaves)   # SE gate visible as its own module
