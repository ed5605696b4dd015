"""Learnable quantizers (yoloq.quant.learnable): PACT and LSQ / LSQ+.

Forward values and every gradient are checked against the analytic formulas, against an
independent plain-autograd reference written with the round-STE trick, and against finite
differences in the regions where the quantized function is differentiable in the parameter
(the clamped regions: inside the range the true derivative of round() is 0, and the gradients
there are straight-through estimates by definition).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
from pytorch_quantization import nn as quant_nn                         # noqa: E402
from pytorch_quantization.nn import TensorQuantizer                     # noqa: E402
from pytorch_quantization.tensor_quant import QuantDescriptor           # noqa: E402

from yoloq.quant.state import quant_state  # noqa: E402
from yoloq.quant.learnable import (clamp_weight_scales, LSQActQuantizer, LSQFunction, LSQWeightQuantizer, PACTFunction,  # noqa: E402
                                   PACTQuantizer, QuantizerDivergenceError, check_quantizers, pact_alpha_l2,
                                   quantizer_parameters)
from yoloq.quant.scheme import export_spec                             # noqa: E402
from yoloq.quant.state import named_quantizers                         # noqa: E402
from yoloq.quant.swap import freeze_quantizers, lsq_init, swap_quantizers  # noqa: E402
from yoloq.quant.prepare import set_amax                                 # noqa: E402
from yoloq.quant.scheme import QDQSpec                                     # noqa: E402

D = torch.float64


def away_from_ties(v: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """Mask of values whose fractional part is not within ``margin`` of .5 (rounding boundary)."""
    frac = v - torch.floor(v)
    return (frac - 0.5).abs() > margin


# --------------------------------------------------------------------------- PACT


def pact_reference(x, alpha, signed, quant_error):
    """Plain autograd with the round-STE trick; ``quant_error=False`` detaches the in-range
    dependence on alpha (PACT paper: STE inside, d/dalpha only from the clipped values)."""
    lo = -alpha * 128 / 127 if signed else torch.zeros_like(alpha)
    y = torch.minimum(torch.maximum(x, lo), alpha)
    s = alpha / 127
    v = y / s
    q = v + (torch.round(v) - v).detach()
    if quant_error:
        return q * s
    inside = ((x >= lo) & (x <= alpha)).detach()
    out_in = x + ((q * s) - x).detach()                  # value q*s; dx = 1, dalpha = 0 inside
    return torch.where(inside, out_in, y)


@pytest.mark.parametrize("signed", [True, False])
def test_pact_forward_values(signed):
    alpha = torch.tensor(2.0)
    x = torch.tensor([-5.0, -2.0, -1.0, -0.01, 0.0, 0.0079, 0.5, 1.99, 2.0, 3.0])
    y = PACTFunction.apply(x, alpha, signed, False)
    s = 2.0 / 127
    lo = -2.0 * 128 / 127 if signed else 0.0         # the int8 -128 level, as QuantizeLinear / TensorRT
    expected = torch.round(x.clamp(lo, 2.0) / s) * s
    assert torch.allclose(y, expected)
    assert float(y.max()) == pytest.approx(2.0) and float(y.min()) == pytest.approx(lo)
    assert len(torch.unique(torch.round(PACTFunction.apply(torch.linspace(-3, 3, 5001), alpha, signed, False) / s)))\
        == (256 if signed else 128)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("quant_error", [False, True])
def test_pact_gradients_match_formula_and_reference(signed, quant_error):
    torch.manual_seed(0)
    x = (torch.randn(4000, dtype=D) * 2.0)
    alpha = torch.tensor(1.5, dtype=D)
    w = torch.randn_like(x)
    xa, aa = x.clone().requires_grad_(), alpha.clone().requires_grad_()
    (PACTFunction.apply(xa, aa, signed, quant_error) * w).sum().backward()

    # analytic
    lo = -alpha * 128 / 127 if signed else torch.zeros_like(alpha)
    above, below = x > alpha, x < lo
    inside = ~(above | below)
    assert torch.equal(xa.grad, w * inside)
    d = above.to(D) - (128 / 127 * below.to(D) if signed else 0)
    if quant_error:
        v = x.clamp(lo, alpha) * 127 / alpha
        d = d + inside * (torch.round(v) - v) / 127
    assert torch.allclose(aa.grad, (w * d).sum())

    # independent reference (plain autograd)
    xr, ar = x.clone().requires_grad_(), alpha.clone().requires_grad_()
    (pact_reference(xr, ar, signed, quant_error) * w).sum().backward()
    assert torch.allclose(xr.grad, xa.grad) and torch.allclose(ar.grad, aa.grad)


@pytest.mark.parametrize("signed", [True, False])
def test_pact_alpha_gradient_finite_differences_in_clipped_region(signed):
    alpha = torch.tensor(1.0, dtype=D)
    x = torch.cat([torch.linspace(1.2, 4.0, 50, dtype=D), -torch.linspace(1.2, 4.0, 50, dtype=D)])
    w = torch.randn(len(x), dtype=D, generator=torch.Generator().manual_seed(1))
    f = lambda a: float((PACTFunction.apply(x, a, signed, False) * w).sum())   # noqa: E731
    eps = 1e-6
    fd = (f(alpha + eps) - f(alpha - eps)) / (2 * eps)
    aa = alpha.clone().requires_grad_()
    (PACTFunction.apply(x, aa, signed, False) * w).sum().backward()
    assert float(aa.grad) == pytest.approx(fd, rel=1e-6, abs=1e-9)
    # signed: the lower clip -alpha * 128/127 contributes -128/127 per element; unsigned: negative x
    # is clipped at 0 (no alpha)
    expect = float(w[:50].sum() - (128 / 127 * w[50:].sum() if signed else 0))
    assert float(aa.grad) == pytest.approx(expect, rel=1e-9)


def test_pact_input_gradient_finite_differences():
    """d/dx: 0 in the clipped regions (exact), 1 inside (STE) -- FD inside is 0 between rounding steps."""
    alpha = torch.tensor(1.0, dtype=D)
    x = torch.tensor([-3.0, -1.5, 1.5, 3.0], dtype=D)
    eps = 1e-6
    fd = (PACTFunction.apply(x + eps, alpha, True, False) - PACTFunction.apply(x - eps, alpha, True, False)) / (2 * eps)
    xa = x.clone().requires_grad_()
    PACTFunction.apply(xa, alpha, True, False).sum().backward()
    assert torch.allclose(xa.grad, fd) and torch.all(xa.grad == 0)


def test_pact_module_l2_export_and_checkpoint():
    q = PACTQuantizer(alpha=3.0, signed=False)
    assert isinstance(q.export_spec(), QDQSpec)
    assert float(q.export_spec().scale) == pytest.approx(3.0 / 127) and q.export_spec().zero_point is None
    model = nn.Sequential(q, nn.Identity())
    model.add_module("alias", q)                       # shared object counted once
    model.add_module("other", PACTQuantizer(alpha=2.0))
    assert float(pact_alpha_l2(model).detach()) == pytest.approx(9.0 + 4.0)
    pact_alpha_l2(model).backward()
    assert float(q.alpha.grad) == pytest.approx(6.0)
    q2 = PACTQuantizer.from_checkpoint({k: v.clone() for k, v in q.state_dict().items()})
    assert not q2.signed and float(q2.alpha.detach()) == 3.0
    x = torch.randn(100) * 4
    assert torch.equal(q2(x), q(x))
    q.disable()
    assert torch.equal(q(x), x) and not PACTQuantizer.from_checkpoint(q.state_dict()).enabled
    with pytest.raises(ValueError, match="alpha"):
        PACTQuantizer(alpha=0.0)


# --------------------------------------------------------------------------- LSQ / LSQ+


def lsq_reference(x, s, beta, n, p, g, round_offset):
    """Plain autograd: gradient scaling by the (s*g) trick, round-STE, clamp with its own gradient."""
    def gscale(t):
        return t * g + (t - t * g).detach()         # value t, gradient multiplied by g
    s = gscale(s)
    if beta is None:
        b = torch.zeros_like(s)
    else:
        beta = gscale(beta)
        if round_offset:
            z = torch.round(beta / s).clamp(-127, 128).detach()
            b = s * z + (beta - beta.detach())      # db/ds = z, db/dbeta = 1
        else:
            b = beta
    v = (x - b) / s
    vc = torch.clamp(v, n, p)
    q = vc + (torch.round(vc) - vc).detach()
    return q * s + b


@pytest.mark.parametrize("variant", ["symmetric", "lsqplus", "offset"])
def test_lsq_forward_values(variant):
    x = torch.linspace(-3, 6, 1001, dtype=D)
    s = torch.tensor(0.02, dtype=D)
    if variant == "symmetric":
        beta, n, p, ro = None, -128, 127, False
    else:
        beta, n, p, ro = torch.tensor(0.513, dtype=D), -128, 127, variant == "offset"
    y = LSQFunction.apply(x, s, beta, n, p, 1.0, ro)
    b = 0.0 if beta is None else (float(s) * round(float(beta) / float(s)) if ro else float(beta))
    expected = torch.round((x - b) / s).clamp(n, p) * s + b
    assert torch.allclose(y, expected)
    assert float(y.min()) == pytest.approx(n * 0.02 + b) and float(y.max()) == pytest.approx(p * 0.02 + b)
    if ro:   # the offset is an integer number of steps: exactly a zero-point Q/DQ (ONNX semantics)
        zp = -round(float(beta) / float(s))
        onnx_like = (torch.clamp(torch.round(x / s) + zp, -128, 127) - zp) * s
        assert torch.allclose(y, onnx_like)


@pytest.mark.parametrize("variant", ["symmetric", "lsqplus", "offset"])
def test_lsq_gradients_match_formula_and_reference(variant):
    torch.manual_seed(0)
    x = torch.randn(3000, dtype=D) * 2 + 0.3
    s = torch.tensor(0.011, dtype=D)
    g = 1 / math.sqrt(x.numel() * 127)
    if variant == "symmetric":
        beta, n, p, ro = None, -128, 127, False
    else:
        beta, n, p, ro = torch.tensor(0.2537, dtype=D), -128, 127, variant == "offset"
    w = torch.randn_like(x)
    xa, sa = x.clone().requires_grad_(), s.clone().requires_grad_()
    ba = None if beta is None else beta.clone().requires_grad_()
    (LSQFunction.apply(xa, sa, ba, n, p, g, ro) * w).sum().backward()

    z = 0.0 if beta is None else (round(float(beta / s)) if ro else 0.0)
    b = 0.0 if beta is None else (float(s) * z if ro else float(beta))
    v = (x - b) / s
    below, above = v < n, v > p
    inside = ~(below | above)
    assert below.any() and above.any() and inside.any()
    assert torch.equal(xa.grad, w * inside)
    d_s = torch.where(inside, torch.round(v) - v, torch.where(below, float(n), float(p)) + z)
    assert torch.allclose(sa.grad, (w * d_s).sum() * g)
    if ba is not None:
        assert torch.allclose(ba.grad, (w * (~inside)).sum() * g)

    xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
    br = None if beta is None else beta.clone().requires_grad_()
    (lsq_reference(xr, sr, br, n, p, g, ro) * w).sum().backward()
    assert torch.allclose(xr.grad, xa.grad) and torch.allclose(sr.grad, sa.grad)
    if br is not None:
        assert torch.allclose(br.grad, ba.grad)


@pytest.mark.parametrize("variant", ["symmetric", "lsqplus", "offset"])
def test_lsq_finite_differences_in_clamped_regions(variant):
    """Where x is clamped the output is s*n + b (or s*p + b): smooth in s and beta."""
    s = torch.tensor(0.01, dtype=D)
    if variant == "symmetric":
        beta, n, p, ro = None, -128, 127, False
    else:
        beta, n, p, ro = torch.tensor(0.3013, dtype=D), -128, 127, variant == "offset"
    x = torch.cat([torch.linspace(-5, -2, 40, dtype=D), torch.linspace(2.5, 6, 40, dtype=D)])
    w = torch.randn(len(x), dtype=D, generator=torch.Generator().manual_seed(2))
    f = lambda s_, b_: float((LSQFunction.apply(x, s_, b_, n, p, 1.0, ro) * w).sum())   # noqa: E731
    eps = 1e-7
    sa = s.clone().requires_grad_()
    ba = None if beta is None else beta.clone().requires_grad_()
    (LSQFunction.apply(x, sa, ba, n, p, 1.0, ro) * w).sum().backward()
    fd_s = (f(s + eps, beta) - f(s - eps, beta)) / (2 * eps)
    assert float(sa.grad) == pytest.approx(fd_s, rel=1e-6)
    if variant == "lsqplus":        # rounded offset: z is piecewise constant in beta, so only STE there
        fd_b = (f(s, beta + eps) - f(s, beta - eps)) / (2 * eps)
        assert float(ba.grad) == pytest.approx(fd_b, rel=1e-6)
    xa = x.clone().requires_grad_()
    LSQFunction.apply(xa, s, beta, n, p, 1.0, ro).sum().backward()
    assert torch.all(xa.grad == 0)


def test_lsq_inside_gradient_is_round_minus_v():
    """Inside the range, between rounding steps, FD of s*round(v) in s is round(v) (round is
    piecewise constant); LSQ's STE gradient is round(v) - v: the two differ exactly by -v."""
    s = torch.tensor(0.1, dtype=D)
    x = torch.linspace(-5, 5, 201, dtype=D)
    x = x[away_from_ties(x / s, 0.2)]
    eps = 1e-8
    fd = (LSQFunction.apply(x, s + eps, None, -127, 127, 1.0, False)
          - LSQFunction.apply(x, s - eps, None, -127, 127, 1.0, False)) / (2 * eps)
    v = x / s
    assert torch.allclose(fd, torch.round(v), atol=1e-5)
    sa = s.clone().requires_grad_()
    LSQFunction.apply(x, sa, None, -127, 127, 1.0, False).sum().backward()
    assert float(sa.grad) == pytest.approx(float((torch.round(v) - v).sum()), abs=1e-9)


