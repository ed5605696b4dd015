"""TensorRT engines from exported ONNX: build, calibration baseline, run, benchmark, trtexec lines.

Three ways to get an INT8 engine out of yoloq, side by side:

* **explicit quantization** (the product): a Q/DQ ONNX from ``yoloq.runtime.onnx_export`` carries
  every scale (``build.build_engine``);
* **implicit calibration** (the baseline, upstream's "simple PTQ"): a plain FP32 ONNX plus
  TensorRT's entropy / minmax calibrator fed with yoloq's train images (``calibrator``);
* **FP16 / FP32** engines of the plain ONNX for comparison.

Modules: ``env`` (availability, version rules, ONNX inspection), ``trtexec`` (equivalent command
lines), ``calibrator``, ``build``, ``runner`` (predictor for ``yoloq.eval.evaluate``, latency
benchmark). ``tensorrt`` itself is imported only when a function needs it.
"""
from yoloq.runtime.tensorrt.build import BuildInfo, build_engine, build_mode, builder_flags
from yoloq.runtime.tensorrt.calibrator import (CALIBRATORS, CalibrationBatches, CalibrationFeeder,
                                               calibration_batches, calibrator_class, make_calibrator)
from yoloq.runtime.tensorrt.env import (DEFAULT_BATCHES, PRECISIONS, STRONGLY_TYPED_MAJOR, OnnxInfo, ShapeProfile,
                                        TrtBuildError, TrtUnavailable, autocast_command, implicit_calibration_removed,
                                        import_tensorrt, inspect_onnx, installed_trt_major, missing_requirement,
                                        normalize_precision, require_gpu, resolve_profile, trt_major)
from yoloq.runtime.tensorrt.runner import BenchResult, TrtPredictor, bench_to_dict, benchmark, format_bench_table
from yoloq.runtime.tensorrt.trtexec import trtexec_bench_command, trtexec_command, trtexec_hint, trtexec_or_reason

__all__ = ["BenchResult", "BuildInfo", "CALIBRATORS", "CalibrationBatches", "CalibrationFeeder", "DEFAULT_BATCHES",
           "OnnxInfo", "PRECISIONS", "STRONGLY_TYPED_MAJOR", "ShapeProfile", "TrtBuildError", "TrtPredictor",
           "TrtUnavailable", "autocast_command", "bench_to_dict", "benchmark", "build_engine", "build_mode",
           "builder_flags", "calibration_batches", "calibrator_class", "format_bench_table",
           "implicit_calibration_removed", "import_tensorrt", "inspect_onnx", "installed_trt_major",
           "make_calibrator", "missing_requirement", "normalize_precision", "require_gpu", "resolve_profile",
           "trt_major", "trtexec_bench_command", "trtexec_command", "trtexec_hint", "trtexec_or_reason"]


def __getattr__(name: str):
    # EntropyCalibrator / MinMaxCalibrator resolve lazily (PEP 562): importing never imports tensorrt
    if name in ("EntropyCalibrator", "MinMaxCalibrator"):
        from yoloq.runtime.tensorrt import calibrator
        return getattr(calibrator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
