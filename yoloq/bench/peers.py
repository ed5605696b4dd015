"""Peer PTQ libraries (NNCF, AMD Quark, AIMET, NVIDIA ModelOpt, onnxruntime) on the same FP32 ONNX
and the same calibration images as yoloq, with TensorRT-like settings, each in a child process.

Each peer runs ``peer_child.py`` (next to this file) as a plain script, with an interpreter the
caller chooses per peer (peers pin conflicting onnx / onnxruntime / torch / numpy versions, so each
is best installed in its own virtual environment). The child needs only the peer library, numpy and
onnx. A peer that is missing, fails or runs out of time becomes a row with the reason (the tail of
its stderr), never an exception in the benchmark.

TensorRT-like settings (``peer_settings``): symmetric INT8, per-channel weights, per-tensor
activations, Q/DQ only on Conv inputs and weights (conv outputs, biases, HardSwish / HardSigmoid /
SE products and sigmoid outputs stay float) and the box decode excluded (``decode_nodes``).
``qdq_placement`` checks afterwards where a quantized file's Q/DQ actually sit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from yoloq.errors import InputError

CHILD_SCRIPT = Path(__file__).with_name("peer_child.py")
STDERR_TAIL_CHARS = 1500

# variant name -> settings on top of the TensorRT-like base. Data, not branches: the child maps the
# names ("cle", "adaround", ...) onto each library's own API.
PEER_VARIANTS: dict[str, dict[str, dict]] = {
    "ort": {
        "minmax": {"calibration": "minmax"},
        "percentile": {"calibration": "percentile"},
    },
    # NNCF's own default range for per-tensor activations: the mean over images of each image's min / max
    "nncf": {
        "default": {"calibration": "mean_minmax", "fast_bias_correction": True},
        "smoothquant": {"calibration": "mean_minmax", "fast_bias_correction": True, "smoothquant_alpha": 0.5},
        "bias_correction": {"calibration": "mean_minmax", "fast_bias_correction": False},
    },
    "quark": {
        "minmax": {"calibration": "minmax"},
        "percentile": {"calibration": "percentile"},
        "minmax_cle": {"calibration": "minmax", "algorithms": ["cle"]},
        "percentile_cle": {"calibration": "percentile", "algorithms": ["cle"]},
        "cle_adaround": {"calibration": "minmax", "algorithms": ["cle", "adaround"]},
        "cle_adaquant": {"calibration": "minmax", "algorithms": ["cle", "adaquant"]},
    },
    "aimet": {
        "minmax": {"calibration": "minmax"},
        "cle": {"calibration": "minmax", "algorithms": ["cle"]},
        "cle_adaround": {"calibration": "minmax", "algorithms": ["cle", "adaround"]},
    },
    # NVIDIA ModelOpt's ONNX INT8 PTQ; its calibration methods are entropy (its default) and max.
    # conv_*: Q/DQ only on Conv inputs and weights; default_*: its own op set and TensorRT placement
    "modelopt": {
        "conv_entropy": {"calibration": "entropy"},
        "conv_max": {"calibration": "max"},
        "default_entropy": {"calibration": "entropy", "quantize_op_types": None},
        "default_max": {"calibration": "max", "quantize_op_types": None},
        "conv_entropy_batch32": {"calibration": "entropy", "batch_size": 32},   # 32 images per calibration step
    },
}
PEER_TOOL_NAMES = {"ort": "onnxruntime-trt", "nncf": "NNCF", "quark": "AMD Quark", "aimet": "AIMET",
                   "modelopt": "NVIDIA ModelOpt"}
# the module each peer's child imports, and how to give a peer its own interpreter (docs/peers.md)
PEER_MODULES = {"ort": "onnxruntime", "nncf": "nncf", "quark": "quark", "aimet": "aimet_onnx", "modelopt": "modelopt"}
PEER_INSTALL = {
    "ort": "pip install onnxruntime",
    "nncf": "python3 -m venv /work/venvs/nncf && /work/venvs/nncf/bin/pip install nncf onnx onnxruntime numpy",
    "quark": "python3 -m venv /work/venvs/quark && /work/venvs/quark/bin/pip install amd-quark onnx onnxruntime "
             "numpy torch",
    "aimet": "python3 -m venv /work/venvs/aimet && /work/venvs/aimet/bin/pip install aimet-onnx",
    "modelopt": 'python3 -m venv /work/venvs/modelopt && /work/venvs/modelopt/bin/pip install "nvidia-modelopt[onnx]"',
}
DEFAULT_PEERS = ("nncf:default", "nncf:smoothquant", "quark:minmax", "quark:percentile", "quark:minmax_cle",
                 "quark:cle_adaround", "quark:cle_adaquant", "aimet:minmax", "aimet:cle", "aimet:cle_adaround",
                 "modelopt:conv_entropy", "modelopt:conv_max", "modelopt:default_entropy")
# Ops a quantizer may sit in front of while it still quantizes only what a Conv reads: they move or
# select values (a per-tensor scale commutes with them).
PASS_THROUGH_OPS = frozenset({"Reshape", "Transpose", "Slice", "Split", "Concat", "MaxPool", "Resize", "Identity",
                              "Flatten", "Squeeze", "Unsqueeze", "Pad", "Gather"})


class PeerError(InputError):
    """Bad peer request (unknown peer/variant, malformed --peer-python)."""


@dataclass
class PeerRun:
    """Outcome of one child process: ``ok`` with the quantized file, or ``error`` with the reason."""

    peer: str
    variant: str
    out: Path
    seconds: float
    error: Optional[str] = None
    info: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


# --------------------------------------------------------------------------- requests


def parse_peer_specs(specs: Iterable[str]) -> list[tuple[str, str]]:
    """``["nncf:default", "quark"]`` -> [(peer, variant), ...]; a bare peer name means all its variants,
    ``default`` means ``DEFAULT_PEERS``."""
    chosen = []
    for spec in specs:
        if spec == "default":
            chosen += parse_peer_specs(DEFAULT_PEERS)
            continue
        peer, _, variant = spec.partition(":")
        if peer not in PEER_VARIANTS:
            raise PeerError(f"unknown peer {peer!r} in {spec!r}; expected one of {sorted(PEER_VARIANTS)}")
        variants = [variant] if variant else list(PEER_VARIANTS[peer])
        for name in variants:
            if name not in PEER_VARIANTS[peer]:
                raise PeerError(f"unknown variant {name!r} of peer {peer!r}; expected one of "
                                f"{sorted(PEER_VARIANTS[peer])}")
            chosen.append((peer, name))
    return chosen


def parse_peer_python(items: Iterable[str]) -> dict[str, str]:
    """``["nncf=/work/venvs/nncf/bin/python", ...]`` -> {peer: interpreter}."""
    found = {}
    for item in items:
        peer, sep, python = item.partition("=")
        if not sep or not python:
            raise PeerError(f"--peer-python {item!r}: expected PEER=INTERPRETER, e.g. nncf=/work/venvs/nncf/bin/python")
        if peer not in PEER_VARIANTS:
            raise PeerError(f"--peer-python {item!r}: unknown peer {peer!r}; expected one of {sorted(PEER_VARIANTS)}")
        found[peer] = python
    return found


# --------------------------------------------------------------------------- graph facts


def decode_nodes(model) -> list[str]:
    """Names of the nodes after the last convs (the box decode): nodes from which no Conv can be
    reached. Nodes without a name get none here, so the peers cannot name them either; they are
    excluded by op type instead (every non-Conv op is kept float anyway)."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    feeds_conv: dict[int, bool] = {}

    def reaches_conv(node) -> bool:
        key = id(node)
        if key not in feeds_conv:
            feeds_conv[key] = False          # graphs are acyclic; this only guards recursion
            feeds_conv[key] = any(c.op_type == "Conv" or reaches_conv(c)
                                  for out in node.output for c in consumers.get(out, []))
        return feeds_conv[key]

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(model.graph.node) + 1000))
    return [n.name for n in model.graph.node if n.op_type != "Conv" and n.name and not reaches_conv(n)]


