#!/usr/bin/env python
"""Benchmark: the default PTQ run's cost per stage and its peak memory, extrapolated to COCO val2017.

The same command as `yoloq bench-cost`: see `python tools/bench_cost.py --help` for its options.
"""
from yoloq.cli import run_tool

if __name__ == "__main__":
    run_tool("bench-cost")
