"""TensorRT deployment (yoloq.runtime.tensorrt.build, tools/trt.py).

Without TensorRT / a GPU (this machine) the tests cover everything that does not execute an engine:
ONNX inspection, optimization-profile rules, the trtexec command text, the build-mode checks that run
before TensorRT is touched, calibration batching on real train images, the calibrator's buffer and
cache handling (on a CPU buffer), and the CLI's exit code 2 + one-line message when TensorRT or the
GPU is missing. The ``gpu`` tests build real engines (FP32, FP16, entropy/minmax-calibrated INT8,
explicit Q/DQ INT8 from ``export_onnx``), compare them with PyTorch / onnxruntime, run COCO eval
and the benchmark; they skip with a reason when ``tensorrt`` or CUDA is missing.
"""
from __future__ import annotations

import json
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
import onnx                                                              # noqa: E402
from onnx import TensorProto, helper, numpy_helper                       # noqa: E402

from yoloq.runtime import onnx_export as export                          # noqa: E402
from yoloq.runtime import tensorrt as yt                                  # noqa: E402
from yoloq.runtime.tensorrt.calibrator import CALIBRATOR_BASES           # noqa: E402
from yoloq.cli import main as yoloq_main  # noqa: E402
from yoloq.cli import trt as trt_cli  # noqa: E402
from conftest import REPO, DATA_YAML, LITE_S_CFG, needs_coco  # noqa: E402




# --------------------------------------------------------------------------- small ONNX files
def torch_onnx_export(model: nn.Module, x: torch.Tensor, path: Path, dynamic_batch: bool) -> Path:
    """Plain FP32 export with input 'images' / output 'outputs' (TorchScript exporter, as yoloq uses)."""
    axes = {"images": {0: "batch"}, "outputs": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, x, str(path), input_names=["images"], output_names=["outputs"],
                          opset_version=13, dynamic_axes=axes, dynamo=False)
    return path


