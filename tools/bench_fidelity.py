#!/usr/bin/env python
"""Benchmark: mAP of exported files (onnxruntime) against the fake-quant model.

The same command as `yoloq bench-fidelity`: see `python tools/bench_fidelity.py --help` for its options.
"""
from yoloq.cli import run_tool

if __name__ == "__main__":
    run_tool("bench-fidelity")
