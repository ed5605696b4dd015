"""Running an engine: a predictor for ``yoloq.eval.evaluate`` (torch CUDA tensors, no pycuda) and a
CUDA-event latency benchmark.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from yoloq.errors import InputError
from yoloq.runtime.tensorrt.env import TrtBuildError, require_gpu, import_tensorrt


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32, "INT8": torch.int8,
             "BOOL": torch.bool, "INT64": torch.int64, "BF16": torch.bfloat16, "UINT8": torch.uint8}
    for name, torch_dtype in table.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return torch_dtype
    raise TrtBuildError(f"unsupported TensorRT I/O data type {dtype}")


class _TensorIO:
    """I/O through the tensor-name API (TensorRT >= 8.5, the only one in 10)."""

    def __init__(self, trt, engine, context):
        self.engine, self.context = engine, context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self.shapes = {n: tuple(engine.get_tensor_shape(n)) for n in names}

    def batch_range(self, name: str) -> tuple[int, int]:
        if self.shapes[name][0] != -1:
            return self.shapes[name][0], self.shapes[name][0]
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        return int(lo[0]), int(hi[0])

    def bind(self, name: str, x: torch.Tensor) -> dict:
        self.context.set_input_shape(name, tuple(x.shape))
        self.context.set_tensor_address(name, int(x.data_ptr()))
        outs = {}
        for out in self.outputs:
            outs[out] = torch.empty(tuple(self.context.get_tensor_shape(out)), dtype=self.dtypes[out], device=x.device)
            self.context.set_tensor_address(out, int(outs[out].data_ptr()))
        return outs

    def execute(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TrtBuildError("TensorRT execute_async_v3 failed (see the TensorRT log)")


class _BindingIO:
    """I/O through bindings (TensorRT 8.x before the tensor-name API)."""

    def __init__(self, trt, engine, context):
        self.engine, self.context = engine, context
        names = [engine.get_binding_name(i) for i in range(engine.num_bindings)]
        self.index = {n: i for i, n in enumerate(names)}
        self.inputs = [n for n in names if engine.binding_is_input(self.index[n])]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(trt, engine.get_binding_dtype(self.index[n])) for n in names}
        self.shapes = {n: tuple(engine.get_binding_shape(self.index[n])) for n in names}
        self.pointers = [0] * len(names)

    def batch_range(self, name: str) -> tuple[int, int]:
        if self.shapes[name][0] != -1:
            return self.shapes[name][0], self.shapes[name][0]
        lo, _, hi = self.engine.get_profile_shape(0, self.index[name])
        return int(lo[0]), int(hi[0])

    def bind(self, name: str, x: torch.Tensor) -> dict:
        self.context.set_binding_shape(self.index[name], tuple(x.shape))
        self.pointers[self.index[name]] = int(x.data_ptr())
        outs = {}
        for out in self.outputs:
            shape = tuple(self.context.get_binding_shape(self.index[out]))
            outs[out] = torch.empty(shape, dtype=self.dtypes[out], device=x.device)
            self.pointers[self.index[out]] = int(outs[out].data_ptr())
        return outs

    def execute(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v2(bindings=self.pointers, stream_handle=stream.cuda_stream):
            raise TrtBuildError("TensorRT execute_async_v2 failed (see the TensorRT log)")


class TrtPredictor:
    """Runs a serialized TensorRT engine: ``Tensor[B,3,S,S] -> ndarray [B,N,4+nc]`` (float32).

    Usable as the ``predict`` of :func:`yoloq.eval.evaluate`. Batches larger than the engine's
    maximum are split; a fixed-batch engine gets short batches padded (padding rows are dropped).
    """

    def __init__(self, engine_path: str | os.PathLike, device: int = 0, verbose: bool = False):
        self.path = str(engine_path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"TensorRT engine not found: {self.path}")
        require_gpu()
        trt = import_tensorrt()
        self.device = torch.device("cuda", device)
        torch.cuda.set_device(self.device)
        self.logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(self.path).read_bytes())
        if self.engine is None:
            raise TrtBuildError(f"{self.path}: TensorRT {trt.__version__} cannot load this engine (engines are "
                                "tied to the TensorRT version and GPU that built them; rebuild it here)")
        self.context = self.engine.create_execution_context()
        io_cls = _TensorIO if hasattr(self.engine, "num_io_tensors") else _BindingIO
        self.io = io_cls(trt, self.engine, self.context)
        if len(self.io.inputs) != 1:
            raise InputError(f"{self.path}: expected one image input, engine has {self.io.inputs}")
        self.input_name = self.io.inputs[0]
        self.output_name = self._pick_output()
        self.min_batch, self.max_batch = self.io.batch_range(self.input_name)
        shape = self.io.shapes[self.input_name]
        self.img_size = shape[2] if shape[2] > 0 and shape[2] == shape[3] else None
        self.input_dtype = self.io.dtypes[self.input_name]
        self.stream = torch.cuda.Stream(self.device)

    def _pick_output(self) -> str:
        outs = self.io.outputs
        if len(outs) == 1:
            return outs[0]
        if "outputs" in outs:
            return "outputs"
        raise InputError(f"{self.path}: engine outputs {outs}; COCO evaluation needs the single [B,N,4+nc] "
                         "output (export without the NMS plugin)")

    def run_device(self, x: torch.Tensor) -> torch.Tensor:
        """One engine call on a CUDA tensor whose batch fits the profile; returns the CUDA output."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))   # x may come from another stream
        with torch.cuda.stream(self.stream):
            x = x.to(self.device, self.input_dtype).contiguous()
            outs = self.io.bind(self.input_name, x)
            self.io.execute(self.stream)
        self.stream.synchronize()
        return outs[self.output_name]

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        if self.img_size is not None and tuple(images.shape[2:]) != (self.img_size, self.img_size):
            raise InputError(f"{self.path}: engine input is {self.img_size}x{self.img_size}, got images of "
                             f"{images.shape[2]}x{images.shape[3]} (set --img-size {self.img_size})")
        results = []
        for start in range(0, images.shape[0], self.max_batch):
            chunk = images[start:start + self.max_batch]
            n = chunk.shape[0]
            if n < self.min_batch:        # fixed-batch engine: pad with zeros, drop those rows after
                pad = chunk.new_zeros((self.min_batch - n,) + tuple(chunk.shape[1:]))
                chunk = torch.cat((chunk, pad), 0)
            results.append(self.run_device(chunk)[:n].float().cpu())
        return torch.cat(results, 0).numpy()


