"""Files that are never half-written, with the modes a shared machine expects.

Every output of yoloq (reports, CSVs, ONNX files, engines, checkpoints, run folders) goes through
these helpers: the data is written to a hidden temporary sibling and renamed into place, so an
interrupted run leaves either the old file or the new one. Temporary files and folders are
created private (0600 / 0700); before the rename they get the mode a plain ``open()`` /
``mkdir()`` would have given (0666 / 0777 minus the umask), so for example a TensorRT build
service running as another user can read an exported ONNX.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from yoloq.errors import YoloqError

STAGING_SUFFIX = ".tmp"            # hidden ".<name>.<random>.tmp" siblings of an output


class OutputPathError(YoloqError, OSError):
    """An output path cannot be written (a directory, no permission, parent is a file)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_file_mode() -> int:
    return 0o666 & ~_umask()


def normal_dir_mode() -> int:
    return 0o777 & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a hidden sibling of ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=STAGING_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, normal_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


# --------------------------------------------------------------------------- JSON


def _json_default(obj):
    if hasattr(obj, "tolist"):            # numpy / torch scalars and arrays
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _finite(obj):
    """JSON has no NaN / inf: write them as null (strict parsers refuse the bare tokens)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def to_json(data: Any) -> str:
    """Indented JSON; numpy / torch values as numbers, NaN / inf as null."""
    return json.dumps(_finite(json.loads(json.dumps(data, default=_json_default))), indent=2) + "\n"


# --------------------------------------------------------------------------- run folders


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A hidden sibling folder renamed to ``final`` on success, removed on failure (SIGINT and
    SIGTERM included, see ``yoloq.cli``). Stale staging folders of an earlier killed run with the
    same name are removed first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=STAGING_SUFFIX, dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, normal_dir_mode())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_staging(final: Path) -> list[Path]:
    """Remove the staging folders ``.<name>.<pid>.<random>.tmp`` / ``.<name>.old-<pid>`` that a
    killed run left beside ``final`` (their process is gone; another live run's are kept)."""
    removed = []
    for p in final.parent.glob(f".{final.name}.*"):
        rest = p.name[len(final.name) + 2:]
        if rest.endswith(STAGING_SUFFIX):
            pid = rest.split(".", 1)[0]
        elif rest.startswith("old-"):
            pid = rest[4:]
        else:
            continue
        if p.is_dir() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _pid_alive(text: str) -> bool:
    try:
        os.kill(int(text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- checks before the work


def check_output_file(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail now, with the path, if ``path`` cannot be written later (a directory, a parent that is a
    file, no write permission), instead of after minutes of work."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is an existing directory; expected a file path")
    check_output_dir(path.parent, what=f"{what} folder")
    return path


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """``path`` is (or can be created as) a writable directory."""
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputPathError(f"{what} {path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {path}: no write permission in {probe}")
    return path