def test_lsq_modules_grad_scale_export_and_checkpoint():
    x = torch.randn(2, 3, 4, 4) * 2
    q = LSQActQuantizer(scale=0.02, mode="symmetric")
    q(x).sum().backward()
    v = x / 0.02
    d = torch.where(v > 127, 127.0, torch.where(v < -128, -128.0, torch.round(v) - v))   # levels -128..127
    assert float(q.scale.grad) == pytest.approx(float(d.sum()) / math.sqrt(48 * 127), rel=1e-4)
    assert not hasattr(q, "beta") and q.export_spec().offset is None

    qo = LSQActQuantizer(scale=0.02, offset=0.5, mode="offset")
    spec = qo.export_spec()
    assert float(spec.offset) == pytest.approx(0.02 * 25) and spec.zero_point is None
    zspec = qo.export_spec(zero_point=True)
    assert int(zspec.zero_point) == -25 and zspec.zero_point.dtype == torch.int8 and zspec.offset is None
    y = qo(x)
    deployed = (torch.clamp(torch.round(x / 0.02) + int(zspec.zero_point), -128, 127) - int(zspec.zero_point)) * 0.02
    assert torch.allclose(y, deployed, atol=1e-6)
    via_offset = torch.clamp(torch.round((x - spec.offset) / spec.scale), -128, 127) * spec.scale + spec.offset
    assert torch.allclose(y, via_offset, atol=1e-6)
    qo2 = LSQActQuantizer.from_checkpoint(qo.state_dict())
    assert qo2.mode == "offset" and torch.equal(qo2(x), y)

    wq = LSQWeightQuantizer(torch.tensor([0.01, 0.02, 0.03]), axis=0)
    w = torch.randn(3, 2, 3, 3)
    wq(w).sum().backward()
    assert wq.scale.grad.shape == (3,)
    ref = w / wq.scale.detach().view(-1, 1, 1, 1)
    d = torch.where(ref.abs() > 127, torch.sign(ref) * 127, torch.round(ref) - ref)
    assert torch.allclose(wq.scale.grad, d.sum((1, 2, 3)) / math.sqrt(18 * 127), rtol=1e-4)
    assert wq.export_spec().axis == 0 and wq.export_spec().scale.shape == (3,)
    wq2 = LSQWeightQuantizer.from_checkpoint(wq.state_dict())
    assert torch.equal(wq2(w), wq(w))
    wt = LSQWeightQuantizer(torch.tensor([0.01, 0.02]), axis=1)      # ConvTranspose: [in, out, k, k]
    assert torch.allclose(wt(torch.ones(3, 2, 1, 1))[:, 1], torch.full((3, 1, 1), 1.0), atol=0.011)


