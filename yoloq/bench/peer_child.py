#!/usr/bin/env python
"""Quantize one FP32 ONNX with one peer PTQ library (NNCF, AMD Quark, AIMET, NVIDIA ModelOpt, onnxruntime).

Run as a plain file by the peer benchmark (``yoloq.bench.peers``), usually with the interpreter of
the peer's own virtual environment, so it needs only the peer library, numpy and onnx -- never
yoloq::

    python peer_child.py --peer nncf --model fp32.onnx --calib calib.npy --settings settings.json --out q.onnx

``--calib``: float32 array [N, 3, H, W] of preprocessed calibration images. ``--settings``: JSON
written by ``yoloq.bench.peers.peer_settings`` (the TensorRT-like settings: symmetric INT8,
per-channel weights, per-tensor activations, only Conv inputs quantized, the box decode excluded,
plus the variant's calibration method and algorithms). Writes ``--out`` (temp file + rename) and
``<out>.info.json`` (library versions and the settings the peer actually used). Exit code 0 on
success; on failure the traceback goes to stderr and the exit code is non-zero.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

PEER_PACKAGES = {"nncf": "nncf", "quark": "amd-quark", "aimet": "aimet-onnx", "ort": "onnxruntime",
                 "modelopt": "nvidia-modelopt"}


def calibration_feeds(calib: np.ndarray, input_name: str, batch_size: int) -> list[dict]:
    """The calibration images as onnxruntime feeds, ``batch_size`` images each."""
    return [{input_name: np.ascontiguousarray(calib[i:i + batch_size], dtype=np.float32)}
            for i in range(0, len(calib), batch_size)]


def _reader(feeds: list[dict]):
    """An onnxruntime ``CalibrationDataReader`` over ``feeds`` (Quark and onnxruntime take one)."""
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        def __init__(self):
            self.position = 0

        def get_next(self):
            if self.position >= len(feeds):
                return None
            self.position += 1
            return feeds[self.position - 1]

        def rewind(self):
            self.position = 0

    return FeedReader()


# --------------------------------------------------------------------------- onnxruntime


def quantize_ort(model_path: str, feeds: list[dict], settings: dict, out: str) -> dict:
    """onnxruntime ``quantize_static``: QDQ, Q/DQ only on Conv inputs and weights (conv outputs and
    biases left float; one dedicated Q/DQ pair per consumer so no other op reads a quantized tensor)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[settings["calibration"]]
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "DedicatedQDQPair": True,
             "OpTypesToExcludeOutputQuantization": settings["quantize_op_types"], "QuantizeBias": False,
             "CalibPercentile": settings.get("percentile", 99.999)}
    quantize_static(model_path, out, _reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                    op_types_to_quantize=settings["quantize_op_types"], nodes_to_exclude=settings["exclude_nodes"],
                    extra_options=extra)
    return {"calibrate_method": str(method), "extra_options": extra}


# --------------------------------------------------------------------------- NNCF


def quantize_nncf(model_path: str, feeds: list[dict], settings: dict, out: str) -> dict:
    """``nncf.quantize`` (ONNX backend): performance preset (symmetric), signed per-tensor activations,
    per-channel weights, fast bias correction on; every op type except Conv ignored, so only Conv
    inputs get quantizers; optional SmoothQuant on convs (NNCF runs it only for ModelType.TRANSFORMER)."""
    import nncf
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters, AdvancedSmoothQuantParameters,
                                                       QuantizationParameters)
    from nncf.common.quantization.structs import QuantizationScheme

    model = onnx.load(model_path)
    ignored_types = sorted({n.op_type for n in model.graph.node} - set(settings["quantize_op_types"]))
    alpha = settings.get("smoothquant_alpha")
    advanced = AdvancedQuantizationParameters(
        activations_quantization_params=QuantizationParameters(
            num_bits=8, mode=QuantizationScheme.SYMMETRIC, per_channel=False),
        weights_quantization_params=QuantizationParameters(
            num_bits=8, mode=QuantizationScheme.SYMMETRIC, per_channel=True),
        smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=alpha if alpha is not None else -1, matmul=-1))
    quantized = nncf.quantize(
        model, nncf.Dataset(feeds), preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(feeds),
        fast_bias_correction=settings.get("fast_bias_correction", True),
        model_type=nncf.ModelType.TRANSFORMER if alpha is not None else None,
        ignored_scope=nncf.IgnoredScope(names=settings["exclude_nodes"], types=ignored_types, validate=False),
        advanced_parameters=advanced)
    onnx.save(quantized, out)
    return {"preset": "PERFORMANCE", "ignored_types": ignored_types, "smoothquant_conv_alpha": alpha,
            "fast_bias_correction": settings.get("fast_bias_correction", True), "subset_size": len(feeds)}


# --------------------------------------------------------------------------- AMD Quark


