#!/usr/bin/env python
"""RepOpt step 2: extract the trained scales of a hyper-search model into a scales file.

The same command as `yoloq repopt-scales`: see `python tools/repopt_scales.py --help` for its options.
"""
from yoloq.cli import run_tool

if __name__ == "__main__":
    run_tool("repopt-scales")
