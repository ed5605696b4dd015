"""Stopping QAT that diverges, with the step, the part that went bad and what to change.

The engine's rules (:mod:`yoloq.train.guard`: every loss part finite, every parameter finite after
an update) with QAT's diagnosis and three more: the total loss not grown past ``max_loss_growth`` x
its value over the first steps; every learned quantizer scale sane (``learnable.check_quantizers``);
after every evaluation, the val mAP not collapsed below ``collapse_ratio`` x the PTQ model's. A run
that trips any check raises ``QuantizerDivergenceError`` before anything of that step or epoch is
written, so no diverged model is ever saved as a finished checkpoint.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from yoloq.config import QATConfig
from yoloq.quant.learnable import QuantizerDivergenceError, check_quantizers
from yoloq.quant.state import named_quantizers
from yoloq.train.guard import Guard, first_nonfinite_parameter

REFERENCE_STEPS = 5          # the loss reference is the mean of the first steps' losses
LR_HINT = "lower --lr / --quantizer-lr (qat.lr, qat.quantizer_lr)"


@torch.no_grad()
def first_nonfinite_quantizer(model: nn.Module, images: torch.Tensor) -> Optional[str]:
    """Run ``images`` once and return the first quantizer (model order) whose output is NaN/inf."""
    found: list[str] = []
    handles = []
    for name, q in named_quantizers(model).items():
        def hook(module, args, out, name=name):
            if not found and not torch.isfinite(out).all():
                found.append(name)
        handles.append(q.register_forward_hook(hook))
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


class DivergenceGuard(Guard):
    """The checks above, for one training run."""
    hint = LR_HINT

    def __init__(self, qcfg: QATConfig):
        self.qcfg = qcfg
        self.first_losses: list[float] = []

    def check_loss(self, loss: torch.Tensor, parts: dict, where: str) -> None:
        value = float(loss.detach())
        if len(self.first_losses) < REFERENCE_STEPS:
            self.first_losses.append(value)
            return
        reference = sum(self.first_losses) / len(self.first_losses)
        if reference > 0 and value > self.qcfg.max_loss_growth * reference:
            text = ", ".join(f"{k} {float(v):.4g}" for k, v in parts.items() if k != "loss")
            raise QuantizerDivergenceError(
                f"{where}: the loss exploded to {value:.4g}, more than {self.qcfg.max_loss_growth:g}x its start "
                f"({reference:.4g}; parts now: {text}); {LR_HINT}")

    def check_model(self, model: nn.Module, where: str) -> None:
        """After an optimizer step: parameters and learned scales."""
        name = first_nonfinite_parameter(model)
        if name is not None:
            raise QuantizerDivergenceError(f"{where}: parameter '{name}' became NaN/inf after the update; {LR_HINT}")
        try:
            check_quantizers(model, self.qcfg.max_scale_growth)
        except QuantizerDivergenceError as err:
            raise QuantizerDivergenceError(f"{where}: {err}") from None

    def check_eval(self, row: dict, extra: dict) -> None:
        self.check_map(row["AP"], (extra.get("ptq") or {}).get("AP"), row["epoch"])

    def check_map(self, ap: float, ptq_ap: Optional[float], epoch: int) -> None:
        if ptq_ap is None or not ptq_ap > 0:
            return
        if not math.isfinite(ap) or ap < self.qcfg.collapse_ratio * ptq_ap:
            raise QuantizerDivergenceError(
                f"epoch {epoch}: val AP collapsed to {ap * 100:.2f} from {ptq_ap * 100:.2f} after PTQ (below "
                f"{self.qcfg.collapse_ratio:g}x); training diverged, nothing of it was saved as a result; {LR_HINT}")

    def nonfinite_loss(self, loss: torch.Tensor, parts: dict, bad: list, where: str, model: nn.Module,
                       images: torch.Tensor) -> QuantizerDivergenceError:
        head = f"{where}: loss part(s) {', '.join(bad) or 'loss'} became NaN/inf"
        try:
            check_quantizers(model, self.qcfg.max_scale_growth)
        except QuantizerDivergenceError as err:
            return QuantizerDivergenceError(f"{head}; {err}")
        param = first_nonfinite_parameter(model)
        if param is not None:
            return QuantizerDivergenceError(f"{head}; parameter '{param}' is NaN/inf; {LR_HINT}")
        name = first_nonfinite_quantizer(model, images)
        if name:
            return QuantizerDivergenceError(f"{head}; quantizer '{name}' is the first to output NaN/inf "
                                            f"(its input is already non-finite: check the weights before it)")
        return QuantizerDivergenceError(f"{head} while every weight and quantizer is finite; {LR_HINT}")
