"""ONNX Q/DQ export (yoloq.runtime.onnx_export): graph structure, TensorRT rules and onnxruntime fidelity.

A small random-weight YOLOv6-N (DFL head, 64 px) is prepared, one layer skipped, and calibrated on
random images; its PTQ (TensorQuantizer), PACT, LSQ+ symmetric and LSQ+ offset variants are exported
and checked node by node, and their onnxruntime outputs are compared with the PyTorch fake-quant
model. Fidelity tolerances (stated in ``assert_close_to_fake_quant``): the two differ only by float
rounding inside Q (x * (127/amax) vs x / scale), which flips a value on an exact rounding tie by one
quantization step; such flips propagate, so the end-to-end bound is set relative to one step, far
below the FP32 <-> INT8 gap.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
import onnx                                                              # noqa: E402
import onnxruntime as ort                                                # noqa: E402
from onnx import helper, numpy_helper, TensorProto                       # noqa: E402

from yoloq.quant.state import quant_state  # noqa: E402
from yoloq.config import ModelConfig                                     # noqa: E402
from yoloq.runtime import ExportError, count_qdq, export_onnx             # noqa: E402
from yoloq.runtime.onnx_export import append_onnx_nms, to_export_model           # noqa: E402
from yoloq.models import build_model                                     # noqa: E402
from yoloq.quant.calibrate import calibrate                              # noqa: E402
from yoloq.quant.learnable import LSQActQuantizer, LSQWeightQuantizer, PACTQuantizer  # noqa: E402
from yoloq.quant.state import named_quantizers                       # noqa: E402
from yoloq.quant.swap import freeze_quantizers, swap_quantizers      # noqa: E402
from yoloq.quant.prepare import (TensorQuantizer, activation_descriptor, prepare, quant_layers,  # noqa: E402
                                 set_amax)
from yoloq.quant.checkpoint import save_quantized                       # noqa: E402
from yoloq.bench import fidelity as bench_fidelity  # noqa: E402
from yoloq.cli import main as yoloq_main  # noqa: E402
from conftest import REPO, SHARED  # noqa: E402

SIZE = 64
SKIP = "neck.Rep_p4.conv1.rbr_reparam"


def run_ort(path, x: np.ndarray) -> list[np.ndarray]:
    """onnxruntime running the graph as written (no int32 bias rounding; yoloq.runtime.ort)."""
    from yoloq.runtime.ort import ort_session
    session = ort_session(path)
    return session.run(None, {session.get_inputs()[0].name: x})


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ptq_model() -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(name="yolov6n", arch="yolov6", depth_multiple=0.33, width_multiple=0.25, use_dfl=True,
                      reg_max=16, img_size=SIZE)
    model = build_model(cfg).fuse().eval()
    qmodel = prepare(model, skip_layers=[SKIP])
    calibrate(qmodel, [images(4, s) for s in range(2)], "max", progress=False)
    return qmodel


def variant(ptq_model, kind: str) -> nn.Module:
    model = copy.deepcopy(ptq_model)
    if kind == "ptq":
        return model
    if kind == "pact":
        model = swap_quantizers(model, "pact")
        with torch.no_grad():       # trained clips are tighter than the calibrated amax
            for q in named_quantizers(model, (PACTQuantizer,)).values():
                q.alpha.mul_(0.8)
        return model
    model = swap_quantizers(model, "lsqplus", mode=kind.split("_")[1])
    if kind == "lsq_offset":
        # make every offset clearly non-zero (a few quantization steps), as QAT would
        with torch.no_grad():
            for i, q in enumerate(named_quantizers(model, (LSQActQuantizer,)).values()):
                q.beta.copy_(q.scale * (3 + i % 5))
    return model


@pytest.fixture(scope="module")
def exported(ptq_model, tmp_path_factory):
    """Dynamic-batch TensorRT-variant export of the PTQ model (shared by structure tests)."""
    path = tmp_path_factory.mktemp("export") / "ptq.onnx"
    info = export_onnx(ptq_model, path, img_size=SIZE, batch=None)
    return info, onnx.load(str(path))


# --------------------------------------------------------------------------- graph helpers


def producers(graph) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def initializers(graph) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in graph.initializer}


def dq_source(name: str, prod, inits):
    """If ``name`` is the output of DQ(Q(x)), return (Q input, scale, zero point, axis), else None."""
    dq = prod.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = prod.get(dq.input[0])
    assert q is not None and q.op_type == "QuantizeLinear", f"DequantizeLinear {dq.name} not fed by a Q"
    scale, zp = inits[q.input[1]], inits[q.input[2]]
    assert np.array_equal(scale, inits[dq.input[1]]) and np.array_equal(zp, inits[dq.input[2]])
    axis = next((a.i for a in q.attribute if a.name == "axis"), 1)
    return q.input[0], scale, zp, axis


def conv_layers(graph):
    """(layer name, conv node, input DQ source, weight DQ source) for every Conv / ConvTranspose,
    named by the weight initializer (``<layer>.weight``)."""
    prod, inits = producers(graph), initializers(graph)
    out = []
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        wsrc = dq_source(node.input[1], prod, inits)
        wname = wsrc[0] if wsrc else node.input[1]
        assert wname.endswith("weight") and wname in inits, f"conv {node.name}: weight {wname} not an initializer"
        out.append((wname[:-len(".weight")], node, dq_source(node.input[0], prod, inits), wsrc))
    return out


# --------------------------------------------------------------------------- structure (TensorRT variant)


def test_qdq_placement_and_counts(ptq_model, exported):
    info, model = exported
    layers = quant_layers(ptq_model)
    convs = {name: (node, xsrc, wsrc) for name, node, xsrc, wsrc in conv_layers(model.graph)}
    quantized = [n for n in layers if n not in quant_state(ptq_model).skip_layers]
    assert SKIP in convs and "detect.proj_conv" in convs
    for name, (node, xsrc, wsrc) in convs.items():
        if name in quantized:
            assert xsrc is not None and wsrc is not None, f"{name}: input and weight must be Q/DQ'd"
            axis = 1 if node.op_type == "ConvTranspose" else 0     # output channels of the weight
            assert wsrc[3] == axis and wsrc[1].shape == (layers[name].weight.shape[axis],), name
            assert wsrc[1].ndim == 1 and xsrc[1].ndim == 0, name
        else:   # skipped layer and the DFL proj conv read float
            assert xsrc is None and wsrc is None, f"{name} must have no Q/DQ"
    assert set(quantized) <= set(convs)
    # one pair per weight + one per activation use (conv inputs and residual operands)
    n_weight = len(quantized)
    act_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and not n.input[0].endswith(".weight")]
    assert info.n_quantize == info.n_dequantize == n_weight + len(act_q)
    assert count_qdq(model) == (info.n_quantize, info.n_dequantize)
    # convs reading one tensor through one quantizer share a single Q/DQ pair (deduplicated)
    assert len({(n.input[0], n.input[1]) for n in act_q}) == len(act_q)
    # every DequantizeLinear output has exactly one producer chain and only Q feeds DQ
    prod = producers(model.graph)
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear":
            assert prod[n.input[0]].op_type == "QuantizeLinear"


def test_scales_and_zero_points_follow_tensorrt_rules(ptq_model, exported):
    _, model = exported
    inits = initializers(model.graph)
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scale, zp = inits[node.input[1]], inits[node.input[2]]
            assert scale.dtype == np.float32 and (scale > 0).all(), node.name
            assert zp.dtype == np.int8 and not zp.any(), f"{node.name}: zero point must be int8 0"
    # every conv reads exactly the scale of its (shared) site quantizer: amax / 127
    sites = quant_state(ptq_model).placement
    for name, _, xsrc, wsrc in conv_layers(model.graph):
        if xsrc is None:
            continue
        amax = quant_state(ptq_model).quantizers[sites.site_of(name).name]._amax
        assert xsrc[1] == np.float32((amax / 127).item()), name
        wamax = quant_layers(ptq_model)[name]._weight_quantizer._amax.flatten()
        np.testing.assert_array_equal(wsrc[1], (wamax / 127).numpy())


def test_concat_inputs_share_exactly_one_scale(exported):
    _, model = exported
    graph = model.graph
    inits = initializers(graph)
    readers: dict[str, list[np.ndarray]] = {}
    for n in graph.node:
        if n.op_type == "QuantizeLinear":
            readers.setdefault(n.input[0], []).append(inits[n.input[1]])
    checked = 0
    for node in graph.node:
        if node.op_type != "Concat":
            continue
        scales = [s for t in list(node.input) + list(node.output) for s in readers.get(t, [])]
        if len(scales) >= 2:
            checked += 1
            assert all(np.array_equal(s, scales[0]) for s in scales), f"{node.name}: concat scales differ"
    assert checked >= 2, "expected quantized concats in YOLOv6-N's neck"


def test_checker_dynamic_batch_and_fixed_batch(ptq_model, exported, tmp_path):
    info, model = exported
    onnx.checker.check_model(model, full_check=True)
    assert info.input_name == "images" and info.output_names == ["outputs"]
    n_anchors = sum((SIZE // s) ** 2 for s in ptq_model.strides)
    for b in (1, 3):
        out = run_ort(info.path, images(b).numpy())[0]
        assert out.shape == (b, n_anchors, 4 + ptq_model.nc)
    fixed = export_onnx(ptq_model, tmp_path / "b2.onnx", img_size=SIZE, batch=2, simplify=False)
    g = onnx.load(fixed.path)
    dims = [d.dim_value for d in g.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, SIZE, SIZE]
    assert (fixed.n_quantize, fixed.n_dequantize) == (info.n_quantize, info.n_dequantize)
    assert run_ort(fixed.path, images(2).numpy())[0].shape == (2, n_anchors, 4 + ptq_model.nc)


# --------------------------------------------------------------------------- fidelity per quantizer type


def assert_close_to_fake_quant(onnx_out: np.ndarray, fq_out: np.ndarray, fp32_out: np.ndarray) -> None:
    """Tolerance: class scores within 0.01 everywhere (mean 5e-4); boxes within 0.5 px for 99% of the
    anchors (64 px input). One-step rounding flips (float arithmetic of Q differs between PyTorch
    and onnxruntime) cascade through a network, so it cannot be bit-exact end to end; the
    single-quantizer test below is the exact one."""
    d = np.abs(onnx_out - fq_out)
    assert d[..., 4:].max() < 0.01 and d[..., 4:].mean() < 5e-4, (d[..., 4:].max(), d[..., 4:].mean())
    assert np.quantile(d[..., :4], 0.99) < 0.5, np.quantile(d[..., :4], 0.99)
    assert np.abs(fp32_out - fq_out).max() > 0        # the model is really quantized


@pytest.mark.parametrize("kind, offset_mode", [("ptq", "subadd"), ("pact", "subadd"), ("lsq_symmetric", "subadd"),
                                               ("lsq_offset", "subadd"), ("lsq_offset", "zero_point")])
def test_onnxruntime_matches_fake_quant(ptq_model, kind, offset_mode, tmp_path):
    model = variant(ptq_model, kind)
    types = {type(q) for q in named_quantizers(model).values()}
    expected = {"ptq": TensorQuantizer, "pact": PACTQuantizer}.get(kind, LSQActQuantizer)
    assert expected in types
    info = export_onnx(model, tmp_path / f"{kind}.onnx", img_size=SIZE, batch=None, offset_mode=offset_mode,
                       simplify=offset_mode == "zero_point")   # folded: zero points become initializers
    x = images(3, seed=11)
    with torch.no_grad():
        fq = model(x).numpy()
        fp32 = to_export_model(model, fp32=True)(x).numpy()
    onnx_out = run_ort(info.path, x.numpy())[0]
    assert_close_to_fake_quant(onnx_out, fq, fp32)

    g = onnx.load(info.path)
    ops = [n.op_type for n in g.graph.node]
    if kind == "lsq_offset" and offset_mode == "subadd":
        assert ops.count("Sub") >= info.n_quantize - len(quant_layers(model)) + 1   # one Sub per act. Q
    if kind == "lsq_offset" and offset_mode == "zero_point":
        consts = {**initializers(g.graph), **{n.output[0]: numpy_helper.to_array(n.attribute[0].t)
                                              for n in g.graph.node if n.op_type == "Constant"}}
        q_zp = [consts[n.input[2]] for n in g.graph.node if n.op_type == "QuantizeLinear"]
        assert any(z.any() for z in q_zp), "offset mode must give non-zero zero points"


class _One(nn.Module):
    def __init__(self, q):
        super().__init__()
        self.q = q

    def forward(self, x):
        return self.q(x)


def _tensor_quantizer(amax):
    q = TensorQuantizer(activation_descriptor())
    set_amax(q, torch.tensor(amax))
    return q


@pytest.mark.parametrize("make, offset_mode", [
    (lambda: _tensor_quantizer(2.0), "subadd"),
    (lambda: PACTQuantizer(alpha=1.7, signed=True), "subadd"),
    (lambda: PACTQuantizer(alpha=1.7, signed=False), "subadd"),
    (lambda: LSQActQuantizer(scale=0.013, mode="symmetric"), "subadd"),
    (lambda: LSQActQuantizer(scale=0.013, offset=0.4, mode="offset"), "subadd"),
    (lambda: LSQActQuantizer(scale=0.013, offset=0.4, mode="offset"), "zero_point"),
])
def test_single_quantizer_is_exact_up_to_rounding(make, offset_mode, tmp_path):
    """One quantizer alone: onnxruntime equals the PyTorch quantizer except for values on a rounding
    tie (float error), over the whole range including clipping at both ends (-128 and 127 levels).
    PACT-unsigned is only the Q/DQ for non-negative inputs (it is used on ReLU outputs only)."""
    q = make()
    spec_scale = float(q.scale.detach()) if not isinstance(q, TensorQuantizer) else 2.0 / 127
    lo = 0.0 if isinstance(q, PACTQuantizer) and not q.signed else -140 * spec_scale
    if isinstance(q, LSQActQuantizer) and q.offset_mode:
        lo = float(q.zero_point_index()) * spec_scale - 140 * spec_scale
    x = torch.linspace(lo, 140 * spec_scale, 20001).reshape(1, 1, 1, -1)
    path = tmp_path / "q.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(to_export_model(_One(q), offset_mode), (x,), str(path), opset_version=13, dynamo=False,
                          input_names=["x"], output_names=["y"])
    assert count_qdq(onnx.load(str(path))) == (1, 1)
    y = run_ort(path, x.numpy())[0]
    with torch.no_grad():
        ref = q(x).numpy()
    diff = np.abs(y - ref)
    assert diff.max() <= spec_scale * 1.001 and (diff > 1e-5).mean() < 1e-3


def test_per_channel_weight_quantizers_export_on_axis_0(tmp_path):
    conv = nn.Conv2d(3, 5, 3)
    from yoloq.quant.prepare import quant_conv_from
    qconv = quant_conv_from(conv)
    w_amax = conv.weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True)
    set_amax(qconv._weight_quantizer, w_amax)
    set_amax(qconv._input_quantizer, torch.tensor(1.0))
    lsq = copy.deepcopy(qconv)
    lsq._weight_quantizer = LSQWeightQuantizer(w_amax.flatten() / 127 * 0.8, axis=0)   # clips a little
    x = torch.rand(2, 3, 8, 8)
    for module in (qconv, lsq):
        path = tmp_path / "c.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(to_export_model(module), (x,), str(path), opset_version=13, dynamo=False)
        g = onnx.load(str(path))
        (_, _, xsrc, wsrc), = [(n, None, *rest[1:]) for n, *rest in conv_layers(g.graph)]
        assert wsrc[3] == 0 and wsrc[1].shape == (5,) and xsrc[1].ndim == 0
        with torch.no_grad():
            np.testing.assert_allclose(run_ort(path, x.numpy())[0], module(x).numpy(), atol=2e-2 / 127 * 20)


def _export_module(module: nn.Module, x: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(to_export_model(module), (x,), str(path), opset_version=13, dynamo=False,
                          input_names=["images"], output_names=["outputs"])
    return path


def test_weights_on_rounding_ties_export_to_the_fake_quant_levels(tmp_path):
    """pytorch-quantization rounds w * (127 / amax), QuantizeLinear rounds w / scale: for a weight on a
    rounding tie (QAT leaves many weights oscillating there) the two pick different levels. The
    exporter stores the fake-quantized weight, so onnxruntime uses exactly the PyTorch levels."""
    from yoloq.runtime.ort import ort_session
    from yoloq.quant.prepare import quant_conv_from
    gen = torch.Generator().manual_seed(3)
    qconv = quant_conv_from(nn.Conv2d(8, 16, 3, padding=1))
    w_amax = torch.rand(16, 1, 1, 1, generator=gen) * 3 + 0.05
    levels = torch.randint(-126, 126, qconv.weight.shape, generator=gen).float()
    with torch.no_grad():
        qconv.weight.copy_((levels + 0.5) * w_amax / 127)                 # every weight on a tie
    set_amax(qconv._weight_quantizer, w_amax)
    set_amax(qconv._input_quantizer, torch.tensor(1.0))
    with torch.no_grad():
        torch_levels = torch.round(qconv._weight_quantizer(qconv.weight) * 127 / w_amax)
    onnx_scale = (w_amax / 127).float()
    naive = torch.round(qconv.weight.detach() / onnx_scale)               # QuantizeLinear on the raw weight
    assert (naive != torch_levels).sum() > 50, "test setup: the ties must round differently"

    x = torch.randint(-127, 128, (2, 8, 12, 12), generator=gen).float() / 127   # on the input grid: exact
    path = _export_module(qconv, x, tmp_path / "ties.onnx")
    out = ort_session(path).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        ref = qconv(x).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_onnxruntime_runs_the_graph_as_written_unless_asked(exported, tmp_path):
    """onnxruntime's WeightBiasQuantization rounds float conv biases to int32 (needed only for its
    integer kernels); yoloq's sessions switch it off for TensorRT-variant graphs."""
    from yoloq.runtime.ort import BIAS_QUANTIZATION_OPTIMIZER, OnnxPredictor, onnx_variant, ort_session
    info, _ = exported

    def int32_bias_dq(quantize_bias: bool) -> int:
        opt = tmp_path / f"opt_{quantize_bias}.onnx"
        ort_session(info.path, quantize_bias=quantize_bias, level="basic", optimized_path=str(opt))
        g = onnx.load(str(opt)).graph
        int32 = {t.name for t in g.initializer if t.data_type == TensorProto.INT32}
        return sum(n.op_type == "DequantizeLinear" and n.input[0] in int32 for n in g.node)

    assert int32_bias_dq(True) > 0, f"onnxruntime {ort.__version__} no longer runs {BIAS_QUANTIZATION_OPTIMIZER}?"
    assert int32_bias_dq(False) == 0
    assert onnx_variant(info.path) == "tensorrt"
    assert OnnxPredictor(info.path).quantize_bias is False
    assert OnnxPredictor(info.path, quantize_bias=True).quantize_bias is True