def export_conv(path: Path, batch_dynamic: bool, size: int = 32) -> Path:
    """A two-layer conv net (plain FP32 ONNX)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1)).eval()
    return torch_onnx_export(model, torch.rand(1, 3, size, size), path, batch_dynamic)


def make_qdq_onnx(path: Path) -> Path:
    """images -> Q -> DQ -> Conv(DQ(Q(weight))) : the shape of a TensorRT explicit-quantization graph."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    consts = [w, numpy_helper.from_array(np.array(0.02, np.float32), "s"),
              numpy_helper.from_array(np.array(0, np.int8), "z"),
              numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"),
              numpy_helper.from_array(np.zeros(4, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["images", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], axis=0),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["outputs"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 3, 16, 16])],
                              [helper.make_tensor_value_info("outputs", TensorProto.FLOAT, ["B", 4, 16, 16])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_fp16_onnx(path: Path) -> Path:
    """FP32 images -> Cast(FP16) -> Conv with FP16 weights -> Cast(FP32): the form ModelOpt AutoCast
    (keep_io_types) writes, which TensorRT 11 builds as an FP16 engine."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float16), "w")
    nodes = [helper.make_node("Cast", ["images"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("Conv", ["x16", "w"], ["y16"], pads=[1, 1, 1, 1]),
             helper.make_node("Cast", ["y16"], ["outputs"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "fp16", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("outputs", TensorProto.FLOAT, [1, 4, 16, 16])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    return {"dynamic": export_conv(d / "dyn.onnx", True), "fixed": export_conv(d / "fixed.onnx", False),
            "qdq": make_qdq_onnx(d / "qdq.onnx"), "fp16": make_fp16_onnx(d / "fp16.onnx")}


# --------------------------------------------------------------------------- ONNX facts, profiles
def test_inspect_onnx(onnx_files):
    dyn = yt.inspect_onnx(onnx_files["dynamic"])
    assert (dyn.input_name, dyn.input_shape, dyn.output_names) == ("images", [None, 3, 32, 32], ["outputs"])
    assert dyn.dynamic_batch and dyn.img_size == 32 and not dyn.has_qdq
    fixed = yt.inspect_onnx(onnx_files["fixed"])
    assert fixed.input_shape == [1, 3, 32, 32] and not fixed.dynamic_batch
    qdq = yt.inspect_onnx(onnx_files["qdq"])
    assert (qdq.n_quantize, qdq.n_dequantize) == (2, 2) and qdq.has_qdq


def test_inspect_onnx_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ONNX file not found: .*missing.onnx"):
        yt.inspect_onnx(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\xffnot a protobuf" * 10)
    with pytest.raises(ValueError, match="bad.onnx: not a readable ONNX model"):
        yt.inspect_onnx(bad)


def test_resolve_profile(onnx_files):
    dyn = yt.inspect_onnx(onnx_files["dynamic"])
    p = yt.resolve_profile(dyn)
    assert (p.min, p.opt, p.max) == ((1, 3, 32, 32), (16, 3, 32, 32), (32, 3, 32, 32)) and p.dynamic
    p = yt.resolve_profile(dyn, min_batch=2, max_batch=8)
    assert (p.min[0], p.opt[0], p.max[0]) == (2, 8, 8)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        yt.resolve_profile(dyn, min_batch=4, opt_batch=2, max_batch=8)
    with pytest.raises(ValueError, match="fixed at 32x32, not 64x64"):
        yt.resolve_profile(dyn, img_size=64)
    fixed = yt.inspect_onnx(onnx_files["fixed"])
    p = yt.resolve_profile(fixed)
    assert p.min == p.opt == p.max == (1, 3, 32, 32) and not p.dynamic
    with pytest.raises(ValueError, match="fixed batch of 1.*max_batch"):
        yt.resolve_profile(fixed, max_batch=32)
    qdq = yt.inspect_onnx(onnx_files["qdq"])
    assert yt.resolve_profile(qdq, min_batch=1, opt_batch=4, max_batch=4).max == (4, 3, 16, 16)


# --------------------------------------------------------------------------- trtexec text
def test_trtexec_command_int8_dynamic(onnx_files):
    cmd = yt.trtexec_command(onnx_files["qdq"], "int8", engine_path="/e/m.engine", max_batch=8)
    onnx_path = onnx_files["qdq"]
    assert cmd == (f"trtexec --onnx={onnx_path} --saveEngine=/e/m.engine --int8 --fp16 "
                   "--memPoolSize=workspace:4096 --minShapes=images:1x3x16x16 --optShapes=images:8x3x16x16 "
                   "--maxShapes=images:8x3x16x16")
    assert yt.trtexec_command(onnx_path, "best", engine_path="/e/m.engine", max_batch=8) == cmd


def test_trtexec_command_fp16_fp32_calib(onnx_files, tmp_path):
    fixed = onnx_files["fixed"]
    fp16 = yt.trtexec_command(fixed, "fp16", workspace_gb=2)
    assert fp16.split() == ["trtexec", f"--onnx={fixed}", f"--saveEngine={fixed.with_suffix('.engine')}",
                            "--fp16", "--memPoolSize=workspace:2048"]
    fp32 = yt.trtexec_command(fixed, "fp32")
    assert "--fp16" not in fp32 and "--int8" not in fp32 and "Shapes" not in fp32
    spaced = tmp_path / "with space" / "m.calib"
    cmd = yt.trtexec_command(fixed, "int8", calib_cache=spaced)
    assert f"'--calib={spaced}'" in cmd              # shell-quoted
    with pytest.raises(ValueError, match="precision 'int4'"):
        yt.trtexec_command(fixed, "int4")


def test_trtexec_command_tensorrt_11(onnx_files, tmp_path):
    """TensorRT 11 has no precision flags: Q/DQ and FP32 files build as they are, an FP32 file becomes
    FP16 through ModelOpt AutoCast first, and implicit INT8 has no trtexec form (nor, without a
    cache, on 10: trtexec would use placeholder scales)."""
    qdq, fixed, fp16 = onnx_files["qdq"], onnx_files["fixed"], onnx_files["fp16"]
    cmd = yt.trtexec_command(qdq, "int8", engine_path="/e/m.engine", max_batch=8, trt_major=11)
    assert cmd == (f"trtexec --onnx={qdq} --saveEngine=/e/m.engine --memPoolSize=workspace:4096 "
                   "--minShapes=images:1x3x16x16 --optShapes=images:8x3x16x16 --maxShapes=images:8x3x16x16")
    converted = fixed.with_name("fixed_fp16.onnx")
    assert yt.trtexec_command(fixed, "fp16", trt_major=11).split() == [
        "python", "-m", "modelopt.onnx.autocast", "--onnx_path", str(fixed), "--output_path", str(converted), "&&",
        "trtexec", f"--onnx={converted}", f"--saveEngine={fixed.with_suffix('.engine')}", "--memPoolSize=workspace:4096"]
    assert yt.trtexec_command(fp16, "fp16", trt_major=11) == (
        f"trtexec --onnx={fp16} --saveEngine={fp16.with_suffix('.engine')} --memPoolSize=workspace:4096")
    assert "--fp16" in yt.trtexec_command(fp16, "fp16", trt_major=10)
    with pytest.raises(ValueError, match="fp16.onnx has FP16 tensors, which TensorRT 11 keeps"):
        yt.trtexec_command(fp16, "fp32", trt_major=11)
    with pytest.raises(ValueError, match="TensorRT 11 has no implicit INT8 calibration"):
        yt.trtexec_command(fixed, "int8", trt_major=11)
    with pytest.raises(ValueError, match="TensorRT 12 has no implicit INT8 calibration"):
        yt.trtexec_command(fixed, "int8", calib_cache=tmp_path / "m.calib", trt_major=12)
    with pytest.raises(ValueError, match="no Q/DQ nodes: trtexec --int8 needs --calib"):
        yt.trtexec_command(fixed, "int8")
    reason = yt.trtexec_or_reason(fixed, "int8")
    assert reason.startswith("none (") and "placeholder scales" in reason


def test_builder_flags_per_tensorrt_version(onnx_files):
    plain, qdq, fp16 = (yt.inspect_onnx(onnx_files[k]) for k in ("fixed", "qdq", "fp16"))
    assert (plain.n_float16, qdq.n_float16, fp16.n_float16) == (0, 0, 1)
    for major in (8, 10):                               # weakly typed: flags allow the precisions
        assert yt.builder_flags(major, qdq, "int8", "explicit-qdq") == (["FP16", "INT8"], [])
        assert yt.builder_flags(major, plain, "best", "implicit-entropy") == (["FP16", "INT8"], [])
        assert yt.builder_flags(major, plain, "fp16", "fp16") == (["FP16"], [])
        assert yt.builder_flags(major, plain, "fp32", "fp32") == ([], [])
    flags, notes = yt.builder_flags(11, qdq, "int8", "explicit-qdq")    # strongly typed: no flags
    assert flags == [] and "outside Q/DQ run in FP32" in notes[0] and "modelopt.onnx.autocast" in notes[0]
    assert yt.builder_flags(11, fp16, "fp16", "fp16") == ([], [])
    assert yt.builder_flags(11, plain, "fp32", "fp32") == ([], [])
    with pytest.raises(ValueError, match=r"fixed.onnx is FP32 and TensorRT 11 builds strongly typed.*autocast"):
        yt.builder_flags(11, plain, "fp16", "fp16")
    with pytest.raises(ValueError, match="1 FP16 initializers"):
        yt.builder_flags(11, fp16, "fp32", "fp32")
    with pytest.raises(ValueError, match="TensorRT 11 has no implicit INT8 calibration"):
        yt.builder_flags(11, plain, "int8", "implicit-minmax")


def test_calibrators_absent_from_tensorrt_11(monkeypatch):
    """TensorRT 11's module has no IInt8*Calibrator: a clear TrtUnavailable, not an AttributeError."""
    stand_in = types.ModuleType("tensorrt")
    stand_in.__version__ = "11.4.0.106"                    # the bindings' version on PyPI, calibrators removed
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in)
    monkeypatch.setattr(yt.calibrator, "_CALIBRATOR_CLASSES", {})
    assert yt.installed_trt_major() == 11
    with pytest.raises(yt.TrtUnavailable, match=r"TensorRT 11.4.0.106 has no implicit INT8 calibration.*IInt8\*Calibrator"):
        yt.EntropyCalibrator


