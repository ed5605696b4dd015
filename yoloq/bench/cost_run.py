"""Measuring the default PTQ run for the cost model (``yoloq bench-cost``): ``yoloq ptq`` as a child
process (its ``report.json`` timings, wall time and peak RSS), and random checkpoints whose
detection head carries the class prior, for models without trained weights.

The child is the real command, with the model's default settings; only the image counts
(``--max-images``, ``--calib-images``) and the output folder are given. The large run adds
``--sensitivity off --no-diagnose``: those stages score a fixed count of calibration images
(``sensitivity_images``), so the small run measures them at the default's own cost and the
large run, which only has to separate per-image from fixed costs, need not pay them twice.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from yoloq.bench.cost import CostError, ModelCost, RunRecord, Scale, model_cost

PRIOR_PROB = 0.01          # the head's class prior (yoloq.train.run / upstream): bias = -log((1 - p) / p)
CANDIDATE_FRACTION = 0.014  # of the anchor x class scores above conf_thres: trained Lite-S / Lite-L give
#                            1.6 / 1.2 % on 16 train images; random weights with the prior alone give 0 %
#                            (every score 0.01: NMS sees no box), without it ~50 % (the candidate cap)
REG_OUT_STD = 0.25         # spread of the random box outputs around the prior's bias 1 (1 stride each side)
SKIP_IN_LARGE_RUN = ("--sensitivity", "off", "--no-diagnose")
# ptq flag (as a key) -> where the quant section keeps that fixed image count
FIXED_COUNTS = {"transform_images": ("transforms", "images"), "auto_images": ("calibration", "auto_images"),
                "sensitivity_images": ("sensitivity", "images")}
LOG_TAIL = 15
KILL_GRACE_S = 20
CHILD = "import sys; from yoloq.cli import console; sys.argv[0] = 'yoloq'; console()"


@dataclass
class Measured:
    """A finished run: the record for the cost model and its full report."""
    record: RunRecord
    report: dict


def ptq_command(cfg: str, scale: Scale, out: Path, name: str, weights: Optional[str] = None,
                data: Optional[str] = None, device: Optional[str] = None, extra: Sequence[str] = ()) -> list[str]:
    """``yoloq ptq`` (through this interpreter, so ``PYTHONPATH`` and the environment carry over)."""
    cmd = [sys.executable, "-c", CHILD, "ptq", "--cfg", cfg, "--max-images", str(scale.eval_images),
           "--calib-images", str(scale.calib_images), "--out", str(out), "--name", name, "--no-progress"]
    for flag, value in (("--weights", weights), ("--data", data), ("--device", device)):
        if value:
            cmd += [flag, str(value)]
    return cmd + list(extra)


# Runs the command as ITS child and writes that child's peak RSS (KiB) to argv[1]: a process spawned
# straight from this one would inherit this process's high-water mark at exec (Linux keeps the
# larger of the old and new memory's peaks), so the bench's own memory would leak into the figure.
RSS_WRAPPER = """
import os, resource, signal, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
signal.signal(signal.SIGTERM, lambda signum, frame: child.terminate())
code = child.wait()
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def run_child(cmd: Sequence[str], log_path: Path, env: Optional[dict] = None, timeout: Optional[float] = None,
              cwd: Optional[Path] = None) -> tuple[int, float, float]:
    """Run ``cmd`` with its output in ``log_path``: (exit code, wall seconds, peak RSS in MB of the
    command, or of its largest descendant that it waited for). After ``timeout`` seconds it gets
    SIGTERM (yoloq cleans up as for Ctrl-C), its process group SIGKILL ``KILL_GRACE_S`` later; the
    exit code is then negative."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, open(log_path, "ab") as log:
        rss_file = Path(tmp) / "rss"
        proc = subprocess.Popen([sys.executable, "-c", RSS_WRAPPER, str(rss_file), *cmd], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        timers = [threading.Timer(timeout, proc.terminate),
                  threading.Timer(timeout + KILL_GRACE_S, lambda: _kill_group(proc.pid))] if timeout else []
        for t in timers:
            t.daemon = True
            t.start()
        try:
            proc.wait()
        except BaseException:             # Ctrl-C / SIGTERM: do not leave the command running
            proc.terminate()
            proc.wait()
            raise
        finally:
            for t in timers:
                t.cancel()
        rss_kib = float(rss_file.read_text()) if rss_file.is_file() else 0.0
    return proc.returncode, time.perf_counter() - start, rss_kib / 1024.0       # Linux: KiB


@dataclass(frozen=True)
class CpuSnapshot:
    """Busy CPU seconds of the whole machine (``/proc/stat``; None off Linux) and the CPU seconds of
    this process's waited-for children and their waited-for descendants (``RUSAGE_CHILDREN``)."""
    machine_busy_s: Optional[float]
    children_s: float


