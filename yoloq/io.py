"""Files that are never half-written, with the modes a shared machine expects.

Every output of yoloq (reports, CSVs, ONNX files, engines, checkpoints, run folders) goes through
these helpers: the data is written to a hidden temporary sibling and renamed into place, so an
interrupted run leaves either the old file or the new one. Temporary files and folders are
created private (0600 / 0700); before the rename they get the mode a plain ``open()`` /
``mkdir()`` would have given (0666 / 0777 minus the umask), so for example a TensorRT build
service running as another user can read an exported ONNX.
"""
from __future__ import annotations

import errno
import glob
import json
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from yoloq.errors import YoloqError, short_repr
from yoloq.version import __version__

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
    """Call ``write(tmp_path)`` on a hidden sibling of ``path``, then rename it to ``path``. A full
    disk (or quota, read-only file system) is an ``OutputPathError`` naming ``path``; the partial
    temporary file is removed."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=STAGING_SUFFIX)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, normal_file_mode())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        failure = write_failure(path, err)
        if failure is not None:
            raise failure from None
        raise
    return path


# errno values that mean "this file system cannot take the output", never a bug in yoloq
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
# torch.save reports a failed write as a RuntimeError from its zip writer
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "file write failed", "unexpected pos")


def write_failure(path: Path, err: BaseException) -> Optional[OutputPathError]:
    """The one-line error for a write that failed because of the disk, or None for anything else."""
    if isinstance(err, OutputPathError):
        return None
    if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
        reason = os.strerror(err.errno)
    elif isinstance(err, RuntimeError) and any(text in str(err) for text in _TORCH_WRITE_FAILURES):
        reason = "No space left on device" if _free_bytes(path.parent) < (1 << 20) else "the write failed"
    else:
        return None
    return OutputPathError(f"{path}: cannot write it: {reason}; nothing half-written was left behind")


def _free_bytes(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


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


def flat_keys(d: dict, prefix: str = "") -> dict:
    """Nested dicts as one level of dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``), to compare settings."""
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --------------------------------------------------------------------------- run folders

RUN_MARKER = ".yoloq-run"          # in every run folder yoloq writes: {"kind": "ptq" | "qat" | "train"}
RUN_NAME_MAX = 200                 # leaves room for the staging prefix / suffix within NAME_MAX (255)


class RunFolderError(OutputPathError):
    """A run name or run folder that yoloq must not write (escapes --out, or holds someone else's files)."""


def check_run_name(name: str, what: str = "--name") -> str:
    """A run name is one plain path component inside the output root: not empty, no separators,
    not '.' / '..', not hidden (yoloq's staging folders are), at most RUN_NAME_MAX characters."""
    text = str(name)
    problem = None
    if not text.strip():
        problem = "is empty"
    elif "/" in text or os.sep in text or (os.altsep and os.altsep in text):
        problem = "contains a path separator"
    elif text.startswith("."):
        problem = "starts with '.' (hidden names are yoloq's staging folders; '.' and '..' leave the output root)"
    elif any(ord(c) < 32 for c in text):
        problem = "contains control characters"
    elif len(text) > RUN_NAME_MAX:
        problem = f"is longer than {RUN_NAME_MAX} characters"
    if problem:
        raise RunFolderError(f"{what}: run name {short_repr(text)} {problem}; a run name is one folder name "
                             f"inside the output root (--out), e.g. lite_s_test")
    return text


def run_kind(folder: Path) -> Optional[str]:
    """The kind recorded in ``folder``'s run marker, or None when it has none (not a yoloq run)."""
    try:
        data = json.loads((Path(folder) / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def check_run_folder(out: str | os.PathLike, name: str, kind: str, what: str = "--name",
                     inputs: dict | None = None) -> Path:
    """``<out>/<name>`` for a ``kind`` run, checked before any work: the name stays inside ``out``,
    ``out`` is writable, an existing folder there is empty or an earlier yoloq ``kind`` run (the
    only folders a run may replace or continue), and none of the run's ``inputs`` ({flag: path})
    lies inside it (replacing the folder would delete it)."""
    final = Path(out) / check_run_name(name, what)
    for flag, given in (inputs or {}).items():
        if given and final.exists() and Path(str(given)).resolve().is_relative_to(final.resolve()):
            raise RunFolderError(f"{final} holds the run's input {flag} {given}; replacing the folder would "
                                 f"delete it: choose another --name or move the input")
    check_output_dir(final, "--out")
    if final.is_symlink():
        raise RunFolderError(f"{final} is a symbolic link; yoloq replaces only run folders it wrote: "
                             f"choose another --name")
    if not final.exists():
        return final
    if not final.is_dir():
        raise RunFolderError(f"{final} exists and is not a folder; choose another --name or --out")
    found = run_kind(final)
    if found is None and any(final.iterdir()):
        raise RunFolderError(f"{final} exists and is not a yoloq run (no {RUN_MARKER} marker): yoloq does not "
                             f"replace folders it did not write; choose another --name or --out, or remove it yourself")
    if found is not None and found != kind:
        raise RunFolderError(f"{final} holds a yoloq {found} run, not a {kind} run; choose another --name or --out")
    return final


def write_run_marker(folder: Path, kind: str) -> None:
    atomic_write_text(Path(folder) / RUN_MARKER, json.dumps({"kind": kind, "yoloq": __version__}) + "\n")


def open_run_folder(final: Path, kind: str) -> Path:
    """Create (or reuse) a run folder written in place (train, qat: last.pt for --resume), marked as a
    ``kind`` run; the same rule as ``check_run_folder`` for what is already there."""
    final = check_run_folder(Path(final).parent, Path(final).name, kind)
    final.mkdir(parents=True, exist_ok=True)
    if run_kind(final) != kind:
        write_run_marker(final, kind)
    return final


@contextmanager
def staging_dir(final: Path, kind: str) -> Iterator[Path]:
    """A hidden sibling folder, marked as a ``kind`` run, renamed to ``final`` on success, removed
    on failure (SIGINT and SIGTERM included, see ``yoloq.cli``). An existing ``final`` is replaced
    only when it is an earlier ``kind`` run (``check_run_folder``); stale staging folders of an
    earlier killed run with the same name are removed first."""
    final = check_run_folder(Path(final).parent, Path(final).name, kind)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=STAGING_SUFFIX, dir=final.parent))
    try:
        write_run_marker(tmp, kind)
        yield tmp
        os.chmod(tmp, normal_dir_mode())
        check_run_folder(final.parent, final.name, kind)     # still ours to replace after the work
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OutputPathError) and str(tmp) in str(err):   # name the run, not its staging folder
            raise OutputPathError(str(err).replace(str(tmp), str(final))) from None
        failure = write_failure(final, err)
        if failure is not None:
            raise failure from None
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _staging_pattern(name: str) -> "re.Pattern[str]":
    """Exactly the names ``staging_dir`` creates for run ``name``: ``.<name>.<pid>.<random>.tmp``
    (``tempfile.mkdtemp``: letters, digits, _) and ``.<name>.old-<pid>``; run ``<name>.v2``'s never match."""
    return re.compile(rf"\.{re.escape(name)}\.(?:(\d+)\.[a-z0-9_]+{re.escape(STAGING_SUFFIX)}|old-(\d+))")


