"""TensorRT quantizer placement (yoloq.quant.placement) and prepare (yoloq.quant.prepare).

A toy detector exercises every rule in a few layers (concat, SPPF max-pool chain, upsample +
concat, one tensor read by two convs, residual add, add of two conv branches, ConvTranspose,
chunk + channel shuffle, SE product, DFL softmax + fixed 1x1); then every real model family is
checked with random weights (placement needs no trained weights).
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from pytorch_quantization import nn as quant_nn
from torch import nn

from yoloq.quant.state import quant_state  # noqa: E402
from yoloq.config import QuantConfig, load_config
from yoloq.models import build_model
from yoloq.quant.calibrate import calibrate
from yoloq.quant.placement import DFL_REASON, analyze
from yoloq.quant.prepare import (fix_dead_channels, input_quantizers, prepare, quant_layers,
                                 replace_input_quantizer, set_layers_quantized, weight_quantizers)
from conftest import CONFIGS  # noqa: E402



def conv_relu(c_in, c_out, k=1, s=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, s, k // 2), nn.ReLU())


class BlockResidual(nn.Module):
    """Residual inside a child module (as BottleRep): prepare re-traces the owner."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = conv_relu(8, 8, 3), conv_relu(8, 8, 3)
        self.alpha = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.conv2(self.conv1(x)) + self.alpha * x


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_relu(3, 8, 3, 2)
        self.left = conv_relu(8, 8)             # stem output read by left and right: one quantizer
        self.right = conv_relu(8, 8)
        self.pool = nn.MaxPool2d(5, 1, 2)       # SPPF chain on `left`
        self.sppf_out = conv_relu(32, 8)
        self.down = conv_relu(8, 8, 3, 2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse_up = conv_relu(16, 8)         # reads cat(up(down), right)
        self.deconv = nn.ConvTranspose2d(8, 8, 2, 2)
        self.after_deconv = conv_relu(8, 8)
        self.shuffle_in = conv_relu(4, 4)       # reads the second half of a chunk
        self.res1 = conv_relu(8, 8)
        self.resblock = BlockResidual()
        self.se_fc = nn.Conv2d(8, 8, 1)
        self.branch_a = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Hardswish())
        self.branch_b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Hardswish())
        self.reg = nn.Conv2d(8, 4 * 5, 1)
        self.proj_conv = nn.Conv2d(5, 1, 1, bias=False)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = self.stem(x)
        a, b = self.left(x), self.right(x)
        y1 = self.pool(a)
        y2 = self.pool(y1)
        s = self.sppf_out(torch.cat((a, y1, y2, self.pool(y2)), 1))
        u = self.fuse_up(torch.cat((self.up(self.down(s)), b), 1))
        d = self.after_deconv(self.deconv(self.down(u)))
        keep, work = d.chunk(2, 1)
        t = torch.cat((keep, self.shuffle_in(work)), 1)
        t = t.unflatten(1, (2, -1)).transpose(1, 2).flatten(1, 2)       # channel shuffle
        r = self.resblock(self.res1(t))                                   # residual add inside
        g = r * torch.sigmoid(self.se_fc(F.adaptive_avg_pool2d(r, 1)))   # SE product
        p = self.branch_a(g) + self.branch_b(g)                            # two conv branches
        bins = F.softmax(self.reg(p).unflatten(1, (4, 5)), dim=2).transpose(1, 2).flatten(2, 3)
        dist = self.proj_conv(bins)
        return self.head(p), dist


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return Toy().eval()


@pytest.fixture(scope="module")
def toy_placement(toy):
    return analyze(toy)


def _site(placement, layer):
    return placement.site_of(layer)


# --------------------------------------------------------------------------- toy: analysis


def test_every_conv_quantized_except_dfl(toy, toy_placement):
    convs = {n for n, m in toy.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))}
    assert set(toy_placement.layers) == convs - {"proj_conv"}
    assert toy_placement.float_layers == {"proj_conv": DFL_REASON}
    assert all("proj_conv" not in s.consumers for s in toy_placement.sites)


def test_tensor_read_by_two_convs_shares_one_site(toy_placement):
    assert _site(toy_placement, "left.0") is _site(toy_placement, "right.0")
    assert "shared by 2 convs" in _site(toy_placement, "left.0").reason


def test_sppf_maxpool_chain_and_concat(toy_placement):
    site = _site(toy_placement, "sppf_out.0")
    assert "maxpool" in site.reason and "concat(4)" in site.reason
    # the pooled tensors and the first pool's input (left's ReLU output) carry the concat's scale
    assert "left_1" in site.tensors and sum(t.startswith("pool") for t in site.tensors) == 3


def test_upsample_concat_shares_with_its_source(toy_placement):
    up_site = _site(toy_placement, "fuse_up.0")
    assert "upsample" in up_site.reason
    # `right`'s output is a concat input: its producer is covered by the concat's quantizer
    assert "right_1" in up_site.tensors and "down_1" in up_site.tensors


