"""YOLOv6 v3/v4 models: upstream key layout, fusion equivalence, fx tracing, head semantics.

Random weights only. Fusion is checked in eval mode after randomising every BatchNorm (weight,
bias, running mean / var), ScaleLayer and BottleRep alpha, so no branch is trivially an identity.
Tolerance: max |fused - unfused| <= 1e-4 * max(1, max |unfused|) per output tensor, in float32
(measured errors are around 1e-6 of the output magnitude).
"""
from __future__ import annotations


import pytest
import torch
import torch.fx as fx
from torch import nn

from yoloq.config import ConfigError, ModelConfig, load_config
from yoloq.models import build_model
from yoloq.models.blocks import (BottleRep, ConvBNReLU, ConvBNSiLU, LinearAddBlock, QARepVGGBlock,
                                 QARepVGGBlockV2, RealVGGBlock, RepConv, RepVGGBlock, ScaleLayer,
                                 repopt_grad_mask, repopt_reinit_kernel)
from yoloq.models.common import fuse_blocks
from yoloq.models.detector import Decode
from yoloq.models.yolov6 import YOLOv6, build_yolov6
from conftest import REPO, read_spec  # noqa: E402
TOL = 1e-4

# config file -> upstream key list stem (``<stem>_train.txt`` / ``<stem>_deploy.txt``)
SPEC_CASES = {
    "yolov6n_repvgg": "yolov6n",
    "yolov6s_repvgg": "yolov6s",
    "yolov6m_repvgg": "yolov6m",
    "yolov6l": "yolov6l",
    "yolov6n_qarepvgg": "qarepvgg_yolov6n_qa",
    "yolov6s_qarepvgg": "qarepvgg_yolov6s_qa",
    "yolov6s_repopt": "repopt_yolov6s_opt",
    "yolov6s_hs": "repopt_yolov6s_hs",
}
ALL_CONFIGS = sorted(list(SPEC_CASES) + ["yolov6m_qarepvgg"])
BLOCKS = ["repvgg", "qarepvgg", "qarepvggv2", "repopt", "hyper_search", "conv_silu"]
# small versions of the three structures (n/s: EfficientRep + BiFPAN; m/l: CSP; RepOpt: PAN)
STRUCTURES = {
    "bifpan": dict(backbone="EfficientRep", neck="RepBiFPANNeck", fuse_p2=True, cspsppf=True),
    "csp_dfl": dict(backbone="CSPBepBackbone", neck="CSPRepBiFPANNeck", fuse_p2=True, cspsppf=False,
                    csp_e=2 / 3, use_dfl=True, reg_max=16),
    "pan": dict(backbone="EfficientRep", neck="RepPANNeck", fuse_p2=False, cspsppf=False),
}


# --------------------------------------------------------------------------- helpers


