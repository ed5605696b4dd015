"""Peer PTQ benchmark plumbing (yoloq.bench.peers): child processes, failure rows, TensorRT-like placement."""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from yoloq.bench import peers

VENVS = Path(os.environ.get("YOLOQ_PEER_VENVS", "/work/venvs"))


class TinyDetector(nn.Module):
    """Conv -> Hardswish -> depthwise conv -> SE (pool, conv, ReLU, conv, Hardsigmoid, product) ->
    1x1 conv -> a small decode (scale + add on the box part, sigmoid on the scores)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.se_reduce, self.se_expand = nn.Conv2d(width, width // 2, 1), nn.Conv2d(width // 2, width, 1)
        self.head = nn.Conv2d(width, 6, 1)

    def forward(self, x):
        x = nn.functional.hardswish(self.stem(x))
        y = self.dw(x)
        gate = nn.functional.hardsigmoid(self.se_expand(torch.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        z = self.head(y * gate).flatten(2)
        return torch.cat((z[:, :4] * 8.0 + 0.5, z[:, 4:].sigmoid()), 1).permute(0, 2, 1)


N_CONVS = 5


def _tiny_files(root: Path, width: int = 8) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = TinyDetector(width).eval()
    path = root / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.rand(1, 3, 16, 16), str(path), input_names=["images"], output_names=["outputs"],
                          opset_version=13, dynamic_axes={"images": {0: "batch"}}, dynamo=False)
    calib = peers.save_calibration([torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)], root / "calib.npy")
    return path, calib


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(FP32 ONNX path, calibration .npy path) of the tiny detector."""
    return _tiny_files(tmp_path_factory.mktemp("peers"))


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    """The tiny detector 16 channels wide: ModelOpt's INT8 rules skip convs narrower than that
    (fewer than 16 input or output channels, unless a multiple of 8 with further conditions)."""
    return _tiny_files(tmp_path_factory.mktemp("peers16"), width=16)


def _settings(path, peer, variant, **kw):
    model = onnx.load(str(path))
    return peers.peer_settings(model, peer, variant, model.graph.input[0].name, **kw)


def test_decode_nodes_are_the_nodes_after_the_last_conv(tiny):
    model = onnx.load(str(tiny[0]))
    decode = set(peers.decode_nodes(model))
    by_name = {n.name: n for n in model.graph.node}
    assert {by_name[name].op_type for name in decode} >= {"Sigmoid", "Mul", "Add", "Transpose"}
    # nothing that feeds a conv is decode: the SE product and the activations are not in it
    assert not any(by_name[name].op_type in ("HardSigmoid", "Relu", "ReduceMean", "GlobalAveragePool", "Conv")
                   for name in decode)


