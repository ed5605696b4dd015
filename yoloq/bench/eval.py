"""Speed of the COCO evaluation pipeline on a few models: the logic of ``yoloq bench-eval``."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from yoloq.config import apply_settings, load_config
from yoloq.data import load_data_config
from yoloq.eval import evaluate_model
from yoloq.models import load_model

DEFAULT_MODELS = ["yolov6lite_s:320", "yolov6s_repvgg:640"]     # shipped configs by name




def build_for_bench(cfg):
    """The configured model with its weights, or fused random weights when it has none."""
    weights = cfg.model.weights
    if weights and Path(weights).is_file():
        return load_model(cfg.model), "yes"
    from yoloq.models import build_model
    torch.manual_seed(0)
    return build_model(cfg.model).fuse().eval(), "random"


def bench_one(entry: str, args) -> dict:
    cfg_path, _, size = entry.partition(":")
    cfg = apply_settings(load_config(cfg_path), getattr(args, "settings", ()))
    img_size = int(size) if size else cfg.model.img_size
    model, weights = build_for_bench(cfg)
    eval_cfg = dataclasses.replace(cfg.eval, batch_size=args.batch_size, workers=args.workers)
    result = evaluate_model(model.to(args.device), load_data_config(cfg.data), eval_cfg, img_size, ann_key=args.ann,
                            max_images=args.images, progress=False)
    return {"model": cfg.model.name, "img_size": img_size, "weights": weights, "images": result.n_images,
            "detections": len(result.detections), "seconds": result.seconds,
            "images_per_s": result.images_per_s, "AP": result.stats["AP"], **result.timing}


def run(args) -> int:
    """The benchmark for parsed command-line ``args`` (``yoloq bench-eval``)."""
    torch.set_num_threads(args.threads)
    rows = [bench_one(entry, args) for entry in args.models]
    print(f"device {args.device}, torch threads {args.threads}, batch {args.batch_size}, workers {args.workers}, "
          f"first {args.images} images of {args.ann}")
    print("| model | size | weights | images | detections | seconds | images/s | pre-process ms/img | "
          "inference ms/img | NMS ms/img | AP (subset) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ap = f"{r['AP'] * 100:.1f}" if r["weights"] == "yes" else "(random)"
        print(f"| {r['model']} | {r['img_size']} | {r['weights']} | {r['images']} | {r['detections']} | "
              f"{r['seconds']:.1f} | {r['images_per_s']:.1f} | {r['preprocess_ms']:.1f} | {r['inference_ms']:.1f} | "
              f"{r['nms_ms']:.1f} | {ap} |")
    return 0
