"""onnxruntime's x86 uint8 x int8 kernels saturate on CPUs without VNNI (issue 27): which CPUs, and that
yoloq's sessions compute integer convs exactly on every CPU.

A one-node probe makes the saturation visible: a QLinearConv whose input codes (255, zero point 128) and
weights (127) are all large, so every pair of products that ``vpmaddubsw`` adds into int16 overflows.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")

from yoloq.runtime.ort import X64_QUANT_PRECISION, integer_kernel_note, ort_session, u8s8_saturates  # noqa: E402

CHANNELS, OUT_SCALE = 32, 4096.0
EXACT_CODE = round(CHANNELS * (255 - 128) * 127 / OUT_SCALE)          # 126: the int32 sum, requantized


def _probe_model() -> bytes:
    """y = QLinearConv(x, w): 1x1 conv, 32 uint8 input channels (zero point 128), int8 weights 127."""
    inits = [numpy_helper.from_array(np.array(v, dtype), name) for name, v, dtype in (
        ("x_scale", 1.0, np.float32), ("x_zp", 128, np.uint8), ("w_scale", 1.0, np.float32),
        ("w_zp", 0, np.int8), ("y_scale", OUT_SCALE, np.float32), ("y_zp", 0, np.uint8))]
    inits.append(numpy_helper.from_array(np.full((8, CHANNELS, 1, 1), 127, np.int8), "w"))
    node = helper.make_node("QLinearConv", ["x", "x_scale", "x_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp"], ["y"])
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, CHANNELS, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def _probe(session) -> np.ndarray:
    return session.run(None, {"x": np.full((1, CHANNELS, 4, 4), 255, np.uint8)})[0]


def _plain_session(model: bytes, precision: bool = False):
    """onnxruntime's defaults (what a deployment that sets nothing gets), optionally with the precision entry."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if precision:
        options.add_session_config_entry(X64_QUANT_PRECISION, "1")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


# CPUID capabilities (torch.cpu.get_capabilities() keys) of real CPU families, and whether MLAS's
# uint8 x int8 kernels saturate there.
X86 = {"architecture": "x86_64", "sse4_1": True, "avx": True}
AVX2 = {**X86, "avx2": True, "fma3": True}
AVX512 = {**AVX2, "avx512_f": True, "avx512_bw": True, "avx512_dq": True, "avx512_vl": True}
CPUS = {
    "Haswell / Zen 2 EPYC (AVX2 only)": (AVX2, True),
    "Alder Lake (AVX2 + AVX-VNNI)": ({**AVX2, "avx_vnni": True}, False),
    "Skylake-SP (AVX-512 without VNNI)": (AVX512, True),
    "Cascade Lake / Zen 4 (AVX512-VNNI)": ({**AVX512, "avx512_vnni": True}, False),
    "Sapphire Rapids (AVX512-VNNI, AVX-VNNI, AMX)": ({**AVX512, "avx512_vnni": True, "avx_vnni": True, "amx_int8": True}, False),
    "AVX-512F without BW (Knights Landing): AVX2 kernels": ({**AVX2, "avx512_f": True}, True),
    "SSE4.1 only, Linux build (SSE2 kernels widen)": (X86, False),
    "aarch64": ({"architecture": "aarch64", "neon": True, "dot": True}, False),
}


@pytest.mark.parametrize("cpu", CPUS)
def test_saturation_follows_mlas_kernel_choice(cpu):
    caps, saturates = CPUS[cpu]
    assert u8s8_saturates(caps) is saturates


def test_this_cpu_is_judged_like_onnxruntime_computes():
    """The rule, applied to this CPU's CPUID (torch's cpuinfo), agrees with what onnxruntime's default
    kernels actually do on the probe; with the precision entry the probe is exact on every CPU."""
    model = _probe_model()
    exact = np.full((1, 8, 4, 4), EXACT_CODE, np.uint8)
    default = _probe(_plain_session(model))
    assert np.array_equal(default, exact) is not u8s8_saturates(), (torch.cpu.get_capabilities(), default.ravel()[:4])
    np.testing.assert_array_equal(_probe(_plain_session(model, precision=True)), exact)


def test_yoloq_sessions_are_exact_and_keep_int8_weights_where_they_can(tmp_path):
    """ort_session computes the probe exactly on every CPU, and only switches to uint8 weights (onnxruntime's
    slower uint8 x uint8 kernels) where the int8 kernels saturate: with VNNI the fast kernels stay."""
    optimized = tmp_path / "probe_optimized.onnx"
    session = ort_session(_probe_model(), threads=1, optimized_path=str(optimized))
    np.testing.assert_array_equal(_probe(session), np.full((1, 8, 4, 4), EXACT_CODE, np.uint8))
    graph = onnx.load(str(optimized)).graph
    weight = next(n.input[3] for n in graph.node if n.op_type == "QLinearConv")
    dtype = next(t.data_type for t in graph.initializer if t.name == weight)
    assert dtype == (TensorProto.UINT8 if u8s8_saturates() else TensorProto.INT8)
    assert ("uint8 x uint8" in integer_kernel_note()) is u8s8_saturates()


def _two_convs_sharing_a_weight_zero_point() -> bytes:
    """x -> QLinearConv(w1) -> QLinearConv(w2), both weights reading one zero-point initializer (as exporters
    share equal constants). Exact codes: 126 after the first conv (as in the probe), then, read at scale 1,
    round(32 * 126 * 127 / 4096) = 125."""
    model = onnx.load_from_string(_probe_model())
    graph = model.graph
    square = numpy_helper.from_array(np.full((CHANNELS, CHANNELS, 1, 1), 127, np.int8), "w")
    graph.initializer.remove(next(t for t in graph.initializer if t.name == "w"))
    graph.initializer.extend([square, numpy_helper.from_array(np.full((CHANNELS, CHANNELS, 1, 1), 127, np.int8), "w2"),
                              numpy_helper.from_array(np.array(0, np.uint8), "y1_zp")])
    graph.node[0].output[0] = "y1"
    graph.node[0].input[7] = "y1_zp"
    graph.node.append(helper.make_node("QLinearConv", ["y1", "x_scale", "y1_zp", "w2", "w_scale", "w_zp", "y_scale", "y_zp"],
                                       ["y"]))
    return model.SerializeToString()


def test_shared_weight_zero_points_still_load_with_exact_kernels():
    """onnxruntime's uint8-weight conversion fails to load a graph whose convs share a weight zero point
    ("Attempt to replace the existing tensor": the real Lite-S exports do); ort_session gives each its own.
    Forced here (exact_int8=True) so that every x86 CPU runs that path."""
    from yoloq.runtime.onnx_graph import own_weight_zero_points
    model = _two_convs_sharing_a_weight_zero_point()
    proto = onnx.load_from_string(model)
    assert own_weight_zero_points(proto) == 1 and own_weight_zero_points(proto) == 0
    assert len({n.input[5] for n in proto.graph.node}) == 2
    for exact_int8 in (True, None):
        out = _probe(ort_session(model, threads=1, exact_int8=exact_int8))
        np.testing.assert_array_equal(out, np.full((1, CHANNELS, 4, 4), 125, np.uint8))