def test_chunk_shuffle_concat_is_one_group(toy_placement):
    site = _site(toy_placement, "shuffle_in.0")
    assert site is _site(toy_placement, "res1.0")      # chunk half, concat and shuffled output
    assert "slice/chunk" in site.reason and "reshape/transpose" in site.reason


def test_residual_add_quantizes_the_residual_operand_only(toy_placement):
    slots = [(s, r) for s in toy_placement.sites for r in s.residuals]
    assert len(slots) == 1, "only alpha*t + res2(...) qualifies; the two-branch add gets nothing"
    site, slot = slots[0]
    assert (slot.owner, slot.fusing_layer, slot.operand) == ("resblock", "resblock.conv2.0", 1)
    assert site.consumers == [] and site.name == "resblock.residual_quantizer"
    assert "residual add" in site.reason


def test_se_product_and_sigmoid_are_not_sites_of_their_own(toy_placement):
    # the SE gate output is only quantized where a conv reads the product (branch_a / branch_b)
    site = _site(toy_placement, "branch_a.0")
    assert site is _site(toy_placement, "branch_b.0") and site.reason.startswith("shared by 2 convs")
    assert not any("sigmoid" in t for s in toy_placement.sites for t in s.tensors
                   if not t.startswith("mul"))


def test_describe_lists_every_site(toy_placement):
    text = toy_placement.describe()
    assert all(s.name in text for s in toy_placement.sites)
    assert "float layers: proj_conv" in text


# --------------------------------------------------------------------------- toy: prepare


@pytest.fixture(scope="module")
def toy_quant(toy):
    return prepare(toy)


def test_prepare_replaces_convs_and_shares_objects(toy, toy_quant):
    layers = quant_layers(toy_quant)
    assert isinstance(layers["deconv"], quant_nn.QuantConvTranspose2d)
    assert layers["deconv"]._weight_quantizer.axis == (1,)
    assert layers["stem.0"]._weight_quantizer.axis == (0,)
    # activations: full int8 range (-128, as TensorRT / QuantizeLinear); weights: narrow (-127..127)
    assert layers["stem.0"]._input_quantizer.axis is None and not layers["stem.0"]._input_quantizer.narrow_range
    assert layers["stem.0"]._weight_quantizer.narrow_range
    assert type(toy_quant.proj_conv) is nn.Conv2d                     # DFL stays float
    assert toy_quant.left[0]._input_quantizer is toy_quant.right[0]._input_quantizer
    assert toy_quant.shuffle_in[0]._input_quantizer is toy_quant.res1[0]._input_quantizer
    assert toy_quant.left[0]._input_quantizer is not toy_quant.stem[0]._input_quantizer
    assert len(input_quantizers(toy_quant)) == len(quant_state(toy_quant).placement.sites)
    assert len({id(q) for q in input_quantizers(toy_quant).values()}) == len(quant_state(toy_quant).placement.sites)
    assert isinstance(toy.left[0], nn.Conv2d), "prepare must not touch the FP32 model"


