"""The trained models ``yoloq bench-backbones`` quantizes: one yolov6n per RepVGG-family backbone,
trained with one recipe (docs/training.md, "Functional proof: overfitting a few COCO train images"),
and the data YAML that evaluates each on the images it was evaluated on while training.

A run folder ``<runs>/<name>/`` is used as it is when it is finished (``best.pt``, and ``last.pt``
absent or at the recipe's last epoch); an interrupted one (``last.pt`` short of it) is resumed, a
missing one trained, all through ``yoloq.train.run_train``. RepOpt-VGG is three steps: the
hyper-search model ``hs`` (trained like the others), its scales (``hs/scales.pt``,
``yoloq.train.repopt``), and the target ``repopt`` trained with the RepOptimizer on those scales.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from yoloq.config import DataConfig, load_config
from yoloq.data import load_data_config
from yoloq.data.coco import list_images, read_annotation_images, read_coco_json
from yoloq.errors import InputError
from yoloq.io import atomic_write_text

MODEL = "yolov6n"                       # the shipped configs yolov6n_<backbone>.yaml
BACKBONES = ("repvgg", "qarepvgg", "repopt")
HYPER_SEARCH = "hs"                     # RepOpt step 1 (block: hyper_search); not quantized itself
EVAL_ANN = "train_subset.json"          # written by a run with eval_split: train


class BenchBackbonesError(InputError):
    """Bad input to ``yoloq bench-backbones``: the message names the run folder or file."""


@dataclass(frozen=True)
class OverfitRecipe:
    """docs/training.md's overfit setting: 150 epochs of batch 4 on the first 16 labelled train
    images at 256 px, evaluated on those images; every backbone gets exactly this."""
    epochs: int = 150
    batch_size: int = 4
    img_size: int = 256
    train_images: int = 16
    lr0: float = 0.02
    workers: int = 1
    eval_split: str = "train"           # evaluate on the training images (val: the dataset's val split)
    settings: tuple = ("train.nominal_batch_size=4", "train.warmup_min_steps=0", "train.eval_interval=10",
                       "train.ema_tau=200", "augment.mosaic=0", "augment.translate=0.05", "augment.scale=0.2")

    def to_dict(self) -> dict:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "img_size": self.img_size,
                "train_images": self.train_images, "lr0": self.lr0, "eval_split": self.eval_split,
                "settings": list(self.settings)}


@dataclass
class Runs:
    """Where the runs live and how missing ones are trained."""
    root: Path
    recipe: OverfitRecipe = field(default_factory=OverfitRecipe)
    data: Optional[str] = None          # dataset YAML of the training images (default: the config's)
    device: str = "auto"
    progress: bool = True
    allow_training: bool = True
    trained: list = field(default_factory=list)     # what this call trained or resumed, for the report


def config_name(backbone: str) -> str:
    return f"{MODEL}_{backbone}"


def run_state(run_dir: Path, epochs: int) -> str:
    """``done`` (use best.pt), ``resume`` (last.pt short of ``epochs``, or no best.pt beside it) or ``new``."""
    best, last = run_dir / "best.pt", run_dir / "last.pt"
    if last.is_file():
        from yoloq.safe_load import load_plain
        state = load_plain(last)
        finished = isinstance(state, dict) and int(state.get("epoch", 0)) >= epochs
        return "done" if finished and best.is_file() else "resume"
    return "done" if best.is_file() else "new"


def _train(runs: Runs, name: str, state: str, scales: Optional[Path] = None) -> None:
    from yoloq.train import TrainOptions, run_train
    if not runs.allow_training:
        raise BenchBackbonesError(f"{runs.root / name}: no finished run (best.pt) and --no-train was given; "
                                  f"train it (docs/training.md) or drop --no-train")
    r = runs.recipe
    print(f"{'resuming' if state == 'resume' else 'training'} {config_name(name)} -> {runs.root / name} "
          f"({r.epochs} epochs, {r.train_images} images, {r.img_size} px)", flush=True)
    run_train(config_name(name), TrainOptions(
        data=runs.data, epochs=r.epochs, batch_size=r.batch_size, img_size=r.img_size, workers=r.workers,
        lr0=r.lr0, train_images=r.train_images, eval_split=r.eval_split, scales=str(scales) if scales else None,
        settings=list(r.settings), name=name, out=str(runs.root), resume=state == "resume", device=runs.device,
        progress=runs.progress))
    runs.trained.append(name)


def _repopt_scales(runs: Runs) -> Path:
    """RepOpt steps 1-2: ``hs/scales.pt``, from the hyper-search run (trained first if needed)."""
    path = runs.root / HYPER_SEARCH / "scales.pt"
    if path.is_file():
        return path
    ensure_run(runs, HYPER_SEARCH)
    from yoloq.models.build import build_model
    from yoloq.train.repopt import extract_scales, save_scales
    from yoloq.weights import load_weights
    weights = runs.root / HYPER_SEARCH / "best.pt"
    model = build_model(load_config(config_name(HYPER_SEARCH)).model)
    load_weights(model, weights)
    save_scales(extract_scales(model, source=str(weights)), path)
    print(f"wrote {path} (RepOpt scales of {weights})", flush=True)
    return path


def ensure_run(runs: Runs, name: str) -> Path:
    """``<root>/<name>/best.pt`` of a finished run, training or resuming the run first if needed."""
    run_dir = runs.root / name
    state = run_state(run_dir, runs.recipe.epochs)
    if state != "done":
        _train(runs, name, state, scales=_repopt_scales(runs) if name == "repopt" else None)
    return run_dir / "best.pt"


def run_summary(run_dir: Path, recipe: OverfitRecipe) -> dict:
    """What the run's ``run.json`` says it was trained with, and where that differs from ``recipe``."""
    path = run_dir / "run.json"
    if not path.is_file():
        return {"run_json": None, "differs": ["no run.json: the training settings are unknown"]}
    saved = json.loads(path.read_text())
    train = saved.get("train", {})
    seen = {"epochs": train.get("epochs"), "batch_size": train.get("batch_size"), "img_size": saved.get("img_size"),
            "train_images": train.get("train_images"), "lr0": train.get("lr0"), "eval_split": train.get("eval_split")}
    wanted = recipe.to_dict()
    differs = [f"{k}: {v} (recipe {wanted[k]})" for k, v in seen.items() if v != wanted[k]]
    return {"run_json": str(path), "trained_with": seen, "images": saved.get("images"), "differs": differs}