def peer_settings(model, peer: str, variant: str, input_name: str, iterations: int = 1000,
                  adaround_images: Optional[int] = None, batch_size: int = 1) -> dict:
    """The settings JSON handed to the child: TensorRT-like base + the variant's own keys."""
    if peer not in PEER_VARIANTS or variant not in PEER_VARIANTS[peer]:
        raise PeerError(f"unknown peer variant {peer}:{variant}")
    base = {"input_name": input_name, "quantize_op_types": ["Conv"], "exclude_nodes": decode_nodes(model),
            "activation": {"bits": 8, "symmetric": True, "signed": True, "per_channel": False},
            "weight": {"bits": 8, "symmetric": True, "per_channel": True},
            "iterations": iterations, "adaround_images": adaround_images, "batch_size": batch_size,
            "percentile": 99.999}
    return {**base, **PEER_VARIANTS[peer][variant]}


def _initializer_names(model) -> set[str]:
    names = {i.name for i in model.graph.initializer}
    names |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return names


def qdq_placement(model) -> dict:
    """Where the DequantizeLinear nodes of a Q/DQ ONNX feed: ``conv_weight`` (a constant into a
    Conv's weight), ``conv_input`` (every path through pass-through ops ends at a Conv's data
    input), ``other`` (anything else: Mul, Add, sigmoid, decode, graph output), with the op types
    reached in ``other_consumers``. TensorRT-like means ``other == 0``."""
    import onnx
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model))
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    outputs = {o.name for o in model.graph.output}
    constants = _initializer_names(model)
    producer = {out: n for n in model.graph.node for out in n.output}

    def ends(tensor: str) -> set[str]:
        """Kinds of consumers reached from ``tensor`` through pass-through ops."""
        kinds = {"graph_output"} if tensor in outputs else set()
        for node, port in consumers.get(tensor, []):
            if node.op_type == "QuantizeLinear":
                kinds.add("requantized")         # re-quantized on its way to a conv: that Q/DQ counts itself
            elif node.op_type == "Conv":
                kinds.add("conv_weight" if port == 1 else "conv_input" if port == 0 else "Conv_bias")
            elif node.op_type in PASS_THROUGH_OPS and (port == 0 or node.op_type == "Concat"):
                for out in node.output:          # Split has several
                    kinds |= ends(out)
            else:
                kinds.add(node.op_type)
        return kinds

    def from_constant(dq) -> bool:
        src = dq.input[0]
        q = producer.get(src)
        return src in constants or (q is not None and q.op_type == "QuantizeLinear" and q.input[0] in constants)

    counts = {"conv_input": 0, "conv_weight": 0, "other": 0, "requantized": 0, "unsigned": 0}
    others: dict[str, int] = {}
    for dq in (n for n in model.graph.node if n.op_type == "DequantizeLinear"):
        kinds = ends(dq.output[0])
        if kinds == {"conv_weight"} and from_constant(dq):
            counts["conv_weight"] += 1
        elif kinds and kinds <= {"conv_input", "requantized"}:
            counts["conv_input"] += 1
            counts["requantized"] += "requantized" in kinds
            counts["unsigned"] += _zero_point_type(model, dq) == onnx.TensorProto.UINT8
        else:
            counts["other"] += 1
            for kind in kinds - {"conv_input", "conv_weight"} or kinds:
                others[kind] = others.get(kind, 0) + 1
    return {**counts, "other_consumers": dict(sorted(others.items()))}


