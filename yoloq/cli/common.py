"""What every command shares: user errors as one line (exit 2), SIGTERM handled like Ctrl-C.

Rule for every tool: an error caused by the user's input (``yoloq.errors.YoloqError``, a missing
or unwritable file) prints ``error: <message>`` and exits with code 2; only bugs show a
traceback. SIGTERM (``timeout``, batch schedulers, ``docker stop``) raises ``Terminated`` so the
same clean-up runs as for Ctrl-C (staging folders removed, temporary files deleted). Sent to the
whole process group, SIGTERM also reaches DataLoader workers: PyTorch's worker handler ends them
without output (a worker forked a moment before has only inherited the handler below, which ignores
it there), and what their end causes in the main process -- an error from a killed worker, raised
in the run or inside a ``__del__`` -- is reported as the termination it is, once.
"""
from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import warnings
from typing import Callable, Optional, Sequence

from yoloq.config.base import ConfigError
from yoloq.errors import YoloqError
from yoloq.io import DISK_ERRNOS

CFG_HELP = "experiment config: a shipped name (yolov6lite_s), a YAML file or an upstream .py config"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
EXIT_BROKEN_PIPE = 141                 # 128 + SIGPIPE, what a shell reports for a closed pipe
# OSErrors that are about a path the user gave, never a bug in yoloq
USER_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM."""


_sigterm = {"main_pid": None, "received": False, "unraisable": sys.__unraisablehook__, "active": False}
# held while a re-sent SIGTERM is delivered and while the handler is restored: a re-send never
# reaches the default handler (which would kill the process with -15 after its clean exit)
_resend_lock = threading.Lock()


def _resend_sigterm() -> None:
    with _resend_lock:
        if _sigterm["active"]:
            os.kill(os.getpid(), signal.SIGTERM)


def _on_sigterm(signum, frame):
    if os.getpid() != _sigterm["main_pid"]:      # a forked DataLoader worker: the main process stops it
        return
    if not _sigterm["active"]:                   # already stopping: a re-sent signal must not interrupt that
        return
    _sigterm["received"] = True
    raise Terminated()


def _on_unraisable(info) -> None:
    """``Terminated`` raised inside a ``__del__`` (a DataLoader iterator joining its workers) is
    swallowed by Python: send SIGTERM again a moment later, from a thread, so that it is raised
    after the ``__del__``, where the run can stop. Other errors in a ``__del__`` after SIGTERM (a
    worker the signal killed) are part of the termination: no traceback for them."""
    if isinstance(info.exc_value, Terminated):
        timer = threading.Timer(0.05, _resend_sigterm)
        timer.daemon = True
        timer.start()
        return
    if not _sigterm["received"]:
        _sigterm["unraisable"](info)


def quiet_known_warnings() -> None:
    # pytorch-quantization 2.1.3 calls torch.jit.script at import; torch 2.14 warns about it
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the user should see it: ``warning: <message>`` on one line (no source line)."""
    return f"warning: {' '.join(str(message).split())}\n"


def run_command(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)`` with the error and signal rules above; returns the exit code."""
    quiet_known_warnings()
    main_thread = threading.current_thread() is threading.main_thread()
    _sigterm.update(main_pid=os.getpid(), received=False, unraisable=sys.unraisablehook)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    _sigterm["active"] = main_thread
    sys.unraisablehook = _on_unraisable
    previous_format, warnings.formatwarning = warnings.formatwarning, one_line_warning
    try:
        return int(main(argv) or 0)
    except YoloqError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except USER_OS_ERRORS as err:
        print(f"error: {_os_error_text(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:
        if err.errno not in DISK_ERRNOS and err.errno != errno.EPIPE:
            raise
        if err.errno == errno.EPIPE:           # `yoloq ... | head`: the reader left; stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
        print(f"error: {_os_error_text(err)} (the output's file system is full or read-only)", file=sys.stderr)
        return EXIT_USER_ERROR
    except SystemExit as exit_:                 # argparse: -h (0) or a usage error (2), already printed
        return 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left behind", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        _sigterm["active"] = False
        print("terminated (SIGTERM): nothing half-written was left behind", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception:
        if not _sigterm["received"]:                 # a bug: the traceback
            raise
        _sigterm["active"] = False
        print("terminated (SIGTERM): nothing half-written was left behind", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        sys.unraisablehook = _sigterm["unraisable"]
        warnings.formatwarning = previous_format
        if main_thread:
            with _resend_lock:
                _sigterm["active"] = False
                signal.signal(signal.SIGTERM, previous)


def _os_error_text(err: OSError) -> str:
    if err.filename is None:
        return str(err)
    return f"{err.filename}: {err.strerror or type(err).__name__}"


class Parser(argparse.ArgumentParser):
    """The parser of every command: a usage error is one line (``error: <prog>: <message>``, exit 2,
    as every user error), and ``--set`` / ``--conf-thres`` / ``--iou-thres`` are applied to
    ``--cfg`` right after parsing (``apply_config_flags``), so each command gets a checked Config."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} -h)\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        return apply_config_flags(namespace), extras


