"""RepOpt-VGG (yoloq.train.repopt): the optimizer equivalence, the scales file and its checks."""
from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict

import pytest
import torch
from torch import nn

from yoloq.config import ModelConfig
from yoloq.models.blocks import LinearAddBlock, RealVGGBlock
from yoloq.models.build import build_model
from yoloq.train.errors import ScalesMismatchError
from yoloq.train.repopt import (RepOptimizer, check_scales, extract_scales, load_scales, reinit_from_scales,
                                save_scales, target_masks)

# yolov6n's structure (EfficientRep + RepBiFPANNeck) at a tiny width, for speed
TINY = ModelConfig(name="tiny", arch="yolov6", depth_multiple=0.33, width_multiple=0.0625, nc=3, img_size=64)


def hyper_search_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    hs = build_model(dataclasses.replace(TINY, block="hyper_search")).to(dtype)
    with torch.no_grad():                  # trained-looking scales and BNs, so masks are not trivial
        for m in hs.modules():
            if isinstance(m, LinearAddBlock):
                for s in (m.scale_conv, m.scale_1x1, m.scale_identity):
                    if s is not None:
                        s.weight.uniform_(0.3, 1.7)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return hs


def equivalent_target(hs, dtype=torch.float64):
    """The RepOpt-VGG target with the hyper-search model's function: every other weight copied,
    each RealVGG kernel = the block's equivalent kernel W3 s3 + pad(W1) s1 + I sid."""
    target = build_model(dataclasses.replace(TINY, block="repopt")).to(dtype)
    state = {k: v for k, v in hs.state_dict().items() if k in target.state_dict()}
    for name, m in hs.named_modules():
        if isinstance(m, LinearAddBlock):
            state[f"{name}.conv.weight"] = m.equivalent_kernel()
    target.load_state_dict(state, strict=True)
    return target


def freeze_conv_scales(hs):
    for m in hs.modules():
        if isinstance(m, LinearAddBlock):
            m.scale_conv.weight.requires_grad_(False)
            m.scale_1x1.weight.requires_grad_(False)


SGD = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)


# --------------------------------------------------------------------------- a stack of blocks


LAYERS = [(3, 8, 2), (8, 8, 1), (8, 16, 2), (16, 16, 1), (16, 16, 1)]     # (in, out, stride): with and without identity


def block_stack(block):
    layers = [(f"b{i}", block(c_in, c_out, 3, stride)) for i, (c_in, c_out, stride) in enumerate(LAYERS)]
    layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()), ("fc", nn.Linear(16, 4))]
    return nn.Sequential(OrderedDict(layers)).double()


def random_scales(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LinearAddBlock):
                for s in (m.scale_conv, m.scale_1x1, m.scale_identity):
                    if s is not None:
                        s.weight.uniform_(0.3, 1.7)


def stack_pair(seed=0):
    torch.manual_seed(seed)
    hs = block_stack(LinearAddBlock)
    random_scales(hs)
    target = block_stack(RealVGGBlock)
    state = {k: v for k, v in hs.state_dict().items() if k in target.state_dict()}
    for name, m in hs.named_modules():
        if isinstance(m, LinearAddBlock):
            state[f"{name}.conv.weight"] = m.equivalent_kernel()
    target.load_state_dict(state, strict=True)
    return hs, target


def train_stack(pairs, steps=20):
    """The same SGD steps (train mode, batch statistics) on each (model, optimizer); returns the
    models' outputs on fixed probe images after every step."""
    g = torch.Generator().manual_seed(1)
    probe = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    trace = []
    for _ in range(steps):
        x = torch.rand(8, 3, 16, 16, generator=g, dtype=torch.float64)
        y = torch.randn(8, 4, generator=g, dtype=torch.float64)
        for model, opt in pairs:
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
        with torch.no_grad():
            trace.append([model(probe) for model, _ in pairs])
    return trace