def test_placement_check_flags_quantizers_outside_conv_inputs(tiny, tmp_path):
    """onnxruntime's default quantize_static (every op) puts Q/DQ on the SE product, sigmoid, ... : the
    checker must see them, or the TensorRT-like test below proves nothing."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    calib = np.load(tiny[1])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"images": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    out = tmp_path / "all_ops.onnx"
    quantize_static(str(tiny[0]), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    placement = peers.qdq_placement(out)
    assert placement["other"] > 0 and placement["other_consumers"]


def _peer_python(peer: str) -> str | None:
    """An interpreter that has ``peer``: $YOLOQ_PEER_PYTHON_<PEER>, then <venvs>/<peer>/bin/python,
    then this one when the library imports here."""
    module = peers.PEER_MODULES[peer]
    candidates = [os.environ.get(f"YOLOQ_PEER_PYTHON_{peer.upper()}"), str(VENVS / peer / "bin" / "python")]
    for python in candidates:
        if python and Path(python).is_file():
            return python
    return sys.executable if importlib.util.find_spec(module) else None


@pytest.mark.parametrize("peer, variant", [("ort", "minmax"), ("nncf", "default"), ("quark", "minmax"),
                                           ("aimet", "minmax")])
def test_trt_like_settings_quantize_only_conv_inputs_and_weights(tiny, tmp_path, peer, variant):
    python = _peer_python(peer)
    if python is None:
        pytest.skip(f"peer {peer} not installed: no $YOLOQ_PEER_PYTHON_{peer.upper()}, no "
                    f"{VENVS / peer}/bin/python, and it does not import in this interpreter")
    out = tmp_path / f"{peer}.onnx"
    run = peers.run_peer(peer, variant, tiny[0], tiny[1], _settings(tiny[0], peer, variant), out, python=python,
                         timeout=300)
    assert run.ok, run.error
    placement = peers.qdq_placement(out)
    # AIMET's to_onnx_qdq also keeps a quantizer on the conv output in front of a ReLU that feeds a
    # conv (exact: a zero-point-0 Q/DQ commutes with ReLU); anything else outside conv inputs fails
    allowed = {"Relu"} if peer == "aimet" else set()
    assert set(placement["other_consumers"]) <= allowed, placement
    assert placement["conv_input"] >= 1
    # NNCF keeps squeeze-excite convs float by design (its built-in se_block ignored pattern)
    expected_weights = N_CONVS - 2 if peer == "nncf" else N_CONVS
    assert placement["conv_weight"] == expected_weights, placement
    assert run.info["versions"]["onnx"]


def _modelopt_python() -> str:
    python = _peer_python("modelopt")
    if python is None:
        pytest.skip(f"NVIDIA ModelOpt not installed: no $YOLOQ_PEER_PYTHON_MODELOPT, no {VENVS}/modelopt/bin/python, "
                    f"and modelopt does not import here ({peers.PEER_INSTALL['modelopt']})")
    return python


def _dq_consumers(model) -> dict[str, set[str]]:
    """Node name -> the names of the DequantizeLinear outputs it reads."""
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name: set(n.input) & dq_outputs for n in model.graph.node}


# the tiny calibration set has 8 images: a 32-image step is cut down to all 8
@pytest.mark.parametrize("variant, method, step", [("conv_entropy", "entropy", 1), ("conv_max", "max", 1),
                                                   ("conv_entropy_batch32", "entropy", 8)])
def test_modelopt_conv_variants_quantize_every_conv_and_nothing_else(tiny16, tmp_path, variant, method, step):
    python = _modelopt_python()
    out = tmp_path / f"{variant}.onnx"
    run = peers.run_peer("modelopt", variant, tiny16[0], tiny16[1], _settings(tiny16[0], "modelopt", variant), out,
                         python=python, timeout=600)
    assert run.ok, run.error
    assert peers.qdq_placement(out) == {"conv_input": N_CONVS, "conv_weight": N_CONVS, "other": 0, "requantized": 0,
                                        "unsigned": 0, "other_consumers": {}}
    used = run.info["used"]
    assert used["calibration_method"] == method and used["high_precision_dtype"] == "fp32"
    assert used["calibration_shapes"] == f"images:{step}x3x16x16"
    assert run.info["versions"]["nvidia-modelopt"]
    quantized = onnx.load(str(out))                 # high_precision_dtype fp32: nothing converted to fp16
    assert quantized.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert not any(i.data_type == onnx.TensorProto.FLOAT16 for i in quantized.graph.initializer)


def test_modelopt_default_op_set_quantizes_beyond_conv_and_honours_exclusions(tiny16, tmp_path):
    """ModelOpt's own placement also quantizes the HardSwish / SE products (the 'other' column);
    a node named in exclude_nodes keeps its inputs float (exact names, not prefixes)."""
    python = _modelopt_python()
    settings = _settings(tiny16[0], "modelopt", "default_entropy")
    assert settings["quantize_op_types"] is None
    settings["exclude_nodes"] = [*settings["exclude_nodes"], "/head/Conv"]
    out = tmp_path / "default.onnx"
    run = peers.run_peer("modelopt", "default_entropy", tiny16[0], tiny16[1], settings, out, python=python,
                         timeout=600)
    assert run.ok, run.error
    placement = peers.qdq_placement(out)
    assert placement["other"] > 0 and "Mul" in placement["other_consumers"], placement
    assert placement["conv_weight"] == N_CONVS - 1, placement
    reads = _dq_consumers(onnx.load(str(out)))
    assert not reads["/head/Conv"] and reads["/dw/Conv"]


def test_exact_name_patterns_match_only_the_named_node():
    import re
    from yoloq.bench.peer_child import exact_name_patterns
    names = ["/decode/Mul", "/decode/Mul_1", "/neck/reduce.0/Conv", "/neck/reduceX0/Conv"]
    patterns = exact_name_patterns(["/decode/Mul", "/neck/reduce.0/Conv"])
    matched = [n for n in names if any(re.match(p, n) for p in patterns)]
    assert matched == ["/decode/Mul", "/neck/reduce.0/Conv"]


def test_modelopt_missing_says_how_to_install_it(tiny, tmp_path):
    if importlib.util.find_spec("modelopt") is not None:
        pytest.skip("modelopt imports in this interpreter: it is not missing here")
    rows = peers.peer_rows(tiny[0], tiny[1], [("modelopt", "conv_entropy")],
                           evaluate_onnx=lambda p: pytest.fail("not reached"), fp32_stats={"AP": 0.3},
                           work_dir=tmp_path, pythons={"modelopt": sys.executable}, timeout=120,
                           progress_print=lambda *_: None)
    assert [(r["tool"], r["variant"]) for r in rows] == [("NVIDIA ModelOpt", "conv_entropy")]
    error = rows[0]["error"]
    assert f"nvidia-modelopt is not installed for {sys.executable}" in error
    assert 'pip install "nvidia-modelopt[onnx]"' in error and "--peer-python modelopt=" in error
    assert "ModuleNotFoundError: No module named 'modelopt'" in error


def test_version_note_names_the_onnxruntime_package_the_peer_has():
    assert peers._version_note("modelopt", {"nvidia-modelopt": "0.47.0", "onnxruntime-gpu": "1.24.4"}) == \
        "nvidia-modelopt 0.47.0, onnxruntime-gpu 1.24.4"
    assert peers._version_note("nncf", {"nncf": "3.4.0", "onnxruntime": "1.32.0"}) == "nncf 3.4.0, onnxruntime 1.32.0"


def _missing_peer() -> str:
    for peer, module in (("aimet", "aimet_onnx"), ("quark", "quark"), ("nncf", "nncf")):
        if importlib.util.find_spec(module) is None:
            return peer
    pytest.skip("every peer library imports in this interpreter: no missing peer to test with")


def test_missing_peer_library_becomes_a_row_with_the_reason(tiny, tmp_path):
    peer = _missing_peer()
    variant = next(iter(peers.PEER_VARIANTS[peer]))
    rows = peers.peer_rows(tiny[0], tiny[1], [(peer, variant)], evaluate_onnx=lambda p: pytest.fail("not reached"),
                           fp32_stats={"AP": 0.3}, work_dir=tmp_path, pythons={peer: sys.executable}, timeout=120,
                           progress_print=lambda *_: None)
    assert len(rows) == 1 and rows[0]["tool"] == peers.PEER_TOOL_NAMES[peer] and rows[0]["variant"] == variant
    assert "exit code 1" in rows[0]["error"] and "ModuleNotFoundError" in rows[0]["error"]
    assert (tmp_path / "logs" / f"{peer}_{variant}.log").is_file()


def test_missing_interpreter_becomes_a_row(tiny, tmp_path):
    run = peers.run_peer("ort", "minmax", tiny[0], tiny[1], _settings(tiny[0], "ort", "minmax"),
                         tmp_path / "q.onnx", python=str(tmp_path / "no-such-python"))
    assert not run.ok and "interpreter not found" in run.error


def test_crashing_child_gives_its_exception_and_leaves_no_output(tiny, tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 16, 16), np.float32))                     # not [N,3,H,W]
    out = tmp_path / "q.onnx"
    run = peers.run_peer("ort", "minmax", tiny[0], bad, _settings(tiny[0], "ort", "minmax"), out, timeout=120)
    assert not run.ok and "expected calibration images [N,3,H,W]" in run.error
    assert "is not installed" not in run.error          # the install hint is only for a missing library
    assert not out.exists()


def test_timeout_becomes_a_row(tiny, tmp_path):
    run = peers.run_peer("ort", "minmax", tiny[0], tiny[1], _settings(tiny[0], "ort", "minmax"), tmp_path / "q.onnx",
                         timeout=0.05)
    assert not run.ok and "timed out after" in run.error


def test_peer_requests_are_checked():
    assert peers.parse_peer_specs(["nncf:default", "aimet"]) == [("nncf", "default")] + [
        ("aimet", v) for v in peers.PEER_VARIANTS["aimet"]]
    assert peers.parse_peer_specs(["default"]) == [tuple(s.split(":")) for s in peers.DEFAULT_PEERS]
    assert peers.parse_peer_specs(["modelopt"]) == [("modelopt", v) for v in
                                                    ("conv_entropy", "conv_max", "default_entropy", "default_max",
                                                     "conv_entropy_batch32")]
    with pytest.raises(peers.PeerError, match="unknown peer 'tensorrt'"):
        peers.parse_peer_specs(["tensorrt"])
    with pytest.raises(peers.PeerError, match="unknown variant 'fast' of peer 'nncf'"):
        peers.parse_peer_specs(["nncf:fast"])
    assert peers.parse_peer_python(["nncf=/x/python"]) == {"nncf": "/x/python"}
    with pytest.raises(peers.PeerError, match="expected PEER=INTERPRETER"):
        peers.parse_peer_python(["nncf"])


def test_bench_ptq_rejects_a_bad_peer_request_before_any_work(tmp_path, capsys):
    from yoloq.cli import main as yoloq_main
    missing_cfg = str(tmp_path / "never_read.yaml")
    assert yoloq_main(["bench-ptq", "--cfg", missing_cfg, "--peers", "tensorrt"]) == 2
    assert "unknown peer 'tensorrt'" in capsys.readouterr().err
    assert yoloq_main(["bench-ptq", "--cfg", missing_cfg, "--peers", "nncf", "--peer-python", "/usr/bin/python3"]) == 2
    assert "expected PEER=INTERPRETER" in capsys.readouterr().err
