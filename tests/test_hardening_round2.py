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
    """The run failed as a user error: exit 2, stderr is one ``error: ...`` line (returned), besides
    one-line ``warning: ...`` notes."""
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
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
    assert "model.name must be a plain name" in line and "'../../x/victim'" in line
    assert (victim / "a.txt").read_text() == "hi"
    line = one_error_line(yoloq_cli("eval", "--cfg", cfg, "--data", tiny_data, "--random-weights"))
    assert "model.name must be a plain name" in line          # its default --out runs/eval/<name>.json too


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
    from yoloq.quant import Calibrate, quantize, save_quantized
    cfg = load_config("yolov6lite_s").with_overrides(model={"img_size": 64})
    torch.manual_seed(0)
    qmodel = quantize(build_model(cfg.model).fuse().eval(), [Calibrate()], [torch.rand(2, 3, 64, 64)], progress=False)
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
        yoloq.load_quantized(tmp_path / "nan.pt")


# --------------------------------------------------------------------------- 6, 7: --set values and YAML numbers


def test_set_accepts_scientific_notation_in_flags_and_files(tmp_path):
    from yoloq.config import apply_settings, load_config
    cfg = apply_settings(load_config("yolov6n_qarepvgg"), ["train.lr0=1e-3", "train.weight_decay=5E-4",
                                                          "quant.percentile=9.999e1"])
    assert (cfg.train.lr0, cfg.train.weight_decay, cfg.quant.calibration.percentile) == (1e-3, 5e-4, 99.99)
    (tmp_path / "sci.yaml").write_text("model:\n  name: sci\n  arch: yolov6\n  img_size: 64\n"
                                       "train:\n  lr0: 2e-3\n  epochs: 1e1\nquant:\n  percentile: 9.999E+1\n")
    loaded = load_config(tmp_path / "sci.yaml")
    assert (loaded.train.lr0, loaded.train.epochs, loaded.quant.calibration.percentile) == (2e-3, 10, 99.99)


@pytest.mark.parametrize("item", ["train.lr0=", "train.epochs= ", "model.img_size=", "loss.iou_type="])
def test_empty_set_value_is_an_error_naming_the_key(item):
    from yoloq.config import ConfigError, apply_settings, load_config
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=f"--set {key}: empty value"):
        apply_settings(load_config("yolov6n_qarepvgg"), [item])


def test_empty_set_value_on_the_command_line_is_one_line(tiny_data, tmp_path):
    line = one_error_line(yoloq_cli("train", "--cfg", "yolov6n_qarepvgg", "--data", tiny_data, "--epochs", "1",
                                    "--out", tmp_path, "--set", "train.lr0="))
    assert "--set train.lr0: empty value" in line
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 14: upstream .py configs, bounded


def _model_py(**fields) -> str:
    base = dict(depth_multiple="0.33", width_multiple="0.25")
    base.update(fields)
    return (f"model = dict(type='YOLOv6n', depth_multiple={base['depth_multiple']}, "
            f"width_multiple={base['width_multiple']},\n"
            "    backbone=dict(type='EfficientRep', num_repeats=[1, 6, 12, 18, 6], "
            "out_channels=[64, 128, 256, 512, 1024], fuse_P2=True, cspsppf=True),\n"
            "    neck=dict(type='RepBiFPANNeck', num_repeats=[12, 12, 12, 12], "
            "out_channels=[256, 128, 128, 256, 256, 512]),\n"
            "    head=dict(type='EffiDeHead', num_layers=3, strides=[8, 16, 32], use_dfl=False, reg_max=0))\n")