def test_lsq_init_mse_search():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((50000,))        # heavy tails: max is a poor range
    amax = float(x.abs().max())

    def mse(s_, b_, n=-128, p=127):
        return float((torch.round((x - b_) / s_).clamp(n, p) * s_ + b_ - x).square().mean())
    s, beta = lsq_init(x, float(x.min()), float(x.max()), "symmetric", amax=amax)
    assert beta == 0.0 and s * 127 < 0.9 * amax
    assert mse(s, 0.0) < mse(amax / 127, 0.0)
    for c in (0.2, 0.5, 0.7, 1.0):                                 # no candidate range beats the choice
        assert mse(s, 0.0) <= mse(c * amax / 127, 0.0) + 1e-12
    x = x.abs()                                                    # non-negative data
    s2, b2 = lsq_init(x, 0.0, float(x.max()), "offset", amax=amax)
    assert b2 > 0                 # the offset mode shifts the range up to use all 256 levels ...
    z = round(b2 / s2)
    assert mse(s2, s2 * z, -128, 127) < mse(*lsq_init(x, 0.0, float(x.max()), "symmetric", amax=amax))  # ... and wins
    with pytest.raises(ValueError, match="mode"):
        lsq_init(x, 0, 1, "asym")


def test_check_quantizers_names_the_quantizer():
    m = nn.Module()
    m.good = PACTQuantizer(alpha=1.0)
    m.bad = LSQActQuantizer(scale=0.01)
    check_quantizers(m)
    with torch.no_grad():
        m.bad.scale.fill_(50.0)
    with pytest.raises(QuantizerDivergenceError, match="'bad'.*exploding"):
        check_quantizers(m)
    with torch.no_grad():
        m.bad.scale.fill_(float("nan"))
    with pytest.raises(QuantizerDivergenceError, match="'bad'.*NaN"):
        check_quantizers(m)
    with torch.no_grad():
        m.bad.scale.fill_(-1.0)
    with pytest.raises(QuantizerDivergenceError, match="'bad'.*collapsed"):
        check_quantizers(m)