def _quark_algorithms(settings: dict) -> list:
    from quark.onnx import AdaQuantConfig, AdaRoundConfig, BiasCorrectionConfig, CLEConfig

    iterations = settings.get("iterations", 1000)
    images = settings.get("adaround_images") or 1_000_000_000      # Quark's own default: every image
    makers = {"cle": lambda: CLEConfig(),
              "bias_correction": lambda: BiasCorrectionConfig(),
              "adaround": lambda: AdaRoundConfig(num_iterations=iterations, batch_size=1, learning_rate=0.1,
                                                 data_size=images),
              "adaquant": lambda: AdaQuantConfig(num_iterations=iterations, batch_size=1, learning_rate=1e-5,
                                                 data_size=images)}
    return [makers[name]() for name in settings.get("algorithms", [])]


def quantize_quark(model_path: str, feeds: list[dict], settings: dict, out: str) -> dict:
    """AMD Quark ONNX ``ModelQuantizer`` with a QConfig: Int8 symmetric float-scale activations
    (per tensor) and weights (per channel), Q/DQ only on Conv inputs and weights (outputs and biases
    float), decode nodes excluded, plus the variant's CLE / bias correction / AdaRound / AdaQuant."""
    from quark.onnx import CalibMethod, Int8Spec, ModelQuantizer, QConfig, QLayerConfig, QuantGranularity

    method = {"minmax": CalibMethod.MinMax, "percentile": CalibMethod.Percentile}[settings["calibration"]]
    layer = QLayerConfig(
        activation=Int8Spec(symmetric=True, calibration_method=method, quant_granularity=QuantGranularity.Tensor),
        weight=Int8Spec(symmetric=True, calibration_method=CalibMethod.MinMax,
                        quant_granularity=QuantGranularity.Channel))
    extra = {"OpTypesToQuantize": settings["quantize_op_types"],
             "OpTypesToExcludeOutputQuantization": settings["quantize_op_types"],
             "DedicatedQDQPair": True, "QuantizeBias": False, "Int32Bias": False,
             "CalibPercentile": settings.get("percentile", 99.999), "PrintSummary": False}
    config = QConfig(global_config=layer, exclude=list(settings["exclude_nodes"]),
                     algo_config=_quark_algorithms(settings), **extra)
    ModelQuantizer(config).quantize_model(model_path, out, calibration_data_reader=_reader(feeds))
    return {"calibration_method": str(method), "algorithms": settings.get("algorithms", []),
            "iterations": settings.get("iterations"), "adaround_images": settings.get("adaround_images"),
            "extra_options": extra}


# --------------------------------------------------------------------------- AIMET


AIMET_CONFIG = {
    # AIMET quantizes op outputs and refuses an op-type config that turns a producer's output off
    # while the consuming Conv turns its input on; so every output quantizer is created here and
    # the ones not read by a Conv are disabled on the sim (``_keep_conv_inputs_only``).
    "defaults": {"ops": {"is_output_quantized": "True", "is_symmetric": "True"},
                 "params": {"is_quantized": "True", "is_symmetric": "True"},
                 "strict_symmetric": "False", "unsigned_symmetric": "False", "per_channel_quantization": "True"},
    "params": {"bias": {"is_quantized": "False"}},
    "op_type": {}, "supergroups": [], "model_input": {"is_input_quantized": "True"}, "model_output": {},
}


def _keep_conv_inputs_only(sim, conv_inputs: set[str]) -> int:
    """Disable every activation quantizer whose tensor is not a Conv data input; returns how many stay."""
    kept = 0
    for name in sim.activation_names:
        quantizer = sim.qc_quantize_op_dict.get(name)
        if quantizer is None:
            continue
        quantizer.enabled = name in conv_inputs
        kept += quantizer.enabled
    return kept


def quantize_aimet(model_path: str, feeds: list[dict], settings: dict, out: str) -> dict:
    """aimet-onnx: optional CLE (``equalize_model``: BN fold, cross-layer scaling, high-bias fold),
    a QuantizationSimModel whose activation quantizers sit only on Conv inputs, optional AdaRound,
    then ``to_onnx_qdq`` with signed activations."""
    from aimet_onnx import QuantizationSimModel, apply_adaround
    from aimet_onnx.cross_layer_equalization import equalize_model

    model = onnx.load(model_path)
    algorithms = settings.get("algorithms", [])
    if "cle" in algorithms:
        equalize_model(model)
    conv_inputs = {n.input[0] for n in model.graph.node if n.op_type == "Conv"}
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "trt_like.json"
        config_path.write_text(json.dumps(AIMET_CONFIG))
        scheme = {"minmax": "min_max", "tf_enhanced": "tf_enhanced"}[settings["calibration"]]
        sim = QuantizationSimModel(model, param_type="int8", activation_type="int8", quant_scheme=scheme,
                                   config_file=str(config_path), dummy_input=feeds[0])
        kept = _keep_conv_inputs_only(sim, conv_inputs)
        if "adaround" in algorithms:
            subset = feeds[:settings["adaround_images"]] if settings.get("adaround_images") else feeds
            apply_adaround(sim, subset, num_iterations=settings.get("iterations", 1000))
        sim.compute_encodings(feeds)
        onnx.save(sim.to_onnx_qdq(force_activation_as="signed"), out)
    return {"quant_scheme": scheme, "algorithms": algorithms, "iterations": settings.get("iterations"),
            "adaround_images": settings.get("adaround_images"),
            "config": AIMET_CONFIG, "activation_quantizers_kept": kept}