def remove_stale_staging(final: Path) -> list[Path]:
    """Remove the staging folders ``.<name>.<pid>.<random>.tmp`` / ``.<name>.old-<pid>`` that a
    killed run left beside ``final`` (their process is gone; another live run's are kept)."""
    removed = []
    pattern = _staging_pattern(final.name)
    for p in final.parent.glob(f".{glob.escape(final.name)}.*"):
        match = pattern.fullmatch(p.name)
        if match is None:
            continue
        pid = match.group(1) or match.group(2)
        if p.is_dir() and not p.is_symlink() and not _pid_alive(pid):
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


def check_output_file(path: str | os.PathLike, what: str = "output", inputs: dict | None = None) -> Path:
    """Fail now, with the path, if ``path`` cannot be written later (a directory, a parent that is a
    file, no write permission) or is one of the command's ``inputs`` ({flag: path}: writing it would
    destroy that input), instead of after minutes of work."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is an existing directory; expected a file path")
    for flag, given in (inputs or {}).items():
        for source in (given if isinstance(given, (list, tuple)) else [given]):
            if source is not None and _same_file(path, Path(str(source))):
                raise OutputPathError(f"{what} {path} is also the command's {flag}: writing it would destroy that "
                                      f"input; choose another {what} path")
    check_output_dir(path.parent, what=f"{what} folder")
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


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
