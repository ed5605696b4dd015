"""Bias correction of the weight-rounding error (Nagel et al. 2019), measured on calibration images.

Rounding a conv's weights to INT8 shifts the mean of its output: E[(W_q - W) x] is rarely zero per
output channel. Bias correction measures that shift on calibration images, with x the conv's own
quantized input as the quantized model delivers it, and subtracts it from the conv's bias, layer
by layer in graph order (one forward pass: a hook corrects each conv's bias and output, so the next
conv sees corrected inputs). The result is plain conv biases: checkpoints, QAT and export carry it
unchanged. Each shift is also recorded in the model's ``QuantState.bias_shifts``, so a layer later
kept in float (sensitivity, ``--max-drop``, diagnosis) gets its original bias back: without that a
model with every layer in float is not FP32 again (measured on Lite-M: docs/results.md).

Only the *weight* error is corrected, on purpose. Correcting the whole output shift
E[y_int8] - E[y_fp32] (the "empirical" variant) also moves the clipping error of the input
quantizer into the bias; that error sits on the few large activations (the objects), while a bias
shifts every position (the background): on Lite-S the whole-shift variant cost several AP points
where the weight-only correction gained (docs/results.md, PTQ section).

Convs without a bias are left as they are (none in the fused YOLOv6 / Lite models), as are float
convs outside the placement (DFL) and skipped layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from yoloq.quant import backend
from yoloq.quant.backend import input_quantizer, weight_quantizer
from yoloq.quant.batches import hooks_attached
from yoloq.quant.channel_scale import scaled_input
from yoloq.quant.scheme import QMAX
from yoloq.quant.state import quant_state


def quantized_input(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``conv`` convolves: its input, divided by its per-channel input scale when it has one
    (``yoloq.quant.channel_scale``), through its input quantizer."""
    return input_quantizer(conv)(scaled_input(conv, x))


def weight_rounding_shift(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-output-channel mean of (W_q - W) * x_q over images and positions, float64.

    By linearity it is sum over taps of E[o, c, i, j] * (mean of the input values tap (i, j) reads),
    so no conv is run. x_q is quantized: each value is k * step with an integer k, so the tap sums
    are exact integer sums (int64), the same whatever the order or the number of threads adding
    them up; only the final dot product over taps is float64."""
    error = (weight_quantizer(conv)(conv.weight) - conv.weight).double()
    taps = _tap_means(conv, quantized_input(conv, x))
    if taps is None:                                  # no integer grid to count on: float64 conv
        xq = quantized_input(conv, x).double()
        y = F.conv2d(xq, error, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        return y.mean(dim=(0, 2, 3))
    groups, out_ch = conv.groups, error.shape[0]
    e = error.reshape(groups, out_ch // groups, -1)                     # [g, O/g, C/g * kh * kw]
    t = taps.reshape(groups, 1, -1)                                     # [g, 1, C/g * kh * kw]
    return (e * t).sum(-1).reshape(out_ch)


def _tap_means(conv: nn.Module, xq: torch.Tensor):
    """[C, kh, kw]: mean over images and output positions of the input value each kernel tap
    multiplies (zero padding included), from exact integer sums of the quantization levels; None
    when the input is not on a quantizer's grid or the padding is not plain zeros."""
    q = input_quantizer(conv)
    amax = backend.get_amax(q) if isinstance(q, backend.TensorQuantizer) and backend.is_enabled(q) else None
    if amax is None or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    scale = QMAX / amax.float()                                         # the fake quantizer's own factor
    levels = torch.round(xq * scale).to(torch.int32)
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    padded = F.pad(levels, (pw, pw, ph, ph))
    ho = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    sums = torch.stack([torch.stack([
        padded[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
        .sum(dim=(0, 2, 3), dtype=torch.int64) for j in range(kw)], -1) for i in range(kh)], -2)
    count = levels.shape[0] * ho * wo
    return sums.double() / count / scale.double()


def _layers(qmodel: nn.Module) -> list[str]:
    state = quant_state(qmodel)
    skip = set(state.skip_layers)
    return [n for n in state.placement.layers if n not in skip and qmodel.get_submodule(n).bias is not None]


@torch.no_grad()
def bias_correction(qmodel: nn.Module, images: torch.Tensor) -> dict:
    """Correct the biases of every quantized conv of a calibrated ``qmodel`` in place from
    ``images`` ([N,3,H,W], calibration images, one batch). Returns a record: layers corrected,
    images, the mean |shift| overall and the ten largest per layer."""
    layers = _layers(qmodel)
    recorded = quant_state(qmodel).bias_shifts
    shifts: dict[str, float] = {}

    def hook(name):
        def correct(module, inputs, y):
            delta = weight_rounding_shift(module, inputs[0]).to(y.dtype)
            module.bias.sub_(delta)
            recorded[name] = recorded.get(name, 0) + delta.detach().cpu()
            shifts[name] = float(delta.abs().mean())
            return y - delta.view(1, -1, *([1] * (y.dim() - 2)))
        return correct

    handles = [qmodel.get_submodule(n).register_forward_hook(hook(n)) for n in layers]
    with hooks_attached(qmodel, handles) as device:
        qmodel(images.to(device))
    return {"layers": len(shifts), "images": int(images.shape[0]),
            "mean_abs_shift": sum(shifts.values()) / max(1, len(shifts)),
            "largest": sorted(shifts.items(), key=lambda kv: -kv[1])[:10]}