# --------------------------------------------------------------------------- NVIDIA ModelOpt


def exact_name_patterns(names) -> list[str]:
    """Node names as patterns that match only themselves: ModelOpt reads ``nodes_to_exclude`` as
    regular expressions with ``re.match`` (a prefix match), and ONNX names hold '.' and '/'."""
    import re
    return [re.escape(name) + "$" for name in names]


def quantize_modelopt(model_path: str, calib: np.ndarray, settings: dict, out: str) -> dict:
    """``modelopt.onnx.quantization.quantize`` in INT8 mode, calibrated with onnxruntime's CPU
    provider, the model kept in float32 around the Q/DQ. Its own TensorRT rules decide the rest:
    symmetric int8, per-channel conv weights, no output quantizers, its conv size filter and, with
    ``quantize_op_types`` None, its default op set and fusion-pattern placement (Add, pools, ... too)."""
    from modelopt.onnx.quantization import quantize

    options = {"quantize_mode": "int8", "calibration_method": settings["calibration"],
               "calibration_eps": ["cpu"], "high_precision_dtype": "fp32",
               "op_types_to_quantize": settings["quantize_op_types"],
               "nodes_to_exclude": exact_name_patterns(settings["exclude_nodes"]),
               "calibrate_per_node": settings.get("calibrate_per_node", False), "log_level": "WARNING"}
    # ModelOpt cuts calibration_data [N,3,H,W] into steps of calibration_shapes' batch (its default
    # for a dynamic batch dim: 1); entropy merges one histogram per step, so the step size matters
    batch = max(1, min(int(settings.get("batch_size", 1)), len(calib)))
    options["calibration_shapes"] = f"{settings['input_name']}:" + "x".join(map(str, (batch, *calib.shape[1:])))
    quantize(model_path, calibration_data=np.ascontiguousarray(calib, dtype=np.float32), output_path=out, **options)
    return {**options, "nodes_to_exclude": f"{len(options['nodes_to_exclude'])} decode nodes (exact names)"}


QUANTIZERS = {"ort": quantize_ort, "nncf": quantize_nncf, "quark": quantize_quark, "aimet": quantize_aimet,
              "modelopt": quantize_modelopt}
# quantizers that take the calibration array itself instead of onnxruntime feeds
ARRAY_QUANTIZERS = frozenset({"modelopt"})


def versions(peer: str) -> dict:
    found = {}
    for package in (PEER_PACKAGES[peer], "onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "torch"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def run(peer: str, model: str, calib_path: str, settings: dict, out: str) -> dict:
    """Quantize ``model`` into ``out`` (atomically) and return what was used."""
    calib = np.load(calib_path, mmap_mode="r")
    if calib.ndim != 4:
        raise ValueError(f"{calib_path}: expected calibration images [N,3,H,W], got shape {calib.shape}")
    feeds = calibration_feeds(calib, settings["input_name"], settings.get("batch_size", 1))
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp.onnx")
    start = time.perf_counter()
    used = QUANTIZERS[peer](model, calib if peer in ARRAY_QUANTIZERS else feeds, settings, str(tmp))
    seconds = time.perf_counter() - start
    onnx.checker.check_model(str(tmp))
    os.replace(tmp, out_path)
    return {"peer": peer, "versions": versions(peer), "seconds": seconds, "used": used,
            "calibration_images": int(len(calib))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", required=True, choices=sorted(QUANTIZERS))
    p.add_argument("--model", required=True, help="FP32 ONNX")
    p.add_argument("--calib", required=True, help=".npy float32 [N,3,H,W]")
    p.add_argument("--settings", required=True, help="JSON file")
    p.add_argument("--out", required=True, help="quantized ONNX to write")
    args = p.parse_args(argv)
    settings = json.loads(Path(args.settings).read_text())
    info = run(args.peer, args.model, args.calib, settings, args.out)
    info_path = Path(args.out + ".info.json")
    info_path.write_text(json.dumps(info, indent=1, default=str))
    print(json.dumps({"ok": True, "seconds": info["seconds"], "versions": info["versions"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