def keys_and_shapes(model: nn.Module) -> list[tuple[str, tuple]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def small_cfg(block: str, structure: str, nc: int = 80) -> ModelConfig:
    return ModelConfig(name=f"test_{block}_{structure}", arch="yolov6", block=block, depth_multiple=0.33,
                       width_multiple=0.25, nc=nc, **STRUCTURES[structure])


def config_model(name: str) -> ModelConfig:
    return load_config(REPO / "configs" / f"{name}.yaml").model


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics / affine, scales and residual weights."""
    g = torch.Generator().manual_seed(seed)

    def uniform_(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            uniform_(m.weight, 0.5, 1.5)
            uniform_(m.bias, -0.2, 0.2)
            uniform_(m.running_mean, -0.2, 0.2)
            uniform_(m.running_var, 0.5, 2.0)
        elif isinstance(m, ScaleLayer):
            uniform_(m.weight, 0.5, 1.5)
        elif isinstance(m, BottleRep):
            uniform_(m.alpha, 0.5, 1.5)
    return model


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL):
    assert actual.shape == expected.shape
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol} * {scale:.3g}"


@torch.no_grad()
def head_outputs(model: YOLOv6, x: torch.Tensor):
    return model.detect(model.neck(model.backbone(x)))


class DecodeLeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Decode) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(model, DecodeLeafTracer().trace(model))


# --------------------------------------------------------------------------- upstream key layout


@pytest.mark.parametrize("cfg_name", list(SPEC_CASES))
def test_state_dict_matches_upstream_train_and_deploy(cfg_name):
    """Keys, shapes and order equal upstream's, in train form and after fuse() (deploy form)."""
    train, deploy = read_spec(f"{SPEC_CASES[cfg_name]}_train.txt"), read_spec(f"{SPEC_CASES[cfg_name]}_deploy.txt")
    with torch.device("meta"):          # structure only: no memory, no init cost
        model = build_model(config_model(cfg_name))
        assert keys_and_shapes(model) == train
        assert model.fuse() is model
        assert keys_and_shapes(model) == deploy
        model.fuse()                    # idempotent
        assert keys_and_shapes(model) == deploy


@pytest.mark.parametrize("spec, extra", [("yolov6n_fuseab_train.txt", ("cls_preds_ab", "reg_preds_ab")),
                                         ("yolov6n_distillns_train.txt", ("reg_preds_dist",))])
def test_training_only_head_branches_are_the_only_difference(spec, extra):
    """Anchor-aided / distillation checkpoints differ from ours only by branches the loader drops."""
    upstream = read_spec(spec)
    with torch.device("meta"):
        ours = keys_and_shapes(build_model(config_model("yolov6n_repvgg")))
    kept = [(k, s) for k, s in upstream if not any(f"detect.{name}." in k for name in extra)]
    assert kept == ours
    assert len(kept) < len(upstream)


def test_all_configs_load_and_build():
    for name in ALL_CONFIGS:
        cfg = config_model(name)
        assert cfg.arch == "yolov6" and cfg.name == name
        with torch.device("meta"):
            model = build_model(cfg)
        assert isinstance(model, YOLOv6)
        assert [n for n, _ in model.named_children()] == ["backbone", "neck", "detect", "decode"]
        assert model.strides == [8, 16, 32] and model.nc == 80 and model.cfg is cfg
        assert isinstance(model.decode, Decode) and not list(model.decode.parameters())


def test_block_choice_follows_config():
    expected = {"yolov6n_repvgg": RepVGGBlock, "yolov6m_repvgg": RepVGGBlock, "yolov6l": ConvBNSiLU,
                "yolov6n_qarepvgg": QARepVGGBlockV2, "yolov6m_qarepvgg": QARepVGGBlockV2,
                "yolov6s_repopt": RealVGGBlock, "yolov6s_hs": LinearAddBlock}
    for name, cls in expected.items():
        with torch.device("meta"):
            model = build_model(config_model(name))
        assert type(model.backbone.stem) is cls, name
    cfg = small_cfg("qarepvgg", "bifpan")
    assert type(build_yolov6(cfg).backbone.stem) is QARepVGGBlock


# --------------------------------------------------------------------------- fusion equivalence


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("block", BLOCKS)
def test_fuse_and_fold_keep_outputs(block, structure):
    torch.manual_seed(0)
    model = randomize(build_yolov6(small_cfg(block, structure))).eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        ref_heads, ref = head_outputs(model, x), model(x)
        model.fuse()
        for (c, r), (c0, r0) in zip(head_outputs(model, x), ref_heads):
            assert_close(c, c0)
            assert_close(r, r0)
        assert_close(model(x), ref)
        model.fold_bn()                 # every remaining BN folded too
        assert_close(model(x), ref)
    folded_bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not folded_bns


@pytest.mark.parametrize("cfg_name", ALL_CONFIGS)
def test_fuse_keeps_outputs_full_configs(cfg_name):
    """The real n/s/m/l configurations (random weights), small input."""
    torch.manual_seed(0)
    model = randomize(build_model(config_model(cfg_name))).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        assert_close(model.fuse()(x), ref)


def _branch_count(model: nn.Module, cls) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("block_cls", [RepVGGBlock, QARepVGGBlock, QARepVGGBlockV2, RealVGGBlock, LinearAddBlock,
                                       ConvBNReLU, ConvBNSiLU])
@pytest.mark.parametrize("c_in, c_out, stride", [(8, 8, 1), (8, 16, 1), (8, 16, 2), (3, 8, 2)])
def test_single_block_fusion(block_cls, c_in, c_out, stride):
    torch.manual_seed(1)
    block = randomize(block_cls(c_in, c_out, 3, stride), seed=3).eval()
    if isinstance(block, LinearAddBlock):
        assert (block.scale_identity is not None) == (c_in == c_out and stride == 1)
    x = torch.randn(2, c_in, 9, 11)
    with torch.no_grad():
        ref = block(x)
        fused = block.fuse()
        assert_close(fused(x), ref)
        if hasattr(fused, "fold_bn"):
            folded = fused.fold_bn()
            assert_close(folded(x), ref)
            assert _branch_count(folded, nn.BatchNorm2d) == 0
            assert _branch_count(folded, nn.Conv2d) == 1


def test_rep_block_deploy_forms():
    """RepVGG -> one biased conv; QARepVGG -> post-BN kept (upstream deploy), RepOpt blocks as is."""
    rep = RepVGGBlock(8, 8).fuse()
    assert isinstance(rep, RepConv) and rep.bn is None
    assert [k for k in rep.state_dict()] == ["rbr_reparam.weight", "rbr_reparam.bias"]
    qa = QARepVGGBlockV2(8, 8).fuse()
    assert isinstance(qa, RepConv) and isinstance(qa.bn, nn.BatchNorm2d)
    assert list(qa.state_dict())[:2] == ["bn.weight", "bn.bias"]
    assert list(qa.fold_bn().state_dict()) == ["rbr_reparam.weight", "rbr_reparam.bias"]
    real = RealVGGBlock(8, 8)
    assert real.fuse() is real
    hs = LinearAddBlock(8, 8)
    assert hs.fuse() is hs and isinstance(hs.fold_bn(), RealVGGBlock)


def test_qarepvgg_v2_differs_from_v1_by_average_pool_only():
    torch.manual_seed(2)
    v1, v2 = QARepVGGBlock(4, 4).eval(), QARepVGGBlockV2(4, 4).eval()
    v2.load_state_dict(v1.state_dict())
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        # remove the ReLU and post-BN to see the branch sums
        pre1 = v1.rbr_dense(x) + v1.rbr_1x1(x) + x
        pre2 = v2.rbr_dense(x) + v2.rbr_1x1(x) + v2.shortcut(x)
        assert_close(pre2 - pre1, nn.functional.avg_pool2d(x, 3, 1, 1))
    assert QARepVGGBlockV2(4, 8).rbr_avg is None


# --------------------------------------------------------------------------- tracing, BN, shapes


@pytest.mark.parametrize("block", BLOCKS)
def test_fx_symbolic_trace_train_and_deploy(block):
    model = randomize(build_yolov6(small_cfg(block, "csp_dfl" if block == "conv_silu" else "bifpan"))).eval()
    x = torch.rand(1, 3, 64, 64)
    for form in ("train", "deploy", "folded"):
        if form == "deploy":
            model.fuse()
        elif form == "folded":
            model.fold_bn()
        gm = trace(model)
        leaves = [n.target for n in gm.graph.nodes if n.op == "call_module"]
        assert "decode" in leaves
        with torch.no_grad():
            assert torch.equal(gm(x), model(x)), form


def test_fx_trace_pan_neck():
    model = build_yolov6(small_cfg("repopt", "pan")).eval()
    gm = trace(model)
    with torch.no_grad():
        x = torch.rand(1, 3, 64, 64)
        assert torch.equal(gm(x), model(x))


@pytest.mark.parametrize("block", BLOCKS)
def test_batchnorm_eps_and_momentum(block):
    model = build_yolov6(small_cfg(block, "csp_dfl"))
    for form in ("train", "deploy"):
        if form == "deploy":
            model.fuse()
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                assert (m.eps, m.momentum) == (1e-3, 0.03), f"{form} {name}"


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_output_shape(structure):
    model = build_yolov6(small_cfg("repvgg", structure, nc=3)).eval()
    b, h, w = 2, 64, 96
    with torch.no_grad():
        out = model(torch.rand(b, 3, h, w))
        heads = head_outputs(model, torch.rand(b, 3, h, w))
    n = sum((h // s) * (w // s) for s in (8, 16, 32))
    assert out.shape == (b, n, 4 + 3)
    assert [tuple(c.shape) for c, _ in heads] == [(b, 3, h // s, w // s) for s in (8, 16, 32)]
    assert [tuple(r.shape) for _, r in heads] == [(b, 4, h // s, w // s) for s in (8, 16, 32)]
    scores = out[..., 4:]
    assert scores.min() >= 0 and scores.max() <= 1


# --------------------------------------------------------------------------- head semantics


def test_dfl_projection_is_expectation_over_bins():
    model = build_yolov6(small_cfg("repvgg", "csp_dfl")).eval()
    det = model.detect
    assert det.proj.tolist() == [float(i) for i in range(17)]
    assert det.proj_conv.weight.flatten().tolist() == det.proj.tolist()
    assert not det.proj_conv.weight.requires_grad
    assert "proj" in dict(det.named_buffers())
    reg = torch.randn(2, 4 * 17, 3, 5)
    expected = (reg.view(2, 4, 17, 3, 5).softmax(2) * torch.arange(17.0).view(1, 1, 17, 1, 1)).sum(2)
    with torch.no_grad():
        assert_close(det.distribution_to_distance(reg), expected, tol=1e-5)


def test_without_dfl_regression_is_distance_as_is():
    model = build_yolov6(small_cfg("repvgg", "bifpan")).eval()
    det = model.detect
    assert det.proj.shape == (17,) and det.proj_conv.weight.shape == (1, 17, 1, 1)   # upstream layout
    assert all(p.out_channels == 4 for p in det.reg_preds)
    feats = [torch.randn(1, c.block.conv.in_channels, 4, 4) for c in det.stems]
    with torch.no_grad():
        outs = det(feats)
        for i, (f, (_, ltrb)) in enumerate(zip(feats, outs)):
            assert torch.equal(ltrb, det.reg_preds[i](det.reg_convs[i](det.stems[i](f))))


def test_decode_matches_head_outputs():
    model = randomize(build_yolov6(small_cfg("repvgg", "bifpan", nc=2))).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        (cls0, ltrb0), *_ = head_outputs(model, x)
    # first cell of level 0: anchor (0.5, 0.5) * stride 8
    l, t, r, b = ltrb0[0, :, 0, 0].tolist()
    assert out[0, 0, :4].tolist() == pytest.approx([(0.5 - l) * 8, (0.5 - t) * 8, (0.5 + r) * 8, (0.5 + b) * 8], rel=1e-5)
    assert out[0, 0, 4:].tolist() == pytest.approx(cls0[0, :, 0, 0].sigmoid().tolist(), rel=1e-5)


# --------------------------------------------------------------------------- config validation


@pytest.mark.parametrize("change, message", [
    (dict(block="repvg"), "did you mean 'repvgg'"),
    (dict(neck="RepBiFPNNeck"), "did you mean 'RepBiFPANNeck'"),
    (dict(backbone="CSPBep"), "backbone"),
    (dict(fuse_p2=False), "fuse_p2"),
    (dict(use_dfl=True, reg_max=0), "reg_max"),
    (dict(use_dfl=False, reg_max=16), "reg_max"),
])
def test_invalid_model_config(change, message):
    cfg = small_cfg("repvgg", "bifpan")
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(ConfigError, match=message):
        build_yolov6(cfg)


# --------------------------------------------------------------------------- RepOpt helpers


def test_repopt_grad_mask_formula():
    s3, s1 = torch.tensor([2.0, 3.0]), torch.tensor([0.5, 4.0])
    mask = repopt_grad_mask(s3, s1, in_channels=2, has_identity=True)
    assert mask.shape == (2, 2, 3, 3)
    expected = torch.empty(2, 2, 3, 3)
    for o in range(2):
        for i in range(2):
            expected[o, i] = s3[o] ** 2
            expected[o, i, 1, 1] += s1[o] ** 2 + (1.0 if o == i else 0.0)
    assert torch.equal(mask, expected)
    no_id = repopt_grad_mask(s3, s1, in_channels=3, has_identity=False)
    assert no_id.shape == (2, 3, 3, 3)
    assert torch.equal(no_id[:, :, 1, 1], (s3 ** 2 + s1 ** 2).view(2, 1).expand(2, 3))
    assert torch.equal(no_id[:, :, 0, 0], (s3 ** 2).view(2, 1).expand(2, 3))


@pytest.mark.parametrize("c_in, c_out, stride", [(6, 6, 1), (4, 6, 1), (4, 6, 2)])
def test_repopt_reinit_equals_linear_add_pre_bn(c_in, c_out, stride):
    torch.manual_seed(4)
    block = randomize(LinearAddBlock(c_in, c_out, 3, stride), seed=5)
    x = torch.randn(2, c_in, 7, 8)
    s3, s1 = block.scale_conv.weight, block.scale_1x1.weight
    sid = block.scale_identity.weight if block.scale_identity is not None else None
    w = repopt_reinit_kernel(block.conv.weight, block.conv_1x1.weight, s3, s1, sid)
    with torch.no_grad():
        pre_bn = block.scale_conv(block.conv(x)) + block.scale_1x1(block.conv_1x1(x))
        if sid is not None:
            pre_bn = pre_bn + block.scale_identity(x)
        assert_close(nn.functional.conv2d(x, w, None, stride, 1), pre_bn, tol=1e-5)


def test_repopt_grad_masks_address_target_weights():
    """The masks of a hyper-search model's scales (yoloq.train.repopt, the one place masks are built)
    land on the target's RealVGGBlock kernels."""
    from yoloq.train.repopt import extract_scales, target_masks
    with torch.device("meta"):
        hs = build_model(config_model("yolov6s_hs"))
        target = build_model(config_model("yolov6s_repopt"))
    hs, target = hs.to_empty(device="cpu"), target.to_empty(device="cpu")
    for m in hs.modules():
        if isinstance(m, ScaleLayer):
            nn.init.ones_(m.weight)
    by_param = target_masks(target, extract_scales(hs))
    masks = {n: by_param[p] for n, p in target.named_parameters() if p in by_param}
    params = dict(target.named_parameters())
    blocks = [n for n, m in target.named_modules() if isinstance(m, RealVGGBlock)]
    assert sorted(masks) == sorted(f"{n}.conv.weight" for n in blocks) and len(masks) == len(by_param)
    for name, mask in masks.items():
        assert mask.shape == params[name].shape
    stem, first_stage = masks["backbone.stem.conv.weight"], masks["backbone.ERBlock_2.1.conv1.conv.weight"]
    assert stem[0, 0, 1, 1] == 2.0 and stem[0, 0, 0, 0] == 1.0                  # no identity (3 -> 32)
    assert first_stage[0, 0, 1, 1] == 3.0 and first_stage[0, 1, 1, 1] == 2.0    # identity on the diagonal


def test_fuse_blocks_walks_any_module_tree():
    net = nn.Sequential(RepVGGBlock(4, 4), nn.Sequential(ConvBNReLU(4, 4, 1, 1), QARepVGGBlock(4, 4)))
    fuse_blocks(net)
    assert isinstance(net[0], RepConv) and isinstance(net[1][1], RepConv)
    assert not hasattr(net[1][0].block, "bn")