def parser(prog: str, doc: str, settings: bool = True) -> argparse.ArgumentParser:
    """An argument parser whose help shows the command's usage examples (its module docstring);
    with ``settings`` it takes ``--set SECTION.KEY=VALUE`` (applied to ``--cfg``)."""
    p = Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if settings:
        add_settings_argument(p)
    return p


def add_settings_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="settings", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                   help="override keys of the --cfg config (YAML values; 1e-3 is a number), e.g. "
                        "eval.conf_thres=0.001 quant.calibration.images=64 train.lr0=0.02")


def add_threshold_arguments(p) -> None:
    """``--conf-thres`` / ``--iou-thres``: the eval section's NMS thresholds (upstream's flag names)."""
    p.add_argument("--conf-thres", dest="eval_conf_thres", type=unit_float, metavar="T",
                   help="score threshold before NMS (default: the config's eval.conf_thres, 0.03 as upstream)")
    p.add_argument("--iou-thres", dest="eval_iou_thres", type=unit_float, metavar="T",
                   help="NMS IoU threshold (default: the config's eval.iou_thres, 0.65 as upstream)")


def apply_config_flags(ns: argparse.Namespace) -> argparse.Namespace:
    """``--cfg`` loaded, with ``--set`` and the threshold flags applied, when any of them is given
    (``load_config`` passes a loaded Config through, so every command's code reads it unchanged)."""
    from yoloq.config import Config, apply_settings, load_config
    from yoloq.config.lookup import SharedFolderWarning
    if getattr(ns, "weights", None) and getattr(ns, "data", None):       # the shared folder is not used
        warnings.filterwarnings("ignore", category=SharedFolderWarning)
    if not hasattr(ns, "cfg") or isinstance(ns.cfg, Config):   # no --cfg (bench-eval applies --set per model),
        return ns                                               # or a sub-command's parser applied them already
    settings = list(getattr(ns, "settings", None) or [])
    thresholds = {k: getattr(ns, f"eval_{k}", None) for k in ("conf_thres", "iou_thres")}
    if not settings and all(v is None for v in thresholds.values()):
        return ns
    given = ["--set"] * bool(settings) + [f"--{k.replace('_', '-')}" for k, v in thresholds.items() if v is not None]
    if not getattr(ns, "cfg", None):
        raise ConfigError(f"{' / '.join(given)} {'change' if len(given) > 1 else 'changes'} the config: give --cfg")
    cfg = apply_settings(load_config(ns.cfg), settings)
    ns.cfg = cfg.with_overrides(eval=thresholds)
    return ns


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def unit_float(text: str) -> float:
    """A number in [0, 1] (thresholds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a std, a timeout, a size in GiB)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def add_evaluation_arguments(p: argparse.ArgumentParser) -> None:
    """The COCO evaluation flags every evaluating command shares (defaults: the config's eval section)."""
    from yoloq.config import AnnKey, Backend, choices
    from yoloq.data.coco import DEFAULT_INTERPOLATION, INTERPOLATIONS
    p.add_argument("--ann", choices=choices(AnnKey), help="ground-truth key of the dataset YAML (default: eval.val_ann)")
    p.add_argument("--max-images", type=positive_int, help="evaluate only the first N images (by id)")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--workers", type=non_negative_int)
    p.add_argument("--backend", choices=choices(Backend))
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default=DEFAULT_INTERPOLATION,
                   help="letterbox resampling (default: %(default)s, the reference protocol)")
    add_threshold_arguments(p)
    p.add_argument("--no-progress", action="store_true")


def add_model_bench_arguments(p: argparse.ArgumentParser, name_default: str, out_default: str,
                              max_images_help: str = "evaluate only the first N val images") -> None:
    """The flags of the benches that quantize one model several times and evaluate each result
    (``bench-robustness``, ``bench-alpha``); :func:`model_bench_options` passes them on."""
    p.add_argument("--cfg", required=True, help="experiment config (a shipped name such as yolov6lite_s, or a YAML)")
    p.add_argument("--weights", help="FP32 checkpoint (default: model.weights of the config)")
    p.add_argument("--data", help="dataset YAML (default: data of the config)")
    p.add_argument("--bootstrap", type=non_negative_int, default=1000, metavar="N",
                   help="paired-bootstrap resamples of each interval (0: none; default %(default)s)")
    p.add_argument("--max-images", type=positive_int, help=max_images_help)
    p.add_argument("--workers", type=non_negative_int, help="data loader workers")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--thread-invariant", action="store_true",
                   help="PyTorch's own conv kernels: the same numbers with any thread count (slower)")
    p.add_argument("--name", help=f"run name (default {name_default})")
    p.add_argument("--out", default=out_default, help="output root (default %(default)s)")
    p.add_argument("--no-progress", action="store_true")


def model_bench_options(args) -> dict:
    """The keyword arguments of :func:`add_model_bench_arguments`' flags (all but ``--cfg``)."""
    return dict(weights=args.weights, data=args.data, bootstrap=args.bootstrap, max_images=args.max_images,
                workers=args.workers, device=args.device, thread_invariant=args.thread_invariant, out=args.out,
                name=args.name, progress=not args.no_progress)


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
