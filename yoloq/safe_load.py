"""Reading ``.pt`` files without ever running code from them.

``torch.load`` runs code in three ways: a pickle may name any global (``os.system``, ``eval``);
with ``weights_only=False`` a TorchScript archive is handed to ``torch.jit.load``, which runs the
archive's own ``__setstate__`` code while loading; and unknown zip layouts may hide either. So
every checkpoint yoloq reads goes through this module:

1. :func:`check_archive` looks at the file before any loader: a zip must have exactly the layout
   ``torch.save`` writes (``<name>/data.pkl``, ``data/<n>``, ``version``, ``byteorder`` and a few
   markers); a TorchScript archive (``code/``, ``constants.pkl``) or any other member is refused
   with a message that says what the file is.
2. :func:`safe_torch_load` unpickles with :class:`RestrictedUnpickler`: only tensor-rebuild
   functions, storages, a few containers and dtypes; every ``yolov6.*`` / ``torch.nn.modules.*``
   class becomes an inert :class:`ModuleStub` that records its ``__dict__`` (upstream release files
   are pickled modules). Any other global raises ``CheckpointError`` naming it.
3. :func:`load_plain` is ``torch.load(weights_only=True)`` after the same check, for yoloq's own files.
"""
from __future__ import annotations

import codecs
import functools
import os
import pickle
import re
import types
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch

from yoloq.errors import YoloqError

# Members of a torch.save zip, below its one top-level folder (torch 1.6 .. 2.14).
TORCH_SAVE_MEMBERS = {"data.pkl", "version", ".format_version", ".storage_alignment", "byteorder",
                      ".data/serialization_id", ".data/version"}


class CheckpointError(YoloqError, ValueError):
    """A checkpoint cannot be read or does not fit the model; the message names the file.
    (A ValueError like ``ConfigError``: bad input, reported without a traceback by the tools.)"""


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle references a global outside the whitelist."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


class ModuleStub:
    """Inert stand-in for a pickled ``nn.Module`` (or any ``yolov6.*`` object).

    Construction ignores its arguments; unpickling stores the object state in ``state`` and
    nothing else runs. ``source`` is the pickled class name ("yolov6.layers.common.DPBlock").
    """

    source = "?"

    def __init__(self, *args, **kwargs):
        self.state: dict = {}

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:      # (dict, slots) form
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = dict(state) if isinstance(state, dict) else {"__state__": state}

    def __repr__(self):
        return f"<stub {self.source}>"


@functools.lru_cache(maxsize=None)
def _stub_class(module: str, name: str) -> type:
    return type(name, (ModuleStub,), {"source": f"{module}.{name}", "__module__": __name__})


def _safe_torch_global(name: str) -> Optional[Any]:
    """dtypes, Size, device and storage classes from the ``torch`` namespace."""
    obj = getattr(torch, name, None)
    if isinstance(obj, torch.dtype) or obj is torch.Size or obj is torch.device:
        return obj
    if name.endswith("Storage") and isinstance(obj, type):    # legacy-format storage types
        return obj
    return None


def _numpy_global(module: str, name: str) -> Optional[Any]:
    """numpy scalars / arrays (upstream stores eval results as numpy floats); no object hooks."""
    if (module, name) not in {("numpy", "dtype"), ("numpy", "ndarray"),
                              ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                              ("numpy.core.multiarray", "_reconstruct"),
                              ("numpy._core.multiarray", "_reconstruct")}:
        return None
    import numpy as np
    if module == "numpy":
        return getattr(np, name)
    try:
        from numpy._core import multiarray
    except ImportError:                                          # numpy < 2
        from numpy.core import multiarray
    return getattr(multiarray, name)


_TORCH_REBUILD = {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter",
                  "_rebuild_parameter_with_state"}


