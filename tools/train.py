#!/usr/bin/env python
"""Train a YOLOv6 detector (RepVGG / QARepVGG / RepOpt) on labelled COCO-JSON or YOLO-format data.

The same command as `yoloq train`: see `python tools/train.py --help` for its options.
"""
from yoloq.cli import run_tool

if __name__ == "__main__":
    run_tool("train")
