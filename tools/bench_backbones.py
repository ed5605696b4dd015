#!/usr/bin/env python
"""Benchmark: RepVGG vs QARepVGG vs RepOpt-VGG yolov6n under PTQ, trained with one recipe.

The same command as `yoloq bench-backbones`: see `python tools/bench_backbones.py --help` for its options.
"""
from yoloq.cli import run_tool

if __name__ == "__main__":
    run_tool("bench-backbones")
