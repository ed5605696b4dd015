"""Turn a deploy-form FP32 model into a fake-quantized one with TensorRT placement.

``prepare(model, qcfg)`` returns a deep copy in which

- every quantized conv is a ``QuantConv2d`` / ``QuantConvTranspose2d`` (``yoloq.quant.backend``)
  (weights per output channel: axis 0, axis 1 for ConvTranspose; 8 bit, narrow range, signed),
  keeping its module path, so state-dict keys stay those of the FP32 model;
- input quantizers are *shared objects* per ``placement.analyze`` site (per tensor, 8 bit,
  full int8 range, signed): ``input_quantizer(a) is input_quantizer(b)`` for convs that must carry one
  scale, so calibration, QAT and export keep them equal;
- a module holding a quantized residual add (BottleRep) is re-traced into a ``GraphModule`` with a
  ``residual_quantizer`` before the residual operand (same child modules and parameters);
- BatchNorms surviving ``fuse()`` (QARepVGG post-add BN, RepOpt BN) are folded first when
  ``qcfg.fold_qarepvgg_post_bn`` (default): TensorRT folds a BN into the conv before it, and
  per-channel symmetric weight quantization is exactly invariant to that per-channel scaling, so
  quantizing the folded kernel is what the engine runs.

Skipped layers (``skip_layers`` / ``qcfg.partial.skip_layers`` / ``set_layers_quantized(..., False)``):
weight quantizer disabled and the layer gets its *own disabled* input quantizer, so it reads the
float tensor while the other readers of a shared site stay quantized; in the exported graph the
skipped conv then has no Q/DQ in front of it. A residual quantizer follows the conv it fuses with.
A bias-corrected layer (``QuantState.bias_shifts``) kept in float gets its original bias back: the
correction compensates its weight rounding, which a float layer does not have.

The prepared model carries its ``QuantState`` (``yoloq.quant.state``): placement, site ->
quantizer object, skipped layers (model order), whether BNs were folded, calibration results.
"""
from __future__ import annotations

import copy
import difflib
from typing import Iterable, Optional

import torch
import torch.fx as fx
from torch import nn

from yoloq.config import QuantConfig
from yoloq.errors import InputError
from yoloq.quant.placement import Placement, PlacementTracer, ResidualSlot, analyze, is_add
from yoloq.quant import backend
from yoloq.quant.backend import TensorQuantizer, set_amax  # noqa: F401 - set_amax: callers import it from here
from yoloq.quant.scheme import DEAD_AMAX, activation_descriptor, new_input_quantizer, weight_descriptor
from yoloq.quant.state import QuantState, attach_state, has_quant_state, quant_state


# --------------------------------------------------------------------------- prepare


def prepare(model: nn.Module, qcfg: Optional[QuantConfig] = None, skip_layers: Iterable[str] = (),
            fold_bn: Optional[bool] = None) -> nn.Module:
    """Deep copy of ``model`` (deploy form, FP32) with quantized convs and shared quantizers.
    ``skip_layers`` (and ``qcfg.partial.skip_layers``) stay in float; ``fold_bn`` (default
    ``qcfg.fold_qarepvgg_post_bn``) folds BNs surviving ``fuse()`` first."""
    qcfg = qcfg or QuantConfig()
    fold_bn = qcfg.fold_qarepvgg_post_bn if fold_bn is None else fold_bn
    qmodel = copy.deepcopy(model).eval()
    if fold_bn:
        from yoloq.models.common import fold_remaining_bn
        fold_remaining_bn(qmodel)
    placement = analyze(qmodel)

    for name in placement.layers:
        _set_submodule(qmodel, name, quant_conv_from(qmodel.get_submodule(name)))

    quantizers: dict[str, nn.Module] = {}
    for site in placement.sites:
        q = new_input_quantizer()
        quantizers[site.name] = q
        for layer in site.consumers:
            backend.set_input_quantizer(qmodel.get_submodule(layer), q)
    _insert_residual_quantizers(qmodel, placement, quantizers)

    attach_state(qmodel, QuantState(placement=placement, quantizers=quantizers, skip_layers=[],
                                    fold_bn=bool(fold_bn)))
    skips = list(dict.fromkeys(list(qcfg.partial.skip_layers) + list(skip_layers)))
    if skips:
        set_layers_quantized(qmodel, skips, False)
    return qmodel


def quant_conv_from(conv: nn.Module) -> nn.Module:
    """A quantized conv with ``conv``'s geometry holding its Parameters (the model is already a copy)."""
    return backend.quant_conv(conv, activation_descriptor(), lambda c: weight_descriptor(_weight_axis(c)))


def _weight_axis(conv: nn.Module) -> Optional[int]:
    """Output channels: axis 0 of a Conv2d weight; axis 1 of a ConvTranspose2d's [in, out / groups,
    kH, kW] (per tensor when grouped)."""
    if isinstance(conv, nn.ConvTranspose2d):
        return 1 if conv.groups == 1 else None
    return 0


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


