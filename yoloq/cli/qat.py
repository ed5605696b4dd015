"""Quantization-aware training of a PTQ result by distillation from its FP32 weights.

    yoloq qat --cfg yolov6lite_s --from runs/ptq/yolov6lite_s_auto --quantizer lsqplus
    yoloq qat --cfg yolov6lite_s --from runs/ptq/yolov6lite_s_auto --quantizer pact \\
        --epochs 2 --images 256 --max-images 100                     # quick run
    yoloq qat --cfg yolov6lite_s --weights my_fp32.pt      # FP32 weights: the config's PTQ first, then QAT
    yoloq qat ... --quantizer lsqplus --lsq-mode offset     # LSQ+ with a learned offset (zero point)
    yoloq qat ... --loss det+distill --augment              # + the YOLOv6 loss on labelled, augmented images
    yoloq qat ... --resume                                  # continue an interrupted run
    torchrun --nproc_per_node 2 tools/qat.py ...            # DistributedDataParallel (gloo / nccl)

Output: <out>/<name>/ with report.md, report.json (FP32 / PTQ / QAT side by side), curves.png,
curves.csv, quant.pt (same format as PTQ: export reads it), last.pt / best.pt (training state for
--resume), results.csv and tensorboard/. Training uses train images only (unlabelled for the
default distillation; labelled ones -- COCO JSON or YOLO .txt labels -- with --loss det+distill);
val is evaluated every epoch. A run that fails before its first epoch is saved leaves nothing
behind. Flags override the config's qat section.
"""
from __future__ import annotations

from typing import Optional, Sequence

from yoloq.cli.common import (CFG_HELP, add_threshold_arguments, init_distributed, non_negative_int, parser,
                              positive_int)
from yoloq.config import LSQMode, Optimizer, QATLoss, QATQuantizer, choices


def build_parser(prog: str = "yoloq qat"):
    p = parser(prog, __doc__)
    p.add_argument("--cfg", required=True, help=CFG_HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="from_dir", help="PTQ run folder runs/ptq/<name> (or its quant.pt)")
    src.add_argument("--weights", help="FP32 checkpoint: quantize it with the config's quant settings "
                                       "(calibration, transforms) first, then QAT, in one command")
    p.add_argument("--data", help="dataset YAML (default: data of the config)")
    p.add_argument("--quantizer", choices=choices(QATQuantizer), help="activation quantizer (default: qat.quantizer)")
    p.add_argument("--lsq-mode", choices=choices(LSQMode), help="LSQ+: symmetric (TensorRT) or offset (learned zero point)")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--images", type=positive_int, help="train images per epoch")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--lr", type=float, help="learning rate of the conv weights")
    p.add_argument("--quantizer-lr", type=float, help="learning rate of the quantizer parameters")
    p.add_argument("--weight-scale-lr", type=float, help="learning rate of LSQ weight scales")
    p.add_argument("--optimizer", choices=choices(Optimizer), help="default: the config's qat.optimizer (sgd)")
    p.add_argument("--loss", choices=choices(QATLoss),
                   help="distill (label-free, default) | det+distill (+ the YOLOv6 loss on labelled train images)")
    p.add_argument("--det-weight", type=float, help="weight of the detection loss with --loss det+distill")
    p.add_argument("--augment", action="store_true", default=None,
                   help="train on augmented views (the config's augment section) instead of letterboxed images")
    p.add_argument("--scales", help="RepOpt models: the hyper-search scales file (QAT uses the RepOptimizer)")
    p.add_argument("--workers", type=non_negative_int, help="DataLoader processes (default: qat.workers, this machine's cores - 1, "
                                               "at most 2)")
    p.add_argument("--max-images", type=positive_int, help="evaluate only the first N val images (quick runs)")
    add_threshold_arguments(p)
    p.add_argument("--name", help="run name (default <ptq name>_<quantizer>)")
    p.add_argument("--out", default="runs/qat", help="output root (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/<name>/last.pt")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def _print_summary(result) -> None:
    r = result.report
    pct = lambda s: f"{s['AP'] * 100:.2f}" if "AP" in s else "-"      # noqa: E731
    print(f"{r['name']}: FP32 AP {pct(r['fp32'])}  PTQ AP {pct(r['ptq'])}  QAT AP {pct(r['qat'])} "
          f"(best epoch {r['best_epoch']}, last {pct(r['qat_last'])})")
    from yoloq.report.common import drop_text
    cis = r.get("drop_ci") or {}
    if cis.get("qat"):
        ptq = f"; PTQ {drop_text(cis['ptq']['drop'], cis['ptq'])}" if cis.get("ptq") else ""
        print(f"AP drop vs FP32: QAT {drop_text(cis['qat']['drop'], cis['qat'])}{ptq} points")
    print("time per stage (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items()))
    print(f"wrote {result.out_dir}/")


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch.distributed as dist
    from yoloq.recipes.qat.run import QATOptions, run_qat
    a = build_parser().parse_args(argv)
    distributed = init_distributed(a.device)
    try:
        qat = dict(quantizer=a.quantizer, lsq_mode=a.lsq_mode, epochs=a.epochs, images=a.images,
                   batch_size=a.batch_size, lr=a.lr, quantizer_lr=a.quantizer_lr, weight_scale_lr=a.weight_scale_lr,
                   optimizer=a.optimizer, workers=a.workers, loss=a.loss, det_weight=a.det_weight, augment=a.augment,
                   scales=a.scales)
        opts = QATOptions(from_dir=a.from_dir or "", weights=a.weights, max_images=a.max_images, name=a.name, out=a.out, resume=a.resume,
                          device=a.device, progress=not a.no_progress, plots=not a.no_plots)
        result = run_qat(a.cfg, opts, qat=qat, data=a.data)
        if result.report:
            _print_summary(result)
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0
