"""yoloq PTQ against onnxruntime's ``quantize_static`` (and peer toolkits) on the same FP32 model and
calibration images, through the same COCO evaluation: the logic of ``yoloq bench-ptq`` (usage and
settings: ``yoloq.cli.bench_ptq``)."""
from __future__ import annotations

import copy
import multiprocessing
import signal
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

# pytorch-quantization 2.1.3 calls torch.jit.script at import; torch 2.14 warns about it
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

from yoloq.bench import peers
from yoloq.device import resolve_device
from yoloq.eval.coco_eval import evaluate
from yoloq.runtime.ort import OnnxPredictor
from yoloq.quant.calibrate import (AUTO_METHODS, apply_calibration, calibrate_auto, collect_statistics,
                                   method_key)
from yoloq.quant.prepare import prepare
from yoloq.eval.coco_eval import evaluate_model
from yoloq.models import load_model
from yoloq.recipes.common import load_calibration_set, seed_everything
from yoloq.recipes.ptq import resolve, run_quantization
from yoloq.io import atomic_write_bytes, atomic_write_text, check_output_dir, check_run_name, to_json
from yoloq.report.common import drop_text, md_table, stat_drop

YOLOQ_METHODS = ("max", "percentile-99.99", "percentile-99.999", "entropy", "mse", "auto", "pipeline")
# "pipeline": the config's whole quant section (PTQ transforms, calibration, bias correction,
# reconstruction) as ``yoloq ptq`` runs it, evaluated fake-quantized and as its exported Q/DQ ONNX
# "<calibration>_<activation/weight types>[_conv]": _conv quantizes only Conv / ConvTranspose (inputs,
# weights, outputs), leaving the decode (boxes in pixels and scores in 0..1 concatenated into one
# tensor, which one per-tensor scale wipes out) in float, as TensorRT placement does.
ORT_VARIANTS = ("minmax_s8s8", "entropy_s8s8", "percentile_s8s8", "minmax_u8s8",
                "minmax_s8s8_conv", "entropy_s8s8_conv", "percentile_s8s8_conv")


# --------------------------------------------------------------------------- onnxruntime side


def export_fp32_onnx(model: torch.nn.Module, path: Path, img_size: int, opset: int = 13) -> Path:
    """Plain FP32 export of the fused model (legacy exporter, traced on a CPU copy), dynamic batch."""
    dummy = torch.zeros(1, 3, img_size, img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model).cpu().eval(), dummy, str(path), input_names=["images"], output_names=["outputs"],
                          opset_version=opset, dynamic_axes={"images": {0: "batch"}, "outputs": {0: "batch"}},
                          dynamo=False)
    return path


class _Reader:
    """onnxruntime CalibrationDataReader over our calibration batches (one batch per call)."""

    def __init__(self, input_name: str, batches: list[torch.Tensor]):
        self.input_name, self.batches, self.i = input_name, batches, 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.input_name: self.batches[self.i - 1].numpy().astype(np.float32)}

    def rewind(self):
        self.i = 0