# --------------------------------------------------------------------------- evaluation data


@dataclass
class EvalData:
    """A backbone's evaluation set (its training images) and the data YAML that points at it."""
    yaml_path: Path
    data_cfg: DataConfig
    ann_file: str
    image_ids: list
    files: list


def _train_split(base: DataConfig) -> list[str]:
    return list(base.train_files) if base.train_files is not None else list_images(base.train_images)


def write_eval_data_yaml(run_dir: Path, base: DataConfig, out: Path) -> EvalData:
    """A data YAML whose val split is the run's ``train_subset.json`` (images in the train folder)
    and whose train split -- what calibration draws from -- is every other train image, so that no
    evaluation image is ever a calibration image (``yoloq.data.coco`` also refuses any overlap)."""
    ann = run_dir / EVAL_ANN
    if not ann.is_file():
        raise BenchBackbonesError(f"{ann} not found: the run must have evaluated on its training images "
                                  f"(eval_split: train), which writes their ground truth there")
    images = read_annotation_images(ann, read_coco_json(ann))
    files = [e["file_name"] for e in images]
    if not files:
        raise BenchBackbonesError(f"{ann}: no images to evaluate on")
    held_out = set(files)
    folder = Path(base.train_images)
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise BenchBackbonesError(f"{ann}: {len(missing)} image(s) not in the train folder {folder}, e.g. {missing[0]} "
                                  f"(pass the dataset YAML the runs were trained on as --data)")
    calib = [f for f in _train_split(base) if f not in held_out]
    data = {"train_images": str(folder.resolve()), "train_files": calib,
            "val_images": str(folder.resolve()), "val_files": files, "val_ann": str(ann.resolve()),
            "nc": base.nc, "names": list(base.names)}
    if base.train_ann:
        data["train_ann"] = base.train_ann
    atomic_write_text(out, "# written by yoloq bench-backbones: evaluate on the run's training images, calibrate "
                           "on the other train images\n" + yaml.safe_dump(data, sort_keys=False))
    return EvalData(out, load_data_config(out), str(ann.resolve()), [e["id"] for e in images], files)


def val_eval_data(base: DataConfig) -> EvalData:
    """The dataset's own val split (runs trained on its train split and evaluated on val): the
    calibration pool is the train split, which yoloq's calibration keeps apart from val."""
    if not base.val_ann or not Path(base.val_ann).is_file():
        raise BenchBackbonesError(f"{base.path}: val_ann not found: {base.val_ann}")
    images = read_annotation_images(base.val_ann)
    return EvalData(Path(base.path), base, str(base.val_ann), [e["id"] for e in images],
                    [e["file_name"] for e in images])


def eval_data_for(runs: Runs, backbone: str, base: DataConfig, folder: Path) -> EvalData:
    """What ``backbone``'s run is evaluated on: its training images (the overfit recipe; a data YAML
    written into ``folder``) or, with ``eval_split: val``, the dataset's val split."""
    if runs.recipe.eval_split == "val":
        return val_eval_data(base)
    return write_eval_data_yaml(runs.root / backbone, base, folder / f"{backbone}.yaml")


def base_data(runs: Runs) -> DataConfig:
    """The dataset the runs were trained on (``--data``, else the shipped config's ``data``)."""
    path = runs.data or load_config(config_name(BACKBONES[0])).data
    if not path:
        raise BenchBackbonesError(f"{config_name(BACKBONES[0])}: no 'data' in the config; pass --data")
    base = load_data_config(path)
    if not base.train_images or not Path(base.train_images).is_dir():
        raise BenchBackbonesError(f"{base.path}: train_images folder not found: {base.train_images}")
    return base