def test_trtexec_bench_command():
    assert yt.trtexec_bench_command("m.engine", 32, 320, iters=100) == (
        "trtexec --loadEngine=m.engine --warmUp=500 --iterations=100 --useSpinWait --shapes=images:32x3x320x320")


# --------------------------------------------------------------------------- checks before TensorRT
def test_build_mode(onnx_files):
    plain, qdq = yt.inspect_onnx(onnx_files["dynamic"]), yt.inspect_onnx(onnx_files["qdq"])
    assert yt.build_mode(qdq, "int8", False) == "explicit-qdq"
    assert yt.build_mode(qdq, "best", True) == "explicit-qdq"        # calibrator ignored later
    assert yt.build_mode(plain, "int8", True) == "implicit"
    assert yt.build_mode(plain, "fp16", False) == "fp16"
    with pytest.raises(ValueError, match="no Q/DQ nodes and no calibrator"):
        yt.build_mode(plain, "int8", False)
    with pytest.raises(ValueError, match="4 Q/DQ nodes: TensorRT builds it only as INT8"):
        yt.build_mode(qdq, "fp16", False)


def test_build_engine_input_errors_need_no_tensorrt(onnx_files, tmp_path):
    engine = tmp_path / "x.engine"
    with pytest.raises(FileNotFoundError, match="ONNX file not found"):
        yt.build_engine(tmp_path / "none.onnx", engine, precision="fp16")
    with pytest.raises(ValueError, match="only as INT8"):
        yt.build_engine(onnx_files["qdq"], engine, precision="fp32")
    with pytest.raises(ValueError, match="fixed batch of 1"):
        yt.build_engine(onnx_files["fixed"], engine, precision="fp16", max_batch=4)
    assert not engine.exists()


