#!/usr/bin/env python
"""COCO mAP of a model's weights or of an ONNX file (upstream YOLOv6 protocol).

The same command as `yoloq eval`: see `python tools/eval.py --help` for its options.
"""
from yoloq.cli import run_tool

if __name__ == "__main__":
    run_tool("eval")
