"""onnxruntime fast path (yoloq.runtime.ort_fast): graph rules, integer kernels, numerics, errors.

The fast tests use a tiny TensorRT-style Q/DQ graph exported from pytorch-quantization modules
(conv -> ReLU, conv -> HardSwish, a shared input quantizer, concat + maxpool + nearest upsample,
an SE block and a float head conv), so they cover every rewrite rule in a few seconds.
"""
from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np
import onnx
import pytest
import torch
from torch import nn

ort = pytest.importorskip("onnxruntime")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from pytorch_quantization import nn as quant_nn

from yoloq.runtime.ort_fast import (OrtFastError, consumer_qparams, make_ort_fast, optimized_op_counts,
                                   qparams_for_range)
from yoloq.runtime.ort import ort_session
from yoloq.quant.prepare import activation_descriptor, new_input_quantizer, set_amax, weight_descriptor
from yoloq.bench import ort as bench_ort  # noqa: E402
from yoloq.cli.bench_ort import parse_args as parse_bench_ort_args  # noqa: E402
from conftest import REPO, SHARED  # noqa: E402

SIZE = 32


def _qconv(cin, cout, k=1, groups=1, quantizer=None):
    conv = quant_nn.QuantConv2d(cin, cout, k, padding=k // 2, groups=groups,
                                quant_desc_input=activation_descriptor(), quant_desc_weight=weight_descriptor(0))
    conv._input_quantizer = quantizer if quantizer is not None else new_input_quantizer()
    return conv


class Tiny(nn.Module):
    """Every pattern of a YOLOv6 graph the fast path handles, TensorRT placement (Q/DQ on conv inputs)."""

    def __init__(self):
        super().__init__()
        self.stem = _qconv(3, 8, 3)                          # -> ReLU -> shared quantizer
        shared = new_input_quantizer()
        self.a = _qconv(8, 8, 3, quantizer=shared)           # -> HardSwish -> concat
        self.b = _qconv(8, 8, 3, groups=8, quantizer=shared)  # depthwise -> HardSwish -> maxpool -> concat
        self.fuse = _qconv(16, 8, 1)                         # reads concat (one quantizer = equal scales)
        self.se1 = _qconv(8, 4, 1)
        self.se2 = _qconv(4, 8, 1)
        self.up = _qconv(8, 8, 1)                            # reads upsample(SE output)
        self.head = _qconv(8, 6, 1)                          # prediction conv: output stays float

    def forward(self, x):
        x = torch.relu(self.stem(x))
        a = nn.functional.hardswish(self.a(x))
        b = nn.functional.max_pool2d(nn.functional.hardswish(self.b(x)), 3, 1, 1)
        y = self.fuse(torch.cat([a, b], 1))
        s = torch.relu(self.se1(nn.functional.adaptive_avg_pool2d(y, 1)))
        y = y * nn.functional.hardsigmoid(self.se2(s))
        y = nn.functional.hardswish(self.up(nn.functional.interpolate(y, scale_factor=2, mode="nearest")))
        return self.head(y).flatten(2).transpose(1, 2)


def _calibrate_tiny(model: nn.Module, images: torch.Tensor) -> None:
    """Max calibration by hand: activation amax from a float pass, weight amax per channel."""
    quantizers = {id(m._input_quantizer): m._input_quantizer for m in model.modules()
                  if isinstance(m, quant_nn.QuantConv2d)}
    amax = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp: amax.__setitem__(
        id(mod._input_quantizer), max(amax.get(id(mod._input_quantizer), 0.0), float(inp[0].abs().max()))))
        for m in model.modules() if isinstance(m, quant_nn.QuantConv2d)]
    for q in quantizers.values():
        q.disable()
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    for key, q in quantizers.items():
        q.enable()
        set_amax(q, torch.tensor(amax[key]))
    for m in model.modules():
        if isinstance(m, quant_nn.QuantConv2d):
            set_amax(m._weight_quantizer, m.weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True))


