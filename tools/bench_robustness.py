#!/usr/bin/env python
"""Benchmark: how much the default PTQ result depends on its calibration images.

The same command as `yoloq bench-robustness`: see `python tools/bench_robustness.py --help` for its options.
"""
from yoloq.cli import run_tool

if __name__ == "__main__":
    run_tool("bench-robustness")