_BUILTINS = {"set": set, "frozenset": frozenset, "complex": complex, "slice": slice}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` returns only whitelisted, side-effect-free globals."""

    def find_class(self, module: str, name: str):
        module = {"__builtin__": "builtins"}.get(module, module)     # protocol-2 pickles use py2 names
        if module == "torch._utils" and name in _TORCH_REBUILD:
            return getattr(torch._utils, name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "builtins" and name in _BUILTINS:
            return _BUILTINS[name]
        if module == "_codecs" and name == "encode":   # protocol-2 bytes (numpy scalars): str -> bytes only
            return codecs.encode
        if module == "torch":
            obj = _safe_torch_global(name)
            if obj is not None:
                return obj
        if module == "numpy" or module.startswith(("numpy.core.", "numpy._core.")):
            obj = _numpy_global(module, name)
            if obj is not None:
                return obj
        # Model classes: upstream's own and torch.nn's become inert stubs (their code never runs).
        if module == "yolov6" or module.startswith(("yolov6.", "torch.nn.modules.")) or module == "torch.nn":
            return _stub_class(module, name)
        raise RefusedGlobal(module, name)


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# What torch.load needs of a ``pickle_module``: Unpickler, load and a __name__.
restricted_pickle = types.ModuleType("yoloq_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load
restricted_pickle.UnpicklingError = pickle.UnpicklingError


# --------------------------------------------------------------------------- before any loader


def check_archive(path: str | os.PathLike) -> None:
    """Refuse files no loader should open: missing files, TorchScript archives and zips that are not
    ``torch.save``'s layout. Legacy (non-zip) pickles pass: the restricted unpickler handles them."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint (broken zip archive: {err})") from None
    tops = {name.split("/", 1)[0] for name in names}
    inner = [name.split("/", 1)[1] if "/" in name else name for name in names]
    if any(n == "constants.pkl" or n.startswith("code/") for n in inner):
        raise CheckpointError(f"{path}: a TorchScript archive (torch.jit.save), which runs code of its own when "
                              f"loaded; yoloq reads weights only. Save a state dict instead: "
                              f"torch.save(model.state_dict(), 'weights.pt')")
    unknown = [n for n in inner if n not in TORCH_SAVE_MEMBERS and not _is_storage(n)]
    if len(tops) != 1 or unknown or "data.pkl" not in inner:
        what = f"unexpected members {unknown[:3]}" if unknown else "no data.pkl under one folder"
        raise CheckpointError(f"{path}: not a torch.save checkpoint ({what}); refused without loading it")


def _is_storage(member: str) -> bool:
    return member.startswith("data/") and member[5:].isdigit()


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load`` through the restricted unpickler (CPU), after :func:`check_archive`."""
    check_archive(path)
    try:
        return torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except RefusedGlobal as err:
        raise CheckpointError(
            f"{path}: refused to unpickle global '{err.qualname}' (not a tensor, container or model "
            f"class): unpickling it could run code from the file; yoloq reads weights only. Save the "
            f"weights as a state dict: torch.save(model.state_dict(), 'weights.pt')") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({describe_load_error(err)})") from None


def load_plain(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` (tensors and plain containers only), after :func:`check_archive`."""
    check_archive(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:                            # noqa: BLE001 - torch raises many kinds here
        raise CheckpointError(f"{path}: not a readable checkpoint ({describe_load_error(err)})") from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def describe_load_error(err: BaseException) -> str:
    """torch.load's failure in one short line for a user. torch's own text spans many lines and
    advises loading with ``weights_only=False``, which runs code from the file: never relayed."""
    text = _ANSI.sub("", str(err))
    found = _UNSUPPORTED_GLOBAL.search(text)
    if found:
        return (f"it holds a pickled Python object ({found.group(1)}), not only tensors and plain containers; "
                f"yoloq does not unpickle such objects")
    if "Weights only load failed" in text or "weights_only" in text:
        return "not a torch.save file of tensors and plain containers (damaged, or another format)"
    if isinstance(err, (KeyError, EOFError, IndexError)) or not text.strip():
        return f"damaged or not a torch.save file ({type(err).__name__})"
    first = " ".join(text.strip().splitlines()[0].split())
    return f"{type(err).__name__}: {first[:160]}"
