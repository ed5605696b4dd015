#!/usr/bin/env python
"""Export a quantized checkpoint to ONNX (Q/DQ for TensorRT, onnxruntime fast path, FP32 / FP16).

The same command as `yoloq export`: see `python tools/export.py --help` for its options.
"""
from yoloq.cli import run_tool

if __name__ == "__main__":
    run_tool("export")
