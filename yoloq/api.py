"""The Python API for a model held in a notebook or a training script.

    import yoloq
    model = yoloq.load("yolov6lite_s")                      # FP32Model: a shipped config by name (its weights)
    model = yoloq.load("my_yolov6s.py", weights="best_ckpt.pt")   # an upstream config + checkpoint
    q = yoloq.ptq(model, data="coco_shared", method="auto", calib_images=256)   # QuantizedModel
    q.evaluate(max_images=100)                               # {"AP": ..., "AP50": ..., ...}
    q.export_onnx("model_int8.onnx")                         # Q/DQ for TensorRT
    q.save("quant.pt")                                       # what `yoloq qat --from` / `yoloq export` read
    q = yoloq.load_quantized("quant.pt")                     # QuantizedModel again
    q = yoloq.qat(q, data="coco_shared", epochs=1, images=64)

Everything here calls the same library functions as the ``yoloq`` command. ``device=`` takes the
names of ``--device`` (``auto``: cuda when available, ``cpu``, ``cuda``, ``cuda:N``; a model is
moved there); every stage then runs on it. Each function returns one type: ``load`` an :class:`FP32Model` (the fused ``nn.Module`` in ``.model`` with the experiment
config it came from in ``.config``), ``load_quantized`` / ``ptq`` / ``qat`` a
:class:`QuantizedModel`, ``evaluate`` a dict of COCO stats.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from yoloq.config import Config, DataConfig, QATConfig, QuantConfig, load_config
from yoloq.data import load_data_config
from yoloq.device import DeviceLike, resolve_device
from yoloq.errors import InputError


@dataclass
class FP32Model:
    """A fused FP32 detector (``model``, eval mode) with the experiment config it was loaded with."""
    model: nn.Module
    config: Config

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def evaluate(self, data: Optional[str | DataConfig] = None, max_images: Optional[int] = None,
                 progress: bool = False, device: DeviceLike = None) -> dict:
        """COCO stats (fractions) on the val images of ``data`` (default: the config's dataset)."""
        return evaluate(self, data, max_images=max_images, progress=progress, device=device)


@dataclass
class QuantizedModel:
    """A quantized detector with what it needs to be evaluated, exported, saved or trained further."""
    model: nn.Module                   # the fake-quantized model (QuantState in model.quant_state)
    config: Config                     # the experiment config it was made with
    data: Optional[DataConfig] = None  # its dataset (calibration was on its train images)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def evaluate(self, data: Optional[str | DataConfig] = None, max_images: Optional[int] = None,
                 progress: bool = False, device: DeviceLike = None) -> dict:
        """COCO stats (fractions) on the val images of ``data`` (default: the calibration dataset)."""
        return evaluate(self, data or self.data, max_images=max_images, progress=progress, device=device)

    def export_onnx(self, path: str | os.PathLike, **kwargs):
        """The Q/DQ ONNX TensorRT builds (``yoloq.runtime.onnx_export.export_onnx`` keywords)."""
        from yoloq.runtime.onnx_export import export_onnx
        kwargs.setdefault("img_size", self.config.model.img_size)
        return export_onnx(self.model, path, **kwargs)

    def save(self, path: str | os.PathLike, meta: Optional[dict] = None) -> Path:
        from yoloq.quant.checkpoint import save_quantized
        save_quantized(self.model, path, meta={"name": self.config.model.name, **(meta or {})})
        return Path(path)


AnyModel = Union[FP32Model, QuantizedModel, nn.Module]


def _config(cfg: str | os.PathLike | Config) -> Config:
    return cfg if isinstance(cfg, Config) else load_config(cfg)


def _data(data: Optional[str | os.PathLike | DataConfig], cfg: Config) -> DataConfig:
    if isinstance(data, DataConfig):
        return data
    source = data or cfg.data
    if not source:
        raise InputError(f"{cfg.path}: no dataset: pass data=... (a dataset YAML path or a shipped name)")
    return load_data_config(source)


def _unwrap(model: AnyModel) -> tuple[nn.Module, Config]:
    """The module and its experiment config (a bare module: the ``ModelConfig`` build_model set)."""
    if isinstance(model, (FP32Model, QuantizedModel)):
        return model.model, model.config
    if isinstance(getattr(model, "cfg", None), type(Config().model)):
        return model, Config(model=model.cfg)
    raise InputError(f"expected a model from yoloq.load / yoloq.load_quantized / yoloq.ptq (or an nn.Module built "
                     f"by yoloq.models.build_model), got {type(model).__name__}")