def _zero_point_type(model, dq) -> Optional[int]:
    """Element type of a DequantizeLinear's zero point (None when it has none: int8 by default)."""
    if len(dq.input) < 3 or not dq.input[2]:
        return None
    for init in model.graph.initializer:
        if init.name == dq.input[2]:
            return init.data_type
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == dq.input[2]:
            return node.attribute[0].t.data_type
    return None


def placement_note(placement: dict) -> str:
    text = f"Q/DQ: {placement['conv_input']} conv inputs, {placement['conv_weight']} conv weights"
    if placement["unsigned"]:
        text += f" ({placement['unsigned']} inputs uint8)"
    if placement["other"]:
        text += f", {placement['other']} elsewhere ({', '.join(f'{k} {v}' for k, v in placement['other_consumers'].items())})"
    return text


# --------------------------------------------------------------------------- child processes


def save_calibration(batches: Sequence, path: Path) -> Path:
    """Calibration batches (torch tensors or arrays [B,3,H,W]) -> one float32 .npy [N,3,H,W]."""
    arrays = [b.detach().cpu().numpy() if hasattr(b, "detach") else np.asarray(b) for b in batches]
    np.save(path, np.concatenate(arrays, 0).astype(np.float32, copy=False))
    return path


def _tail(text: str, limit: int = STDERR_TAIL_CHARS) -> str:
    """The last line of the child's output first (the exception, usually), then up to 12 lines of context."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "(no output)"
    return f"{lines[-1][:300]} | output tail: " + "\n".join(lines[-12:])[-limit:]


def _read_tail(path: Path, size: int = 64_000) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode(errors="replace")


def run_peer(peer: str, variant: str, fp32_onnx: Path, calib_npy: Path, settings: dict, out: Path,
             python: Optional[str] = None, timeout: Optional[float] = None, log_dir: Optional[Path] = None) -> PeerRun:
    """Quantize ``fp32_onnx`` with one peer variant in a child process; never raises for the
    peer's own failures (missing interpreter or library, crash, non-zero exit, timeout). The child's
    stdout and stderr stream into ``<log_dir>/<peer>_<variant>.log`` (default: next to ``out``)."""
    python = python or sys.executable
    out, fp32_onnx, calib_npy = Path(out).resolve(), Path(fp32_onnx).resolve(), Path(calib_npy).resolve()
    settings_path = out.with_name(out.stem + ".settings.json")
    settings_path.write_text(json.dumps(settings))
    log = Path(log_dir or out.parent) / f"{peer}_{variant}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [python, str(CHILD_SCRIPT), "--peer", peer, "--model", str(fp32_onnx), "--calib", str(calib_npy),
               "--settings", str(settings_path), "--out", str(out)]
    # the child must not see yoloq (PYTHONPATH), and its log must keep the order of stdout and stderr
    env = {**os.environ, "PYTHONPATH": "", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    try:
        with open(log, "w") as stream:
            stream.write(f"$ {' '.join(command)}\n")
            stream.flush()
            # cwd: the peers drop their own files in it (Quark: quantized_info.csv, *.data)
            done = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, timeout=timeout, env=env,
                                  cwd=out.parent)
    except FileNotFoundError as err:
        return PeerRun(peer, variant, out, time.perf_counter() - start, f"interpreter not found: {python} ({err})")
    except subprocess.TimeoutExpired:
        return PeerRun(peer, variant, out, time.perf_counter() - start,
                       f"timed out after {timeout:.0f} s: {_tail(_read_tail(log))}")
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        output = _read_tail(log)
        return PeerRun(peer, variant, out, seconds,
                       f"exit code {done.returncode}: {missing_library_hint(peer, python, output)}{_tail(output)}")
    if not out.is_file():
        return PeerRun(peer, variant, out, seconds, f"exit code 0 but no output file {out}")
    info_path = Path(str(out) + ".info.json")
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return PeerRun(peer, variant, out, seconds, info=info)


def missing_library_hint(peer: str, python: str, output: str) -> str:
    """'<package> is not installed for <python>: ...' when the child's output shows that the peer's
    own module failed to import; '' for any other failure."""
    from yoloq.bench.peer_child import PEER_PACKAGES
    if f"No module named '{PEER_MODULES[peer]}'" not in output:
        return ""
    return (f"{PEER_PACKAGES[peer]} is not installed for {python}; install it in its own venv "
            f"({PEER_INSTALL[peer]}) and pass --peer-python {peer}=<venv>/bin/python (docs/peers.md) | ")


def peer_rows(fp32_onnx: Path, calib_npy: Path, specs: Sequence[tuple[str, str]], evaluate_onnx: Callable,
              fp32_stats: dict, work_dir: Path, pythons: Optional[dict] = None, timeout: Optional[float] = None,
              iterations: int = 1000, adaround_images: Optional[int] = None,
              progress_print: Callable = print) -> list[dict]:
    """Run every (peer, variant) and evaluate each quantized file with ``evaluate_onnx(path)``
    (returns an object with ``stats``, ``seconds``, ``images_per_s``). Rows follow the
    bench_ptq format; a failed peer is ``{"tool", "variant", "error"}``."""
    import onnx
    from yoloq.report.common import stat_drop

    model = onnx.load(str(fp32_onnx))
    input_name = model.graph.input[0].name
    pythons = pythons or {}
    rows = []
    for peer, variant in specs:
        tool = PEER_TOOL_NAMES[peer]
        settings = peer_settings(model, peer, variant, input_name, iterations=iterations,
                                 adaround_images=adaround_images)
        run = run_peer(peer, variant, fp32_onnx, calib_npy, settings, Path(work_dir) / f"{peer}_{variant}.onnx",
                       python=pythons.get(peer), timeout=timeout, log_dir=Path(work_dir) / "logs")
        if not run.ok:
            rows.append({"tool": tool, "variant": variant, "error": run.error, "calib_seconds": run.seconds})
            progress_print(f"{tool} {variant}: failed: {run.error.splitlines()[-1] if run.error else ''}")
            continue
        try:
            placement = qdq_placement(run.out)
            result = evaluate_onnx(run.out)
        except Exception as err:  # noqa: BLE001 - a peer's file that does not run is a result, not a crash
            rows.append({"tool": tool, "variant": variant, "error": f"evaluation: {type(err).__name__}: {err}"[:600],
                         "calib_seconds": run.seconds})
            progress_print(f"{tool} {variant}: evaluation failed: {err}")
            continue
        versions = run.info.get("versions", {})
        rows.append({"tool": tool, "variant": variant, "fp32": fp32_stats, "int8": result.stats,
                     "drop": stat_drop(fp32_stats, result.stats), "calib_seconds": run.seconds,
                     "eval_seconds": result.seconds, "images_per_s": result.images_per_s,
                     "placement": placement, "versions": versions, "used": run.info.get("used", {}),
                     "note": f"{placement_note(placement)}; {_version_note(peer, versions)}"})
        progress_print(f"{tool:12s} {variant:20s} AP {result.stats['AP'] * 100:6.2f}  calib {run.seconds:7.1f} s")
    return rows


def _version_note(peer: str, versions: dict) -> str:
    from yoloq.bench.peer_child import PEER_PACKAGES  # a plain module: importing it needs numpy + onnx only
    package = PEER_PACKAGES[peer]
    ort = next((f"{name} {versions[name]}" for name in ("onnxruntime", "onnxruntime-gpu") if name in versions),
               "onnxruntime ?")
    return f"{package} {versions.get(package, '?')}, {ort}"
