#!/usr/bin/env python
"""Quantization-aware training of a PTQ result (PACT / LSQ+, distillation from the FP32 model).

The same command as `yoloq qat`: see `python tools/qat.py --help` for its options.
"""
from yoloq.cli import run_tool

if __name__ == "__main__":
    run_tool("qat")