def test_module_import_does_not_import_tensorrt():
    code = "import sys, yoloq.runtime.tensorrt.build as t; print('tensorrt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_calibrator_classes_need_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)      # makes `import tensorrt` fail, as when absent
    monkeypatch.setattr(yt.calibrator, "_CALIBRATOR_CLASSES", {})
    with pytest.raises(yt.TrtUnavailable, match="'tensorrt' is not installed"):
        yt.EntropyCalibrator
    with pytest.raises(ValueError, match="calibrator 'kl'"):
        yt.calibrator_class("kl")


# --------------------------------------------------------------------------- calibration batching
def test_calibration_batches_rechunks_and_drops_remainder():
    images = torch.arange(7 * 3 * 2 * 2, dtype=torch.float32).reshape(7, 3, 2, 2)
    loader = [(images[0:3], ["m"] * 3), (images[3:6], ["m"] * 3), (images[6:7], ["m"])]   # like yoloq loaders
    batches = yt.CalibrationBatches(loader, batch_size=2)
    with pytest.warns(UserWarning, match="1 image"):
        got = list(batches)
    assert [tuple(b.shape) for b in got] == [(2, 3, 2, 2)] * 3 and batches.dropped == 1
    assert torch.equal(torch.cat(got), images[:6]) and all(b.is_contiguous() for b in got)
    assert len(list(yt.CalibrationBatches([images], batch_size=3, max_batches=1))) == 1
    with pytest.raises(ValueError, match="fewer images than one batch of 8"), pytest.warns(UserWarning):
        list(yt.CalibrationBatches([images], batch_size=8))


@needs_coco
def test_calibration_batches_real_train_images():
    from yoloq.data import load_data_config
    from yoloq.data.coco import CocoDetectionDataset, calibration_images

    data_cfg = load_data_config(DATA_YAML)
    with pytest.warns(UserWarning, match="1 image"):
        got = list(yt.calibration_batches(data_cfg, 5, 64, 2, seed=3, workers=0))
    assert [tuple(b.shape) for b in got] == [(2, 3, 64, 64)] * 2
    files = calibration_images(data_cfg, 5, seed=3)          # train split only, same choice
    dataset = CocoDetectionDataset(data_cfg.train_images, None, 64, files=files)
    expected = torch.stack([dataset[i][0] for i in range(4)])
    assert torch.equal(torch.cat(got), expected)
    assert 0.0 <= float(expected.min()) and float(expected.max()) <= 1.0 and expected.std() > 0.05


def test_calibration_feeder_buffer_and_cache(tmp_path):
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cache = tmp_path / "sub" / "m.calib"
    feeder = yt.CalibrationFeeder(yt.CalibrationBatches([images], 3), cache, device="cpu")
    assert feeder.batch_size == 3 and feeder.read_cache() is None
    for i in range(2):
        ptrs = feeder.next_pointers(["images"])
        assert ptrs == [feeder.buffer.data_ptr()]
        assert torch.equal(feeder.buffer, images[3 * i:3 * i + 3])
    assert feeder.next_pointers(["images"]) is None and feeder.n_batches == 2 and feeder.error is None
    feeder.write_cache(bytearray(b"TRT-8601-EntropyCalibration2\nimages: 3c010a14\n"))
    assert cache.read_bytes().startswith(b"TRT-8601") and feeder.read_cache() == cache.read_bytes()
    assert list(cache.parent.iterdir()) == [cache]                    # no temp file left behind
    assert yt.CalibrationFeeder([images], cache, batch_size=3, use_cache=False, device="cpu").read_cache() is None
    two_inputs = yt.CalibrationFeeder([images[:3]], batch_size=3, device="cpu")
    assert two_inputs.next_pointers(["a", "b"]) is None and "one image input" in str(two_inputs.error)
    wrong = yt.CalibrationFeeder([images[:2]], batch_size=3, device="cpu")
    assert wrong.next_pointers(["images"]) is None and "expected 3" in str(wrong.error)