def cpu_snapshot() -> CpuSnapshot:
    import resource
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        busy = None
    return CpuSnapshot(busy, kids.ru_utime + kids.ru_stime)


def other_cpus(before: CpuSnapshot, after: CpuSnapshot, wall_s: float) -> Optional[float]:
    """CPUs that processes other than the measured child (and this one, which only waits) kept busy
    on average over ``wall_s``: the machine's busy time minus the child's own CPU time."""
    if before.machine_busy_s is None or after.machine_busy_s is None or wall_s <= 0:
        return None
    own = after.children_s - before.children_s
    return round(max(0.0, (after.machine_busy_s - before.machine_busy_s - own) / wall_s), 2)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _log_tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-LOG_TAIL:])


def measure(cfg: str, scale: Scale, work: Path, name: str, weights: Optional[str] = None, data: Optional[str] = None,
            device: Optional[str] = None, extra: Sequence[str] = (), env: Optional[dict] = None) -> Measured:
    """One ``yoloq ptq`` run at ``scale``; its report.json and the child's usage."""
    import json
    log = work / f"{name}.log"
    code, wall, rss = run_child(ptq_command(cfg, scale, work, name, weights, data, device, extra), log, env)
    if code != 0:
        raise CostError(f"yoloq ptq --cfg {cfg} ({scale.eval_images} eval / {scale.calib_images} calibration images) "
                        f"failed with exit code {code}; the end of {log}:\n{_log_tail(log)}")
    report = json.loads((work / name / "report.json").read_text())
    return Measured(RunRecord(scale, dict(report["timings"]), round(wall, 2), round(rss, 1)), report)


# --------------------------------------------------------------------------- models


def parse_model(entry: str) -> tuple[str, Optional[int]]:
    """``config[:img_size]`` (a shipped config name or a path)."""
    cfg, _, size = entry.partition(":")
    if size and not size.isdigit():
        raise CostError(f"--models entry '{entry}': expected config[:img_size] with a whole number size")
    return cfg, int(size) if size else None


def fixed_counts(quant) -> dict:
    """The fixed calibration-image counts of a ``QuantConfig``, by the ``yoloq ptq`` flag that sets them."""
    return {flag: getattr(getattr(quant, section), field) for flag, (section, field) in FIXED_COUNTS.items()}


def sample_images(data_cfg, img_size: int, n: int = 4, seed: int = 0):
    """``n`` letterboxed train images ``[n, 3, S, S]`` (the calibration split; never val)."""
    import torch
    from yoloq.data.coco import calibration_images, letterbox, read_image, to_tensor
    names = calibration_images(data_cfg, n, seed)
    return torch.stack([to_tensor(letterbox(read_image(Path(data_cfg.train_images) / f), img_size)[0])
                        for f in names])


def random_checkpoint(cfg, path: Path, images, seed: int = 0) -> dict:
    """Seeded random weights for ``cfg.model`` whose head carries the class prior: class biases
    ``-log((1 - p) / p)``, class weights scaled so that ``CANDIDATE_FRACTION`` of the scores on
    ``images`` pass ``cfg.eval.conf_thres``, box outputs spread around the prior's 1 stride; saved
    as a plain state dict (what ``--weights`` reads). Returns the candidates per image."""
    import torch
    from yoloq.io import atomic_torch_save
    from yoloq.models import build_model
    torch.manual_seed(seed)
    model = build_model(cfg.model).eval()
    detect = model.detect
    heads = list(detect.cls_preds) + list(detect.reg_preds)
    raw = {}
    hooks = [conv.register_forward_hook(lambda m, i, o: raw.__setitem__(m, (o - m.bias.view(1, -1, 1, 1)).flatten()))
             for conv in heads]
    prior = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
    margin = math.log(cfg.eval.conf_thres / (1 - cfg.eval.conf_thres)) - prior     # logit distance to pass
    with torch.no_grad():
        try:
            model(images)
        finally:
            for h in hooks:
                h.remove()
        for conv in detect.cls_preds:
            z = raw[conv]
            top = z.kthvalue(max(1, round(z.numel() * (1 - CANDIDATE_FRACTION)))).values
            conv.weight.mul_(margin / max(float(top), 1e-12))
            conv.bias.fill_(prior)
        dfl = getattr(detect, "use_dfl", False)
        for conv in detect.reg_preds:            # DFL bins: logits around uniform; else distances around 1
            conv.weight.mul_((1.0 if dfl else REG_OUT_STD) / max(float(raw[conv].std()), 1e-12))
            conv.bias.fill_(1.0)
        scores = model(images)[..., 4:]
    atomic_torch_save(model.state_dict(), path)
    per_image = (scores > cfg.eval.conf_thres).flatten(1).sum(1).float()
    return {"candidates_per_image": round(float(per_image.mean()), 1),
            "candidate_fraction": round(float(per_image.mean()) / scores[0].numel(), 5)}


