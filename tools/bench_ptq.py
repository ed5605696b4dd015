#!/usr/bin/env python
"""Benchmark: yoloq PTQ against peer quantization toolkits on the same model and images.

The same command as `yoloq bench-ptq`: see `python tools/bench_ptq.py --help` for its options.
"""
from yoloq.cli import run_tool

if __name__ == "__main__":
    run_tool("bench-ptq")