def test_clamp_weight_scales_keeps_a_floor_and_leaves_the_rest():
    m = nn.Module()
    m.w = LSQWeightQuantizer(scale=torch.tensor([1e-6, 0.5, 2.0]))
    with torch.no_grad():
        m.w.scale.copy_(torch.tensor([-3e-6, 0.04, 2.5]))     # an SGD step overshot channel 0 and 1
    assert clamp_weight_scales(m) == 2
    torch.testing.assert_close(m.w.scale.detach(), torch.tensor([1e-7, 0.05, 2.5]))
    check_quantizers(m)                                       # no longer "collapsed"
    assert clamp_weight_scales(m) == 0


# --------------------------------------------------------------------------- swap on a hand-built model


def act_desc():
    return QuantDescriptor(num_bits=8, calib_method="max")


def weight_desc(axis=0):
    return QuantDescriptor(num_bits=8, axis=(axis,))


class TinyQuantNet(nn.Module):
    """conv1 -> relu -> (conv2, conv3 share ONE input quantizer) ; conv4 skipped (disabled)."""

    def __init__(self):
        super().__init__()
        self.conv1 = quant_nn.QuantConv2d(3, 8, 3, padding=1, quant_desc_input=act_desc(), quant_desc_weight=weight_desc())
        self.conv2 = quant_nn.QuantConv2d(8, 4, 1, quant_desc_input=act_desc(), quant_desc_weight=weight_desc())
        self.conv3 = quant_nn.QuantConv2d(8, 4, 1, quant_desc_input=act_desc(), quant_desc_weight=weight_desc())
        self.conv4 = quant_nn.QuantConv2d(8, 4, 1, quant_desc_input=act_desc(), quant_desc_weight=weight_desc())
        self.up = quant_nn.QuantConvTranspose2d(4, 2, 2, stride=2, quant_desc_input=act_desc(),
                                                quant_desc_weight=weight_desc(axis=1))
        self.conv3._input_quantizer = self.conv2._input_quantizer
        self.conv4._input_quantizer = TensorQuantizer(act_desc(), disabled=True)
        self.conv4._weight_quantizer.disable()

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        return self.up(self.conv2(h) + self.conv3(h)).sum(1, keepdim=True) + self.conv4(h).mean()