@dataclass
class Subject:
    """One model of the table: its config, size, weights and what the table says about them."""
    cfg: str
    img_size: int
    model: str
    weights: Optional[str]
    label: str
    notes: list


def prepare_subject(entry: str, data: Optional[str], work: Path, random: bool = False) -> Subject:
    """The config's trained weights when its file exists (and ``random`` is off), else a random
    checkpoint with the head prior in ``work``."""
    from yoloq.config import load_config
    from yoloq.data import load_data_config
    cfg_name, size = parse_model(entry)
    cfg = load_config(cfg_name)
    if size:
        cfg = cfg.with_overrides(model={"img_size": size})
    data_path = data or cfg.data
    if not data_path or not Path(data_path).is_file():
        raise CostError(f"{cfg_name}: dataset YAML not found: {data_path} (give --data)")
    notes = []
    if cfg.model.weights and Path(cfg.model.weights).is_file() and not random:
        return Subject(cfg_name, cfg.model.img_size, cfg.model.name, None, "trained", notes)
    data_cfg = load_data_config(data_path)
    cfg = cfg.with_overrides(model={"nc": data_cfg.nc})
    path = work / f"{cfg.model.name}_random_prior.pt"
    info = random_checkpoint(cfg, path, sample_images(data_cfg, cfg.model.img_size))
    notes.append(f"random weights, head prior {PRIOR_PROB}: {info['candidates_per_image']:.0f} candidates per image "
                 f"above conf_thres ({100 * info['candidate_fraction']:.2f} % of anchor x class scores)")
    return Subject(cfg_name, cfg.model.img_size, cfg.model.name, str(path), "random (head prior)", notes)


def too_few_calibration_images(counts: dict, calib_images: int) -> list[str]:
    """The fixed counts a run with ``calib_images`` cannot honour (those stages would run on fewer
    images than the default and be measured too cheap)."""
    return [f"{k} = {v} > {calib_images} calibration images" for k, v in sorted(counts.items()) if v > calib_images]


def child_env(threads: Optional[int]) -> dict:
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def scratch_dir(keep: Optional[Path]):
    """Where the runs go: ``keep`` (kept) or a temporary folder."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        return _Kept(keep)
    return tempfile.TemporaryDirectory(prefix="yoloq_bench_cost_")


class _Kept:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> str:
        return str(self.path)

    def __exit__(self, *exc) -> None:
        return None


# --------------------------------------------------------------------------- the benchmark


def _override_counts(counts: dict, extra: Sequence[str]) -> dict:
    """``counts`` with the ``--transform-images N`` style flags of ``extra`` applied."""
    counts = dict(counts)
    for i, arg in enumerate(extra[:-1]):
        key = arg.lstrip("-").replace("-", "_")
        if arg.startswith("--") and key in FIXED_COUNTS and extra[i + 1].isdigit():
            counts[key] = int(extra[i + 1])
    return counts


def bench_model(entry: str, small: Scale, large: Scale, work: Path, opts) -> ModelCost:
    """Both runs of one ``config[:size]`` entry, fitted."""
    subject = prepare_subject(entry, opts.data, work, opts.random_weights)
    extra = list(opts.ptq_args) + (["--img-size", str(subject.img_size)] if parse_model(entry)[1] else [])
    counts = _override_counts(fixed_counts_of(subject), opts.ptq_args)
    notes = subject.notes + [f"fixed counts {counts}"]
    short = too_few_calibration_images(counts, small.calib_images)
    if short:
        notes.append("NOT the default's cost: " + "; ".join(short))
    env = child_env(opts.threads)
    runs = []
    for tag, scale, more in (("small", small, ()), ("large", large, SKIP_IN_LARGE_RUN)):
        before, cpu_before = os.getloadavg()[0], cpu_snapshot()
        run = measure(subject.cfg, scale, work, f"{subject.model}_{tag}", subject.weights, opts.data, opts.device,
                      extra + list(more), env).record
        run.load_average, run.cpus = round(max(before, os.getloadavg()[0]), 1), os.cpu_count() or 0
        run.other_cpus = other_cpus(cpu_before, cpu_snapshot(), run.wall_s)
        runs.append(run)
    return model_cost(subject.model, subject.img_size, subject.label, runs[0], runs[1], notes)


def fixed_counts_of(subject: Subject) -> dict:
    from yoloq.config import load_config
    return fixed_counts(load_config(subject.cfg).quant)


def run_bench(models: Sequence[str], small: Scale, large: Scale, opts, progress: bool = True) -> list:
    """The fitted cost of every model (``opts``: data, device, threads, random_weights, ptq_args,
    keep_runs)."""
    from tqdm import tqdm
    costs = []
    with scratch_dir(opts.keep_runs) as work:
        for entry in tqdm(models, desc="bench-cost (2 ptq runs per model)", disable=not progress):
            costs.append(bench_model(entry, small, large, Path(work), opts))
    return costs
