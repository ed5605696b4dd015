#!/usr/bin/env python
"""Detections drawn on images, a folder or a video (FP32 weights, quant.pt, ONNX, TensorRT engine).

The same command as `yoloq infer`: see `python tools/infer.py --help` for its options.
"""
from yoloq.cli import run_tool

if __name__ == "__main__":
    run_tool("infer")
