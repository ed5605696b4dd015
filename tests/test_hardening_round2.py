"""Hardening, round 2 (issue 23): run folders yoloq did not write, run names that leave --out,
non-finite quantized checkpoints, --set values, YAML numbers and bombs, upstream .py config bounds,
one-line argparse / YAML errors, disk full, file modes, images by content."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_coco

from yoloq.cli import main as yoloq_main
from yoloq.errors import YoloqError
from yoloq.io import RUN_MARKER, check_run_name, remove_stale_staging, staging_dir

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
QUICK_PTQ = ["--random-weights", "--img-size", "64", "--calib", "max", "--calib-images", "2", "--max-images", "2",
             "--sensitivity", "off", "--no-diagnose", "--no-plots", "--channel-scale", "off",
             "--bias-correction", "off", "--no-progress"]


def yoloq_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """``yoloq ...`` as a user runs it (a fresh process)."""
    return subprocess.run([sys.executable, "-c", "from yoloq.cli import console; console()", *map(str, args)],
                          capture_output=True, text=True, env=ENV, cwd=cwd or REPO, timeout=600)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The run failed as a user error: exit 2, stderr is one ``error: ...`` line (returned)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return tiny_coco(tmp_path_factory.mktemp("tiny"))


# --------------------------------------------------------------------------- 1, 2, 25: run folders


def test_ptq_refuses_to_replace_a_folder_it_did_not_write(tiny_data, tmp_path):
    keep = tmp_path / "runs" / "keep"
    keep.mkdir(parents=True)
    (keep / "a.txt").write_text("hi")
    line = one_error_line(yoloq_cli("ptq", "--cfg", "yolov6lite_s", "--data", tiny_data, *QUICK_PTQ,
                                    "--out", tmp_path / "runs", "--name", "keep"))
    assert str(keep) in line and "not a yoloq run" in line
    assert (keep / "a.txt").read_text() == "hi"


@pytest.mark.parametrize("name", [".", "..", "../../../esc/x", "{tmp}/abs_run", "", "a/b", ".hidden"])
def test_run_names_stay_inside_out_for_every_command(tiny_data, tmp_path, capsys, name):
    name = name.format(tmp=tmp_path)
    out = tmp_path / "root" / "runs"
    (out / "other_run").mkdir(parents=True)
    (out / "other_run" / RUN_MARKER).write_text('{"kind": "ptq"}')
    (tmp_path / "quant.pt").write_bytes(b"not read: the name is checked first")
    commands = [
        ["ptq", "--cfg", "yolov6lite_s", "--data", tiny_data, *QUICK_PTQ],
        ["qat", "--cfg", "yolov6lite_s", "--data", tiny_data, "--from", tmp_path / "quant.pt", "--no-progress"],
        ["train", "--cfg", "yolov6n_qarepvgg", "--data", tiny_data, "--epochs", "1", "--no-progress"],
    ]
    for argv in commands:
        assert yoloq_main([str(a) for a in argv] + ["--out", str(out), "--name", name]) == 2, argv[0]
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--name: run name" in err, (argv[0], err)
    assert sorted(p.name for p in out.iterdir()) == ["other_run"]
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["runs"]


def test_model_name_from_a_config_cannot_leave_out(tiny_data, tmp_path):
    victim = tmp_path / "x" / "victim_max"
    victim.mkdir(parents=True)
    (victim / "a.txt").write_text("hi")
    cfg = tmp_path / "cfg" / "evil.yaml"
    cfg.parent.mkdir()
    base = yaml.safe_load((REPO / "configs" / "yolov6lite_s.yaml").read_text())
    base["model"]["name"] = "../../x/victim"
    base["model"].pop("weights", None)
    cfg.write_text(yaml.safe_dump(base))
    line = one_error_line(yoloq_cli("ptq", "--cfg", cfg, "--data", tiny_data, *QUICK_PTQ,
                                    "--out", tmp_path / "cfg" / "runs"))
    assert "run name from model.name" in line and "path separator" in line
    assert (victim / "a.txt").read_text() == "hi"


def test_check_run_name_accepts_plain_names():
    for name in ("lite_s", "x.v2", "run-1 (copy)", "a" * 200):
        assert check_run_name(name) == name
    with pytest.raises(YoloqError, match="longer than 200"):
        check_run_name("a" * 201)


def test_staging_replaces_only_an_earlier_run_of_the_same_kind(tmp_path):
    with staging_dir(tmp_path / "run", "ptq") as stage:
        (stage / "report.json").write_text("{}")
    assert (tmp_path / "run" / RUN_MARKER).is_file()
    with staging_dir(tmp_path / "run", "ptq") as stage:       # an earlier ptq run: replaced
        (stage / "new.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [RUN_MARKER, "new.json"]
    with pytest.raises(OSError, match="holds a yoloq ptq run, not a qat run"):
        with staging_dir(tmp_path / "run", "qat"):
            pass
    (tmp_path / "empty").mkdir()
    with staging_dir(tmp_path / "empty", "ptq"):               # an empty folder holds nothing to lose
        pass
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(OSError, match="not a yoloq run"):
        with staging_dir(tmp_path / "mine", "ptq"):
            pass
    assert (tmp_path / "mine" / "notes.txt").is_file()
    os.symlink(tmp_path / "run", tmp_path / "link")
    with pytest.raises(OSError, match="symbolic link"):
        with staging_dir(tmp_path / "link", "ptq"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_stale_staging_matches_only_the_names_it_creates(tmp_path):
    live_other = tmp_path / f".x.v2.{os.getpid()}.abcd1234.tmp"     # the live staging folder of run 'x.v2'
    dead_same = tmp_path / ".x.999999999.abcd1234.tmp"             # a killed run 'x' (no such pid)
    dead_old = tmp_path / ".x.old-999999999"
    dead_other = tmp_path / ".x.v2.999999999.abcd1234.tmp"         # a killed run 'x.v2': not run x's to remove
    for p in (live_other, dead_same, dead_old, dead_other):
        p.mkdir()
    removed = remove_stale_staging(tmp_path / "x")
    assert sorted(p.name for p in removed) == sorted([dead_same.name, dead_old.name])
    assert live_other.is_dir() and dead_other.is_dir()


# --------------------------------------------------------------------------- 4: non-finite quantized checkpoints


@pytest.fixture(scope="module")
def tiny_quant(tmp_path_factory) -> Path:
    """A real quantized checkpoint of a random Lite-S at 64 px (calibrated on noise)."""
    import torch
    from yoloq.config import load_config
    from yoloq.models import build_model
    from yoloq.quant import quantize, save_quantized
    cfg = load_config("yolov6lite_s").with_overrides(model={"img_size": 64})
    torch.manual_seed(0)
    qmodel = quantize(build_model(cfg.model).fuse().eval(), [torch.rand(2, 3, 64, 64)], progress=False)
    path = tmp_path_factory.mktemp("q") / "quant.pt"
    save_quantized(qmodel, path, meta={"name": "tiny"})
    return path


def _nan_first(table: dict) -> str:
    import torch
    key = next(k for k, v in table.items() if isinstance(v, torch.Tensor) and v.is_floating_point())
    table[key] = torch.full_like(table[key], float("nan"))
    return key


def _poison(ckpt: dict, where: str) -> str:
    """Put NaN / inf into one stored tensor; returns its name as the error should give it."""
    import torch
    if where == "weights":
        return "weights." + _nan_first(ckpt["weights"])
    if where == "weight_amax":
        key = next(iter(ckpt["weight_amax"]))
        ckpt["weight_amax"][key] = torch.full_like(ckpt["weight_amax"][key], float("inf"))
        return f"weight_amax.{key}"
    if where == "input_amax":
        key = next(k for k, r in ckpt["input_quantizers"].items() if r.get("amax") is not None)
        ckpt["input_quantizers"][key]["amax"] = torch.tensor(float("nan"))
        return f"input_quantizers.{key}.amax"
    name = next(iter(ckpt["weight_amax"]))
    ckpt["bias_shifts"] = {name: torch.tensor([float("nan")])}
    return f"bias_shifts.{name}"


@pytest.mark.parametrize("where", ["weights", "weight_amax", "input_amax", "bias_shifts"])
def test_non_finite_quantized_checkpoint_is_refused_naming_the_tensor(tiny_quant, tmp_path, where):
    import torch
    from yoloq.quant.checkpoint import QuantCheckpointError, load_quantized
    ckpt = torch.load(tiny_quant, weights_only=True)
    name = _poison(ckpt, where)
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.raises(QuantCheckpointError, match=f"NaN/inf values \\(first: '{name}'\\)"):
        load_quantized(tmp_path / "nan.pt")


def test_export_and_load_refuse_a_nan_quant_pt(tiny_quant, tiny_data, tmp_path, capsys):
    import torch
    import yoloq
    ckpt = torch.load(tiny_quant, weights_only=True)
    _poison(ckpt, "weights")
    torch.save(ckpt, tmp_path / "nan.pt")
    line = one_error_line(yoloq_cli("export", "--ckpt", tmp_path / "nan.pt", "--out", tmp_path / "m.onnx"))
    assert "NaN/inf" in line and not (tmp_path / "m.onnx").exists()
    with pytest.raises(yoloq.errors.YoloqError, match="NaN/inf"):
        yoloq.load(tmp_path / "nan.pt")
