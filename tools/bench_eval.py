#!/usr/bin/env python
"""Benchmark: speed of the COCO evaluation pipeline.

The same command as `yoloq bench-eval`: see `python tools/bench_eval.py --help` for its options.
"""
from yoloq.cli import run_tool

if __name__ == "__main__":
    run_tool("bench-eval")
