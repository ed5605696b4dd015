"""Implicit INT8 calibration (the baseline: upstream's "simple PTQ"): TensorRT's entropy / minmax
calibrators fed with yoloq's calibration images (train split), with a calibration cache.
TensorRT 8.6-10.x only (11 removed the calibrators).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch

from yoloq.errors import InputError
from yoloq.io import atomic_write_bytes
from yoloq.runtime.tensorrt.env import TrtUnavailable, implicit_calibration_removed, import_tensorrt


CALIBRATORS = ("entropy", "minmax")

CALIBRATOR_BASES = {"entropy": "IInt8EntropyCalibrator2", "minmax": "IInt8MinMaxCalibrator"}


class CalibrationBatches:
    """Fixed-size float32 batches ``[B,3,S,S]`` (contiguous, CPU) from an image loader.

    TensorRT's calibrator needs every batch to have exactly the calibration shape, while a loader's
    last batch may be short and failed images shrink batches: images are re-chunked, and a short
    remainder is dropped (with a warning) rather than padded, so no fake image skews the ranges.
    ``loader`` yields ``(images, metas)`` (yoloq loaders) or plain image tensors.
    """

    def __init__(self, loader: Iterable, batch_size: int, max_batches: Optional[int] = None):
        if batch_size < 1:
            raise InputError(f"calibration batch size must be >= 1, got {batch_size}")
        self.loader = loader
        self.batch_size = int(batch_size)
        self.max_batches = max_batches
        self.dropped = 0             # images left over in the last, incomplete batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        pending: list[torch.Tensor] = []
        n_pending = n_batches = 0
        self.dropped = 0
        for item in self.loader:
            images = item[0] if isinstance(item, (tuple, list)) else item
            if images is None or images.numel() == 0:
                continue
            if images.ndim != 4:
                raise InputError(f"calibration images must be [B,3,H,W], got shape {tuple(images.shape)}")
            pending.append(images.detach().to("cpu", torch.float32))
            n_pending += images.shape[0]
            while n_pending >= self.batch_size:
                stacked = torch.cat(pending, 0)
                yield stacked[:self.batch_size].contiguous()
                n_batches += 1
                if self.max_batches is not None and n_batches >= self.max_batches:
                    return
                rest = stacked[self.batch_size:]
                pending, n_pending = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
        self.dropped = n_pending
        if n_pending:
            warnings.warn(f"calibration: {n_pending} image(s) left over after the last full batch of "
                          f"{self.batch_size} were not used", stacklevel=2)
        if n_batches == 0:
            raise InputError(f"calibration: fewer images than one batch of {self.batch_size}")


def calibration_batches(data_cfg, n_images: int, img_size: int, batch_size: int, *, seed: int = 0,
                        workers: int = 2) -> CalibrationBatches:
    """Batches of ``n_images`` train images (``yoloq.data.coco.calibration_loader``: train split,
    letterboxed like evaluation) for a TensorRT calibrator."""
    from yoloq.data.coco import calibration_loader

    loader = calibration_loader(data_cfg, n_images, img_size, batch_size, workers, seed=seed)
    return CalibrationBatches(loader, batch_size)


class CalibrationFeeder:
    """The TensorRT-independent half of a calibrator: copies each batch into one device buffer and
    hands out its address; reads and (atomically) writes the calibration cache.

    Exceptions cannot cross back through TensorRT's C++ callback, so a failure is stored in
    ``error`` and calibration is ended; :func:`build_engine` re-raises it after the build.
    """

    def __init__(self, batches: Iterable[torch.Tensor], cache_file: Optional[str | os.PathLike] = None,
                 *, batch_size: Optional[int] = None, use_cache: bool = True, device: str | torch.device = "cuda"):
        self.batches = batches
        self.batch_size = int(batch_size or getattr(batches, "batch_size", 0) or 0)
        if self.batch_size < 1:
            raise InputError("CalibrationFeeder needs batch_size (or batches with a batch_size attribute)")
        self.cache_file = Path(cache_file) if cache_file else None
        self.use_cache = use_cache
        self.device = torch.device(device)
        self.buffer: Optional[torch.Tensor] = None
        self.n_batches = 0
        self.error: Optional[BaseException] = None
        self._iter: Optional[Iterator[torch.Tensor]] = None

    def next_pointers(self, names: Sequence[str]) -> Optional[list[int]]:
        """Device addresses (one per input name) of the next batch, or None when done."""
        try:
            if len(names) != 1:
                raise InputError(f"calibration feeds one image input, the network asks for {list(names)}")
            if self._iter is None:
                self._iter = iter(self.batches)
            batch = next(self._iter, None)
            if batch is None:
                return None
            if batch.shape[0] != self.batch_size:
                raise InputError(f"calibration batch has {batch.shape[0]} images, expected {self.batch_size}")
            if self.buffer is None or self.buffer.shape != batch.shape:
                self.buffer = torch.empty(batch.shape, dtype=torch.float32, device=self.device)
            self.buffer.copy_(batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)   # TensorRT reads it on its own stream
            self.n_batches += 1
            return [int(self.buffer.data_ptr())]
        except BaseException as err:  # noqa: BLE001 - must not unwind through TensorRT
            self.error = err
            return None

    def read_cache(self) -> Optional[bytes]:
        if self.use_cache and self.cache_file and self.cache_file.is_file():
            return self.cache_file.read_bytes()
        return None

    def write_cache(self, cache) -> None:
        if self.cache_file is None:
            return
        try:
            atomic_write_bytes(self.cache_file, _to_bytes(cache))
        except BaseException as err:  # noqa: BLE001
            self.error = err


def _to_bytes(buffer) -> bytes:
    try:
        return memoryview(buffer).tobytes()
    except TypeError:
        return bytes(buffer)


def _make_calibrator_class(kind: str):
    """A TensorRT calibrator class (pybind11 subclass) delegating to :class:`CalibrationFeeder`."""
    if kind not in CALIBRATOR_BASES:
        raise InputError(f"calibrator '{kind}': expected one of {CALIBRATORS}")
    trt = import_tensorrt()
    base = getattr(trt, CALIBRATOR_BASES[kind], None)
    if base is None:
        raise TrtUnavailable(implicit_calibration_removed(trt.__version__))

    class Calibrator(base):
        __doc__ = (f"``tensorrt.{CALIBRATOR_BASES[kind]}`` fed by yoloq calibration batches.\n\n"
                   "    Calibrator(batches, cache_file=None, *, use_cache=True)")
        algorithm_name = kind

        def __init__(self, batches, cache_file=None, *, batch_size=None, use_cache=True):
            base.__init__(self)          # pybind11 needs the C++ base initialised explicitly
            self.feeder = CalibrationFeeder(batches, cache_file, batch_size=batch_size, use_cache=use_cache)

        def get_batch_size(self):
            return self.feeder.batch_size

        def get_batch(self, names, *unused):
            return self.feeder.next_pointers(names)

        def read_calibration_cache(self, *unused):
            return self.feeder.read_cache()

        def write_calibration_cache(self, cache):
            self.feeder.write_cache(cache)

    Calibrator.__name__ = Calibrator.__qualname__ = {"entropy": "EntropyCalibrator", "minmax": "MinMaxCalibrator"}[kind]
    return Calibrator

_CALIBRATOR_CLASSES: dict = {}


def calibrator_class(kind: str):
    """``EntropyCalibrator`` / ``MinMaxCalibrator`` (built on first use: needs ``tensorrt``)."""
    if kind not in _CALIBRATOR_CLASSES:
        _CALIBRATOR_CLASSES[kind] = _make_calibrator_class(kind)
    return _CALIBRATOR_CLASSES[kind]


def make_calibrator(kind: str, batches: CalibrationBatches, cache_file: Optional[str | os.PathLike] = None,
                    *, use_cache: bool = True):
    return calibrator_class(kind)(batches, cache_file, use_cache=use_cache)


def __getattr__(name: str):
    # Module attributes EntropyCalibrator / MinMaxCalibrator resolve lazily (PEP 562), so importing
    # this module never imports tensorrt.
    if name == "EntropyCalibrator":
        return calibrator_class("entropy")
    if name == "MinMaxCalibrator":
        return calibrator_class("minmax")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
