#!/usr/bin/env python
"""Benchmark: the channel-scaling α judged on labelled train images held out from calibration.

The same command as `yoloq bench-alpha`: see `python tools/bench_alpha.py --help` for its options.
"""
from yoloq.cli import run_tool

if __name__ == "__main__":
    run_tool("bench-alpha")