@dataclass
class BenchResult:
    batch: int
    median_ms: Optional[float] = None
    p90_ms: Optional[float] = None
    mean_ms: Optional[float] = None
    throughput: Optional[float] = None      # images / s at the median latency
    iters: int = 0
    skipped: Optional[str] = None


def benchmark(engine_path: str | os.PathLike, batch_sizes: Sequence[int] = (1, 32), warmup: int = 50,
              iters: int = 200, img_size: Optional[int] = None,
              predictor: Optional[TrtPredictor] = None) -> list[BenchResult]:
    """GPU latency of the engine alone (device-resident random input, no host copies), timed with
    CUDA events per call after ``warmup`` calls: median / p90 (ms) and throughput (img/s).
    A batch size outside the engine's profile is reported as skipped."""
    if iters < 1 or warmup < 0:
        raise InputError(f"need iters >= 1 and warmup >= 0, got {iters} / {warmup}")
    pred = predictor or TrtPredictor(engine_path)
    shape = pred.io.shapes[pred.input_name]
    size = pred.img_size or img_size
    if not size:
        raise InputError(f"{engine_path}: engine input size is dynamic; pass img_size")
    results = []
    for batch in batch_sizes:
        if not pred.min_batch <= batch <= pred.max_batch:
            results.append(BenchResult(batch, skipped=f"engine batch range is {pred.min_batch}..{pred.max_batch}"))
            continue
        gen = torch.Generator(device=pred.device).manual_seed(0)
        x = torch.rand((batch, shape[1], size, size), generator=gen, device=pred.device).to(pred.input_dtype)
        with torch.cuda.stream(pred.stream):
            outputs = pred.io.bind(pred.input_name, x)    # keep the output buffers alive while timing
        for _ in range(warmup):
            pred.io.execute(pred.stream)
        pred.stream.synchronize()
        times = []
        for _ in range(iters):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(pred.stream)
            pred.io.execute(pred.stream)
            end.record(pred.stream)
            end.synchronize()
            times.append(begin.elapsed_time(end))
        del outputs
        t = np.asarray(times)
        median = float(np.median(t))
        results.append(BenchResult(batch, median, float(np.percentile(t, 90)), float(t.mean()),
                                   batch * 1000.0 / median, iters))
    return results


def format_bench_table(results: Sequence[BenchResult], title: str = "") -> str:
    lines = ([f"**{title}**", ""] if title else []) + [
        "| batch | median ms | p90 ms | img/s |", "|---|---|---|---|"]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.batch} | skipped: {r.skipped} | | |")
        else:
            lines.append(f"| {r.batch} | {r.median_ms:.3f} | {r.p90_ms:.3f} | {r.throughput:.1f} |")
    return "\n".join(lines)


def bench_to_dict(results: Sequence[BenchResult]) -> list[dict]:
    return [asdict(r) for r in results]