# --------------------------------------------------------------------------- variants: fp32, nms


def test_fp32_export_has_no_qdq_and_matches_float(ptq_model, tmp_path):
    from yoloq.runtime.ort import onnx_variant
    info = export_onnx(ptq_model, tmp_path / "fp32.onnx", img_size=SIZE, fp32=True)
    assert (info.n_quantize, info.n_dequantize) == (0, 0)
    assert onnx_variant(info.path) == "fp32"
    x = images(1, seed=5)
    with torch.no_grad():
        ref = to_export_model(ptq_model, fp32=True)(x).numpy()
    np.testing.assert_allclose(run_ort(info.path, x.numpy())[0], ref, rtol=1e-4, atol=1e-3)


def test_fp16_export_for_strongly_typed_tensorrt(ptq_model, tmp_path):
    """fp16=True: every conv weight FP16 between FP32 input/output, no Q/DQ, the box decode in FP32;
    onnxruntime's result stays close to the FP32 export, and TensorRT 11 would build it as FP16."""
    from yoloq.runtime.ort import onnx_variant
    from yoloq.runtime import tensorrt as yt
    info = export_onnx(ptq_model, tmp_path / "fp16.onnx", img_size=SIZE, batch=None, fp16=True)
    fp32 = export_onnx(ptq_model, tmp_path / "fp32.onnx", img_size=SIZE, batch=None, fp32=True)
    assert (info.n_quantize, info.n_dequantize) == (0, 0) and onnx_variant(info.path) == "fp16"
    assert next(ptq_model.parameters()).dtype == torch.float32          # the caller's model is untouched
    graph = onnx.load(info.path).graph
    inits = {i.name: i.data_type for i in graph.initializer}
    conv_weights = [inits[n.input[1]] for n in graph.node if n.op_type == "Conv"]
    assert conv_weights and set(conv_weights) == {onnx.TensorProto.FLOAT16}
    assert graph.input[0].type.tensor_type.elem_type == graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = images(2, seed=6).numpy()
    half, full = run_ort(info.path, x)[0], run_ort(fp32.path, x)[0]
    assert half.dtype == np.float32 and half.shape == full.shape
    assert np.abs(half[..., 4:] - full[..., 4:]).max() < 1e-3               # scores (measured 1.5e-5)
    assert np.abs(half[..., :4] - full[..., :4]).max() < 0.5                 # boxes in px (measured 0.14)
    plain = yt.inspect_onnx(fp32.path)
    assert yt.builder_flags(11, yt.inspect_onnx(info.path), "fp16", "fp16") == ([], [])
    with pytest.raises(ValueError, match="FP32 and TensorRT 11 builds strongly typed"):
        yt.builder_flags(11, plain, "fp16", "fp16")


