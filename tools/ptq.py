#!/usr/bin/env python
"""Post-training INT8 quantization of a YOLOv6 model (calibrate, evaluate FP32 and INT8, report).

The same command as `yoloq ptq`: see `python tools/ptq.py --help` for its options.
"""
from yoloq.cli import run_tool

if __name__ == "__main__":
    run_tool("ptq")