def test_repopt_sgd_equals_the_multi_branch_model_on_a_block_stack():
    """The RepOpt paper's equivalence, exact to float64 rounding (1e-12) over 20 steps.

    Conditions that make it exact (derivation in yoloq.train.repopt): in the multi-branch model
    ``s3 conv(W3) + s1 conv(W1) + sid x`` the conv scales s3, s1 are constants (frozen; found by the
    hyper-search, they define the masks) while W3, W1 and the identity scale sid are trained, and the
    RepOpt-VGG kernel starts at ``W3 s3 + pad(W1) s1 + I sid``. Then SGD -- here with momentum,
    Nesterov and L2 weight decay applied alike to every parameter, sid included -- on the multi-branch
    model equals SGD on the plain model whose kernel gradients are multiplied by
    ``M = s3^2 + s1^2 (centre) + 1 (identity centre)`` before weight decay and momentum. The BN after
    the sum is the same module in both and sees the same input, in train mode (batch statistics) too.
    No gradient clipping (the two parameterisations have different gradient norms).
    """
    hs, target = stack_pair()
    freeze_conv_scales(hs)
    start = hs(torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(9), dtype=torch.float64)).detach()
    trace = train_stack([(hs, torch.optim.SGD([p for p in hs.parameters() if p.requires_grad], **SGD)),
                         (target, RepOptimizer(target.parameters(), target_masks(target, extract_scales(hs)), **SGD))])
    for a, b in trace:
        assert torch.allclose(a, b, rtol=0, atol=1e-12), (a - b).abs().max()
    assert (trace[-1][0] - start).abs().max() > 0.1                          # training moved the function
    for name, m in hs.named_modules():
        if isinstance(m, LinearAddBlock):
            assert torch.allclose(m.equivalent_kernel(), getattr(target, name).conv.weight, atol=1e-12), name


@pytest.mark.parametrize("broken", ["scales trained", "no masks", "adam"])
def test_repopt_equivalence_breaks_where_the_paper_says_it_does_not_hold(broken):
    """Negative controls for the tolerance above: training the scales themselves (the
    hyper-search stage), plain SGD on the target, or Adam (per-element normalisation is not
    linear) leave the two functions apart after the same steps."""
    hs, target = stack_pair()
    if broken != "scales trained":
        freeze_conv_scales(hs)
    params = [p for p in hs.parameters() if p.requires_grad]
    masks = target_masks(target, extract_scales(hs))
    if broken == "adam":
        pairs = [(hs, torch.optim.Adam(params, lr=1e-2)), (target, torch.optim.Adam(target.parameters(), lr=1e-2))]
    else:
        opt = torch.optim.SGD(target.parameters(), **SGD) if broken == "no masks" else \
            RepOptimizer(target.parameters(), masks, **SGD)
        pairs = [(hs, torch.optim.SGD(params, **SGD)), (target, opt)]
    a, b = train_stack(pairs)[-1]
    assert (a - b).abs().max() > 1e-3


# --------------------------------------------------------------------------- yolov6n structure


def test_repopt_sgd_equals_the_hyper_search_yolov6n_structure():
    """The same equivalence on the whole tiny yolov6n-structured detector: every RealVGGBlock of
    the target gets its mask by name from the hyper-search model's scales. Two steps only: this
    deep, narrow network with batch statistics of 2 images is ill-conditioned, and float64
    rounding differences then grow about 100x a step (measured: 5e-10 relative after 2 steps,
    against 0.3 without the masks)."""
    kw = dict(lr=0.002, momentum=0.9, nesterov=True, weight_decay=5e-3)
    hs = hyper_search_model()
    target, plain = equivalent_target(hs), equivalent_target(hs)
    freeze_conv_scales(hs)
    start = batch_stat_outputs(hs)
    train(hs, torch.optim.SGD([p for p in hs.parameters() if p.requires_grad], **kw))
    train(target, RepOptimizer(target.parameters(), target_masks(target, extract_scales(hs)), **kw))
    train(plain, torch.optim.SGD(plain.parameters(), **kw))
    a = batch_stat_outputs(hs)
    scale = a.abs().max()
    assert (a - start).abs().max() / scale > 0.05
    assert (a - batch_stat_outputs(target)).abs().max() / scale < 1e-7
    assert (a - batch_stat_outputs(plain)).abs().max() / scale > 1e-2


