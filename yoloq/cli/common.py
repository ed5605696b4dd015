"""What every command shares: user errors as one line (exit 2), SIGTERM handled like Ctrl-C.

Rule for every tool: an error caused by the user's input (``yoloq.errors.YoloqError``, a missing
or unwritable file) prints ``error: <message>`` and exits with code 2; only bugs show a
traceback. SIGTERM (``timeout``, batch schedulers, ``docker stop``) raises ``Terminated`` so the
same clean-up runs as for Ctrl-C (staging folders removed, temporary files deleted).
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings
from typing import Callable, Optional, Sequence

from yoloq.errors import YoloqError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
# OSErrors that are about a path the user gave, never a bug in yoloq
USER_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM."""


def _on_sigterm(signum, frame):
    raise Terminated()


def quiet_known_warnings() -> None:
    # pytorch-quantization 2.1.3 calls torch.jit.script at import; torch 2.14 warns about it
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)


def run_command(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)`` with the error and signal rules above; returns the exit code."""
    quiet_known_warnings()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return int(main(argv) or 0)
    except YoloqError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except USER_OS_ERRORS as err:
        print(f"error: {_os_error_text(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left behind", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("terminated (SIGTERM): nothing half-written was left behind", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _os_error_text(err: OSError) -> str:
    if err.filename is None:
        return str(err)
    return f"{err.filename}: {err.strerror or type(err).__name__}"


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """An argument parser whose help shows the command's usage examples (its module docstring)."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def add_evaluation_arguments(p: argparse.ArgumentParser) -> None:
    """The COCO evaluation flags every evaluating command shares (defaults: the config's eval section)."""
    from yoloq.config import AnnKey, Backend, choices
    from yoloq.data.coco import DEFAULT_INTERPOLATION, INTERPOLATIONS
    p.add_argument("--ann", choices=choices(AnnKey), help="ground-truth key of the dataset YAML (default: eval.val_ann)")
    p.add_argument("--max-images", type=positive_int, help="evaluate only the first N images (by id)")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--workers", type=int)
    p.add_argument("--backend", choices=choices(Backend))
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default=DEFAULT_INTERPOLATION,
                   help="letterbox resampling (default: %(default)s, the reference protocol)")
    p.add_argument("--no-progress", action="store_true")


def evaluation_overrides(args) -> dict:
    return dict(batch_size=args.batch_size, workers=args.workers, backend=args.backend, val_ann=args.ann)


def init_distributed(device: str) -> bool:
    """torchrun sets WORLD_SIZE / RANK: join the process group (nccl on CUDA, gloo on CPU)."""
    import os
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True
