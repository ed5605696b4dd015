"""Post-training INT8 quantization of a YOLOv6 model: calibrate on train images, evaluate FP32 and
INT8 on val, report the drop, per-layer sensitivity and diagnosis, save the quantized model.

    yoloq ptq --cfg yolov6lite_s                       # calib from the config
    yoloq ptq --cfg yolov6lite_s --calib mse --calib-images 256
    yoloq ptq --cfg yolov6lite_s --sensitivity fast --skip-layers 3
    yoloq ptq --cfg yolov6lite_s --max-drop 1.0        # fewest float layers with drop <= 1 point
    yoloq ptq --cfg yolov6lite_s --max-images 50 --calib-images 32   # quick run
    yoloq ptq --cfg yolov6lite_s --equalize on --channel-scale all --bias-correction on
    yoloq ptq --cfg yolov6lite_s --equalize auto --channel-scale auto --bias-correction auto

(``python tools/ptq.py ...`` is the same command; ``torchrun --nproc_per_node N tools/ptq.py ...``
shards the FP32 / INT8 evaluations over N processes, and rank 0 alone writes.) Output: <out>/<name>/ with report.md,
report.json, stats.png, sensitivity.png, diagnosis.png and quant.pt (for qat / export). Written to
a hidden staging folder and renamed at the end: a failed or interrupted run leaves nothing
behind. Same inputs and seed -> same numbers. Flags override the config's quant / eval sections.

Calibration, --calib auto, the sensitivity ranking and the --max-drop search use train images only
(--max-drop measures mAP on labeled train images not used for calibration); val is only evaluated.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Optional, Sequence

from yoloq.cli.common import CFG_HELP, add_threshold_arguments, non_negative_int, parser, positive_int
from yoloq.config import (AnnKey, CalibMethod, ChannelScale, Reconstruct, Sensitivity, SensitivityMode,
                          choices, load_config)

SWITCH = {"on": True, "off": False, "auto": "auto"}      # --equalize / --bias-correction / --se-float


def build_parser(prog: str = "yoloq ptq"):
    p = parser(prog, __doc__)
    p.add_argument("--cfg", required=True, help=CFG_HELP)
    p.add_argument("--weights", help="checkpoint to quantize (default: model.weights of the config); any form "
                                     "yoloq reads: upstream release pickles, plain or deploy-form state dicts")
    p.add_argument("--random-weights", action="store_true", help="smoke test with seeded random weights (meaningless mAP)")
    p.add_argument("--img-size", type=positive_int, help="input size (default: model.img_size; a multiple of 32)")
    p.add_argument("--data", help="dataset YAML (default: data of the config)")
    p.add_argument("--device", default="auto",
                   help="where every stage runs: auto (cuda when available), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--thread-invariant", action="store_true",
                   help="PyTorch's own conv kernels instead of oneDNN's: the same numbers with any thread count "
                        "(oneDNN's differ in the last bits, which fake quantization can amplify), 1.3-2x slower")
    _calibration_flags(p)
    _transform_flags(p)
    _reconstruction_flags(p)
    _partial_flags(p)
    _output_flags(p)
    return p


def _calibration_flags(p) -> None:
    g = p.add_argument_group("calibration (defaults: the config's quant section)")
    g.add_argument("--calib", choices=choices(CalibMethod),
                   help="activation range method; auto picks the one closest to FP32 on calibration images")
    g.add_argument("--percentile", type=float, help="percentile for --calib percentile (e.g. 99.99)")
    g.add_argument("--calib-images", type=positive_int, help="number of train images for calibration")
    g.add_argument("--seed", type=int, help="seed choosing the calibration images")
    g.add_argument("--auto-methods", nargs="+", metavar="METHOD", help="candidates of --calib auto")
    g.add_argument("--auto-images", type=positive_int, help="calibration images scoring the --calib auto candidates")


def alpha_or_auto(text: str):
    """``--channel-scale-alpha``: a number in [0, 1] or ``auto``."""
    problem = argparse.ArgumentTypeError(f"expected a number in [0, 1] or auto, got '{text}'")
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise problem from None
    if not 0.0 <= value <= 1.0:
        raise problem
    return value


def _transform_flags(p) -> None:
    g = p.add_argument_group("PTQ transforms (auto: chosen by detector-output SQNR on calibration images)")
    g.add_argument("--equalize", choices=tuple(SWITCH), help="exact cross-layer equalization")
    g.add_argument("--channel-scale", choices=choices(ChannelScale),
                   help="per-channel input scaling: of depthwise convs, of all convs, or auto")
    g.add_argument("--channel-scale-alpha", type=alpha_or_auto, metavar="A",
                   help="migration strength for dense convs in [0, 1], or auto: chosen among the candidates "
                        "on calibration images (config: null)")
    g.add_argument("--channel-scale-alphas", type=float, nargs="+", metavar="A",
                   help="candidates of the alpha choice")
    g.add_argument("--bias-correction", choices=tuple(SWITCH), help="after calibration, remove the mean shift weight rounding puts on each conv output")
    g.add_argument("--se-float", choices=tuple(SWITCH), help="keep the squeeze-excite convs in float")
    g.add_argument("--transform-images", type=positive_int,
                   help="calibration images for channel ranges, bias means and the auto scoring")


def _reconstruction_flags(p) -> None:
    g = p.add_argument_group("block reconstruction after calibration (docs/ptq_reconstruction.md)")
    g.add_argument("--reconstruct", choices=choices(Reconstruct),
                   help="adaround: per layer; brecq: per block; qdrop: per block with random activation-"
                        "quantization dropping (default: the config's quant.reconstruction.method, off)")
    g.add_argument("--recon-iters", type=positive_int, help="optimisation steps per block")
    g.add_argument("--recon-images", type=positive_int, help="calibration images used (default: all)")
    g.add_argument("--recon-batch-size", type=positive_int, help="images per optimisation step")
    g.add_argument("--recon-drop-prob", type=float, help="qdrop: probability an activation skips quantization")
    g.add_argument("--recon-lambda", type=float, help="weight of the AdaRound rounding regularizer")
    g.add_argument("--recon-device", metavar="DEVICE",
                   help="auto, cpu, cuda or cuda:N (default: the run's --device)")


def _partial_flags(p) -> None:
    g = p.add_argument_group("partial quantization / sensitivity")
    g.add_argument("--sensitivity", choices=choices(Sensitivity),
                   help="per-layer sensitivity: fast (output SQNR on calibration images) or map (fast + "
                        "confirm the top layers with mAP on labeled train images); config default: fast")
    g.add_argument("--sensitivity-mode", choices=choices(SensitivityMode),
                   help="quantize-one: only the layer quantized; skip-one: all but the layer")
    g.add_argument("--sensitivity-images", type=positive_int, help="calibration images scored per layer")
    g.add_argument("--skip-layers", type=non_negative_int, metavar="K", help="keep the K most sensitive layers in float")
    g.add_argument("--skip", nargs="+", default=(), metavar="LAYER", help="also keep these layers in float (names)")
    g.add_argument("--max-drop", type=float, metavar="X",
                   help="keep the fewest most-sensitive layers in float so the AP drop on labeled train "
                        "images is <= X points")
    g.add_argument("--max-skip", type=non_negative_int, metavar="N", help="--max-drop keeps at most N layers in float")
    g.add_argument("--select-images", type=positive_int,
                   help="labeled train images measured by --max-drop / --sensitivity map")
    g.add_argument("--no-diagnose", action="store_true", help="skip the per-layer range / SQNR diagnosis")


def _output_flags(p) -> None:
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--ann", choices=choices(AnnKey), help="ground truth (default eval.val_ann)")
    g.add_argument("--max-images", type=positive_int, help="evaluate only the first N val images (quick runs)")
    g.add_argument("--batch-size", type=positive_int, help="evaluation batch size")
    add_threshold_arguments(g)
    g.add_argument("--workers", type=non_negative_int, help="data loader workers")
    g.add_argument("--name", help="run name (default <model>_<calib>)")
    g.add_argument("--out", default="runs/ptq", help="output root (default %(default)s)")
    g.add_argument("--no-save", action="store_true", help="do not write quant.pt")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--print-placement", action="store_true", help="print the quantizer placement table")
    g.add_argument("--no-progress", action="store_true")


def quant_overrides(a, cfg) -> dict:
    """The ``quant`` keys the flags set (None: not given), by their names in the config."""
    return {"calibration.method": a.calib, "calibration.percentile": a.percentile,
            "calibration.images": a.calib_images, "seed": a.seed, "calibration.auto_methods": a.auto_methods,
            "calibration.auto_images": a.auto_images,
            "sensitivity.metric": a.sensitivity, "sensitivity.mode": a.sensitivity_mode,
            "sensitivity.images": a.sensitivity_images,
            "partial.max_drop": a.max_drop, "partial.max_skip": a.max_skip, "partial.select_images": a.select_images,
            "partial.skip_layers": list(cfg.quant.partial.skip_layers) + list(a.skip) if a.skip else None,
            "diagnose": False if a.no_diagnose else None,
            "transforms.equalize": SWITCH.get(a.equalize), "transforms.channel_scale": a.channel_scale,
            "transforms.channel_scale_alpha": None if a.channel_scale_alpha == "auto" else a.channel_scale_alpha,
            "transforms.channel_scale_alphas": a.channel_scale_alphas,
            "transforms.bias_correction": SWITCH.get(a.bias_correction), "transforms.se_float": SWITCH.get(a.se_float),
            "transforms.images": a.transform_images,
            "reconstruction.method": a.reconstruct, "reconstruction.iters": a.recon_iters,
            "reconstruction.images": a.recon_images, "reconstruction.batch_size": a.recon_batch_size,
            "reconstruction.drop_prob": a.recon_drop_prob, "reconstruction.reg_weight": a.recon_lambda,
            "reconstruction.device": a.recon_device}


def load_ptq_config(a):
    """The config of ``--cfg``; ``--channel-scale-alpha auto`` sets its alpha to null (the other
    flags are overrides applied by ``run_ptq``, where None means "not given")."""
    cfg = load_config(a.cfg)
    if a.channel_scale_alpha == "auto":
        transforms = dataclasses.replace(cfg.quant.transforms, channel_scale_alpha=None)
        cfg = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, transforms=transforms))
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    from yoloq.cli.common import init_distributed
    from yoloq.distributed import is_main_process
    from yoloq.recipes.ptq import PTQOptions, run_ptq
    from yoloq.report.ptq import format_summary
    a = build_parser().parse_args(argv)
    cfg = load_ptq_config(a)
    opts = PTQOptions(skip_count=a.skip_layers, random_weights=a.random_weights, max_images=a.max_images, name=a.name, out=a.out,
                      save_model=not a.no_save, plots=not a.no_plots, print_placement=a.print_placement,
                      progress=not a.no_progress, device=a.device, thread_invariant=a.thread_invariant)
    started = init_distributed(a.device)     # torchrun: evaluations sharded
    main_process = is_main_process()
    try:
        result = run_ptq(cfg, opts, quant=quant_overrides(a, cfg), model={"weights": a.weights, "img_size": a.img_size},
                         data=a.data, eval=dict(val_ann=a.ann, batch_size=a.batch_size, workers=a.workers))
    finally:
        if started:
            import torch.distributed as dist
            dist.destroy_process_group()
    if main_process:
        print(format_summary(result.report))
        print("time per stage (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))
        print(f"wrote {result.out_dir}/")
    return 0
