"""The quantization state of a prepared model, as one typed object, and the walkers over quantizers.

``prepare`` attaches a :class:`QuantState` to the model it returns (``model.quant_state``); every
later stage reads and updates that one object instead of loose attributes:

- ``placement``: where TensorRT wants activation quantizers (``yoloq.quant.placement``);
- ``quantizers``: site name -> the quantizer *object* of that site (shared by all its readers);
- ``skip_layers``: layers kept in floating point, in model order;
- ``fold_bn``: whether BNs surviving ``fuse()`` were folded before quantization;
- ``calib``: calibration statistics, the method used and how many images it saw;
- ``qat_kind``: the learnable quantizers swapped in by QAT (``pact``, ``lsqplus-symmetric`` ...);
- ``bias_shifts``: layer -> what bias correction subtracted from its bias (``yoloq.quant.bias_correct``);
  the correction belongs to the layer's weight rounding, so a layer kept in float gets it back;
- ``records``: what each step of ``yoloq.quant.quantize`` did (a report's material; not saved).

A deep copy of the model copies its state consistently (the site map points at the copied
quantizers), which is what ``copy.deepcopy`` of an ``nn.Module`` attribute does.

Walkers: :func:`quantizer_slots` visits every place a quantizer module is held (aliases of
shared objects included); :meth:`QuantState.site_slots` visits the activation sites with the layer
that decides whether each holder is quantized; :func:`replace_quantizers` swaps quantizer objects
everywhere they are held, keeping shared objects shared and the site map current.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from torch import nn

from yoloq.errors import InputError
from yoloq.quant.backend import INPUT_QUANTIZER, WEIGHT_QUANTIZER
from yoloq.quant.placement import Placement, QuantSite
from yoloq.quant.scheme import QUANTIZER_TYPES

STATE_ATTR = "quant_state"


@dataclass
class CalibrationState:
    stats: dict = field(default_factory=dict)        # site name -> calibrate.SiteStats (or None)
    amax_cache: dict = field(default_factory=dict)   # (site, method) -> amax, filled lazily
    images: int = 0                                   # images the statistics were collected on
    method: Optional[str] = None                      # range rule applied last ("entropy", ...)


@dataclass
class QuantState:
    placement: Placement
    quantizers: dict                                  # site name -> quantizer object
    skip_layers: list = field(default_factory=list)
    fold_bn: bool = True
    calib: CalibrationState = field(default_factory=CalibrationState)
    qat_kind: Optional[str] = None
    bias_shifts: dict = field(default_factory=dict)   # layer -> tensor subtracted from its bias
    records: dict = field(default_factory=dict)       # step name -> what quantize() recorded

    def site_slots(self, model: nn.Module) -> Iterator[tuple[QuantSite, nn.Module, str, str]]:
        """Every place a site quantizer is held: (site, holder module, attribute, the layer whose
        quantized / float status decides it)."""
        for site in self.placement.sites:
            for layer in site.consumers:
                yield site, model.get_submodule(layer), INPUT_QUANTIZER, layer
            for slot in site.residuals:
                yield site, model.get_submodule(slot.owner), slot.attr, slot.fusing_layer

    def site_names(self) -> dict[int, str]:
        """id(quantizer object) -> site name."""
        names: dict[int, str] = {}
        for site, q in self.quantizers.items():
            names.setdefault(id(q), site)
        return names


def quant_state(model: nn.Module) -> QuantState:
    """The state ``prepare`` attached to ``model``; a clear error for a model that was not prepared."""
    state = getattr(model, STATE_ATTR, None)
    if not isinstance(state, QuantState):
        raise InputError(f"{type(model).__name__} is not a quantized model (no quantizer placement): "
                         f"run yoloq.quant.prepare(model) first")
    return state


def has_quant_state(model: nn.Module) -> bool:
    return isinstance(getattr(model, STATE_ATTR, None), QuantState)


def attach_state(model: nn.Module, state: QuantState) -> None:
    setattr(model, STATE_ATTR, state)


# --------------------------------------------------------------------------- quantizer walkers


@dataclass
class Slot:
    """One place a quantizer module is held: ``getattr(holder, attr)``, at module path ``path``."""
    holder: nn.Module
    attr: str
    path: str

    @property
    def quantizer(self) -> nn.Module:
        return getattr(self.holder, self.attr)

    @property
    def is_weight(self) -> bool:
        return self.attr == WEIGHT_QUANTIZER


def quantizer_slots(model: nn.Module, types: tuple = QUANTIZER_TYPES) -> Iterator[Slot]:
    """Every child module of a type in ``types``, once per holder (a shared object appears once
    per place that holds it)."""
    for path, holder in list(model.named_modules(remove_duplicate=False)):
        for attr, child in list(holder._modules.items()):
            if isinstance(child, types):
                yield Slot(holder, attr, f"{path}.{attr}" if path else attr)


def named_quantizers(model: nn.Module, types: tuple = QUANTIZER_TYPES) -> dict[str, nn.Module]:
    """Every quantizer object once, by name: its site name when it is a site quantizer, else its
    first module path."""
    names = quant_state(model).site_names() if has_quant_state(model) else {}
    out: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for path, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, types) and id(m) not in seen:
            seen.add(id(m))
            out[names.get(id(m), path)] = m
    return out


def replace_quantizers(model: nn.Module, make: Callable[[nn.Module, Slot], Optional[nn.Module]],
                       types: tuple = QUANTIZER_TYPES) -> dict[int, nn.Module]:
    """Replace quantizer objects everywhere they are held: ``make(old, first_slot)`` returns the
    new module (or None to keep the old one); it is called once per object, so a shared quantizer
    stays one shared object. Updates the site map. Returns ``{id(old): new}``."""
    new: dict[int, Optional[nn.Module]] = {}
    for slot in quantizer_slots(model, types):
        old = slot.quantizer
        if id(old) not in new:
            new[id(old)] = make(old, slot)
        if new[id(old)] is not None:
            setattr(slot.holder, slot.attr, new[id(old)])
    replaced = {k: v for k, v in new.items() if v is not None}
    if has_quant_state(model):
        state = quant_state(model)
        state.quantizers = {site: replaced.get(id(q), q) for site, q in state.quantizers.items()}
    return replaced
