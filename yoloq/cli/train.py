"""Train a YOLOv6 detector (RepVGG / QARepVGG / RepOpt) on labelled data (COCO JSON or YOLO .txt labels).

    yoloq train --cfg yolov6n_qarepvgg --epochs 300
    yoloq train --cfg yolov6n_repvgg --data coco_shared --batch-size 32
    yoloq train --cfg yolov6n_repvgg --data my_yolo_data.yaml   # upstream YOLO data YAML (.txt labels)
    yoloq train --cfg yolov6n_hs --epochs 100               # RepOpt step 1: hyper-search
    yoloq repopt-scales --cfg yolov6n_hs \\
        --weights runs/train/yolov6n_hs/best.pt --out runs/train/yolov6n_hs/scales.pt   # step 2
    yoloq train --cfg yolov6n_repopt \\
        --scales runs/train/yolov6n_hs/scales.pt                                 # step 3: RepOptimizer
    yoloq train ... --resume                                            # continue runs/train/<name>
    yoloq train ... --set train.weight_decay_mode=custom_l2 augment.mosaic=0   # any config key
    torchrun --nproc_per_node 2 tools/train.py --cfg ...                          # DDP (nccl / gloo)

Writes runs/train/<name>/: best.pt (EMA weights, plain checkpoint: yoloq eval --weights,
model.weights / --weights for yoloq ptq), last.pt (training state for --resume), results.csv,
tensorboard/, run.json. A run that fails before its first epoch is saved leaves no folder behind; a
non-finite loss, weights or EMA stop the run with the reason (exit 2). See docs/training.md.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from yoloq.cli.common import CFG_HELP, init_distributed, non_negative_int, parser, positive_int
from yoloq.config import EvalSplit, choices


def build_parser(prog: str = "yoloq train"):
    p = parser(prog, __doc__)
    p.add_argument("--cfg", required=True, help=CFG_HELP)
    p.add_argument("--data", help="dataset YAML (default: the config's data)")
    p.add_argument("--weights", help="start from these weights (default: model.weights, else from scratch)")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--batch-size", type=positive_int, help="images per process and step")
    p.add_argument("--img-size", type=positive_int, help="square training / evaluation size (default: model.img_size)")
    p.add_argument("--lr0", type=float)
    p.add_argument("--workers", type=non_negative_int, help="DataLoader processes (default: train.workers, this machine's cores "
                                                           "- 1, at most 4)")
    p.add_argument("--train-images", type=positive_int, help="train on the first N labelled train images only")
    p.add_argument("--eval-split", choices=choices(EvalSplit),
                   help="evaluate on val (default) or on the training images themselves (overfit check)")
    p.add_argument("--max-eval-images", type=positive_int, help="evaluate only the first N images (quick runs)")
    p.add_argument("--scales", help="RepOpt target: scales file of the hyper-search model")
    p.add_argument("--name", help="run name (default: the model's name)")
    p.add_argument("--out", default="runs/train", help="output root (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue <out>/<name>/last.pt")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from yoloq.train import TrainOptions, run_train
    a = build_parser().parse_args(argv)
    distributed = init_distributed(a.device)
    try:
        result = run_train(a.cfg, TrainOptions(
            data=a.data, weights=a.weights, epochs=a.epochs, batch_size=a.batch_size, img_size=a.img_size,
            workers=a.workers, lr0=a.lr0, train_images=a.train_images, eval_split=a.eval_split, scales=a.scales,
            max_eval_images=a.max_eval_images, settings=a.settings, name=a.name, out=a.out, resume=a.resume,
            device=a.device, progress=not a.no_progress))
        if int(os.environ.get("RANK", "0")) == 0:
            last = result.history[-1] if result.history else {}
            aps = [(r["epoch"], r["AP"]) for r in result.history if "AP" in r]
            best = max(aps, key=lambda e: e[1]) if aps else None
            ap = f"AP {last['AP'] * 100:.2f} at epoch {last['epoch']}" if "AP" in last else "no evaluation"
            print(f"{result.name}: {ap}" + (f", best {best[1] * 100:.2f} at epoch {best[0]}" if best else ""))
            print(f"wrote {result.out_dir}/")
    finally:
        if distributed:
            import torch.distributed as dist
            dist.destroy_process_group()
    return 0