@pytest.mark.parametrize("fields, message", [
    ({"width_multiple": " + ".join(["1"] * 300_000)}, "bytes; an upstream model config is a few KB"),
    ({"width_multiple": " + ".join(["1"] * 100_000)}, "too long or nested too deeply"),
    ({"width_multiple": "-" * 200_000 + "1"}, "too long or nested too deeply"),
    ({"width_multiple": "(" * 60 + "1" + ")" * 60 + " + " + " + ".join(["0"] * 60)}, "nested deeper than 50"),
    ({"width_multiple": ".inf"}, "not valid Python"),
    ({"width_multiple": "1e308*10"}, r"a number beyond \+-1e\+12"),
    ({"width_multiple": "1e11*1e11"}, r"a number beyond \+-1e\+12"),
    ({"width_multiple": "1e400"}, "a non-finite number"),
    ({"width_multiple": "1" * 5000}, "not valid Python"),
    ({"width_multiple": "0x" + "f" * 5000}, "a number beyond"),
    ({"width_multiple": "int('" + "9" * 5000 + "')"}, r"int\('9999"),
    ({"depth_multiple": "100000"}, r"model.depth_multiple must be in \(0, 4\], got 100000"),
    ({"width_multiple": "5.0"}, r"model.width_multiple must be in \(0, 4\]"),
])
def test_hostile_upstream_config_values_are_bounded(tmp_path, fields, message):
    from yoloq.config import ConfigError, load_config
    path = tmp_path / "hostile.py"
    path.write_text(_model_py(**fields))
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value) and len(str(err.value)) < 600 and "\n" not in str(err.value)


def test_hostile_upstream_eval_params_are_bounded(tmp_path):
    from yoloq.config import ConfigError, load_config
    path = tmp_path / "e.py"
    path.write_text(_model_py() + "eval_params = dict(conf_thres=1e9, img_size=640)\n")
    with pytest.raises(ConfigError, match=r"eval_params: eval.conf_thres must be in \[0, 1\]"):
        load_config(path)
    path.write_text(_model_py() + "eval_params = dict(img_size=[640, 900000])\n")
    with pytest.raises(ConfigError, match=r"eval_params: model.img_size must be .* <= 8192"):
        load_config(path)


def test_hostile_upstream_config_on_the_command_line_is_one_line(tmp_path):
    path = tmp_path / "deep.py"
    path.write_text(_model_py(depth_multiple="100000"))
    line = one_error_line(yoloq_cli("eval", "--cfg", path, "--random-weights", "--out", tmp_path / "r.json"))
    assert "model.depth_multiple must be in (0, 4]" in line


@pytest.mark.parametrize("key, value, message", [
    ("depth_multiple", 100000, r"model.depth_multiple must be in \(0, 4\]"),
    ("width_multiple", float("inf"), r"model.width_multiple must be in \(0, 4\]"),
    ("reg_max", 10 ** 9, r"model.reg_max must be in \[0, 64\]"),
    ("nc", 10 ** 9, r"model.nc must be in \[1, 100000\]"),
    ("img_size", 2 ** 20, r"model.img_size must be .* <= 8192"),
])
def test_model_fields_of_yaml_configs_are_bounded_too(tmp_path, key, value, message):
    from yoloq.config import ConfigError, load_config
    raw = yaml.safe_load((REPO / "configs" / "yolov6n_qarepvgg.yaml").read_text())
    raw["model"][key] = value
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "c.yaml")


# --------------------------------------------------------------------------- issue 26.2: today's upstream configs


def test_current_upstream_eval_params_are_accepted():
    import warnings
    from yoloq.config import load_config
    fixture = REPO / "tests" / "fixtures" / "upstream_configs" / "experiment" / "yolov6n_with_eval_params_2023.py"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # standard values: nothing to warn about
        cfg = load_config(fixture)
    assert (cfg.model.arch, cfg.model.neck, cfg.model.img_size, cfg.eval.conf_thres) == \
        ("yolov6", "RepBiFPANNeck", 640, 0.03)


@pytest.mark.parametrize("change, named", [
    (("infer_on_rect=False", "infer_on_rect=True"), "infer_on_rect"),
    (("shrink_size=None", "shrink_size=4"), "shrink_size"),
])
def test_current_upstream_eval_tweaks_warn(tmp_path, change, named):
    from yoloq.config import load_config
    fixture = REPO / "tests" / "fixtures" / "upstream_configs" / "experiment" / "yolov6n_with_eval_params_2023.py"
    (tmp_path / "c.py").write_text(fixture.read_text().replace(*change))
    with pytest.warns(UserWarning, match=f"eval_params {named} ignored"):
        load_config(tmp_path / "c.py")