def train(model, opt, steps=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        images = torch.rand(2, 3, 64, 64, generator=g, dtype=torch.float64)
        goals = [(torch.randn(1, 3, s, s, generator=g, dtype=torch.float64),
                  torch.randn(1, 4, s, s, generator=g, dtype=torch.float64)) for s in (8, 4, 2)]
        opt.zero_grad()
        outs = model.detect.forward_raw(model.neck(model.backbone(images)))
        sum(((c - w[0]) ** 2).mean() + ((r - w[1]) ** 2).mean() for (c, r), w in zip(outs, goals)).backward()
        opt.step()


def batch_stat_outputs(model):
    m = copy.deepcopy(model).train()          # batch statistics, without touching the model's own
    with torch.no_grad():
        return m(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(9), dtype=torch.float64))


def test_mask_is_applied_before_weight_decay_and_momentum():
    w = torch.nn.Parameter(torch.ones(1, 1, 3, 3))
    mask = torch.full((1, 1, 3, 3), 2.0)
    opt = RepOptimizer([w], {w: mask}, lr=0.1, momentum=0.5, weight_decay=0.1)
    for _ in range(2):
        w.grad = torch.ones_like(w)
        opt.step()
    # step 1: d = 2*1 + 0.1*1 = 2.1, buf = 2.1, w = 1 - 0.21 = 0.79
    # step 2: d = 2*1 + 0.1*0.79 = 2.079, buf = 0.5*2.1 + 2.079 = 3.129, w = 0.79 - 0.3129
    assert w.detach().flatten()[0].item() == pytest.approx(0.79 - 0.3129, abs=1e-6)


# --------------------------------------------------------------------------- scales file


def test_scales_file_round_trip_and_reinit(tmp_path):
    hs = hyper_search_model(dtype=torch.float32)
    path = save_scales(extract_scales(hs, source="hs.pt"), tmp_path / "scales.pt")
    scales = load_scales(path)
    target = build_model(dataclasses.replace(TINY, block="repopt"))
    check_scales(target, scales)
    name = next(n for n, m in hs.named_modules() if isinstance(m, LinearAddBlock) and m.scale_identity is not None)
    t_block = dict(target.named_modules())[name]
    before = t_block.conv.weight.detach().clone()
    reinit_from_scales(target, scales, seed=0)
    after = t_block.conv.weight.detach()
    s = scales["blocks"][name]
    ring = torch.ones(3, 3, dtype=torch.bool)
    ring[1, 1] = False
    # away from the centre only the 3x3 branch contributes: W3 * s3
    assert torch.allclose(after[:, :, ring], before[:, :, ring] * s["scale_conv"].view(-1, 1, 1))
    masks = target_masks(target, scales)
    assert len(masks) == sum(isinstance(m, RealVGGBlock) for m in target.modules())
    m = masks[t_block.conv.weight]
    i = torch.arange(m.shape[0])
    assert torch.allclose(m[i, i, 1, 1], s["scale_conv"] ** 2 + s["scale_1x1"] ** 2 + 1)


def test_a_scales_file_that_does_not_fit_the_model_is_refused(tmp_path):
    hs = hyper_search_model(dtype=torch.float32)
    path = save_scales(extract_scales(hs), tmp_path / "scales.pt")
    wider = build_model(dataclasses.replace(TINY, block="repopt", width_multiple=0.25))
    with pytest.raises(ScalesMismatchError, match=r"scales.pt: block '.+' has \(out, in, stride, identity\)"):
        check_scales(wider, load_scales(path))
    deeper = build_model(dataclasses.replace(TINY, block="repopt", depth_multiple=0.67))
    with pytest.raises(ScalesMismatchError, match="does not match the model.*missing: "):
        check_scales(deeper, load_scales(path))
    repvgg = build_model(dataclasses.replace(TINY, block="repvgg"))
    with pytest.raises(ScalesMismatchError, match="no RealVGGBlock"):
        check_scales(repvgg, load_scales(path))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ScalesMismatchError, match="other.pt: not a RepOpt scales file"):
        load_scales(tmp_path / "other.pt")
    with pytest.raises(ScalesMismatchError, match="not found"):
        load_scales(tmp_path / "missing.pt")
    with pytest.raises(ScalesMismatchError, match="no LinearAddBlock"):
        extract_scales(repvgg, "repvgg.pt")