@pytest.fixture(scope="module")
def trt_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = Tiny().eval()
    images = torch.rand(4, 3, SIZE, SIZE)
    _calibrate_tiny(model, images)
    path = tmp_path_factory.mktemp("ortfast") / "tiny_trt.onnx"
    old = quant_nn.TensorQuantizer.use_fb_fake_quant
    quant_nn.TensorQuantizer.use_fb_fake_quant = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, images[:1], str(path), opset_version=13, input_names=["images"],
                              output_names=["outputs"], dynamo=False)
    finally:
        quant_nn.TensorQuantizer.use_fb_fake_quant = old
    return path, images


def _run(path, x: np.ndarray) -> np.ndarray:
    """yoloq's session with integer kernels (int32 biases; exact uint8 x uint8 kernels on CPUs whose int8
    kernels saturate, see tests/test_ort_saturation.py), for the Q/DQ graph and the fast path alike."""
    sess = ort_session(path, quantize_bias=True)
    return np.concatenate([sess.run(None, {"images": x[i:i + 1]})[0] for i in range(len(x))])


@pytest.fixture(scope="module")
def fast(trt_onnx, tmp_path_factory):
    src, images = trt_onnx
    out = tmp_path_factory.mktemp("ortfast") / "tiny_fast.onnx"
    info = make_ort_fast(src, out, calib_images=[images[:2]])
    return out, info


def _producer_consumers(model):
    prod = {o: n for n in model.graph.node for o in n.output}
    cons = {}
    for n in model.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    return prod, cons


def test_rules_applied(fast):
    _, info = fast
    assert info.n_conv == 8
    assert info.relu_exact == 2                 # stem and se1
    assert info.pre_activation == 3             # a, b, up: HardSwish (self-gated) on the consumer's scale
    # SE input (GAP + Mul) and SE gate (HardSigmoid) are not self-gated: float by default; the
    # prediction conv reaches no quantizer
    assert info.left_float == ["/fuse/Conv", "/se2/Conv", "/head/Conv"]
    assert info.propagated >= 2                 # the concat's quantizer pushed onto both inputs (and maxpool)