# --------------------------------------------------------------------------- 15, 18: YAML bombs and one-line YAML errors


def _laughs(levels: int = 9) -> str:
    """A billion-laughs value in flow style: 9 levels of 9 aliases each (9^9 strings when expanded)."""
    value, prev = "[&a [lol,lol,lol,lol,lol,lol,lol,lol,lol]", "a"
    for name in "bcdefghijklm"[:levels - 1]:
        value += f", &{name} [" + ",".join([f"*{prev}"] * 9) + "]"
        prev = name
    return value + "]"


@pytest.mark.parametrize("section, key", [("model", "name"), ("quant", "skip_layers")])
def test_billion_laughs_value_is_refused_quickly(tmp_path, section, key):
    import time
    from yoloq.config import ConfigError, load_config
    path = tmp_path / "bomb.yaml"
    path.write_text(f"{section}:\n  {key}: {_laughs()}\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="YAML aliases expand .*an alias bomb") as err:
        load_config(path)
    assert time.perf_counter() - start < 5 and len(str(err.value)) < 300


def test_billion_laughs_in_set_and_data_yaml(tmp_path):
    from yoloq.config import ConfigError, apply_settings, load_config
    from yoloq.data import load_data_config
    with pytest.raises(ConfigError, match="--set model.name: YAML aliases expand"):
        apply_settings(load_config("yolov6lite_s"), [f"model.name={_laughs()}"])
    (tmp_path / "d.yaml").write_text(f"train: a\nval: b\nnc: 2\nnames: {_laughs()}\n")
    with pytest.raises(ConfigError, match="YAML aliases expand"):
        load_data_config(tmp_path / "d.yaml")


def test_recursive_alias_is_refused(tmp_path):
    from yoloq.config import ConfigError, load_config
    (tmp_path / "r.yaml").write_text("quant:\n  skip_layers: &s [a, *s]\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        load_config(tmp_path / "r.yaml")


def test_large_bad_values_are_printed_bounded(tmp_path):
    from yoloq.config import ConfigError, load_config
    (tmp_path / "big.yaml").write_text("model:\n  name: [" + ", ".join(["x" * 50] * 20000) + "]\n")
    with pytest.raises(ConfigError, match="'name' must be a string, got \\['xxx") as err:
        load_config(tmp_path / "big.yaml")
    assert len(str(err.value)) < 300
    (tmp_path / "long.yaml").write_text("quant:\n  calib: " + "m" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="quant.calibration.method: ") as err:
        load_config(tmp_path / "long.yaml")
    assert len(str(err.value)) < 400


@pytest.mark.parametrize("text, where, problem", [
    ("model:\n  name: [unclosed\n  arch: lite\n", ":3:7:", "expected ',' or ']'"),
    ("model:\n  name: !!python/object:os.system x\n", ":2:9:", "could not determine a constructor"),
    ("model:\n\tname: x\n", ":2:1:", "found character '\\t'"),
    ("a: b: c\n", ":1:5:", "mapping values are not allowed here"),
])
def test_yaml_syntax_and_tag_errors_are_one_line(tmp_path, text, where, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    line = one_error_line(yoloq_cli("eval", "--cfg", path, "--random-weights"))
    assert line.startswith(f"error: {path}{where} not valid YAML: ") and problem in line


# --------------------------------------------------------------------------- 18: argparse errors on one line


@pytest.mark.parametrize("argv, named", [
    (["ptq", "--cfg", "yolov6lite_s", "--calib-images", "0"], "yoloq ptq: argument --calib-images: expected an integer >= 1"),
    (["ptq", "--cfg", "yolov6lite_s", "--calib-images", "many"], "expected an integer, got 'many'"),
    (["eval", "--cfg", "yolov6lite_s", "--conf-thres", "2"], "yoloq eval: argument --conf-thres: expected a number in [0, 1]"),
    (["qat"], "yoloq qat: the following arguments are required: --cfg"),
    (["export", "--ckpt", "a.pt"], "the following arguments are required: --out"),
    (["trt", "build", "--precision", "int4", "--onnx", "m.onnx"], "yoloq trt build: argument --precision: invalid choice"),
    (["train", "--cfg", "yolov6n_qarepvgg", "--no-such-flag"], "yoloq train: unrecognized arguments: --no-such-flag"),
    (["bench-ort", "--cfg", "yolov6lite_s", "--weights", "w.pt", "--hardswish-as-relu"], "needs --random-weights"),
    (["train", "--cfg", "yolov6n_qarepvgg", "--img-size", "-32"], "argument --img-size: expected an integer >= 1"),
    (["bench-fidelity", "--cfg", "yolov6lite_s", "--ckpt", "q.pt", "--noise-std", "nan"],
     "argument --noise-std: expected a finite number > 0, got nan"),
    (["bench-eval", "--threads", "0"], "argument --threads: expected an integer >= 1"),
    (["trt", "build", "--onnx", "m.onnx", "--workspace", "-1"], "argument --workspace: expected a finite number > 0"),
])
def test_usage_errors_are_one_line_with_exit_2(argv, named):
    line = one_error_line(yoloq_cli(*argv))
    assert named in line and "usage:" not in line


# --------------------------------------------------------------------------- issue 26.5: shared flags on every command


@pytest.mark.parametrize("command, argv", [
    ("eval", ["--cfg", "yolov6lite_s"]),
    ("ptq", ["--cfg", "yolov6lite_s"]),
    ("qat", ["--cfg", "yolov6lite_s", "--from", "runs/ptq/x"]),
    ("trt", ["eval", "--engine", "e.engine", "--cfg", "yolov6lite_s"]),
])
def test_threshold_flags_and_set_reach_the_config(command, argv):
    import importlib
    from yoloq.cli import COMMANDS
    build = importlib.import_module(COMMANDS[command][0]).build_parser
    ns = build().parse_args(argv + ["--conf-thres", "0.25", "--iou-thres", "0.5", "--set", "eval.max_det=17",
                                    "quant.calib_images=5e1"])
    cfg = ns.cfg
    assert (cfg.eval.conf_thres, cfg.eval.iou_thres, cfg.eval.max_det, cfg.quant.calibration.images) == (0.25, 0.5, 17, 50)


@pytest.mark.parametrize("command, argv", [
    ("export", ["--ckpt", "q.pt", "--out", "m.onnx", "--cfg", "yolov6lite_s"]),
    ("bench-fidelity", ["--cfg", "yolov6lite_s", "--ckpt", "q.pt"]),
    ("bench-ptq", ["--cfg", "yolov6lite_s"]),
    ("bench-ort", ["--cfg", "yolov6lite_s", "--random-weights"]),
    ("train", ["--cfg", "yolov6n_qarepvgg"]),
    ("repopt-scales", ["--cfg", "yolov6n_hs", "--out", "s.pt"]),
    ("trt", ["build", "--onnx", "m.onnx", "--cfg", "yolov6lite_s"]),
])
def test_set_is_on_every_command_with_a_config(command, argv):
    import importlib
    from yoloq.cli import COMMANDS
    ns = importlib.import_module(COMMANDS[command][0]).build_parser().parse_args(argv + ["--set", "export.opset=17"])
    assert ns.cfg.export.opset == 17


def test_set_without_cfg_and_bad_set_keys_are_one_line(tmp_path):
    line = one_error_line(yoloq_cli("export", "--ckpt", "q.pt", "--out", tmp_path / "m.onnx", "--set", "export.opset=17"))
    assert "--set changes the config: give --cfg" in line
    line = one_error_line(yoloq_cli("eval", "--cfg", "yolov6lite_s", "--set", "eval.conf_thresh=0.1"))
    assert "unknown key 'conf_thresh' (did you mean 'conf_thres'?)" in line


def test_bench_eval_applies_set_to_each_model():
    from yoloq.cli.bench_eval import build_parser
    ns = build_parser().parse_args(["--set", "eval.max_det=3"])
    assert ns.settings == ["eval.max_det=3"] and ns.models == ["yolov6lite_s:320", "yolov6s_repvgg:640"]


# --------------------------------------------------------------------------- 9, 10, 23: data


def test_duplicate_annotation_id_is_refused(tiny_data, tmp_path):
    import json
    from yoloq.data.ground_truth import GroundTruthError, validate_ground_truth
    gt = json.loads((tiny_data.parent / "val.json").read_text())
    gt["annotations"].append(dict(gt["annotations"][0]))
    with pytest.raises(GroundTruthError, match="annotation 1 \\(image 1\\): annotation id listed twice"):
        validate_ground_truth(gt, "val.json")
    root = tmp_path / "d"
    root.mkdir()
    (root / "val.json").write_text(json.dumps(gt))
    data = yaml.safe_load(tiny_data.read_text())
    data.update(val_images=str(tiny_data.parent / "val"), val_ann=str(root / "val.json"),
                train_images=str(tiny_data.parent / "train"), train_ann=str(tiny_data.parent / "train.json"))
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    line = one_error_line(yoloq_cli("eval", "--cfg", "yolov6lite_s", "--data", root / "data.yaml", "--random-weights",
                                    "--img-size", "64", "--out", tmp_path / "r.json"))
    assert "annotation id listed twice" in line and not (tmp_path / "r.json").exists()


def _yolo_dataset(root: Path) -> Path:
    """3 val images with YOLO labels (images/val, labels/val) and an upstream data YAML."""
    import cv2
    import numpy as np
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(root / "images" / split / f"im{i}.png"), np.full((48, 64, 3), 40 * i, np.uint8))
            (root / "labels" / split / f"im{i}.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnc: 2\nnames: [a, b]\n")
    return root / "data.yaml"


def test_label_path_that_is_a_folder_is_an_error_naming_it(tmp_path):
    from yoloq.data.yolo_labels import YoloLabelError, read_labels
    data = _yolo_dataset(tmp_path)
    bad = tmp_path / "labels" / "val" / "im1.txt"
    bad.unlink()
    bad.mkdir()
    with pytest.raises(YoloLabelError, match="not a file \\(a directory\\?\\)"):
        read_labels(bad, 2)
    line = one_error_line(yoloq_cli("eval", "--cfg", "yolov6lite_s", "--data", data, "--random-weights",
                                    "--img-size", "64", "--out", tmp_path / "r.json"))
    assert str(bad) in line and "not a file" in line
    (tmp_path / "labels" / "val" / "im2.txt").unlink()
    (tmp_path / "labels" / "val" / "im2.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(YoloLabelError, match="broken symbolic link"):
        read_labels(tmp_path / "labels" / "val" / "im2.txt", 2)


def test_png_named_jpg_is_read_by_content(tmp_path):
    import cv2
    import numpy as np
    import torch
    from yoloq.data.coco import CocoDetectionDataset
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :30] = 200
    ok, png = cv2.imencode(".png", image)
    (tmp_path / "000000000001.jpg").write_bytes(png.tobytes())
    tensor, meta = CocoDetectionDataset(tmp_path, None, 64)[0]
    assert isinstance(tensor, torch.Tensor) and (meta.orig_h, meta.orig_w) == (40, 60)


# --------------------------------------------------------------------------- 13, 19: full disk, file modes


@pytest.fixture
def full_disk(tmp_path):
    """A 1.5 MB tmpfs (a disk that fills up); skipped where mounting is not permitted."""
    mount = tmp_path / "full"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.strip()[:200]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _fill(folder: Path) -> None:
    """Use up every free byte of the file system of ``folder``."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def test_full_disk_is_one_line_and_leaves_nothing(full_disk, tiny_quant, tiny_data):
    line = one_error_line(yoloq_cli("export", "--ckpt", tiny_quant, "--out", full_disk / "m.onnx"))
    assert f"{full_disk / 'm.onnx'}: cannot write it: No space left on device" in line
    assert list(full_disk.iterdir()) == []
    line = one_error_line(yoloq_cli("ptq", "--cfg", "yolov6lite_s", "--data", tiny_data, *QUICK_PTQ,
                                    "--out", full_disk, "--name", "r"))
    assert f"{full_disk / 'r'}" in line and "No space left on device" in line
    assert list(full_disk.iterdir()) == []
    _fill(full_disk)
    line = one_error_line(yoloq_cli("eval", "--cfg", "yolov6lite_s", "--data", tiny_data, "--random-weights",
                                    "--img-size", "64", "--no-progress", "--out", full_disk / "e.json"))
    assert f"{full_disk / 'e.json'}: cannot write it: No space left on device" in line
    assert [p.name for p in full_disk.iterdir()] == ["filler"]


def test_eval_result_has_the_normal_file_mode(tiny_data, tmp_path):
    old = os.umask(0o022)
    try:
        assert yoloq_main(["eval", "--cfg", "yolov6lite_s", "--data", str(tiny_data), "--random-weights",
                           "--img-size", "64", "--no-progress", "--out", str(tmp_path / "e.json")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "e.json").stat().st_mode & 0o777 == 0o644


def test_closed_stdout_pipe_ends_quietly(tiny_quant, tmp_path):
    proc = subprocess.run(f"{sys.executable} -c 'from yoloq.cli import console; console()' export --ckpt {tiny_quant}"
                          f" --out {tmp_path / 'm.onnx'} | head -c 10", shell=True, capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=600)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr[-2000:]


# --------------------------------------------------------------------------- issue 26.9: warnings


def test_warnings_are_one_clean_line(tiny_data, tmp_path):
    proc = yoloq_cli("eval", "--cfg", "yolov6lite_s", "--data", tiny_data, "--random-weights", "--img-size", "64",
                     "--no-progress", "--out", tmp_path / "e.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("warning: ") for line in lines), proc.stderr
    assert "no detections to evaluate" in proc.stderr and "UserWarning" not in proc.stderr


def test_shared_folder_warning_only_when_the_shared_folder_is_used(tiny_data, tmp_path, monkeypatch):
    import warnings
    import torch
    from yoloq.config import lookup
    from yoloq.config.lookup import SharedFolderWarning
    from yoloq.models import build_model
    from yoloq.config import load_config
    monkeypatch.delenv("YOLOQ_SHARED", raising=False)
    monkeypatch.setattr(lookup, "shared_dir", lambda: tmp_path / "no_shared")
    monkeypatch.setattr(lookup, "_warned_shared", set())
    torch.save(build_model(load_config("yolov6lite_s").model).state_dict(), tmp_path / "w.pt")
    argv = ["eval", "--cfg", "yolov6lite_s", "--data", str(tiny_data), "--img-size", "64", "--no-progress",
            "--max-images", "1"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert yoloq_main(argv + ["--weights", str(tmp_path / "w.pt"), "--out", str(tmp_path / "a.json")]) == 0
    assert not [w for w in caught if issubclass(w.category, SharedFolderWarning)]
    monkeypatch.setattr(lookup, "_warned_shared", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yoloq_main(argv + ["--out", str(tmp_path / "b.json")])            # model.weights under ${YOLOQ_SHARED}
    assert [w for w in caught if issubclass(w.category, SharedFolderWarning)]


def test_zero_size_box_warning_once_per_dataset():
    import warnings
    from yoloq.data.ground_truth import validate_ground_truth
    gt = {"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1}],
          "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 0, 3]}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            validate_ground_truth(gt, "once_per_dataset.json")
    assert len([w for w in caught if "zero-size" in str(w.message)]) == 1


# --------------------------------------------------------------------------- 12: export arguments


@pytest.mark.parametrize("flags, named", [
    (["--img-size", "300"], "--img-size 300: expected a multiple of 32"),
    (["--opset", "999"], "opset 999: this torch"),
])
def test_export_bad_size_or_opset_is_one_line(tiny_quant, tmp_path, flags, named):
    line = one_error_line(yoloq_cli("export", "--ckpt", tiny_quant, "--out", tmp_path / "m.onnx", *flags))
    assert named in line and not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------- 17: outputs checked before the work


def test_bench_fidelity_checks_its_output_first(tiny_quant, tiny_data, tmp_path):
    import time
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    start = time.perf_counter()
    line = one_error_line(yoloq_cli("bench-fidelity", "--cfg", "yolov6lite_s", "--set", f"data={tiny_data}",
                                    "--ckpt", tiny_quant, "--images", "2", "--output-images", "0", "--no-progress",
                                    "--out", blocker / "b.json"))
    assert "is a file, not a directory" in line and time.perf_counter() - start < 60


def test_repopt_scales_checks_its_output_first(tmp_path):
    line = one_error_line(yoloq_cli("repopt-scales", "--cfg", "yolov6n_hs", "--weights", tmp_path / "missing.pt",
                                    "--out", tmp_path))
    assert "is an existing directory" in line


# --------------------------------------------------------------------------- 21: loader messages


@pytest.fixture(scope="module")
def odd_pickles(tmp_path_factory) -> dict:
    import pickle
    import numpy as np
    import torch
    folder = tmp_path_factory.mktemp("odd")
    torch.save({"w": np.zeros(3)}, folder / "numpy.pt")               # a pickled object beyond tensors
    with open(folder / "legacy.pt", "wb") as f:                        # plain pickle, not torch.save
        pickle.dump({"x": 1}, f)
    (folder / "text.pt").write_text("hello\n")
    return {p.stem: p for p in folder.iterdir()}


def test_quant_pt_errors_never_relay_torch_advice(odd_pickles):
    from yoloq.quant.checkpoint import QuantCheckpointError, load_quantized
    for path in odd_pickles.values():
        with pytest.raises(QuantCheckpointError) as err:
            load_quantized(path)
        text = str(err.value)
        assert "weights_only" not in text and "\n" not in text and len(text) < 400, text
    with pytest.raises(QuantCheckpointError, match=r"pickled Python object \(numpy"):
        load_quantized(odd_pickles["numpy"])


def test_scales_file_errors_are_one_clean_line(odd_pickles, tiny_data, tmp_path):
    from yoloq.train.errors import ScalesMismatchError
    from yoloq.train.repopt import load_scales
    for path in odd_pickles.values():
        with pytest.raises(ScalesMismatchError, match="RepOpt scales file") as err:
            load_scales(path)
        assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
    line = one_error_line(yoloq_cli("train", "--cfg", "yolov6n_repopt", "--data", tiny_data, "--epochs", "1",
                                    "--scales", odd_pickles["numpy"], "--out", tmp_path / "runs"))
    assert "RepOpt scales file" in line and "weights_only" not in line


# --------------------------------------------------------------------------- issue 26.10: -h examples work anywhere


def test_help_examples_name_configs_that_resolve_outside_a_checkout(tmp_path, monkeypatch):
    import importlib
    import re
    from yoloq.cli import COMMANDS
    from yoloq.config.lookup import find_config
    monkeypatch.chdir(tmp_path)                       # no configs/ folder here
    names = set()
    for module, _ in COMMANDS.values():
        doc = importlib.import_module(module).__doc__ or ""
        names |= set(re.findall(r"--cfg\s+([^\s\\\\]+)", doc)) | set(re.findall(r"--models\s+([^\s:]+)", doc))
    names = {n for n in names if n != "..." and not n.startswith("<")}   # placeholders, not names
    assert names and all("/" not in n for n in names), sorted(names)
    for name in names:
        assert find_config(name).is_file()


# --------------------------------------------------------------------------- further cases: outputs that are inputs


def test_an_output_that_is_an_input_is_refused(tiny_quant, tiny_data, tmp_path):
    import shutil
    ckpt = tmp_path / "quant.pt"
    shutil.copy(tiny_quant, ckpt)
    before = ckpt.read_bytes()
    line = one_error_line(yoloq_cli("export", "--ckpt", ckpt, "--out", ckpt))
    assert "is also the command's --ckpt" in line and ckpt.read_bytes() == before
    line = one_error_line(yoloq_cli("eval", "--cfg", "yolov6lite_s", "--data", tiny_data, "--random-weights",
                                    "--out", tiny_data))
    assert "is also the command's --data" in line


def test_ptq_does_not_replace_a_run_folder_holding_its_weights(tiny_data, tmp_path):
    import torch
    from yoloq.config import load_config
    from yoloq.models import build_model
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / RUN_MARKER).write_text('{"kind": "ptq"}')
    torch.save(build_model(load_config("yolov6lite_s").model).state_dict(), run / "my_weights.pt")
    line = one_error_line(yoloq_cli("ptq", "--cfg", "yolov6lite_s", "--data", tiny_data, *QUICK_PTQ[1:],
                                    "--weights", run / "my_weights.pt", "--out", tmp_path / "runs", "--name", "r"))
    assert "holds the run's input --weights" in line and (run / "my_weights.pt").is_file()


@pytest.mark.parametrize("flags, named", [
    (["--nms", "onnx", "--score-thres", "nan"], "argument --score-thres: expected a number in [0, 1]"),
    (["--nms", "onnx", "--iou-thres", "7"], "argument --iou-thres: expected a number in [0, 1]"),
])
def test_export_nms_thresholds_are_checked(tiny_quant, tmp_path, flags, named):
    line = one_error_line(yoloq_cli("export", "--ckpt", tiny_quant, "--out", tmp_path / "m.onnx", *flags))
    assert named in line and not (tmp_path / "m.onnx").exists()


def test_export_onnx_refuses_nms_thresholds_out_of_range(tiny_quant, tmp_path):
    from yoloq.runtime.onnx_export import ExportError, export_onnx
    with pytest.raises(ExportError, match="NMS settings"):
        export_onnx(tiny_quant, tmp_path / "m.onnx", img_size=64, nms="onnx", score_threshold=float("nan"))


@pytest.mark.parametrize("command", ["train", "qat"])
def test_train_and_qat_do_not_write_into_a_folder_they_did_not_make(tiny_data, tmp_path, capsys, command):
    keep = tmp_path / "runs" / "keep"
    keep.mkdir(parents=True)
    (keep / "a.txt").write_text("hi")
    (tmp_path / "quant.pt").write_bytes(b"not read")
    argv = {"train": ["train", "--cfg", "yolov6n_qarepvgg", "--epochs", "1"],
            "qat": ["qat", "--cfg", "yolov6lite_s", "--from", str(tmp_path / "quant.pt")]}[command]
    assert yoloq_main(argv + ["--data", str(tiny_data), "--out", str(tmp_path / "runs"), "--name", "keep",
                              "--no-progress"]) == 2
    assert "not a yoloq run" in capsys.readouterr().err
    assert sorted(p.name for p in keep.iterdir()) == ["a.txt"]
    (keep / "a.txt").unlink()
    (keep / RUN_MARKER).write_text('{"kind": "ptq"}')
    assert yoloq_main(argv + ["--data", str(tiny_data), "--out", str(tmp_path / "runs"), "--name", "keep",
                              "--no-progress"]) == 2
    assert f"holds a yoloq ptq run, not a {command} run" in capsys.readouterr().err


@pytest.mark.parametrize("text, named", [
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}, {"id": "2", "file_name": "b.jpg"}], "annotations": []}',
     "'id' must be an integer"),
])
def test_hostile_coco_json_is_one_line(tmp_path, text, named):
    from yoloq.data.coco import read_annotation_images
    from yoloq.errors import YoloqError
    (tmp_path / "ann.json").write_text(text)
    with pytest.raises(YoloqError, match=named):
        read_annotation_images(tmp_path / "ann.json")