def calibrated_tiny(seed=0):
    torch.manual_seed(seed)
    m = TinyQuantNet().eval()
    x = torch.rand(4, 3, 8, 8) * 2 - 0.5
    with torch.no_grad():
        h = torch.relu(torch.nn.functional.conv2d(x, m.conv1.weight, m.conv1.bias, padding=1))
    set_amax(m.conv1._input_quantizer, x.abs().max())
    set_amax(m.conv2._input_quantizer, h.abs().max())
    set_amax(m.up._input_quantizer, torch.tensor(3.0))
    for conv in (m.conv1, m.conv2, m.conv3, m.conv4):
        set_amax(conv._weight_quantizer, conv.weight.detach().abs().amax((1, 2, 3), keepdim=True))
    set_amax(m.up._weight_quantizer, m.up.weight.detach().abs().amax((0, 2, 3), keepdim=True))
    return m, x


@pytest.mark.parametrize("kind,mode", [("pact", "symmetric"), ("lsqplus", "symmetric"), ("lsqplus", "offset"),
                                       ("fixed", "symmetric")])
def test_swap_keeps_sharing_disabled_and_starts_at_ptq(kind, mode):
    m, x = calibrated_tiny()
    with torch.no_grad():
        ptq_out = m(x)
    swap_quantizers(m, kind, mode)
    if kind == "fixed":
        assert all(isinstance(q, TensorQuantizer) for q in named_quantizers(m).values())
        assert quantizer_parameters(m) == []
    else:
        act_cls = PACTQuantizer if kind == "pact" else LSQActQuantizer
        assert isinstance(m.conv2._input_quantizer, act_cls)
        assert m.conv2._input_quantizer is m.conv3._input_quantizer              # sharing kept
        assert isinstance(m.conv4._input_quantizer, TensorQuantizer) and m.conv4._input_quantizer._disabled
        assert isinstance(m.conv4._weight_quantizer, TensorQuantizer) and m.conv4._weight_quantizer._disabled
        w_cls = LSQWeightQuantizer if kind == "lsqplus" else TensorQuantizer
        assert isinstance(m.conv1._weight_quantizer, w_cls) and isinstance(m.up._weight_quantizer, w_cls)
        if kind == "lsqplus":
            assert m.up._weight_quantizer.axis == 1 and m.up._weight_quantizer.scale.shape == (2,)
        n_act = 3                                          # conv1, shared conv2/conv3, up
        assert len(quantizer_parameters(m)) == n_act * (2 if mode == "offset" else 1) + (4 if kind == "lsqplus" else 0)   # conv4 skipped
    with torch.no_grad():
        out = m(x)
    # initialised from the calibrated amax without calibration batches: exactly the PTQ model
    assert torch.equal(out, ptq_out), float((out - ptq_out).abs().max())
    m.train()
    out = m(x)
    out.square().sum().backward()
    for p in quantizer_parameters(m):
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_swap_with_calibration_batches_picks_unsigned_pact_and_mse_init():
    m, x = calibrated_tiny()
    batches = [x[:2], (x[2:], None)]
    pact = swap_quantizers(calibrated_tiny()[0], "pact", calib_batches=batches)
    assert pact.conv1._input_quantizer.signed                     # input has negatives
    assert not pact.conv2._input_quantizer.signed                 # ReLU output: one-sided clip
    assert float(pact.conv2._input_quantizer.alpha.detach()) == pytest.approx(float(m.conv2._input_quantizer._amax))
    lsq = swap_quantizers(calibrated_tiny()[0], "lsqplus", "offset", calib_batches=batches)
    q = lsq.conv2._input_quantizer
    assert q.offset_mode and float(q.beta.detach()) > 0                    # ReLU output: range shifted up
    # the collection pass switched quantizers off meanwhile: afterwards they are as before
    assert lsq.conv4._input_quantizer._disabled and lsq.conv1._input_quantizer.enabled
    assert not any(q._disabled for q in named_quantizers(lsq).values()
                   if isinstance(q, TensorQuantizer) and q is not lsq.conv4._input_quantizer
                   and q is not lsq.conv4._weight_quantizer)