def test_trt_nms_node(ptq_model, tmp_path):
    info = export_onnx(ptq_model, tmp_path / "trt_nms.onnx", img_size=SIZE, batch=4, nms="trt", max_det=50,
                       score_threshold=0.3, iou_threshold=0.5)
    g = onnx.load(info.path)
    onnx.checker.check_model(g)
    node = next(n for n in g.graph.node if n.op_type == "EfficientNMS_TRT")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["max_output_boxes"] == 50 and attrs["background_class"] == -1
    assert attrs["score_activation"] == 0 and attrs["box_coding"] == 0
    assert attrs["score_threshold"] == pytest.approx(0.3) and attrs["iou_threshold"] == pytest.approx(0.5)
    assert info.output_names == ["num_dets", "det_boxes", "det_scores", "det_classes"]
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in g.graph.output}
    assert shapes == {"num_dets": [4, 1], "det_boxes": [4, 50, 4], "det_scores": [4, 50], "det_classes": [4, 50]}
    assert info.n_quantize > 0


def _identity_detector(n: int, nc: int) -> onnx.ModelProto:
    inp = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", n, 4 + nc])
    out = helper.make_tensor_value_info("outputs", TensorProto.FLOAT, ["batch", n, 4 + nc])
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["outputs"])], "g", [inp], [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_onnx_nms_matches_torchvision(tmp_path):
    from torchvision.ops import batched_nms
    g = torch.Generator().manual_seed(0)
    b, n, nc = 2, 300, 4
    xy = torch.rand(b, n, 2, generator=g) * 200
    wh = torch.rand(b, n, 2, generator=g) * 60 + 5
    preds = torch.cat([xy, xy + wh, torch.rand(b, n, nc, generator=g)], 2)
    model = append_onnx_nms(_identity_detector(n, nc), score_threshold=0.5, iou_threshold=0.45, max_det=1000)
    onnx.checker.check_model(model)
    path = tmp_path / "nms.onnx"
    onnx.save(model, str(path))
    dets = run_ort(path, preds.numpy())[0]
    assert dets.shape[1] == 7 and len(dets) > 50
    for i in range(b):
        boxes, scores = preds[i, :, :4], preds[i, :, 4:]
        idx, cls = torch.nonzero(scores > 0.5, as_tuple=True)
        keep = batched_nms(boxes[idx], scores[idx, cls], cls, 0.45)
        ref = torch.cat([boxes[idx][keep], scores[idx, cls][keep, None], cls[keep, None].float()], 1).numpy()
        mine = dets[dets[:, 0] == i][:, 1:]
        order = lambda a: a[np.lexsort((a[:, 4], a[:, 5]))]   # noqa: E731 - by class, then score
        np.testing.assert_allclose(order(mine), order(ref), rtol=1e-6, atol=1e-4)


def test_export_with_onnx_nms_runs(ptq_model, tmp_path):
    info = export_onnx(ptq_model, tmp_path / "nms.onnx", img_size=SIZE, batch=None, nms="onnx",
                       score_threshold=0.05, iou_threshold=0.5)
    assert info.output_names == ["detections"]
    x = images(2, seed=9)
    dets = run_ort(info.path, x.numpy())[0]
    assert dets.ndim == 2 and dets.shape[1] == 7
    assert set(np.unique(dets[:, 0])) <= {0.0, 1.0}
    assert (dets[:, 5] > 0.05).all() and (dets[:, 6] >= 0).all() and (dets[:, 6] < ptq_model.nc).all()


# --------------------------------------------------------------------------- errors


def test_bad_inputs_give_clear_errors(ptq_model, tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ExportError, match="nope.pt"):
        export_onnx(missing, tmp_path / "a.onnx", img_size=SIZE)
    plain = tmp_path / "plain.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, plain)
    with pytest.raises(ExportError, match="plain.pt.*not a yoloq quantized checkpoint"):
        export_onnx(plain, tmp_path / "a.onnx", img_size=SIZE)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="garbage.pt"):
        export_onnx(garbage, tmp_path / "a.onnx", img_size=SIZE)
    float_model = build_model(ptq_model.cfg).fuse().eval()
    with pytest.raises(ExportError, match="not a quantized model"):
        export_onnx(float_model, tmp_path / "a.onnx", img_size=SIZE)
    uncalibrated = prepare(float_model)
    with pytest.raises(ExportError, match="no amax.*not calibrated"):
        export_onnx(uncalibrated, tmp_path / "a.onnx", img_size=SIZE)
    for kwargs, what in [({"nms": "tensorrt"}, "nms"), ({"offset_mode": "beta"}, "offset_mode"),
                         ({"opset": 11}, "opset"), ({"batch": 0}, "batch")]:
        with pytest.raises(ExportError, match=what):
            export_onnx(ptq_model, tmp_path / "a.onnx", img_size=SIZE, **kwargs)
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".*.tmp"))


