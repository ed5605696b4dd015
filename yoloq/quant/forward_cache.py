"""Skip the layers a one-layer change cannot reach: reuse of a reference forward's layer outputs.

Sensitivity runs the same batch through the model once per layer, each time with one layer's
quantization toggled. Every layer upstream of the toggled one (and every branch that does not read
it, e.g. the other scales of the detection head) then sees exactly the input it saw in the
reference forward and computes exactly the same output. ``LayerOutputCache`` records each listed
layer's input and output in one reference forward; inside ``reuse``, a layer whose input is
bit-identical to the recorded one (``torch.equal``, a memory pass against a convolution) returns
the recorded output instead of running. Nothing is approximated: a layer runs whenever its input
or its own settings may differ, so the model's output is the one a full forward gives.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn


class LayerOutputCache:
    """Inputs and outputs of ``layers`` (name -> module, single-tensor input) in one forward."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module]):
        self.model = model
        self.layers = layers
        self.records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._held: dict[str, set[int]] = {}

    @torch.no_grad()
    def record(self, x: torch.Tensor) -> torch.Tensor:
        """Run the reference forward on ``x``, keep every listed layer's input and output (copies:
        later in-place ops must not alter them); a layer called more than once is not kept."""
        calls: dict[str, int] = {}
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook(name):
            def keep(module, args, output):
                calls[name] = calls.get(name, 0) + 1
                if len(args) == 1 and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                    seen[name] = (args[0].detach().clone(), output.detach().clone())
            return keep

        handles = [m.register_forward_hook(hook(n)) for n, m in self.layers.items()]
        try:
            out = self.model(x)
        finally:
            for h in handles:
                h.remove()
        self.records = {n: seen[n] for n in seen if calls[n] == 1}
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.records.values() for t in pair)

    def probe(self, x: torch.Tensor) -> int:
        """Bytes a record of ``x`` holds (one reference forward; nothing is kept)."""
        self.record(x)
        size, self.records = self.nbytes(), {}
        return size

    @contextmanager
    def reuse(self, changed: Iterable[nn.Module] = ()) -> Iterator[None]:
        """Forwards inside reuse recorded outputs for unchanged inputs; a layer that holds (or is)
        one of the ``changed`` modules always runs."""
        changed_ids = {id(m) for m in changed}
        patched = []
        for name, (inp, out) in self.records.items():
            if changed_ids & self._held_ids(name):
                continue
            module = self.layers[name]
            module.forward = _reusing_forward(module.forward, inp, out)
            patched.append(module)
        try:
            yield
        finally:
            for module in patched:
                del module.forward          # back to the class's forward

    def _held_ids(self, name: str) -> set[int]:
        if name not in self._held:
            self._held[name] = {id(m) for m in self.layers[name].modules()}
        return self._held[name]


def worth_reusing(module: nn.Module, min_macs: int = 32) -> bool:
    """A conv whose multiply-adds per output value (``in_channels / groups x kernel area``) are
    well above the two memory passes of a check and a copy; a 3x3 depthwise conv (9) is not."""
    if not isinstance(module, nn.modules.conv._ConvNd):
        return True
    area = 1
    for k in module.kernel_size:
        area *= k
    return module.in_channels // module.groups * area >= min_macs


def _reusing_forward(forward, recorded_input: torch.Tensor, recorded_output: torch.Tensor):
    def run(*args, **kwargs):
        if (not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor)
                and args[0].shape == recorded_input.shape and args[0].dtype == recorded_input.dtype
                and torch.equal(args[0], recorded_input)):
            return recorded_output.clone()  # a copy: the caller may modify it in place
        return forward(*args, **kwargs)
    return run