def _ort_quantize_in_process(fp32_onnx: Path, out: Path, variant: str, batches: list[torch.Tensor]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    method, types, *scope = variant.split("_")
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    act = {"s8s8": QuantType.QInt8, "u8s8": QuantType.QUInt8}[types]
    reader = type("Reader", (_Reader, CalibrationDataReader), {})("images", batches)
    op_types = ["Conv", "ConvTranspose"] if scope == ["conv"] else None     # None: every supported op
    # Not CalibMaxIntermediateOutputs: in onnxruntime 1.32 MinMax then fails with "No data is
    # collected" when the batch count is a multiple of it.
    quantize_static(str(fp32_onnx), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=act, weight_type=QuantType.QInt8, calibrate_method=calib,
                    op_types_to_quantize=op_types)


def ort_quantize(fp32_onnx: Path, out: Path, variant: str, batches: list[torch.Tensor]) -> float:
    """quantize_static with one of ``ORT_VARIANTS`` in a forked child process, so that a variant
    killed for memory (Entropy / Percentile over every op of Lite-M/L at 256 images need more than
    24 GB) becomes a failed row instead of ending the whole benchmark. Returns the seconds it took."""
    start = time.perf_counter()
    child = multiprocessing.get_context("fork").Process(target=_ort_quantize_in_process,
                                                          args=(fp32_onnx, out, variant, batches))
    child.start()
    child.join()
    if child.exitcode != 0:
        why = (" (killed by SIGKILL: most likely out of memory, onnxruntime's histogram calibrators keep "
               "every activation of every calibration image)" if child.exitcode == -signal.SIGKILL else "")
        raise RuntimeError(f"quantize_static {variant} exited with code {child.exitcode}{why}")
    return time.perf_counter() - start


# --------------------------------------------------------------------------- benchmark


class Bench:
    """One benchmark run: the FP32 model, the shared calibration images and evaluation, the rows."""

    def __init__(self, args):
        cfg, data_cfg = resolve(args.cfg, quant={"calibration.images": args.calib_images, "seed": args.seed},
                                eval={"workers": args.workers}, model={"weights": args.weights}, data=args.data)
        self.args, self.cfg, self.data_cfg = args, cfg, data_cfg
        name = args.name if args.name is not None else f"{cfg.model.name}_bench"
        check_output_dir(Path(args.out) / check_run_name(name), "--out")       # before the work, not after
        self.progress = not args.no_progress
        seed_everything(cfg.quant.seed)
        self.device = resolve_device(args.device)          # yoloq's rows; onnxruntime and the peers use the CPU
        self.fp32 = load_model(cfg.model).to(self.device)
        self.calib = load_calibration_set(data_cfg, cfg.quant.calibration.images, cfg.model.img_size,
                                          cfg.quant.loader.batch_size, cfg.eval.workers, cfg.quant.seed)
        self.rows: list[dict] = []
        self.fp32_eval = self.evaluate(self.fp32)
        print(f"FP32 (PyTorch) AP {self.fp32_eval.stats['AP'] * 100:.2f} on {self.fp32_eval.n_images} images", flush=True)

    def evaluate(self, model_or_onnx):
        """COCO evaluation of a PyTorch model or an ONNX file, identical for every row."""
        kw = dict(max_images=self.args.max_images, progress=self.progress)
        if isinstance(model_or_onnx, torch.nn.Module):
            return evaluate_model(model_or_onnx, self.data_cfg, self.cfg.eval, self.cfg.model.img_size, **kw)
        return evaluate(OnnxPredictor(model_or_onnx), self.data_cfg, self.cfg.eval, self.cfg.model.img_size, **kw)

    def add(self, tool: str, variant: str, reference, result, calib_s: float, note: str = "") -> None:
        """One row: ``result`` against ``reference`` (the FP32 evaluation of the same runtime), with
        the drop's paired-bootstrap interval (``--bootstrap`` resamples)."""
        fp32_stats = reference.stats
        self.rows.append({"tool": tool, "variant": variant, "fp32": fp32_stats, "int8": result.stats,
                          "drop": stat_drop(fp32_stats, result.stats), "drop_ci": self.interval(reference, result),
                          "calib_seconds": calib_s,
                          "eval_seconds": result.seconds, "images_per_s": result.images_per_s, "note": note})
        print(f"{tool:12s} {variant:20s} AP {result.stats['AP'] * 100:6.2f}  calib {calib_s:7.1f} s", flush=True)

    def interval(self, reference, result) -> Optional[dict]:
        if isinstance(result, _as_result):
            return result.drop_ci
        if not self.args.bootstrap or reference is result:
            return None
        from yoloq.recipes.ptq import drop_interval_record
        return drop_interval_record(reference, result, self.args.bootstrap)

    def yoloq_rows(self) -> None:
        """The config's pipeline, every calibration method from one statistics pass, then auto."""
        qcfg, batches = self.cfg.quant, self.calib.batches
        if "pipeline" in self.args.methods:
            with tempfile.TemporaryDirectory() as tmp:
                self.pipeline_rows(Path(tmp))
        methods = [m for m in self.args.methods if m not in ("auto", "pipeline")]
        if methods:
            self.method_rows(methods)
        if "auto" in self.args.methods:
            auto_model = prepare(self.fp32, qcfg)
            start = time.perf_counter()
            info = calibrate_auto(auto_model, batches, self.fp32, AUTO_METHODS, num_bins=qcfg.calibration.num_bins,
                                  progress=self.progress)
            calib_s = time.perf_counter() - start
            done = {r["variant"]: r for r in self.rows if r["tool"] == "yoloq"}
            result = _as_result(done[info["method"]]) if info["method"] in done else self.evaluate(auto_model)
            self.add("yoloq", "auto", self.fp32_eval, result, calib_s, note=f"chose {info['method']}")

    def method_rows(self, methods: list[str]) -> None:
        """Plain calibration (no transforms) with each range rule, from one statistics pass."""
        qmodel = prepare(self.fp32, self.cfg.quant)
        start = time.perf_counter()
        collect_statistics(qmodel, self.calib.batches, num_bins=self.cfg.quant.calibration.num_bins,
                           progress=self.progress)
        collect_s = time.perf_counter() - start
        for method in methods:
            start = time.perf_counter()
            apply_calibration(qmodel, method)
            self.add("yoloq", method_key(method), self.fp32_eval, self.evaluate(qmodel),
                     collect_s + time.perf_counter() - start)

    def pipeline_rows(self, tmp: Path) -> None:
        """The config's quant section end to end; the exported Q/DQ ONNX through onnxruntime too."""
        from yoloq.runtime import export_onnx
        start = time.perf_counter()
        run = run_quantization(self.cfg, self.data_cfg, self.fp32, self.calib, progress=self.progress)
        quant_s = time.perf_counter() - start
        plan = run.transforms.get("plan", "none")
        recon = self.cfg.quant.reconstruction.method
        note = f"{plan}; calib {run.calib_info['method']}" + (f"; {recon}" if recon != "off" else "")
        self.add("yoloq", "pipeline", self.fp32_eval, self.evaluate(run.qmodel), quant_s, note=note)
        info = export_onnx(run.qmodel, tmp / "pipeline.onnx", img_size=self.cfg.model.img_size, batch=None)
        self.add("yoloq", "pipeline_onnx", self.fp32_eval, self.evaluate(Path(info.path)), quant_s,
                 note="its Q/DQ ONNX export, evaluated with onnxruntime")

    def onnx_rows(self, tmp: Path) -> None:
        """onnxruntime's quantize_static variants and the peers, all from the same FP32 ONNX."""
        fp32_onnx = export_fp32_onnx(self.fp32, tmp / "fp32.onnx", self.cfg.model.img_size)
        ort_fp32 = self.evaluate(fp32_onnx)
        self.add("onnxruntime", "fp32", ort_fp32, ort_fp32, 0.0, note="FP32 ONNX export (sanity check)")
        for variant in ([] if self.args.skip_ort else self.args.ort_variants):
            qpath = tmp / f"{variant}.onnx"
            try:
                calib_s = ort_quantize(fp32_onnx, qpath, variant, self.calib.batches)
                result = self.evaluate(qpath)
            except Exception as err:  # noqa: BLE001 - a peer variant failing is a result, not a crash
                self.rows.append({"tool": "onnxruntime", "variant": variant, "error": f"{type(err).__name__}: {err}"})
                print(f"onnxruntime {variant}: failed: {err}", flush=True)
                continue
            self.add("onnxruntime", variant, ort_fp32, result, calib_s)
        if self.args.peers:              # NNCF, AMD Quark, AIMET in child processes (yoloq.bench.peers)
            self.rows += self.peer_rows(fp32_onnx, ort_fp32.stats, tmp)

    def peer_rows(self, fp32_onnx: Path, fp32_stats: dict, tmp: Path) -> list[dict]:
        args = self.args
        work = Path(args.out) / (args.name or f"{self.cfg.model.name}_bench") / "peers"
        work.mkdir(parents=True, exist_ok=True)
        calib = peers.save_calibration(self.calib.batches, tmp / "calib.npy")
        return peers.peer_rows(fp32_onnx, calib, peers.parse_peer_specs(args.peers), self.evaluate, fp32_stats, work,
                               pythons=peers.parse_peer_python(args.peer_python), timeout=args.peer_timeout,
                               iterations=args.peer_iterations, adaround_images=args.peer_adaround_images)

    def summary(self) -> dict:
        cfg, fp32_eval = self.cfg, self.fp32_eval
        return {"name": self.args.name or f"{cfg.model.name}_bench", "model": cfg.model.name, "config": cfg.path,
                "img_size": cfg.model.img_size, "calib_images": self.calib.images, "calib_files": self.calib.files,
                "seed": cfg.quant.seed, "eval_images": fp32_eval.n_images, "ann_file": fp32_eval.ann_file,
                "fp32": fp32_eval.stats, "rows": self.rows}


def run_bench(args) -> dict:
    peers.parse_peer_specs(args.peers), peers.parse_peer_python(args.peer_python)   # bad requests fail first
    bench = Bench(args)
    if not args.skip_yoloq:
        bench.yoloq_rows()
    if not args.skip_ort or args.peers:
        with tempfile.TemporaryDirectory() as tmp:
            bench.onnx_rows(Path(tmp))
    return bench.summary()


class _as_result:
    """An already measured row, re-used for ``auto`` when it picked a method measured above."""

    def __init__(self, row: dict):
        self.stats, self.seconds, self.images_per_s = row["int8"], row["eval_seconds"], row["images_per_s"]
        self.drop_ci = row.get("drop_ci")


def render_bench_markdown(bench: dict) -> str:
    head = [f"# PTQ peer benchmark: {bench['model']} at {bench['img_size']}", "",
            f"{bench['eval_images']} images of `{bench['ann_file']}`; {bench['calib_images']} train images for "
            f"calibration (the same for every row), seed {bench['seed']}. AP in %, drop in points vs the "
            f"FP32 of the same runtime, with its paired-bootstrap interval over the images where measured. "
            f"Calibration time includes the statistics pass.", ""]
    table = []
    for r in bench["rows"]:
        if "error" in r:
            table.append((r["tool"], r["variant"], "-", "failed", "-", "-", "-", r["error"][:80]))
            continue
        table.append((r["tool"], r["variant"], f"{r['fp32']['AP'] * 100:.2f}", f"{r['int8']['AP'] * 100:.2f}",
                      drop_text(r["drop"]["AP"], r.get("drop_ci")), f"{r['int8']['AP50'] * 100:.2f}", f"{r['calib_seconds']:.1f}",
                      r.get("note", "")))
    return "\n".join(head + [md_table(("tool", "variant", "FP32 AP", "INT8 AP", "drop", "INT8 AP50",
                                       "calib s", "note"), table), ""])


def plot_bench(bench: dict) -> bytes:
    from yoloq.report.common import figure_bytes, pyplot
    plt = pyplot()
    rows = [r for r in bench["rows"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    labels = [f"{r['tool']} {r['variant']}" for r in rows]
    ax.bar(range(len(rows)), [r["int8"]["AP"] * 100 for r in rows],
           color=["tab:blue" if r["tool"] == "yoloq" else "tab:orange" for r in rows])
    ax.axhline(bench["fp32"]["AP"] * 100, color="k", ls="--", lw=1, label="FP32 (PyTorch)")
    ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("COCO AP %")
    ax.set_title(f"{bench['model']}: INT8 PTQ, yoloq vs onnxruntime quantize_static")
    ax.legend()
    return figure_bytes(fig)




def run(args) -> int:
    """The benchmark for parsed command-line ``args`` (``yoloq bench-ptq``)."""
    start = time.perf_counter()
    bench = run_bench(args)
    bench["seconds"] = time.perf_counter() - start
    out = Path(args.out) / bench["name"]
    atomic_write_bytes(out / "bench.png", plot_bench(bench))
    atomic_write_text(out / "bench.json", to_json(bench))
    atomic_write_text(out / "bench.md", render_bench_markdown(bench))
    print(render_bench_markdown(bench))
    print(f"wrote {out}/ in {bench['seconds']:.0f} s")
    return 0