# --------------------------------------------------------------------------- CLI
def test_parse_args():
    a = trt_cli.build_parser().parse_args(["build", "--onnx", "m.onnx"])
    assert (a.precision, a.calib, a.workspace, a.calib_batch, a.engine) == ("int8", None, 4.0, 8, None)
    a = trt_cli.build_parser().parse_args(["bench", "--engine", "m.engine", "--batch", "1", "8", "32"])
    assert (a.batch, a.warmup, a.iters) == ([1, 8, 32], 50, 200)
    a = trt_cli.build_parser().parse_args(["eval", "--engine", "m.engine", "--cfg", "c.yaml", "--max-images", "5"])
    assert (a.command, a.max_images) == ("eval", 5)
    with pytest.raises(SystemExit):
        trt_cli.build_parser().parse_args(["eval", "--engine", "m.engine"])          # --cfg is required
    with pytest.raises(SystemExit):
        trt_cli.build_parser().parse_args(["build", "--onnx", "m.onnx", "--calib", "percentile"])
    assert trt_cli.default_engine_path(Path("r/m.onnx"), "best", "entropy") == Path("r/m_int8_entropy.engine")
    assert trt_cli.default_engine_path(Path("r/m.onnx"), "fp16", None) == Path("r/m_fp16.engine")


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_without_tensorrt_exits_2_with_trtexec(onnx_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)      # TensorRT absent, whatever is installed
    engine = tmp_path / "m.engine"
    assert yoloq_main(["trt", "build", "--onnx", str(onnx_files["qdq"]), "--engine", str(engine), "--max-batch", "4"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "'tensorrt' is not installed" in line and "building an engine" in line
    shapes = "--minShapes=images:1x3x16x16 --optShapes=images:4x3x16x16 --maxShapes=images:4x3x16x16"
    assert line.endswith(f"Run instead: trtexec --onnx={onnx_files['qdq']} --saveEngine={engine} --int8 --fp16 "
                         f"--memPoolSize=workspace:4096 {shapes} (TensorRT 8.6/10.x); with TensorRT 11.x: trtexec "
                         f"--onnx={onnx_files['qdq']} --saveEngine={engine} --memPoolSize=workspace:4096 {shapes}")
    assert not engine.exists()
    engine.write_bytes(b"not really an engine")
    assert yoloq_main(["trt", "bench", "--engine", str(engine), "--batch", "1", "32", "--img-size", "320"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "benchmarking an engine" in line and "--shapes=images:32x3x320x320" in line
    assert yoloq_main(["trt", "eval", "--engine", str(engine), "--cfg", str(LITE_S_CFG)]) == 2
    assert f"trtexec --loadEngine={engine}" in _one_line(capsys.readouterr().err)


def test_cli_without_gpu_exits_2(onnx_files, monkeypatch, capsys):
    # TensorRT importable (a bare module stands in for it) but no CUDA device: the GPU branch.
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert yoloq_main(["trt", "build", "--onnx", str(onnx_files["fixed"]), "--precision", "fp16"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "no CUDA GPU visible" in line and "trtexec --onnx=" in line and "--fp16" in line


def test_cli_input_errors_exit_2(onnx_files, tmp_path, capsys):
    assert yoloq_main(["trt", "build", "--onnx", str(tmp_path / "none.onnx")]) == 2
    assert "ONNX file not found" in capsys.readouterr().err
    assert yoloq_main(["trt", "build", "--onnx", str(onnx_files["dynamic"])]) == 2        # plain ONNX, int8, no calib
    assert "no Q/DQ nodes and no calibrator" in capsys.readouterr().err
    assert yoloq_main(["trt", "build", "--onnx", str(onnx_files["dynamic"]), "--calib", "entropy"]) == 2
    assert "--calib needs calibration images" in capsys.readouterr().err
    assert yoloq_main(["trt", "build", "--onnx", str(onnx_files["dynamic"]), "--precision", "fp16",
                         "--calib", "minmax", "--cfg", str(LITE_S_CFG)]) == 2
    assert "cannot go with --precision fp16" in capsys.readouterr().err
    assert yoloq_main(["trt", "bench", "--engine", str(tmp_path / "none.engine")]) == 2
    assert "engine not found" in capsys.readouterr().err


def test_cli_script_exit_code(onnx_files, tmp_path):
    """The real entry point (python tools/trt.py) with tensorrt made unimportable."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "tensorrt.py").write_text("raise ModuleNotFoundError(\"No module named 'tensorrt'\", name='tensorrt')\n")
    env = {**__import__("os").environ, "PYTHONPATH": f"{blocker}:{REPO}"}
    out = subprocess.run([sys.executable, str(REPO / "tools" / "trt.py"), "build", "--onnx", str(onnx_files["fixed"]),
                          "--precision", "fp16"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "'tensorrt' is not installed" in out.stderr and "trtexec --onnx=" in out.stderr


# =========================================================================== GPU + TensorRT
@pytest.fixture(scope="module")
def trt_gpu():
    trt = pytest.importorskip("tensorrt", reason="TensorRT Python package 'tensorrt' is not installed")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT tests need a CUDA GPU; torch.cuda.is_available() is False")
    return trt


def _lite_s_model():
    """YOLOv6Lite-S in deploy form: real weights when the shared file exists, else random."""
    from yoloq.config import load_config
    from yoloq.models import build_model
    from yoloq.models import load_model

    cfg = load_config(LITE_S_CFG)
    if cfg.model.weights and Path(cfg.model.weights).is_file():
        return load_model(cfg.model), cfg, True
    torch.manual_seed(0)
    return build_model(cfg.model).fuse().eval(), cfg, False


@pytest.fixture(scope="module")
def lite_s(trt_gpu, tmp_path_factory):
    model, cfg, real = _lite_s_model()
    path = tmp_path_factory.mktemp("lite") / "lite_s_fp32.onnx"
    torch_onnx_export(model, torch.rand(1, 3, 320, 320), path, dynamic_batch=True)
    return {"model": model, "cfg": cfg, "real": real, "onnx": path, "dir": path.parent}


@pytest.fixture(scope="module")
def fp16_engine(lite_s):
    engine, source = lite_s["dir"] / "lite_s_fp16.engine", lite_s["onnx"]
    if yt.trt_major(trt_module()) >= yt.STRONGLY_TYPED_MAJOR:     # no FP16 flag: FP16 comes from the ONNX
        import copy
        from yoloq.runtime.onnx_export import HalfPrecision
        source = lite_s["dir"] / "lite_s_fp16.onnx"
        torch_onnx_export(HalfPrecision(copy.deepcopy(lite_s["model"])), torch.rand(1, 3, 320, 320), source, True)
    info = yt.build_engine(source, engine, precision="fp16", min_batch=1, opt_batch=4, max_batch=8)
    assert info.mode == "fp16" and engine.stat().st_size == info.engine_bytes
    return engine


def _torch_out(model, x):
    with torch.no_grad():
        return model(x).numpy()


@pytest.mark.gpu
def test_fp32_engine_matches_pytorch(lite_s):
    engine = lite_s["dir"] / "lite_s_fp32.engine"
    info = yt.build_engine(lite_s["onnx"], engine, precision="fp32", max_batch=4)
    assert info.profile["max"] == [4, 3, 320, 320] and "--fp16" not in info.trtexec
    pred = yt.TrtPredictor(engine)
    assert (pred.min_batch, pred.max_batch, pred.img_size) == (1, 4, 320)
    x = torch.rand(6, 3, 320, 320, generator=torch.Generator().manual_seed(1))   # split into 4 + 2
    got, ref = pred(x), _torch_out(lite_s["model"], x)
    assert got.shape == ref.shape and got.dtype == np.float32
    # TF32 may be used for FP32 convs on Ampere+: allow ~1e-3 relative error.
    assert np.abs(got[..., 4:] - ref[..., 4:]).max() < 1e-2
    assert np.abs(got[..., :4] - ref[..., :4]).max() < 0.5           # pixels at 320


@pytest.mark.gpu
def test_fp16_engine_close_to_pytorch(lite_s, fp16_engine):
    x = torch.rand(3, 3, 320, 320, generator=torch.Generator().manual_seed(2))
    got, ref = yt.TrtPredictor(fp16_engine)(x), _torch_out(lite_s["model"], x)
    assert np.abs(got[..., 4:] - ref[..., 4:]).max() < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("kind", yt.CALIBRATORS)
@needs_coco
def test_implicit_calibration_engine(lite_s, kind):
    from yoloq.data import load_data_config

    if yt.trt_major(trt_module()) >= yt.STRONGLY_TYPED_MAJOR:
        pytest.skip(f"TensorRT {trt_module().__version__} has no implicit INT8 calibration (removed in 11)")
    data_cfg = load_data_config(DATA_YAML)
    engine, cache = lite_s["dir"] / f"lite_s_{kind}.engine", lite_s["dir"] / f"lite_s_{kind}.calib"
    batches = yt.calibration_batches(data_cfg, 8, 320, 4, workers=0)
    calibrator = yt.make_calibrator(kind, batches, cache)
    assert isinstance(calibrator, getattr(trt_module(), CALIBRATOR_BASES[kind]))
    info = yt.build_engine(lite_s["onnx"], engine, precision="int8", max_batch=8, calibrator=calibrator)
    assert info.mode == f"implicit-{kind}" and calibrator.feeder.n_batches == 2 and cache.stat().st_size > 0
    assert f"--calib={cache}" in info.trtexec
    x = torch.rand(2, 3, 320, 320, generator=torch.Generator().manual_seed(3))
    out = yt.TrtPredictor(engine)(x)
    assert out.shape == _torch_out(lite_s["model"], x).shape and np.isfinite(out).all()
    # second build reads the cache: no image is fed again
    again = yt.make_calibrator(kind, yt.calibration_batches(data_cfg, 8, 320, 4, workers=0), cache)
    yt.build_engine(lite_s["onnx"], engine, precision="int8", max_batch=8, calibrator=again)
    assert again.feeder.n_batches == 0


def trt_module():
    import tensorrt
    return tensorrt


@pytest.mark.gpu
def test_parse_error_lists_parser_messages(trt_gpu, tmp_path):
    node = helper.make_node("NoSuchOp", ["images"], ["outputs"], domain="yoloq.test")
    graph = helper.make_graph([node], "bad", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("outputs", TensorProto.FLOAT, [1, 3, 8, 8])])
    path = tmp_path / "bad_op.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("yoloq.test", 1)]),
              str(path))
    with pytest.raises(yt.TrtBuildError, match=r"could not parse .*bad_op.onnx:\n.*NoSuchOp"):
        yt.build_engine(path, tmp_path / "bad.engine", precision="fp32")
    assert not (tmp_path / "bad.engine").exists()


@pytest.mark.gpu
def test_benchmark(fp16_engine):
    results = yt.benchmark(fp16_engine, (1, 4, 64), warmup=5, iters=20)
    ok = {r.batch: r for r in results if not r.skipped}
    assert set(ok) == {1, 4} and "1..8" in results[2].skipped
    for r in ok.values():
        assert 0 < r.median_ms <= r.p90_ms and r.throughput == pytest.approx(r.batch * 1000 / r.median_ms)


@pytest.mark.gpu
@needs_coco
def test_eval_engine_matches_pytorch_map(lite_s, fp16_engine):
    if not lite_s["real"]:
        pytest.skip("mAP comparison needs the real YOLOv6Lite-S weights in ../shared/weights")
    from yoloq.data import load_data_config
    from yoloq.eval import evaluate_model

    data_cfg, eval_cfg = load_data_config(DATA_YAML), lite_s["cfg"].eval
    eval_cfg.workers = 0
    from yoloq.cli.trt import evaluate_engine
    trt_res = evaluate_engine(fp16_engine, data_cfg, eval_cfg, max_images=24, progress=False)
    ref = evaluate_model(lite_s["model"], data_cfg, eval_cfg, 320, max_images=24, progress=False)
    assert trt_res.n_images == 24 and trt_res.extra["engine"] == str(fp16_engine)
    assert abs(trt_res.stats["AP"] - ref.stats["AP"]) < 0.01         # FP16 vs FP32: within 1 point


@pytest.mark.gpu
def test_cli_build_and_bench(lite_s, tmp_path, capsys):
    engine, out = tmp_path / "cli_fp32.engine", tmp_path / "bench.json"
    assert yoloq_main(["trt", "build", "--onnx", str(lite_s["onnx"]), "--engine", str(engine), "--precision", "fp32",
                         "--max-batch", "2", "--opt-batch", "2"]) == 0
    assert "equivalent trtexec command: trtexec" in capsys.readouterr().out and engine.is_file()
    assert yoloq_main(["trt", "bench", "--engine", str(engine), "--batch", "1", "2", "--warmup", "2", "--iters", "5",
                         "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["results"]] == [1, 2] and all(r["median_ms"] > 0 for r in data["results"])


@pytest.mark.gpu
def test_explicit_qdq_int8_engine_from_export_onnx(trt_gpu, tmp_path):
    """INT8 engine from yoloq's own Q/DQ export (small random yolov6n): TensorRT output tracks the
    onnxruntime run of the same Q/DQ graph (different INT8 kernels and FP16 in between, so a loose bound)."""
    import onnxruntime as ort
    from yoloq.config import ModelConfig
    from yoloq.models import build_model
    from yoloq.quant.calibrate import calibrate
    from yoloq.quant.prepare import prepare

    torch.manual_seed(0)
    cfg = ModelConfig(name="yolov6n", arch="yolov6", depth_multiple=0.33, width_multiple=0.25, img_size=128)
    qmodel = prepare(build_model(cfg).fuse().eval())
    gen = torch.Generator().manual_seed(0)
    calibrate(qmodel, [torch.rand(4, 3, 128, 128, generator=gen) for _ in range(2)], "max", progress=False)
    onnx_path = tmp_path / "n_qdq.onnx"
    export.export_onnx(qmodel, onnx_path, img_size=128, batch=None)
    info = yt.build_engine(onnx_path, tmp_path / "n_int8.engine", precision="int8", max_batch=4)
    assert info.mode == "explicit-qdq" and info.n_qdq > 0
    x = torch.rand(2, 3, 128, 128, generator=gen)
    got = yt.TrtPredictor(tmp_path / "n_int8.engine")(x)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == ref.shape
    assert np.corrcoef(got[..., 4:].ravel(), ref[..., 4:].ravel())[0, 1] > 0.98


def _scaling_muls(graph) -> list[str]:
    """Names of the per-channel input-scaling Muls: a Mul by a constant whose output a
    QuantizeLinear of an activation reads (yoloq.quant.channel_scale)."""
    consts = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    q_inputs = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    return [n.name for n in graph.node
            if n.op_type == "Mul" and n.output[0] in q_inputs and any(i in consts for i in n.input)]


def _engine_layer_names(trt, engine_path: Path) -> list[str]:
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    return [layer if isinstance(layer, str) else layer.get("Name", "") for layer in info.get("Layers", [])]


@pytest.mark.gpu
def test_channel_scaling_mul_fuses_into_the_engine(trt_gpu, tmp_path):
    """Not measured on the CPU machine (docs/ptq_transforms.md): the per-channel Mul that
    channel scaling puts before a QuantizeLinear should not be a layer of its own in the INT8
    engine; TensorRT should fuse it with the producer's pointwise epilogue or the Q. Every such
    Mul must appear inside a fused layer name (' + ' or a PWN(...) group), never alone."""
    from yoloq.quant.calibrate import calibrate
    from yoloq.quant.channel_scale import apply_channel_scaling
    from yoloq.quant.prepare import prepare

    model, _cfg, _real = _lite_s_model()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(4, 3, 320, 320, generator=gen) for _ in range(2)]
    qmodel = prepare(model)
    apply_channel_scaling(qmodel, model, batches, "all", alpha=0.8)
    calibrate(qmodel, batches, "max", progress=False)
    onnx_path = tmp_path / "scaled.onnx"
    export.export_onnx(qmodel, onnx_path, img_size=320, batch=1)
    muls = _scaling_muls(onnx.load(str(onnx_path)).graph)
    assert muls, "the export has no input-scaling Mul"
    engine = tmp_path / "scaled.engine"
    yt.build_engine(onnx_path, engine, precision="int8", max_batch=1)
    layers = _engine_layer_names(trt_gpu, engine)
    alone = [m for m in muls if any(name == m for name in layers)]
    missing = [m for m in muls if not any(m in name for name in layers)]
    assert not alone, f"{len(alone)} of {len(muls)} scaling Muls run as layers of their own, e.g. {alone[:3]}"
    assert len(missing) < len(muls), "no scaling Mul name found in the engine's layer information"
