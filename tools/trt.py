#!/usr/bin/env python
"""TensorRT engines of exported ONNX files: build, COCO evaluation, latency benchmark.

The same command as `yoloq trt`: see `python tools/trt.py --help` for its options.
"""
from yoloq.cli import run_tool

if __name__ == "__main__":
    run_tool("trt")