def test_swap_errors():
    m = TinyQuantNet()
    with pytest.raises(ValueError, match="no amax"):
        swap_quantizers(m, "pact")
    with pytest.raises(ValueError, match="kind"):
        swap_quantizers(calibrated_tiny()[0], "dorefa")
    with pytest.raises(ValueError, match="TensorQuantizer"):
        swap_quantizers(nn.Conv2d(1, 1, 1), "pact")


@pytest.mark.parametrize("kind,mode", [("pact", "symmetric"), ("lsqplus", "symmetric"), ("lsqplus", "offset")])
def test_freeze_gives_the_same_model_with_tensor_quantizers(kind, mode):
    m, x = calibrated_tiny()
    swap_quantizers(m, kind, mode)
    with torch.no_grad():   # move away from the init so the test sees learned values
        for p in quantizer_parameters(m):
            p.mul_(0.9)
    frozen = freeze_quantizers(m)
    with torch.no_grad():       # bit for bit: the quantizers compute like pytorch-quantization
        assert torch.equal(frozen(x), m(x))
    assert frozen.conv2._input_quantizer is frozen.conv3._input_quantizer
    if mode == "offset":
        assert isinstance(frozen.conv2._input_quantizer, LSQActQuantizer)
        assert isinstance(frozen.conv1._weight_quantizer, TensorQuantizer)
    else:
        assert all(isinstance(q, TensorQuantizer) for q in named_quantizers(frozen).values())
        # the frozen amax maps back to the learned scale
        spec = export_spec(frozen.conv2._input_quantizer)
        assert torch.allclose(spec.scale, export_spec(m.conv2._input_quantizer).scale)
        wspec = export_spec(frozen.up._weight_quantizer)
        assert wspec.axis == 1 and torch.allclose(wspec.scale, export_spec(m.up._weight_quantizer).scale)
    # swapping a frozen model back (no calibration batches) is exact: lossless round trip
    if mode == "symmetric":
        back = swap_quantizers(freeze_quantizers(m), kind, mode)
        with torch.no_grad():
            assert torch.equal(back(x), m(x))