def test_prepared_model_equals_fp32_with_quantizers_off(toy, toy_quant):
    x = torch.rand(2, 3, 32, 32)
    q = prepare(toy)
    for tq in list(input_quantizers(q).values()) + list(weight_quantizers(q).values()):
        tq.disable()
    with torch.no_grad():
        for a, b in zip(toy(x), q(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_calibrated_concat_inputs_share_amax(toy):
    q = prepare(toy)
    calibrate(q, [torch.rand(2, 3, 32, 32)], method="max", progress=False)
    placement = quant_state(q).placement
    for site in placement.sites:
        amaxes = {float(q.get_submodule(c)._input_quantizer.amax) for c in site.consumers}
        assert len(amaxes) == (1 if site.consumers else 0)
    concat_sites = [s for s in placement.sites if "concat" in s.reason]
    assert len(concat_sites) >= 3 and all(float(input_quantizers(q)[s.name].amax) > 0 for s in concat_sites)


def test_skip_gives_private_disabled_quantizer_and_reenable_restores(toy):
    q = prepare(toy, QuantConfig.of(skip_layers=["left.0"]))
    shared = input_quantizers(q)[quant_state(q).placement.site_of("left.0").name]
    assert q.left[0]._input_quantizer is not shared and q.left[0]._input_quantizer._disabled
    assert q.left[0]._weight_quantizer._disabled
    assert q.right[0]._input_quantizer is shared and not shared._disabled
    assert quant_state(q).skip_layers == ["left.0"]
    set_layers_quantized(q, ["left.0"], True)
    assert q.left[0]._input_quantizer is shared and not q.left[0]._weight_quantizer._disabled
    assert quant_state(q).skip_layers == []
    with pytest.raises(ValueError, match="proj_conv.*DFL"):
        set_layers_quantized(q, ["proj_conv"], False)
    with pytest.raises(ValueError, match="did you mean 'left.0'"):
        set_layers_quantized(q, ["lefft.0"], False)


def test_residual_quantizer_follows_its_fusing_conv(toy):
    q = prepare(toy)
    placement = quant_state(q).placement
    (site, slot), = [(s, r) for s in placement.sites for r in s.residuals]
    holder = q.get_submodule(slot.owner)
    assert getattr(holder, slot.attr) is input_quantizers(q)[site.name]
    set_layers_quantized(q, [slot.fusing_layer], False)
    assert getattr(holder, slot.attr)._disabled


def test_replace_input_quantizer_keeps_sharing(toy):
    q = prepare(toy)
    name = quant_state(q).placement.site_of("left.0").name
    new = quant_nn.TensorQuantizer(quant_nn.QuantConv2d.default_quant_desc_input)
    replace_input_quantizer(q, name, new)
    assert q.left[0]._input_quantizer is new and q.right[0]._input_quantizer is new
    assert input_quantizers(q)[name] is new
    from yoloq.errors import InputError                     # a wrong name is a user error naming the site
    with pytest.raises(InputError, match=rf"no quantizer site '{name}x'; did you mean '{name}'"):
        replace_input_quantizer(q, name + "x", new)
    with pytest.raises(InputError, match="'nope' is not a quantized layer"):
        quant_state(q).placement.site_of("nope")


def test_fix_dead_channels(toy):
    q = prepare(toy)
    calibrate(q, [torch.rand(1, 3, 32, 32)], progress=False)
    wq = q.stem[0]._weight_quantizer
    wq._amax[0] = 0.0
    wq._amax[1] = float("nan")
    assert fix_dead_channels(q) == 2
    assert torch.all(wq._amax > 0) and torch.isfinite(wq._amax).all()


# --------------------------------------------------------------------------- real model families


def test_residual_in_child_module_gets_graph_quantizer():
    model = nn.Sequential(conv_relu(3, 8, 3), BlockResidual(), nn.Conv2d(8, 2, 1)).eval()
    q = prepare(model)
    assert q[1].residual_quantizer is input_quantizers(q)["1.residual_quantizer"]
    x = torch.rand(1, 3, 16, 16)
    calibrate(q, [x], progress=False)
    assert float(q[1].residual_quantizer.amax) > 0
    with torch.no_grad():
        assert torch.allclose(q(x), model(x), atol=0.1 * float(model(x).abs().max()))


REAL = ["yolov6lite_s", "yolov6n_repvgg", "yolov6s_qarepvgg", "yolov6s_repopt", "yolov6m_repvgg", "yolov6l"]


@pytest.fixture(scope="module", params=REAL)
def real(request):
    torch.manual_seed(0)
    cfg = load_config(CONFIGS / f"{request.param}.yaml").model
    return request.param, build_model(cfg).fuse().eval()


def test_real_model_placement_invariants(real):
    name, model = real
    placement = analyze(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    used_dfl = model.cfg.use_dfl                        # without DFL proj_conv is never called
    expected = set(convs) if used_dfl else set(convs) - {"detect.proj_conv"}
    assert set(placement.layers) | set(placement.float_layers) == expected
    assert ("detect.proj_conv" in placement.float_layers) == used_dfl
    assert "detect.proj_conv" not in placement.layers
    levels = len(model.strides)
    for i in range(levels):                              # cls/reg branches read the stem output
        assert placement.site_of(f"detect.cls_convs.{i}" + _first_conv(model, f"detect.cls_convs.{i}")) is \
            placement.site_of(f"detect.reg_convs.{i}" + _first_conv(model, f"detect.reg_convs.{i}"))
    residuals = [r for s in placement.sites for r in s.residuals]
    n_bottlereps = sum(type(m).__name__ == "BottleRep" and m.shortcut for m in model.modules())
    assert len(residuals) == n_bottlereps                # Lite P6 add and Rep blocks: none
    consumers = [c for s in placement.sites for c in s.consumers]
    assert sorted(consumers) == sorted(placement.layers)  # every layer has exactly one site


def _first_conv(model, prefix):
    sub = model.get_submodule(prefix)
    for n, m in sub.named_modules():
        if isinstance(m, nn.Conv2d):
            return "." + n if n else ""
    raise AssertionError(prefix)


@pytest.mark.parametrize("name", ["yolov6lite_s", "yolov6n_qarepvgg", "yolov6m_repvgg"])
def test_real_model_prepare_and_calibrate(name):
    torch.manual_seed(0)
    model = build_model(load_config(CONFIGS / f"{name}.yaml").model).fuse().eval()
    q = prepare(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules()), "post-BN must be folded"
    placement = quant_state(q).placement
    for site in placement.sites:
        objs = {id(q.get_submodule(c)._input_quantizer) for c in site.consumers}
        objs |= {id(getattr(q.get_submodule(r.owner), r.attr)) for r in site.residuals}
        assert objs == {id(input_quantizers(q)[site.name])}
    x = torch.rand(1, 3, 64, 64)
    calibrate(q, [x], method="percentile", progress=False)
    with torch.no_grad():
        out = q(x)
    assert out.shape == model(x).shape and torch.isfinite(out).all()
