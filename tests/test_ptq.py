"""run_ptq end to end on the shared Lite-S weights (tiny image counts), and bad-input handling."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from yoloq.config import ConfigError, QuantConfig
from yoloq.errors import YoloqError
from yoloq.safe_load import CheckpointError
from yoloq.recipes.ptq import PTQError, PTQOptions, run_ptq
from yoloq.quant.checkpoint import load_quantized
from yoloq.report.common import MAIN_STATS
from yoloq.report.ptq import load_report
from yoloq.quant.state import quant_state
from yoloq.cli import main as yoloq_main
from conftest import DATA_YAML as DATA, LITE_S_WEIGHTS as WEIGHTS, SHARED, needs_shared


TINY = dict(max_images=8, progress=False, quant=dict(calib_images=8, sensitivity_images=4), eval=dict(workers=0))


def tiny(**quant):
    """TINY with more quant overrides."""
    return {**TINY, "quant": {**TINY["quant"], **quant}}


def write_cfg(tmp_path: Path, weights=WEIGHTS, data=DATA, quant: dict | None = None) -> Path:
    cfg = {"model": {"name": "yolov6lite_s", "arch": "lite", "backbone": "Lite_EffiBackbone",
                     "neck": "Lite_EffiNeck", "width_multiple": 0.7, "img_size": 320, "weights": str(weights)},
           "data": str(data), "eval": {"batch_size": 8, "workers": 0},
           "quant": {"calib": "max", "calib_images": 8, "batch_size": 4, **(quant or {})}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or list(out.iterdir()) == [], f"partial output left in {out}: {list(out.iterdir())}"


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
@needs_shared
def test_run_ptq_lite_s_end_to_end(tmp_path):
    """auto calibration + sensitivity (fast and mAP) + --max-drop search + diagnosis + report + quant.pt."""
    out = tmp_path / "runs"
    res = run_ptq(write_cfg(tmp_path, quant={"calib": "auto"}), out=str(out), name="e2e",
                  **tiny(auto_methods=["max", "percentile-99.99", "entropy"], sensitivity="map", confirm_top=2,
                         max_drop=0.0, max_skip=2, select_images=3, sensitivity_images=2))
    run_dir = out / "e2e"
    assert sorted(p.name for p in out.iterdir()) == ["e2e"]                  # no staging folder left
    for name in ("report.md", "report.json", "stats.png", "sensitivity.png", "diagnosis.png", "quant.pt"):
        assert (run_dir / name).is_file(), name
    rep = load_report(run_dir / "report.json")
    assert rep["fp32"]["AP"] > 0.15 and rep["int8"]["AP"] > 0.05
    for k in MAIN_STATS:
        assert rep["drop"][k] == pytest.approx((rep["fp32"][k] - rep["int8"][k]) * 100, abs=1e-6)
    assert rep["data"]["eval_images"] == 8 and rep["calibration"]["images"] == 8
    calib = rep["calibration"]
    assert calib["requested"] == "auto" and set(calib["auto_errors"]) == {"max", "percentile-99.99", "entropy"}
    assert calib["method"] == max(calib["auto_errors"], key=lambda m: calib["auto_errors"][m]["sqnr_db"])
    assert all(f.startswith("0000") for f in calib["files"])                 # train image names
    n_layers = rep["placement"]["quantized_layers"]
    assert len(rep["sensitivity"]["ranking"]) == n_layers == len(rep["diagnosis"]["layers"])
    assert {"calibrate", "eval_fp32", "eval_int8", "sensitivity", "partial_search", "total"} <= set(rep["timings"])
    # --max-drop: measured on labeled train images that were not calibration images, never on val
    sel = rep["selection"]
    assert sel["images"] == 3 and sel["disjoint_from_calibration"] == 3
    assert sel["source"].endswith("instances_train2017.json") and "never on val" in rep["partial"]["note"]
    trace, k = rep["partial"]["search"], rep["partial"]["k"]
    passing = [t["k"] for t in trace if t["drop"] <= 0.0]
    assert trace[0]["k"] == 0 and k == (min(passing) if passing else 2) and all(t["k"] <= 2 for t in trace)
    assert set(rep["skipped_layers"]) == {r["layer"] for r in rep["sensitivity"]["ranking"][:k]}
    assert res.skipped_layers == rep["skipped_layers"]
    assert all("map_drop" in r for r in rep["sensitivity"]["ranking"][:2] if r["layer"] not in rep["skipped_layers"])
    md = (run_dir / "report.md").read_text()
    assert f"| AP | {rep['fp32']['AP'] * 100:.2f} | {rep['int8']['AP'] * 100:.2f} |" in md
    model, meta = load_quantized(run_dir / "quant.pt")
    assert quant_state(model).skip_layers == rep["skipped_layers"] and meta["calib_method"] == calib["method"]


@pytest.mark.slow
@needs_shared
def test_run_ptq_is_reproducible(tmp_path):
    cfg = write_cfg(tmp_path, quant={"calib": "percentile"})
    common = dict(out=str(tmp_path / "runs"), plots=False, **{**tiny(diagnose=False, sensitivity="off"), "max_images": 4})
    a = run_ptq(cfg, name="a", **common)
    b = run_ptq(cfg, name="b", **common)
    assert a.int8 == b.int8 and a.fp32 == b.fp32
    qa, _ = load_quantized(tmp_path / "runs" / "a" / "quant.pt")
    qb, _ = load_quantized(tmp_path / "runs" / "b" / "quant.pt")
    for (ka, va), (kb, vb) in zip(qa.state_dict().items(), qb.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_partial_quantization_keeps_top_k_and_explicit_skips():
    """--skip-layers and the --max-drop search on a toy model (the search's measure is a plain
    function of the skipped set here; the real one is COCO mAP on train images, tested above)."""
    from test_sensitivity import calibrated, toy
    from yoloq.quant.prepare import set_layers_quantized
    from yoloq.quant.partial import partial_quantization
    fp32 = toy()
    q, images = calibrated(fp32)
    set_layers_quantized(q, ["6"], False)                                   # e.g. from quant.skip_layers
    sens = {"ranking": [{"layer": name} for name in ("2", "6", "4", "0")]}   # most sensitive first
    part = partial_quantization(q, sens, None, skip_count=2, max_drop=None, max_skip=None, progress=False)
    assert part["k"] == 2 and quant_state(q).skip_layers == ["2", "4", "6"]        # model order; "6" not counted

    class Drops:                                                            # drop falls as layers stay in float
        info, fp32_ap = {"images": 1, "disjoint_from_calibration": 1}, 0.5

        def drop(self, model):
            return 3.0 - len(quant_state(model).skip_layers)

    set_layers_quantized(q, ["2", "4"], True)                               # back to only "6" in float
    part = partial_quantization(q, sens, Drops(), skip_count=None, max_drop=1.0, max_skip=None, progress=False)
    assert part["k"] == 1 and quant_state(q).skip_layers == ["2", "6"]
    assert [t["k"] for t in part["search"]] == [0, 1]


# --------------------------------------------------------------------------- bad input


@needs_shared
def test_missing_weights_and_data_fail_before_work(tmp_path):
    out = tmp_path / "runs"
    with pytest.raises(PTQError, match=r"model.weights not found: .*nope\.pt"):
        run_ptq(write_cfg(tmp_path, weights=tmp_path / "nope.pt"), out=str(out), **TINY)
    with pytest.raises(PTQError, match=r"dataset YAML not found: .*missing\.yaml"):
        run_ptq(write_cfg(tmp_path, data=tmp_path / "missing.yaml"), out=str(out), **TINY)
    data = yaml.safe_load(DATA.read_text())
    data.update(train_images=str(tmp_path / "no_such_dir"), val_images=str(SHARED / "coco" / "val2017"),
                train_ann=str(SHARED / "coco/annotations/instances_train2017.json"),
                val_ann=str(SHARED / "coco/annotations/instances_val2017.json"), val_ann_official=None)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(PTQError, match=r"train_images \(calibration\) not found: .*no_such_dir"):
        run_ptq(write_cfg(tmp_path, data=tmp_path / "data.yaml"), out=str(out), **TINY)
    assert_nothing_written(out)


@needs_shared
def test_unreadable_calibration_images(tmp_path):
    bad = tmp_path / "train"
    bad.mkdir()
    (bad / "000000000001.jpg").write_bytes(b"not a jpeg")
    data = yaml.safe_load(DATA.read_text())
    data.update(train_images=str(bad), val_images=str(SHARED / "coco" / "val2017"),
                train_ann=str(SHARED / "coco/annotations/instances_train2017.json"),
                val_ann=str(SHARED / "coco/annotations/instances_val2017.json"), val_ann_official=None)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "runs"
    with pytest.warns(UserWarning, match="unreadable"), pytest.raises(YoloqError, match="no readable image"):
        run_ptq(write_cfg(tmp_path, data=tmp_path / "data.yaml"), out=str(out), **TINY)
    assert_nothing_written(out)


@needs_shared
def test_invalid_quant_section(tmp_path):
    out = tmp_path / "runs"
    with pytest.raises(ConfigError, match="quant.calibration.method: 'kl' is not one of max, percentile, entropy, mse, auto"):
        run_ptq(write_cfg(tmp_path, quant={"calib": "kl"}), out=str(out), **TINY)
    with pytest.raises(ConfigError, match="unknown key 'calib_image'"):
        run_ptq(write_cfg(tmp_path, quant={"calib_image": 8}), out=str(out), **TINY)
    with pytest.raises(ConfigError, match="quant.calibration.percentile"):
        run_ptq(write_cfg(tmp_path, quant={"calib": "percentile", "percentile": 120}), out=str(out), **TINY)
    with pytest.raises(PTQError, match="give one"):
        run_ptq(write_cfg(tmp_path), out=str(out), skip_count=2, **tiny(max_drop=1.0))
    with pytest.raises(PTQError, match="not a quantized layer"):
        run_ptq(write_cfg(tmp_path, quant={"skip_layers": ["backbone.nope"]}), out=str(out), **TINY)
    assert_nothing_written(out)


@needs_shared
def test_nan_weights_are_named_before_any_work(tmp_path):
    """A NaN in the FP32 weights stops at load, naming the tensor (NaN activations from finite
    weights are caught by calibration: test_calibrate)."""
    ckpt = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    key = "backbone.conv_0.block.conv.weight"
    ckpt["model_state_dict"][key][0, 0, 0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    out = tmp_path / "runs"
    with pytest.raises(CheckpointError, match=rf"hold NaN/inf values \(first: '{key}'\)"):
        run_ptq(write_cfg(tmp_path, weights=tmp_path / "nan.pt"), out=str(out), **TINY)
    assert_nothing_written(out)


def test_options_are_a_dataclass_with_defaults():
    opts = PTQOptions()
    assert opts.skip_count is None and opts.out == "runs/ptq" and opts.save_model
    assert QuantConfig().sensitivity.metric == "fast"



@pytest.mark.slow
@needs_shared
def test_bench_ptq_tiny(tmp_path):
    """The peer benchmark runs both sides on the same images and writes one table; the pipeline
    row runs the config's transforms and its exported ONNX gives the fake-quant AP in onnxruntime.
    Measured on these 2 images: pipeline 24.97, its ONNX 25.62 (a few one-level rounding flips
    between the runtimes move a detection); FP32 in PyTorch and in onnxruntime both 27.53."""
    cfg = write_cfg(tmp_path, quant={"equalize": True, "channel_scale": "all", "channel_scale_alpha": 0.8,
                                     "transform_images": 4})
    code = yoloq_main(["bench-ptq", "--cfg", str(cfg), "--calib-images", "4", "--max-images", "2", "--workers", "0",
                       "--methods", "max", "pipeline", "--ort-variants", "minmax_s8s8", "--out", str(tmp_path / "b"),
                       "--name", "t", "--no-progress"])
    assert code == 0
    bench = load_report(tmp_path / "b" / "t" / "bench.json")
    rows = {(r["tool"], r["variant"]): r for r in bench["rows"]}
    assert set(rows) == {("yoloq", "max"), ("yoloq", "pipeline"), ("yoloq", "pipeline_onnx"),
                         ("onnxruntime", "fp32"), ("onnxruntime", "minmax_s8s8")}
    assert "equalize + scale all a=0.8" in rows[("yoloq", "pipeline")]["note"]
    assert rows[("yoloq", "pipeline_onnx")]["int8"]["AP"] == pytest.approx(rows[("yoloq", "pipeline")]["int8"]["AP"],
                                                                           abs=0.015)
    assert rows[("onnxruntime", "fp32")]["int8"]["AP"] == pytest.approx(bench["fp32"]["AP"], abs=0.003)
    assert bench["calib_images"] == 4 and bench["eval_images"] == 2
    assert "| onnxruntime | minmax_s8s8 |" in (tmp_path / "b" / "t" / "bench.md").read_text()


def test_bench_ptq_failed_peer_variant_is_an_error_not_a_crash(tmp_path):
    """quantize_static runs in a child process; its failure is raised as one clear error (the
    benchmark records it as a failed row and goes on)."""
    from yoloq.bench import ptq as bench_ptq
    missing = tmp_path / "no_such_model.onnx"
    with pytest.raises(RuntimeError, match=r"quantize_static minmax_s8s8_conv exited with code 1"):
        bench_ptq.ort_quantize(missing, tmp_path / "q.onnx", "minmax_s8s8_conv", [torch.zeros(1, 3, 32, 32)])
    assert not (tmp_path / "q.onnx").exists()