def test_checkpoint_round_trip(ptq_model, tmp_path):
    """A quantized checkpoint path exports the same graph as the in-memory model."""
    model = freeze_quantizers(variant(ptq_model, "lsq_offset"))   # what QAT saves: LSQ+ offset stays
    save_quantized(model, tmp_path / "quant.pt", meta={"name": "tiny"})
    a = export_onnx(model, tmp_path / "a.onnx", img_size=SIZE, simplify=False)
    b = export_onnx(tmp_path / "quant.pt", tmp_path / "b.onnx", img_size=SIZE, simplify=False)
    assert (a.n_quantize, a.n_dequantize) == (b.n_quantize, b.n_dequantize)
    x = images(1, seed=2).numpy()
    np.testing.assert_array_equal(run_ort(a.path, x)[0], run_ort(b.path, x)[0])


def test_export_cli_variants_and_bad_checkpoint(ptq_model, tmp_path, capsys):
    """tools/export.py: TensorRT variant prints the trtexec command; ort-exact rewrites the graph so
    onnxruntime forms integer convs and still computes the same outputs; a non-checkpoint fails."""
    ckpt = tmp_path / "quant.pt"
    save_quantized(ptq_model, ckpt, meta={"name": "tiny"})
    trt, exact = tmp_path / "trt.onnx", tmp_path / "exact.onnx"
    assert yoloq_main(["export", "--ckpt", str(ckpt), "--out", str(trt), "--img-size", str(SIZE)]) == 0
    assert "trtexec --onnx=" in capsys.readouterr().out
    assert yoloq_main(["export", "--ckpt", str(ckpt), "--out", str(exact), "--img-size", str(SIZE), "--variant", "ort-exact"]) == 0
    assert "ort fast path" in capsys.readouterr().out
    x = images(1, seed=3).numpy()
    ref, out = run_ort(trt, x)[0], run_ort(exact, x)[0]     # integer vs float conv kernels: rounding only
    assert np.abs(out - ref).max() <= 0.01 * (ref.max() - ref.min())
    from yoloq.runtime.ort_fast import optimized_op_counts
    assert optimized_op_counts(exact).get("QLinearConv", 0) > optimized_op_counts(trt, quantize_bias=False).get("QLinearConv", 0)
    assert yoloq_main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "f.onnx"), "--variant", "ort"]) == 2
    assert "--variant ort needs --cfg" in capsys.readouterr().err
    half = tmp_path / "half.onnx"                    # FP16 file: TensorRT 11 needs no precision flag for it
    assert yoloq_main(["export", "--ckpt", str(ckpt), "--out", str(half), "--img-size", str(SIZE), "--fp16"]) == 0
    out = capsys.readouterr().out
    assert "batch 1, FP16" in out and f"trtexec --onnx={half} --saveEngine=" in out
    from yoloq.runtime.tensorrt import installed_trt_major
    if installed_trt_major() is None:                # both forms printed; 11.x's without an AutoCast step
        assert f"with TensorRT 11.x: trtexec --onnx={half} --saveEngine=" in out
    assert yoloq_main(["export", "--ckpt", str(ckpt), "--out", str(half), "--fp16", "--variant", "ort-exact"]) == 2
    assert "does not combine with --fp32, --fp16 or --nms" in capsys.readouterr().err
    if (SHARED / "coco").is_dir():                   # train images set the pre-activation zero points
        fast = tmp_path / "fast.onnx"
        assert yoloq_main(["export", "--ckpt", str(ckpt), "--out", str(fast), "--img-size", str(SIZE), "--variant", "ort",
                         "--cfg", str(REPO / "configs/yolov6n_repvgg.yaml"), "--calib-images", "2"]) == 0
        assert "NOT numerically identical" in capsys.readouterr().out       # the SiLU head stems
        assert optimized_op_counts(fast).get("QLinearConv", 0) > optimized_op_counts(exact).get("QLinearConv", 0)
    bad = tmp_path / "bad.pt"
    torch.save({"weights": {}}, bad)
    assert yoloq_main(["export", "--ckpt", str(bad), "--out", str(tmp_path / "x.onnx")]) == 2
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


