"""The one device resolver of the package: every ``--device`` flag and API ``device=`` goes through
:func:`resolve_device`, so every command accepts the same names with the same rules.

Names: ``auto`` (this process's GPU when CUDA is available — ``LOCAL_RANK`` under torchrun — else
the CPU), ``cpu``, ``cuda`` (the current GPU; under torchrun this process's), ``cuda:N``. A GPU that is
not there is a :class:`DeviceError` (one line on the command line), never a traceback later.
"""
from __future__ import annotations

import os
import re
from typing import Union

import torch

from yoloq.errors import InputError

DEVICE_NAMES = "auto, cpu, cuda, cuda:N"
DeviceLike = Union[str, torch.device, None]

_CUDA = re.compile(r"cuda(?::(\d+))?")


class DeviceError(InputError):
    """A device name that is malformed or names hardware this machine does not have."""


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def _cuda(index: int | None, name: str) -> torch.device:
    if not torch.cuda.is_available():
        raise DeviceError(f"device '{name}': no CUDA GPU is available on this machine (use --device cpu or auto)")
    count = torch.cuda.device_count()
    if index is None:
        index = _local_rank() if "LOCAL_RANK" in os.environ else torch.cuda.current_device()
    if index >= count:
        raise DeviceError(f"device '{name}': this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def resolve_device(name: DeviceLike = "auto") -> torch.device:
    """``name`` (a string, a ``torch.device`` or None = auto) as a checked ``torch.device``."""
    if isinstance(name, torch.device):
        name = str(name)
    text = "auto" if name is None else str(name).strip().lower()
    if text == "auto":
        return _cuda(None, "auto") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA.fullmatch(text)
    if match:
        return _cuda(int(match.group(1)) if match.group(1) is not None else None, text)
    raise DeviceError(f"device '{name}' is not a device name; expected one of {DEVICE_NAMES}")


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for a module that has none)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")
