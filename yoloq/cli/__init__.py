"""The ``yoloq`` command: one sub-command per tool, the same flags as ``tools/*.py``.

    yoloq ptq --cfg yolov6lite_s           # post-training quantization (calibrate, evaluate, report)
    yoloq qat --cfg ... --from runs/ptq/<name>  # quantization-aware training
    yoloq export --ckpt .../quant.pt --out m.onnx
    yoloq eval --cfg ... [--onnx m.onnx]
    yoloq infer --cfg ... --source images/      # detections drawn on images or a video
    yoloq trt build|eval|bench ...
    yoloq train --cfg yolov6n_qarepvgg     # training (yoloq.train), RepOpt: yoloq repopt-scales
    yoloq bench-ptq | bench-ort | bench-fidelity | bench-eval | bench-cost | bench-backbones | bench-robustness | bench-alpha
    yoloq --version

User errors print one line and exit with code 2; see ``yoloq.cli.common``.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

from yoloq.cli.common import run_command

COMMANDS = {
    "ptq": ("yoloq.cli.ptq", "post-training INT8 quantization: calibrate, evaluate FP32 and INT8, report"),
    "qat": ("yoloq.cli.qat", "quantization-aware training of a PTQ result (PACT / LSQ+, distillation)"),
    "export": ("yoloq.cli.export", "ONNX with Q/DQ for TensorRT (or the onnxruntime fast path, FP32, FP16)"),
    "eval": ("yoloq.cli.eval", "COCO mAP of weights, a quant.pt or an ONNX file (AP per class, PR curves, timing)"),
    "infer": ("yoloq.cli.infer", "detections drawn on images, a folder or a video (weights, quant.pt, ONNX, engine)"),
    "trt": ("yoloq.cli.trt", "TensorRT engines: build, COCO evaluation, latency"),
    "train": ("yoloq.cli.train", "train a YOLOv6 detector (RepVGG / QARepVGG / RepOpt) on labelled data"),
    "repopt-scales": ("yoloq.cli.repopt_scales", "RepOpt: the scales file of a trained hyper-search model"),
    "bench-ptq": ("yoloq.cli.bench_ptq", "benchmark: yoloq PTQ vs peer quantization toolkits"),
    "bench-ort": ("yoloq.cli.bench_ort", "benchmark: onnxruntime CPU latency of the INT8 variants"),
    "bench-fidelity": ("yoloq.cli.bench_fidelity", "benchmark: deployed (onnxruntime) vs fake-quant mAP"),
    "bench-eval": ("yoloq.cli.bench_eval", "benchmark: evaluation pipeline speed"),
    "bench-cost": ("yoloq.cli.bench_cost", "benchmark: the default PTQ run's cost per stage, extrapolated to COCO val2017"),
    "bench-backbones": ("yoloq.cli.bench_backbones", "benchmark: RepVGG vs QARepVGG vs RepOpt yolov6n under PTQ (one recipe)"),
    "bench-robustness": ("yoloq.cli.bench_robustness", "benchmark: the default PTQ drop and α choice per calibration set"),
    "bench-alpha": ("yoloq.cli.bench_alpha", "benchmark: the channel-scaling α judged on train images held out from calibration"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: yoloq <command> [options]   (yoloq <command> --help for its options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines + ["", "  --version  print the version"])


def command_main(name: str):
    """The ``main(argv)`` of one command."""
    return importlib.import_module(COMMANDS[name][0]).main


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``yoloq <command> ...``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from yoloq import __version__
        print(f"yoloq {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        import difflib
        hint = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        print(f"error: unknown command '{argv[0]}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
              + f"; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_command(lambda args: command_main(argv[0])(args), argv[1:])


def run_tool(name: str) -> None:
    """Entry point of ``tools/<name>.py``: the same command, then exit with its code."""
    sys.exit(run_command(command_main(name), sys.argv[1:]))


def console() -> None:
    """The ``yoloq`` console script."""
    sys.exit(main())