# --------------------------------------------------------------------------- real model (slow)


@pytest.mark.slow
def test_lite_s_ptq_onnxruntime_matches_fake_quant(tmp_path):
    """Real Lite-S, entropy-calibrated on 16 train images: the onnxruntime Q/DQ model must give the
    fake-quant model's outputs. Bit equality is impossible: one-ulp float differences (Q arithmetic
    x * (127 / amax) vs x / scale, conv summation order) flip a value on an exact rounding tie now
    and then, and Lite-S's large folded depthwise weights amplify such flips. Tolerances: mean
    |score diff| < 0.015, < 2% of anchors > 0.05 (the quantization error itself, fake-quant vs FP32,
    is 0.021 / 9.7%), mAP on 20 images within 1.0 (a wrong scale or placement costs tens). The
    500-image mAP agreement is measured by tools/bench_fidelity.py (README)."""
    if not (SHARED / "weights" / "yolov6lite_s.pt").is_file() or not (SHARED / "coco").is_dir():
        pytest.skip(f"shared weights / COCO subset not found under {SHARED}")
    from yoloq.config import load_config
    from yoloq.data import load_data_config
    from yoloq.data.coco import calibration_loader
    from yoloq.eval.coco_eval import evaluate, evaluate_model
    from yoloq.runtime.ort import OnnxPredictor
    from yoloq.models import load_model

    cfg = load_config(REPO / "configs" / "yolov6lite_s.yaml")
    data_cfg = load_data_config(REPO / "data" / "coco_shared.yaml")
    qmodel = prepare(load_model(cfg.model))
    calib = [b for b, _ in calibration_loader(data_cfg, 16, 320, 8, 0)]
    calibrate(qmodel, calib, "entropy", progress=False)
    info = export_onnx(qmodel, tmp_path / "lite_s.onnx", img_size=320, batch=None)
    assert info.n_quantize == info.n_dequantize > 250
    predictor = OnnxPredictor(info.path)
    with torch.no_grad():
        torch_scores = qmodel.eval()(calib[1])[..., 4:].amax(-1)
    ort_scores = torch.from_numpy(predictor(calib[1]))[..., 4:].amax(-1)
    diff = (torch_scores - ort_scores).abs()
    assert diff.mean() < 0.015, f"mean score difference {diff.mean():.4f}"
    assert (diff > 0.05).float().mean() < 0.02, f"{(diff > 0.05).float().mean():.2%} of anchors differ by > 0.05"
    kw = dict(max_images=20, progress=False)
    fq = evaluate_model(qmodel, data_cfg, cfg.eval, 320, **kw).stats["AP"]
    deployed = evaluate(predictor, data_cfg, cfg.eval, 320, **kw).stats["AP"]
    assert fq > 0.1
    assert abs(deployed - fq) * 100 <= 1.0, (fq, deployed)


