#!/usr/bin/env python
"""Benchmark: onnxruntime CPU latency (and mAP) of the FP32 and INT8 export variants.

The same command as `yoloq bench-ort`: see `python tools/bench_ort.py --help` for its options.
"""
from yoloq.cli import run_tool

if __name__ == "__main__":
    run_tool("bench-ort")
