"""Where configs and data live: bare config names, the shipped YAMLs, and the shared data folder.

- ``--cfg yolov6s_qarepvgg`` / ``yolov6s_qarepvgg.yaml`` (a bare name) resolves against the configs
  shipped inside the package (``yoloq/resources/configs``; the repository's ``configs/`` is a link to
  that folder), so ``pip install`` users need no source checkout. The same holds for data YAMLs
  (``yoloq/resources/data``). A path that exists always wins over a shipped name.
- Paths inside config and data YAMLs may use environment variables (``$VAR`` / ``${VAR}``). The
  shipped YAMLs reach the shared weights and COCO subsets through ``${YOLOQ_SHARED}``; when that
  variable is unset it defaults to :func:`shared_dir`.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Optional

from yoloq.config.base import ConfigError

PACKAGE = Path(__file__).resolve().parents[1]             # yoloq/
RESOURCES = PACKAGE / "resources"
CONFIG_DIR = RESOURCES / "configs"
DATA_DIR = RESOURCES / "data"
DEFAULT_DATA = DATA_DIR / "coco_shared.yaml"
SHARED_ENV = "YOLOQ_SHARED"
CONFIG_SUFFIXES = (".yaml", ".yml", ".py")

_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_warned_shared: set[str] = set()


class SharedFolderWarning(UserWarning):
    """``${YOLOQ_SHARED}`` is unset and its default folder is missing (commands given both --weights
    and --data do not need it and silence this)."""


# --------------------------------------------------------------------------- shipped files
def available_configs(directory: Path = CONFIG_DIR) -> list[str]:
    """Names (file stems) of the shipped configs in ``directory``."""
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.iterdir() if p.suffix in CONFIG_SUFFIXES)


def _is_bare_name(value: str) -> bool:
    return os.sep not in value and (os.altsep is None or os.altsep not in value)


def _lookup(value: str | os.PathLike, directory: Path, kind: str) -> Path:
    """``value`` itself when it exists, else the shipped file of that bare name in ``directory``."""
    path = Path(os.path.expanduser(str(value)))
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"{kind} '{value}' is a folder, not a file")
    if _is_bare_name(str(value)):
        names = [path.name] if path.suffix in CONFIG_SUFFIXES else [path.name + s for s in CONFIG_SUFFIXES]
        for name in names:
            if (directory / name).is_file():
                return directory / name
    names = available_configs(directory)
    hint = (f"give a path or one of the shipped {kind}s ({directory}): {', '.join(names)}" if names
            else f"give a path (no shipped {kind}s in {directory})")
    raise ConfigError(f"{kind} not found: {value}; {hint}")


def find_config(value: str | os.PathLike) -> Path:
    """Path of the experiment config ``value``: an existing file (YAML or upstream ``.py``), or the
    name of a shipped config with or without ``.yaml`` (``yolov6lite_s`` / ``yolov6lite_s.yaml``).
    A missing one is a :class:`ConfigError` that lists the shipped names."""
    return _lookup(value, CONFIG_DIR, "config file")


def find_data_config(value: str | os.PathLike) -> Path:
    """Like :func:`find_config`, for dataset YAMLs (``coco_shared`` names the shipped COCO subset)."""
    return _lookup(value, DATA_DIR, "dataset YAML")


# --------------------------------------------------------------------------- shared data folder
def _source_checkout() -> Optional[Path]:
    """The repository root when yoloq runs from a source checkout (editable install or PYTHONPATH)."""
    root = PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() and (root / "yoloq").is_dir() else None


def shared_dir() -> Path:
    """The shared data folder (weights, COCO subsets): ``$YOLOQ_SHARED`` if set; else the first that
    exists of ``<checkout>/../shared`` (source checkout only) and ``../shared`` from the current
    directory; else the first of those candidates (so error messages name a concrete path)."""
    env = os.environ.get(SHARED_ENV)
    if env:
        return Path(os.path.expanduser(env)).resolve()
    candidates = []
    checkout = _source_checkout()
    if checkout is not None:
        candidates.append((checkout.parent / "shared").resolve())
    candidates.append((Path.cwd().parent / "shared").resolve())
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return candidates[0]


def expand_path_vars(value: str, where: str) -> str:
    """Expand ``$VAR`` / ``${VAR}`` in a path from a YAML; ``YOLOQ_SHARED`` unset or empty defaults
    to :func:`shared_dir` (as there). Any other variable unset or empty is an error naming it and
    ``where`` (an empty one would turn ``${DATA}/coco`` into ``/coco`` silently)."""
    if "$" not in value:
        return value

    def substitute(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if os.environ.get(name):
            return os.environ[name]
        if name == SHARED_ENV:
            shared = shared_dir()
            if not shared.is_dir() and str(shared) not in _warned_shared:
                _warned_shared.add(str(shared))
                warnings.warn(f"{where}: {SHARED_ENV} is not set and the default shared folder {shared} "
                              f"does not exist; set {SHARED_ENV}=/path/to/shared or pass your own paths "
                              "(--data, --weights)", SharedFolderWarning, stacklevel=4)
            return str(shared)
        state = "is empty" if name in os.environ else "is not set"
        raise ConfigError(f"{where}: environment variable ${name} in '{value}' {state}")

    return _VAR.sub(substitute, value)
