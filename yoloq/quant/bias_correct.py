"""Empirical bias correction (Nagel et al. 2019, sequential variant) on calibration images.

Quantization shifts the mean of a conv's output: E[y_int8] - E[y_fp32] is rarely zero per channel
(rounding of the weights is biased per channel, clipping removes the tails of one sign more than
the other), and the shift adds up along the network. Bias correction measures it per output
channel on calibration images and subtracts it from the conv's bias, layer by layer in graph order,
so each layer is corrected for what the already-corrected layers before it deliver.

One forward pass does it in order: a forward hook on every quantized conv compares the mean of its
quantized output (whole image set as one batch) with the FP32 mean of the same conv (one earlier
pass with every quantizer off), moves the difference into the bias and passes the corrected output
on, so the next conv sees corrected inputs. The result is plain conv biases: checkpoints, QAT and
export carry it unchanged. Convs without a bias are left as they are (none in the fused YOLOv6 /
Lite models), as are float convs outside the placement (DFL).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from yoloq.quant.scheme import QUANTIZER_TYPES, TensorQuantizer
from yoloq.quant.state import quant_state


@contextmanager
def quantizers_off(model: nn.Module) -> Iterator[None]:
    """Every quantizer of ``model`` passes values through (the FP32 network) for the block."""
    saved = []
    for m in {id(m): m for m in model.modules() if isinstance(m, QUANTIZER_TYPES)}.values():
        if isinstance(m, TensorQuantizer):
            saved.append((m, "_disabled", m._disabled))
            m._disabled = True
        elif hasattr(m, "enabled"):
            saved.append((m, "enabled", m.enabled))
            m.enabled = False
    try:
        yield
    finally:
        for m, attr, value in saved:
            setattr(m, attr, value)


def _channel_mean(y: torch.Tensor) -> torch.Tensor:
    return y.detach().mean(dim=[d for d in range(y.dim()) if d != 1]).double()


def output_sum_hook(sums: dict, name: str):
    """Forward hook adding up a module's per-channel output mean times the batch size (divide by
    the number of images for the mean)."""
    def record(_m, _inputs, y):
        part = _channel_mean(y) * y.shape[0]
        sums[name] = part if name not in sums else sums[name] + part
    return record


@torch.no_grad()
def fp32_output_means(model: nn.Module, layers: list[str], images: torch.Tensor, chunk: int = 16) -> dict:
    """Per-channel mean output of each layer with every quantizer off (any model: a prepared one,
    or the FP32 network it was prepared from, whose conv outputs are the same)."""
    sums: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(output_sum_hook(sums, n)) for n in layers]
    try:
        with quantizers_off(model):
            for part in images.split(chunk):
                model(part)
    finally:
        for h in handles:
            h.remove()
    return {n: s / images.shape[0] for n, s in sums.items()}


@torch.no_grad()
def bias_correction(qmodel: nn.Module, images: torch.Tensor, reference: Optional[dict] = None) -> dict:
    """Correct the biases of every quantized conv of a calibrated ``qmodel`` in place from
    ``images`` ([N,3,H,W], calibration images). ``reference``: the FP32 per-channel output means
    of those layers on the same images when already known (``fp32_output_means``), else one FP32
    pass computes them. Returns a record: layers corrected, the mean |shift| per layer and overall."""
    layers = [n for n in quant_state(qmodel).placement.layers if qmodel.get_submodule(n).bias is not None]
    was_training = qmodel.training
    qmodel.eval()
    images = images.to(next(qmodel.parameters()).device)
    missing = [n for n in layers if reference is None or n not in reference]
    reference = {**(reference or {}), **(fp32_output_means(qmodel, missing, images) if missing else {})}
    shifts: dict[str, float] = {}

    def hook(name):
        def correct(module, _inputs, y):
            delta = (_channel_mean(y) - reference[name]).to(y.dtype)
            module.bias.sub_(delta)
            shifts[name] = float(delta.abs().mean())
            return y - delta.view(1, -1, *([1] * (y.dim() - 2)))
        return correct

    handles = [qmodel.get_submodule(n).register_forward_hook(hook(n)) for n in layers]
    try:
        qmodel(images)
    finally:
        for h in handles:
            h.remove()
        qmodel.train(was_training)
    return {"layers": len(shifts), "images": int(images.shape[0]),
            "mean_abs_shift": sum(shifts.values()) / max(1, len(shifts)),
            "largest": sorted(shifts.items(), key=lambda kv: -kv[1])[:10]}
