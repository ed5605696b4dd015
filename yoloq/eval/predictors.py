"""Predictors for :func:`yoloq.eval.evaluate` that are not PyTorch modules."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch


class OnnxPredictor:
    """Runs an ONNX detector with onnxruntime (CPU): ``[B,3,S,S] -> ndarray [B,N,4+nc]``.

    A model exported with a fixed batch size of 1 is run image by image. ``img_size`` is the
    model's fixed input size, or None when its spatial dimensions are dynamic.
    """

    def __init__(self, path: str | Path, threads: Optional[int] = None):
        import onnxruntime as ort

        self.path = str(path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{self.path}: expected one image input, found {[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        shape = inputs[0].shape
        if len(shape) != 4:
            raise ValueError(f"{self.path}: input '{self.input_name}' has shape {shape}; expected [B,3,H,W]")
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.img_size = shape[2] if isinstance(shape[2], int) and shape[2] == shape[3] else None
        self.output_name = self.session.get_outputs()[0].name
        self.one_by_one = False          # set when a "dynamic" batch turns out to work only as 1

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = images.detach().cpu().numpy().astype(np.float32, copy=False)
        if self.img_size is not None and x.shape[2:] != (self.img_size, self.img_size):
            raise ValueError(f"{self.path}: model input is {self.img_size}x{self.img_size}, "
                             f"got images of {x.shape[2]}x{x.shape[3]} (set --img-size {self.img_size})")
        if self.fixed_batch == x.shape[0] or (self.fixed_batch is None and not self.one_by_one):
            try:
                return self._run(x)
            except Exception as err:  # noqa: BLE001 - onnxruntime raises its own Fail/RuntimeException types
                if self.fixed_batch is not None or x.shape[0] == 1:
                    raise
                # Batch declared dynamic, but a shape was baked in at export (e.g. a Reshape with batch 1).
                warnings.warn(f"{self.path}: batch {x.shape[0]} failed ({str(err).splitlines()[0][:200]}); "
                              "running image by image", stacklevel=2)
                self.one_by_one = True
        elif self.fixed_batch not in (None, 1):
            raise ValueError(f"{self.path}: model has a fixed batch of {self.fixed_batch}; "
                             f"use batch size {self.fixed_batch} or 1")
        return np.concatenate([self._run(x[i:i + 1]) for i in range(x.shape[0])], 0)


def load_eval_model(model_cfg, weights: Optional[str] = None) -> torch.nn.Module:
    """Build the model of ``model_cfg``, load ``weights`` (default ``model_cfg.weights``) and fuse it
    to deploy form for speed (fusion is exact up to float rounding). Returns it in eval mode."""
    from ..checkpoint import load_weights
    from ..models import build_model

    weights = weights or model_cfg.weights
    if not weights:
        raise ValueError(f"model '{model_cfg.name}': no weights given (set model.weights or pass --weights)")
    model = build_model(model_cfg)
    load_weights(model, weights)
    return model.fuse().eval()
