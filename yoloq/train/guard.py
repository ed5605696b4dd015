"""The engine's stop rules: a non-finite loss, weights or EMA end the run with an error naming the
epoch, the step and the part, before anything of that step is saved. A step may bring a subclass
with more rules (QAT: ``yoloq.recipes.qat.guard``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from yoloq.train.errors import NonFiniteLossError, NonFiniteWeightsError


def first_nonfinite_parameter(model: nn.Module) -> Optional[str]:
    """The name of the first parameter holding NaN/inf (None when all are finite), one sync."""
    named = [(n, p) for n, p in model.named_parameters()]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named])
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


class Guard:
    """The engine's stop rules: a non-finite loss, weights or EMA. A step may bring a subclass with
    more (QAT: an exploding loss, runaway quantizer scales, a collapsed mAP)."""
    hint = "lower train.lr0, check the data, or start from other weights"

    def nonfinite_loss(self, loss: torch.Tensor, parts: dict, bad: list, where: str, model: nn.Module,
                       images: torch.Tensor) -> Exception:
        values = ", ".join(f"{k} {float(v):.4g}" for k, v in parts.items())
        if bad:
            what = f"loss part(s) {', '.join(bad)}"
        else:
            what = "the total loss" if not torch.isfinite(loss).all() else "the loss on another process"
        return NonFiniteLossError(f"{where}: {what} not finite ({values}); {self.hint}")

    def check_loss(self, loss: torch.Tensor, parts: dict, where: str) -> None:
        """After the finiteness check, before the backward pass."""

    def check_model(self, model: nn.Module, where: str) -> None:
        """After every optimizer step."""
        name = first_nonfinite_parameter(model)
        if name is not None:
            raise NonFiniteWeightsError(f"{where}: parameter '{name}' became NaN/inf after the update; {self.hint}")

    def check_ema(self, ema: nn.Module, where: str) -> None:
        name = first_nonfinite_parameter(ema)
        if name is not None:
            raise NonFiniteWeightsError(f"{where}: the EMA of parameter '{name}' is NaN/inf; {self.hint}")

    def check_eval(self, row: dict, extra: dict) -> None:
        """After an evaluation, before anything of the epoch is saved."""