class _ChildrenLeafTracer(PlacementTracer):
    """Traces one module's own forward; every submodule it calls stays a call_module node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _insert_residual_quantizers(model: nn.Module, placement: Placement, quantizers: dict) -> None:
    by_owner: dict[str, list[tuple[ResidualSlot, str]]] = {}
    for site in placement.sites:
        for slot in site.residuals:
            by_owner.setdefault(slot.owner, []).append((slot, site.name))
    for owner, slots in by_owner.items():
        module = model.get_submodule(owner)
        graph = _ChildrenLeafTracer().trace(module)
        gm = fx.GraphModule(module, graph, class_name=f"{type(module).__name__}WithResidualQuant")
        adds = [n for n in gm.graph.nodes if is_add(n)]
        for slot, site_name in slots:
            if slot.add_index >= len(adds):
                raise RuntimeError(f"residual quantizer: {owner} has {len(adds)} adds when re-traced, "
                                   f"placement expected at least {slot.add_index + 1}")
            add = adds[slot.add_index]
            gm.add_submodule(slot.attr, quantizers[site_name])
            with gm.graph.inserting_before(add):
                qnode = gm.graph.call_module(slot.attr, (add.args[slot.operand],))
            add.update_arg(slot.operand, qnode)
        gm.recompile()
        gm.train(module.training)
        _set_submodule(model, owner, gm)


# --------------------------------------------------------------------------- helpers


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Quantized conv modules by name (skipped layers included), in model order."""
    return {name: model.get_submodule(name) for name in quant_state(model).placement.layers}


def input_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """Activation quantizer objects by site name, one entry per object (shared ones once)."""
    return dict(quant_state(model).quantizers)


def weight_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """Per-channel weight quantizers by layer name."""
    return {name: backend.weight_quantizer(m) for name, m in quant_layers(model).items()}


def set_layers_quantized(model: nn.Module, names: Iterable[str], enabled: bool) -> None:
    """Quantize (or keep in float) the given layers, keeping shared quantizers consistent.

    Disabled: the layer's weight quantizer is off and it gets a private disabled input quantizer
    (other readers of its site stay quantized). Enabled: it reads the shared site quantizer again.
    A residual quantizer is on iff the conv it fuses with is quantized.
    """
    state = quant_state(model)
    placement = state.placement
    names = list(names)
    known = set(placement.layers)
    for name in names:
        if name not in known:
            hint = difflib.get_close_matches(name, placement.layers, n=1)
            why = placement.float_layers.get(name)
            raise InputError(f"set_layers_quantized: '{name}' is not a quantized layer"
                             + (f" ({why})" if why else "") + (f"; did you mean '{hint[0]}'?" if hint else ""))
    changed = set(names)
    for name in changed:
        backend.set_enabled(backend.weight_quantizer(model.get_submodule(name)), enabled)
    _move_bias_shifts(model, state, [n for n in changed if (n in state.skip_layers) == enabled], enabled)
    for site, holder, attr, layer in state.site_slots(model):
        if layer in changed:
            setattr(holder, attr, state.quantizers[site.name] if enabled else new_input_quantizer(disabled=True))
    skipped = set(state.skip_layers)
    skipped = skipped - changed if enabled else skipped | changed
    state.skip_layers = [n for n in placement.layers if n in skipped]


@torch.no_grad()
def _move_bias_shifts(model: nn.Module, state: QuantState, layers: Iterable[str], quantized: bool) -> None:
    """Apply (``quantized``) or take back the bias correction of ``layers`` whose status changes."""
    for name in layers:
        shift = state.bias_shifts.get(name)
        if shift is not None:
            bias = model.get_submodule(name).bias
            if quantized:
                bias.sub_(shift.to(bias))
            else:
                bias.add_(shift.to(bias))


def replace_input_quantizer(model: nn.Module, site_name: str, new: nn.Module) -> None:
    """Swap the quantizer object of one site everywhere it is held. Holders that are skipped keep
    their private disabled quantizer."""
    state = quant_state(model)
    if site_name not in state.quantizers:
        hint = difflib.get_close_matches(site_name, list(state.quantizers), n=1)
        raise InputError(f"replace_input_quantizer: no quantizer site '{site_name}'"
                         + (f"; did you mean '{hint[0]}'?" if hint else ""))
    old = state.quantizers[site_name]
    for site, holder, attr, _ in state.site_slots(model):
        if site.name == site_name and getattr(holder, attr) is old:
            setattr(holder, attr, new)
    state.quantizers[site_name] = new


@torch.no_grad()
def fix_dead_channels(model: nn.Module, floor: float = DEAD_AMAX) -> int:
    """Replace zero / tiny / NaN / inf amax values (dead channels, unseen tensors) by ``floor``.
    Returns how many values were replaced."""
    fixed = 0
    modules = list(model.modules())
    if has_quant_state(model):      # site quantizers of skipped layers are held by no module
        modules += list(quant_state(model).quantizers.values())
    for module in {id(m): m for m in modules}.values():
        amax = backend.get_amax(module) if isinstance(module, TensorQuantizer) else None
        if amax is not None:
            bad = ~torch.isfinite(amax) | (amax <= 2.0 ** -24)
            if bad.any():
                fixed += int(bad.sum())
                amax[bad] = floor
    return fixed