def test_every_quantized_conv_reads_dq_and_feeds_q(fast):
    path, _ = fast
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    prod, cons = _producer_consumers(model)
    weights = {t.name for t in model.graph.initializer}
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        assert prod[conv.input[0]].op_type == "DequantizeLinear", conv.name
        users = cons.get(conv.output[0], [])
        if conv.name in ("/head/Conv", "/fuse/Conv", "/se2/Conv"):     # float convs: constant float weights
            assert all(u.op_type != "QuantizeLinear" for u in users)
            assert conv.input[1] in weights and conv.input[1] not in prod, conv.name
        else:
            assert [u.op_type for u in users] == ["QuantizeLinear"], conv.name
            assert prod[conv.input[1]].op_type == "DequantizeLinear", conv.name
    # Concat reads only DQ inputs (QLinearConcat); ReLU became a Clip(min=zero point) on the codes
    by_name = {n.name: n for n in model.graph.node}
    assert [prod[i].op_type for i in by_name["/Concat"].input] == ["DequantizeLinear"] * 2
    assert prod[by_name["/MaxPool"].input[0]].op_type == "DequantizeLinear"     # 8-bit max pool
    assert prod[by_name["/Resize"].input[0]].op_type == "DequantizeLinear"      # 8-bit nearest upsample
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert len(clips) == 2 and not any(n.op_type in ("Relu", "LeakyRelu") for n in model.graph.node)
    for clip in clips:
        q = prod[clip.input[0]]
        assert q.op_type == "QuantizeLinear" and prod[q.input[0]].op_type == "Conv"
        assert clip.input[1] == q.input[2]              # min = the codes' zero point (uint8 128)
        assert {c.op_type for c in cons[clip.output[0]]} == {"DequantizeLinear"}
    # activations are uint8 (zero point + 128), weights stay int8
    zps = {t.name: t.data_type for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in zps:
            assert zps[n.input[2]] == onnx.TensorProto.UINT8, n.name


def test_onnxruntime_forms_integer_kernels(trt_onnx, fast):
    src, _ = trt_onnx
    path, _ = fast
    before, after = optimized_op_counts(src), optimized_op_counts(path)
    assert before.get("QLinearConv", 0) <= 1            # TensorRT variant: float convs on dequantized tensors
    assert after.get("QLinearConv", 0) == 5              # stem, a, b, se1, up
    assert after.get("Clip", 0) == 2 and after.get("QLinearLeakyRelu", 0) == 0     # ReLU on 8-bit codes
    assert after.get("QLinearConcat", 0) == 1


def test_output_close_to_trt_variant(trt_onnx, fast):
    """Tolerance: the pre-activation requantization moves ~20% of the codes after a HardSwish by one
    step of the consumer's scale; through this random tiny net that is <= 10% of the output range
    at worst (measured 9.8%), 4.4% on average (a real, documented cost, see the module docstring)."""
    src, images = trt_onnx
    path, _ = fast
    x = images.numpy()
    ref, out = _run(src, x), _run(path, x)
    assert out.shape == ref.shape
    spread = float(ref.max() - ref.min())
    assert np.abs(out - ref).max() <= 0.12 * spread
    assert np.abs(out - ref).mean() <= 0.06 * spread
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.9


def test_fast_path_files_are_marked_for_integer_kernels(fast, tmp_path, trt_onnx):
    from yoloq.runtime.ort import OnnxPredictor, onnx_variant
    path, _ = fast
    assert onnx_variant(path) == "ort-fast" and OnnxPredictor(path).quantize_bias is True
    exact = tmp_path / "exact_variant.onnx"
    make_ort_fast(trt_onnx[0], exact, pre_act="float")
    assert onnx_variant(exact) == "ort-exact"
    # without onnxruntime's int32 bias rounding no QLinearConv forms: why the fast path keeps it
    assert optimized_op_counts(path, quantize_bias=False).get("QLinearConv", 0) == 0


def test_exact_mode_matches_the_qdq_graph(trt_onnx, tmp_path):
    """pre_act="float" skips the only inexact rewrite (convs before HardSwish/SiLU stay float): the
    fast path then computes what the Q/DQ graph computes with the int32 biases integer kernels need
    (onnxruntime's bias rounding on both), and still forms integer convs. Only the float convs differ,
    by float rounding: they keep a float bias (constant weights, step 7) where the Q/DQ graph's got
    rounded to int32 — measured 3e-8 here, no quantizer code moved. On every CPU: where onnxruntime's
    int8 kernels saturate (x86 without VNNI), ``_run``'s session runs exact uint8 x uint8 kernels."""
    src, images = trt_onnx
    out = tmp_path / "exact.onnx"
    info = make_ort_fast(src, out, pre_act="float")
    assert info.pre_activation == 0 and info.relu_exact > 0
    assert any("pre_act='float'" in note for note in info.notes)
    x = images.numpy()
    np.testing.assert_allclose(_run(out, x), _run(src, x), rtol=0, atol=1e-6)
    assert optimized_op_counts(out).get("QLinearConv", 0) > 0
    signed = tmp_path / "exact_int8.onnx"           # without step 6: ReLU clips int8 codes at 0
    make_ort_fast(src, signed, pre_act="float", uint8=False)
    np.testing.assert_allclose(_run(signed, x), _run(src, x), rtol=0, atol=1e-6)


def test_uint8_weight_kernels_give_the_same_numbers(trt_onnx, fast):
    """exact_int8=True (onnxruntime's uint8 x uint8 kernels, what CPUs without VNNI run) computes what this
    CPU's default choice computes (exact on every CPU), for the Q/DQ graph and the fast path."""
    x = trt_onnx[1].numpy()
    for path in (trt_onnx[0], fast[0]):
        sess = ort_session(path, quantize_bias=True, exact_int8=True)
        forced = np.concatenate([sess.run(None, {"images": x[i:i + 1]})[0] for i in range(len(x))])
        np.testing.assert_array_equal(forced, _run(path, x))


def test_plain_onnxruntime_session_saturates_where_the_cpu_does(trt_onnx, tmp_path):
    """Why yoloq's sessions set ``session.x64quantprecision`` on CPUs without VNNI: there a session with
    onnxruntime's defaults runs the exact variant's int8 weights through ``vpmaddubsw`` and moves most
    outputs (measured under an emulated AVX2-only CPU: 96,580 of 98,304 values, up to 2.6e-3)."""
    from yoloq.runtime.ort import u8s8_saturates
    if not u8s8_saturates():
        pytest.skip("this CPU's uint8 x int8 kernels are exact (VNNI or not x86): no saturation to show")
    src, images = trt_onnx
    out = tmp_path / "exact.onnx"
    make_ort_fast(src, out, pre_act="float")
    x = images.numpy()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    plain = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    default = np.concatenate([plain.run(None, {"images": x[i:i + 1]})[0] for i in range(len(x))])
    assert (np.abs(default - _run(src, x)) > 1e-4).mean() > 0.5


def test_float_convs_get_dequantized_weights(trt_onnx, tmp_path):
    """Step 7: convs left float read DQ(Q(W)) computed at export — the same float32 values onnxruntime
    computes from the weight Q/DQ (checked against onnxruntime itself), no weight DQ left for them at
    run time, and the graph's output unchanged (bit for bit without graph optimizations; with them
    the float convs run onnxruntime's prepacked kernels, a different summation order)."""
    src, images = trt_onnx
    folded, unfolded = tmp_path / "folded.onnx", tmp_path / "unfolded.onnx"
    info = make_ort_fast(src, folded, pre_act="float")
    make_ort_fast(src, unfolded, pre_act="float", fold_weights=False)
    assert info.folded_weights == 6          # a, b, up (before HardSwish), fuse, se2, head
    # the exported constants equal onnxruntime's own DQ(Q(W)) of the original graph
    original = onnx.load(str(src))
    prod, _ = _producer_consumers(original)
    convs = {n.name: n for n in original.graph.node if n.op_type == "Conv"}
    probe = onnx.ModelProto()
    probe.CopyFrom(original)
    for name in ("/a/Conv", "/head/Conv"):
        probe.graph.output.append(onnx.helper.make_tensor_value_info(convs[name].input[1], onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ort_weights = sess.run([convs[n].input[1] for n in ("/a/Conv", "/head/Conv")], {"images": images[:1].numpy()})
    out = onnx.load(str(folded))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    out_convs = {n.name: n for n in out.graph.node if n.op_type == "Conv"}
    for name, expected in zip(("/a/Conv", "/head/Conv"), ort_weights):
        np.testing.assert_array_equal(inits[out_convs[name].input[1]], expected)
    weight_q = [n for n in out.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits
                and inits[n.input[0]].ndim == 4]
    assert len(weight_q) == info.n_conv - info.folded_weights == 2        # stem, se1: the QLinearConvs
    dq_run = optimized_op_counts(folded).get("DequantizeLinear", 0)
    assert dq_run < optimized_op_counts(unfolded).get("DequantizeLinear", 0) - 5
    x = images[:1].numpy()
    for level in ("disable", "all"):                 # float biases in both
        outs = [ort_session(p, quantize_bias=False, level=level).run(None, {"images": x})[0] for p in (folded, unfolded)]
        if level == "disable":                       # the same numbers reach the same ops
            np.testing.assert_array_equal(*outs)
        else:                                        # prepacked float conv kernels: summation order only
            np.testing.assert_allclose(*outs, rtol=0, atol=1e-6)


def test_dequantized_weight_follows_onnx_semantics():
    """A weight Q/DQ without zero point is uint8 in ONNX: negative weights saturate at 0, as onnxruntime
    computes it (checked against onnxruntime)."""
    from onnx import TensorProto, helper, numpy_helper
    from yoloq.runtime.onnx_graph import OnnxGraph, dequantized_weight
    w = np.array([[[[-0.3]], [[0.25]]], [[[0.75]], [[2.0]]]], np.float32)          # [2,2,1,1]
    scale = np.array([0.5, 0.01], np.float32)                                      # per channel, axis 0
    nodes = [helper.make_node("QuantizeLinear", ["w", "s"], ["wq"], axis=0),
             helper.make_node("DequantizeLinear", ["wq", "s"], ["wdq"], axis=0)]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("wdq", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    g = OnnxGraph(model)
    got = dequantized_weight(g, g.producer["wdq"])
    np.testing.assert_array_equal(got, expected)
    assert got[0, 0, 0, 0] == 0.0 and got[1, 1, 0, 0] == np.float32(2.0)


def test_qparams():
    s, zp = consumer_qparams(0.1, lo=-5.0)               # -50 steps needed: shift the range up
    assert s == np.float32(0.1) and zp == -78
    assert consumer_qparams(0.1, lo=-50.0)[1] == 0       # cannot cover it and keep the top: symmetric
    assert consumer_qparams(0.1)[1] == 0
    s, zp = qparams_for_range(-1.0, 3.0)
    assert np.isclose(s, 4 / 255) and -128 <= zp <= 127
    zp = int(zp)
    assert np.isclose((-128 - zp) * s, -1.0, atol=s) and np.isclose((127 - zp) * s, 3.0, atol=s)


def test_errors(tmp_path, trt_onnx):
    plain = tmp_path / "plain.onnx"
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["images"], ["outputs"])], "g",
                                   [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 3])],
                                   [onnx.helper.make_tensor_value_info("outputs", onnx.TensorProto.FLOAT, [1, 3])])
    onnx.save(onnx.helper.make_model(graph), str(plain))
    with pytest.raises(OrtFastError, match="plain.onnx.*no QuantizeLinear"):
        make_ort_fast(plain, tmp_path / "o.onnx")
    with pytest.raises(OrtFastError, match="missing.onnx: file not found"):
        make_ort_fast(tmp_path / "missing.onnx", tmp_path / "o.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(OrtFastError, match="junk.onnx"):
        make_ort_fast(junk, tmp_path / "o.onnx")
    with pytest.raises(ValueError, match="need calib_images"):
        make_ort_fast(trt_onnx[0], tmp_path / "o.onnx", pre_act="minmax")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.slow
def test_lite_s_checkpoint_end_to_end(tmp_path):
    """Real exporter + real PTQ checkpoint: integer kernels formed and outputs close to the Q/DQ graph."""
    ckpt = REPO / "runs/ptq/yolov6lite_s_auto/quant.pt"
    if not ckpt.is_file() or not SHARED.is_dir():
        pytest.skip(f"needs {ckpt} and {SHARED}")
    from yoloq.runtime.onnx_export import export_onnx
    trt = tmp_path / "trt.onnx"
    export_onnx(str(ckpt), trt, img_size=320)
    info = make_ort_fast(trt, tmp_path / "fast.onnx")
    counts = optimized_op_counts(tmp_path / "fast.onnx")
    assert counts.get("QLinearConv", 0) >= info.n_conv - len(info.left_float) - 5
    x = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
    ref, out = _run(trt, x), _run(tmp_path / "fast.onnx", x)
    assert np.abs(out[..., 4:] - ref[..., 4:]).mean() < 5e-3      # measured 1.4e-3 (scores 0..1)
    # uint8 x uint8 kernels (what CPUs without VNNI run; forced here): the same numbers as this CPU's own
    # exact kernels, and the export's shared weight zero points do not stop onnxruntime from loading it
    for path in (trt, tmp_path / "fast.onnx"):
        forced = ort_session(path, quantize_bias=True, exact_int8=True).run(None, {"images": x})[0]
        np.testing.assert_array_equal(forced, _run(path, x))


def test_bench_ratio_pairs_runs_of_the_same_block():
    """tools/bench_ort.py: the ratio to FP32 is the median of per-block ratios, so a machine that slows
    down 3x between two variants' runs (shared hosts do) moves one block, not the result."""
    # 3 blocks of 4 runs; the slow phase starts during block 2, after its int8 runs
    times = {"fp32": [10.0] * 4 + [30.0] * 4 + [30.0] * 4, "int8": [4.0] * 4 + [4.0] * 4 + [12.0] * 4}
    assert bench_ort.ratio_to_fp32(times, "int8", rounds=3) == pytest.approx(0.4)
    assert np.median(times["int8"]) / np.median(times["fp32"]) == pytest.approx(4 / 30)   # pooled: wrong
    assert bench_ort.ratio_to_fp32(times, "fp32", rounds=3) == 1.0
    slower = {"fp32": [10.0] * 12, "int8": [5.0] * 12}              # a second repetition, other phase
    table = bench_ort.format_table([times, slower], {"fp32": 0.2, "int8": 0.19}, "header", rounds=3)
    assert "| int8 | 5.00 | 12.00 | 0.45 | 0.40..0.50 | 19.00 |" in table


def test_bench_op_profile(trt_onnx, fast):
    """tools/bench_ort.py --profile: onnxruntime's profiler, summed per op type of the optimized graph,
    and the convs alone by kind (read from the graph onnxruntime runs)."""
    x = trt_onnx[1][:1].numpy()
    profiles = {"trt": bench_ort.op_profile(trt_onnx[0], 1, x, runs=3), "fast": bench_ort.op_profile(fast[0], 1, x, runs=3)}
    by_op = {k: ops for k, (ops, _) in profiles.items()}
    assert by_op["fast"]["QLinearConv"][1] == 5 and "QLinearConv" not in by_op["trt"]
    assert by_op["trt"]["Conv"][1] + by_op["trt"].get("FusedConv", (0, 0))[1] == 8
    assert all(ms > 0 for p in by_op.values() for ms, _ in p.values())
    table = bench_ort.format_profile(by_op)
    assert table.splitlines()[0] == "| op type | trt | fast |" and "| all kernels |" in table
    # Tiny has one depthwise 3x3 (b), two dense 3x3 (stem, a) and five 1x1 convs, float or integer
    for name, (_, by_conv) in profiles.items():
        kinds = defaultdict(int)
        for key, (ms, nodes) in by_conv.items():
            op, kind = key.split(", ")
            assert op in ("Conv", "FusedConv", "QLinearConv") and ms > 0, (name, key)
            kinds[kind] += nodes
        assert dict(kinds) == {"depthwise 3x3": 1, "dense 3x3": 2, "dense 1x1": 5}, name
        conv_ms = sum(ms for ms, _ in by_conv.values())
        assert conv_ms == pytest.approx(sum(by_op[name].get(op, (0, 0))[0] for op in bench_ort.CONV_OPS))
    table = bench_ort.format_profile({k: c for k, (_, c) in profiles.items()}, label="conv op, kind", total="all convs")
    assert table.splitlines()[0] == "| conv op, kind | trt | fast |" and table.splitlines()[-1].startswith("| all convs |")


def test_bench_hardswish_as_relu():
    """--hardswish-as-relu: every HardSwish module becomes a ReLU (and only with random weights)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Hardswish(), nn.Sequential(nn.Conv2d(4, 4, 1), nn.Hardswish()),
                          nn.Hardsigmoid())
    assert bench_ort.hardswish_to_relu(model) == 2
    assert [type(m).__name__ for m in model.modules() if not isinstance(m, (nn.Conv2d, nn.Sequential))] == \
        ["ReLU", "ReLU", "Hardsigmoid"]
    with pytest.raises(SystemExit):
        parse_bench_ort_args(["--cfg", "c.yaml", "--ckpt", "q.pt", "--hardswish-as-relu"])
    assert parse_bench_ort_args(["--cfg", "c.yaml", "--random-weights", "--hardswish-as-relu"]).hardswish_as_relu
