#!/usr/bin/env python
"""Post-training INT8 quantization of a YOLOv6 model: calibrate on train images, evaluate FP32 and
INT8 on val, report the drop, per-layer sensitivity and diagnosis, save the quantized model.

    python tools/ptq.py --cfg configs/yolov6lite_s.yaml                       # calib from the config
    python tools/ptq.py --cfg configs/yolov6lite_s.yaml --calib mse --calib-images 256
    python tools/ptq.py --cfg configs/yolov6lite_s.yaml --sensitivity fast --skip-layers 3
    python tools/ptq.py --cfg configs/yolov6lite_s.yaml --max-drop 1.0        # smallest k with drop <= 1 point
    python tools/ptq.py --cfg configs/yolov6lite_s.yaml --max-images 50 --calib-images 32   # quick run

Output: <out>/<name>/ with report.md, report.json, stats.png, sensitivity.png, diagnosis.png and
quant.pt (for tools/qat.py / tools/export.py). Written to a temporary folder and renamed at the
end: a failed run leaves nothing behind. Same inputs and seed -> same numbers.

Calibration, --calib auto, the sensitivity ranking and the --max-drop search use train images only
(--max-drop measures mAP on labeled train images not used for calibration); val is only evaluated.
"""
from __future__ import annotations

import argparse
import sys
import warnings

# pytorch-quantization 2.1.3 calls torch.jit.script at import; torch 2.14 warns about it
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

from yoloq.config import ConfigError
from yoloq.quant.calibrate import AUTO_METHODS, CalibrationError
from yoloq.quant.ptq import CALIB_CHOICES, SENSITIVITY_CHOICES, PTQOptions, run_ptq
from yoloq.quant.sensitivity import MODES
from yoloq.report import format_summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, help="experiment config (configs/*.yaml)")
    g = p.add_argument_group("calibration (defaults: the config's quant section)")
    g.add_argument("--calib", choices=CALIB_CHOICES,
                   help="activation range method; auto picks the one closest to FP32 on calibration images")
    g.add_argument("--percentile", type=float, help="percentile for --calib percentile (e.g. 99.99)")
    g.add_argument("--calib-images", type=int, help="number of train images for calibration")
    g.add_argument("--seed", type=int, help="seed choosing the calibration images")
    g.add_argument("--auto-methods", nargs="+", default=list(AUTO_METHODS), metavar="METHOD",
                   help="candidates of --calib auto (default: %(default)s)")
    g.add_argument("--auto-images", type=int, default=32,
                   help="calibration images scoring the --calib auto candidates (default %(default)s)")
    g = p.add_argument_group("partial quantization / sensitivity")
    g.add_argument("--sensitivity", choices=SENSITIVITY_CHOICES, default="fast",
                   help="per-layer sensitivity: fast (output SQNR on calibration images) or map (fast + "
                        "confirm the top layers with mAP on labeled train images); default %(default)s")
    g.add_argument("--sensitivity-mode", choices=MODES, default="quantize-one",
                   help="quantize-one: only the layer quantized; skip-one: all but the layer (default %(default)s)")
    g.add_argument("--sensitivity-images", type=int, default=16,
                   help="calibration images scored by the fast metric, per layer (default %(default)s)")
    g.add_argument("--skip-layers", type=int, metavar="K", help="keep the K most sensitive layers in float")
    g.add_argument("--skip", nargs="+", default=(), metavar="LAYER", help="keep these layers in float (names)")
    g.add_argument("--max-drop", type=float, metavar="X",
                   help="keep the fewest most-sensitive layers in float so the AP drop on labeled train "
                        "images is <= X points")
    g.add_argument("--max-skip", type=int, metavar="N", help="--max-drop keeps at most N layers in float")
    g.add_argument("--select-images", type=int, default=128,
                   help="labeled train images measured by --max-drop / --sensitivity map (default %(default)s)")
    g.add_argument("--no-diagnose", action="store_true", help="skip the per-layer range / SQNR diagnosis")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--ann", choices=("val_ann", "val_ann_official"), help="ground truth (default eval.val_ann)")
    g.add_argument("--max-images", type=int, help="evaluate only the first N val images (quick runs)")
    g.add_argument("--batch-size", type=int, help="evaluation batch size")
    g.add_argument("--workers", type=int, help="data loader workers")
    g.add_argument("--name", help="run name (default <model>_<calib>)")
    g.add_argument("--out", default="runs/ptq", help="output root (default %(default)s)")
    g.add_argument("--no-save", action="store_true", help="do not write quant.pt")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--print-placement", action="store_true", help="print the quantizer placement table")
    g.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    opts = PTQOptions(calib=a.calib, percentile=a.percentile, calib_images=a.calib_images, seed=a.seed,
                      skip_layers=a.skip_layers, skip_names=tuple(a.skip), max_drop=a.max_drop, max_skip=a.max_skip,
                      sensitivity=a.sensitivity, sensitivity_mode=a.sensitivity_mode,
                      sensitivity_images=a.sensitivity_images, auto_images=a.auto_images,
                      auto_methods=tuple(a.auto_methods),
                      select_images=a.select_images,
                      diagnose=not a.no_diagnose, max_images=a.max_images, ann=a.ann, batch_size=a.batch_size,
                      workers=a.workers, name=a.name, out=a.out, save_model=not a.no_save, plots=not a.no_plots,
                      print_placement=a.print_placement, progress=not a.no_progress)
    result = run_ptq(a.cfg, opts)
    print(format_summary(result.report))
    print("time per stage (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))
    print(f"wrote {result.out_dir}/")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, CalibrationError, ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