def load(source: str | os.PathLike | Config, weights: Optional[str | os.PathLike] = None,
         device: DeviceLike = "auto") -> FP32Model:
    """A config (path, shipped name, upstream ``.py``) -> its FP32 model, fused, with ``weights``
    (default: the config's), on ``device``. A quantized checkpoint is read by :func:`load_quantized`."""
    if not isinstance(source, Config) and Path(source).suffix == ".pt":
        raise InputError(f"{source}: a .pt file is a checkpoint, not a config: yoloq.load_quantized('{source}') reads "
                         f"a quant.pt; FP32 weights go with their config: yoloq.load(config, weights='{source}')")
    from yoloq.models import load_model
    cfg = _config(source)
    cfg = cfg.with_overrides(model={"weights": str(weights)}) if weights is not None else cfg
    target = resolve_device(device)
    return FP32Model(load_model(cfg.model, weights).to(target), cfg)


def load_quantized(path: str | os.PathLike, device: DeviceLike = "auto") -> QuantizedModel:
    """A quantized checkpoint (``quant.pt`` of ``yoloq ptq`` / ``yoloq qat`` / ``QuantizedModel.save``;
    written on any device) on ``device``."""
    from yoloq.quant.checkpoint import load_quantized as read
    qmodel, _meta = read(path, device=resolve_device(device))
    return QuantizedModel(qmodel, Config(model=qmodel.cfg, path=str(path)))


def _on(module: nn.Module, device: DeviceLike) -> nn.Module:
    """``module`` moved to ``device`` (None: where it is)."""
    return module if device is None else module.to(resolve_device(device))


def ptq(model: FP32Model | nn.Module, data: Optional[str | os.PathLike | DataConfig] = None, method: str = "auto",
        calib_images: int = 256, batch_size: int = 8, workers: int = 0, progress: bool = False,
        device: DeviceLike = None, **quant: object) -> QuantizedModel:
    """Calibrate ``model`` (an FP32 model from :func:`load`) on ``calib_images`` train images of
    ``data`` with ``method`` (max, percentile, entropy, mse, auto); other keywords are ``quant``
    config keys, flat (``equalize=True``, ``channel_scale="all"``, ``reconstruct="brecq"``, ...) or
    dotted (``**{"transforms.images": 32}``), applied as ``yoloq ptq`` applies them. Every stage
    runs on ``device`` (None: where the model is). Returns the :class:`QuantizedModel`."""
    from yoloq.recipes.common import load_calibration_set
    from yoloq.recipes.ptq import run_quantization
    module, cfg = _unwrap(model)
    module = _on(module, device)
    cfg = cfg.with_overrides(quant={"calib": method, "calib_images": calib_images, "batch_size": batch_size, **quant})
    data_cfg = _data(data, cfg)
    calib = load_calibration_set(data_cfg, calib_images, cfg.model.img_size, batch_size, workers, cfg.quant.seed)
    run = run_quantization(cfg, data_cfg, module, calib, progress=progress)     # the PTQ transforms too, as yoloq ptq
    return QuantizedModel(run.qmodel, cfg, data_cfg)


def evaluate(model: AnyModel, data: Optional[str | os.PathLike | DataConfig] = None, config: Optional[Config] = None,
             max_images: Optional[int] = None, progress: bool = False, device: DeviceLike = None) -> dict:
    """COCO stats (fractions) of any model on the val images of ``data`` (default: its config's),
    run on ``device`` (None: where the model is)."""
    from yoloq.eval.coco_eval import evaluate_model
    module, own = _unwrap(model)
    module = _on(module, device)
    cfg = config or own
    data_cfg = _data(data, cfg)
    eval_cfg = replace(cfg.eval, workers=0)
    return evaluate_model(module, data_cfg, eval_cfg, cfg.model.img_size, max_images=max_images,
                          progress=progress).stats


def qat(quantized: QuantizedModel, data: Optional[str | os.PathLike | DataConfig] = None,
        progress: bool = False, device: str = "cpu", **settings: object) -> QuantizedModel:
    """Quantization-aware training of a :class:`QuantizedModel` by distillation from its own FP32
    weights on train images of ``data`` (``loss="det+distill"``: labelled ones, the YOLOv6 loss added);
    keywords are ``qat`` config fields (quantizer, epochs, images, lr, ...). The same recipe as
    ``yoloq qat`` (``yoloq.recipes.qat.run.distill``), without a validation set or files; returns the
    trained model (frozen to the PTQ checkpoint format, as ``yoloq qat`` saves it)."""
    from yoloq.quant.swap import freeze_quantizers
    from yoloq.recipes.qat.run import distill
    from yoloq.report.run_log import library_log
    cfg = quantized.config.with_overrides(qat={"workers": 0, **settings})
    data_cfg = _data(data if data is not None else quantized.data, cfg)
    with library_log(None):                                # pytorch-quantization's "Overwriting amax" lines
        student = freeze_quantizers(quantized.model)      # a copy: the caller's model stays as it was
        result, _ = distill(cfg, data_cfg, student, device=device, progress=progress)
        student.load_state_dict(result.model_state)
        return QuantizedModel(freeze_quantizers(student.cpu().eval()), cfg, data_cfg)


__all__ = ["FP32Model", "QuantizedModel", "evaluate", "load", "load_quantized", "ptq", "qat", "QuantConfig",
           "QATConfig"]