# --------------------------------------------------------------------------- real model + checkpoint


@pytest.fixture(scope="module")
def lite_calibrated():
    from yoloq.config import ModelConfig
    from yoloq.models import build_model
    from yoloq.quant.calibrate import calibrate
    from yoloq.quant.prepare import prepare
    torch.manual_seed(0)
    cfg = ModelConfig(name="yolov6lite_s", arch="lite", backbone="Lite_EffiBackbone", neck="Lite_EffiNeck",
                      width_multiple=0.7, img_size=64)
    model = build_model(cfg).fuse().eval()
    qmodel = prepare(model, skip_layers=[])
    batches = [torch.rand(2, 3, 64, 64) for _ in range(2)]
    calibrate(qmodel, batches, "max", progress=False)
    return qmodel, batches


@pytest.mark.parametrize("kind,mode", [("pact", "symmetric"), ("lsqplus", "symmetric"), ("lsqplus", "offset")])
def test_prepared_model_swap_save_load_round_trip(lite_calibrated, kind, mode, tmp_path):
    import copy
    from yoloq.quant.prepare import input_quantizers
    from yoloq.quant.checkpoint import load_quantized, save_quantized
    qmodel, batches = lite_calibrated
    qmodel = copy.deepcopy(qmodel)
    sites_before = {name: id(q) for name, q in input_quantizers(qmodel).items()}
    swap_quantizers(qmodel, kind, mode, calib_batches=batches[:1])
    sites = input_quantizers(qmodel)
    assert set(sites) == set(sites_before)
    groups_before = {}
    for name, key in sites_before.items():
        groups_before.setdefault(key, set()).add(name)
    for group in groups_before.values():               # sites sharing an object still share one
        assert len({id(sites[n]) for n in group}) == 1
    # every consumer conv holds the site's new object
    for site in quant_state(qmodel).placement.sites:
        for layer in site.consumers:
            assert qmodel.get_submodule(layer)._input_quantizer is sites[site.name]
    with torch.no_grad():   # pretend training moved the parameters
        for p in quantizer_parameters(qmodel):
            p.mul_(0.95)
    x = batches[1]
    with torch.no_grad():
        ref = qmodel(x)
    save_quantized(freeze_quantizers(qmodel), tmp_path / "quant.pt", meta={"qat": kind})
    loaded, meta = load_quantized(tmp_path / "quant.pt")
    assert meta == {"qat": kind}
    with torch.no_grad():
        assert torch.equal(loaded(x), ref), float((loaded(x) - ref).abs().max())
    kept = LSQActQuantizer if mode == "offset" else TensorQuantizer
    assert all(isinstance(q, kept) for q in input_quantizers(loaded).values())