def test_bench_fidelity_cli_on_a_small_checkpoint(ptq_model, tmp_path, capsys):
    """tools/bench_fidelity.py: fake-quant vs onnxruntime rows (both offset forms for LSQ+ offset
    checkpoints), differences computed from the measured values, JSON written atomically."""
    if not (SHARED / "coco").is_dir():
        pytest.skip(f"shared COCO subset not found under {SHARED}")
    import json
    ckpt = tmp_path / "run" / "quant.pt"
    save_quantized(freeze_quantizers(variant(ptq_model, "lsq_offset")), ckpt, meta={"name": "tiny"})
    out = tmp_path / "fid.json"
    assert yoloq_main(["bench-fidelity", "--cfg", str(REPO / "configs" / "yolov6lite_s.yaml"), "--ckpt", str(ckpt), "--images", "2",
                     "--noise", "1", "--output-images", "2", "--no-progress", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["img_size"] == SIZE and len(row["noise"]) == len(row["noise_ort"]) == 1
    for kind in ("deployed", "noise"):
        stats = row["outputs"][kind]
        assert set(stats) == {"score_mean_abs", "score_share_over_0.05", "box_mean_abs_px"}
        assert 0 <= stats["score_mean_abs"] < 0.05 and 0 <= stats["score_share_over_0.05"] <= 1
    assert {"ort_subadd_float", "ort_subadd_int32", "ort_zero_point_float", "ort_zero_point_int32"} <= set(row)
    table = capsys.readouterr().out
    lines = [ln for ln in table.splitlines() if ln.startswith(f"| {ckpt}")]
    assert len(lines) == 2 and "(zero point)" in lines[1]
    cells = lines[0].strip("|").split("|")
    assert float(cells[3]) == pytest.approx(round(row["ort_subadd_float"], 2) - round(row["fake"], 2), abs=0.011)
    pairs = [row["ort_subadd_float"] - row["fake"], row["noise_ort"][0] - row["noise"][0]]
    deployed_cell, noise_cell = cells[6].split("(")
    assert float(deployed_cell) == pytest.approx(row["outputs"]["deployed"]["score_mean_abs"], abs=1e-4)
    assert float(noise_cell.strip(" )")) == pytest.approx(row["outputs"]["noise"]["score_mean_abs"], abs=1e-4)
    assert cells[11].strip().startswith(f"{sum(pairs) / 2:+.2f} ±") and "(2 pairs)" in cells[11]
    assert [c.strip() for c in lines[1].strip("|").split("|")[6:]] == ["–"] * 6
    cfg = str(REPO / "configs" / "yolov6lite_s.yaml")
    assert yoloq_main(["bench-fidelity", "--cfg", cfg, "--ckpt", str(tmp_path / "missing.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert yoloq_main(["bench-fidelity", "--cfg", cfg, "--ckpt", str(ckpt), "--noise", "-1"]) == 2
    assert "--noise and --output-images must be >= 0" in capsys.readouterr().err


def test_bench_fidelity_statistics_and_noise_pairing():
    """The fidelity estimate: mean of ORT-minus-fake over the unperturbed and the noise pairs, with
    the sample standard error (a single pair has none); the raw-output statistics; identical noise
    for the two sides of a pair."""
    cli = bench_fidelity
    row = {"fake": 20.0, "ort_subadd_float": 20.3, "noise": [19.8, 20.1, 20.0], "noise_ort": [19.8, 19.9, 20.1]}
    mean, se = cli.paired_difference(row)           # pairs: +0.3, 0.0, -0.2, +0.1
    assert mean == pytest.approx(0.05)
    assert se == pytest.approx((sum((d - 0.05) ** 2 for d in (0.3, 0.0, -0.2, 0.1)) / 3 / 4) ** 0.5)
    assert cli.paired_difference({"fake": 20.0, "ort_subadd_float": 19.9}) == (pytest.approx(-0.1), 0.0)
    # output statistics: a known score / box change
    reference = torch.zeros(1, 4, 4 + 2)
    other = reference.clone()
    other[0, 0, 4] = 0.1                                  # one anchor's best score moves by 0.1
    other[0, :, :4] = 2.0                                 # every box coordinate by 2 px
    stats = cli.output_difference(reference, other.numpy())
    assert stats == {"score_mean_abs": pytest.approx(0.025), "score_share_over_0.05": 0.25, "box_mean_abs_px": 2.0}
    # the pairing itself: a module and a plain predictor with the same seed see the same noise,
    # batch after batch; another seed sees other noise
    batches = [torch.zeros(2, 3, 4, 4), torch.ones(1, 3, 4, 4)]
    module, plain, other_seed = (cli.InputNoise(torch.nn.Identity(), 1e-4, 0),
                                 cli.InputNoise(lambda x: x.clone(), 1e-4, 0), cli.InputNoise(torch.nn.Identity(), 1e-4, 1))
    for x in batches:
        a, b, c = module(x), plain(x), other_seed(x)
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert 0 < (a - x).abs().max() < 1e-3
