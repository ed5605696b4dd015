"""Small things every recipe (PTQ, QAT) shares: stage timing, seeding, the calibration set."""
from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from yoloq.config import Config, DataConfig
from yoloq.errors import InputError


class StageTimer:
    """Wall-clock seconds per named stage (a stage entered twice adds up)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - start, 2)

    def with_total(self) -> dict[str, float]:
        return {**self.times, "total": round(time.perf_counter() - self.start, 2)}


def align_classes(cfg: Config, data_cfg: DataConfig) -> Config:
    """The model predicts the dataset's classes: upstream takes ``nc`` from the data YAML, so a model
    section (an upstream .py config, or a COCO config used with another dataset) follows it."""
    if cfg.model.nc == data_cfg.nc:
        return cfg
    return cfg.with_overrides(model={"nc": data_cfg.nc})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class CalibrationSet:
    """Calibration images (train split) loaded once: letterboxed batches and their file names."""
    batches: list = field(default_factory=list)
    files: list = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(b.shape[0] for b in self.batches)

    def first(self, n: int) -> list:
        """The first ``n`` images, as batches."""
        out, seen = [], 0
        for b in self.batches:
            if seen >= n:
                break
            out.append(b[: n - seen])
            seen += out[-1].shape[0]
        return out


def load_calibration_set(data_cfg: DataConfig, n_images: int, img_size: int, batch_size: int, workers: int,
                         seed: int) -> CalibrationSet:
    """``n_images`` train images chosen by ``seed`` (``yoloq.data.coco.calibration_loader``)."""
    from yoloq.data.coco import calibration_loader
    loader = calibration_loader(data_cfg, n_images, img_size, batch_size, workers, seed=seed)
    files = [name for _, name in loader.dataset.entries]
    batches = [images for images, _ in loader]
    if not batches:
        raise InputError(f"calibration: none of the {len(files)} chosen images in {data_cfg.train_images} "
                         f"could be read")
    return CalibrationSet(batches=batches, files=files)


# --------------------------------------------------------------------------- what a run ran on


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Peak resident memory of this process and of its finished children (data loader workers),
    and the peak CUDA memory allocated on ``device`` (None on the CPU), in MiB."""
    import resource
    kib = 1024.0                                    # Linux reports ru_maxrss in KiB
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib
    cuda = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return {"peak_rss_mib": round(own, 1), "peak_rss_children_mib": round(children, 1),
            "peak_cuda_mib": None if cuda is None else round(cuda, 1), "device": str(device)}


def run_environment(device: torch.device) -> dict:
    """Versions, thread count, CPU and device: what the numbers of a run depend on besides its inputs."""
    import platform
    from yoloq.quant import backend
    try:
        import onnxruntime
        ort = onnxruntime.__version__
    except ImportError:
        ort = None
    env = {"python": platform.python_version(), "torch": torch.__version__, "pytorch_quantization": backend.version(),
           "onnxruntime": ort, "threads": torch.get_num_threads(), "cpu": _cpu_model(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; ``platform.processor()`` elsewhere)."""
    import platform
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextmanager
def thread_invariant_kernels(enabled: bool = True):
    """Within the block, convolutions run on PyTorch's own kernels instead of oneDNN's on the CPU
    (and cuDNN picks deterministic algorithms on a GPU). oneDNN splits some convolutions differently
    with the thread count, so their float32 outputs differ in the last bits, and fake quantization
    turns a few of those into whole-level flips that carry to the mAP (docs/results.md, determinism).
    PyTorch's kernels give the same bits with any thread count, at 1.3-2x the CPU time."""
    if not enabled:
        yield
        return
    cudnn = torch.backends.cudnn
    with torch.backends.mkldnn.flags(enabled=False), \
            cudnn.flags(enabled=cudnn.enabled, benchmark=False, deterministic=True, allow_tf32=cudnn.allow_tf32):
        yield


def conv_kernels(thread_invariant: bool) -> str:
    """How the report names the kernels a run used."""
    if thread_invariant:
        return "pytorch (thread-count independent)"
    return "onednn" if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled else "pytorch"
