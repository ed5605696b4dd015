"""Upstream YOLOv6 `.py` configs: read with ast (never executed), mapped to yoloq's model section.

The fixtures in tests/fixtures/upstream_configs/ are small stand-ins written for these tests with
the structure and values of the upstream files they name (meituan/YOLOv6 configs/...).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from yoloq.config import Config, ConfigError, load_config
from yoloq.config.lookup import DEFAULT_DATA
from yoloq.models import build_model
from yoloq.config.upstream import read_upstream_config
from conftest import REPO, SHARED, read_spec  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "upstream_configs"

# upstream config (fixture) -> the shipped YAML describing the same model
SAME_MODEL = {
    "yolov6n": "yolov6n_repvgg", "yolov6s": "yolov6s_repvgg", "yolov6m": "yolov6m_repvgg", "yolov6l": "yolov6l",
    "qarepvgg/yolov6n_qa": "yolov6n_qarepvgg", "qarepvgg/yolov6s_qa": "yolov6s_qarepvgg",
    "qarepvgg/yolov6m_qa": "yolov6m_qarepvgg", "repopt/yolov6s_hs": "yolov6s_hs",
    "repopt/yolov6s_opt": "yolov6s_repopt", "yolov6_lite/yolov6_lite_s": "yolov6lite_s",
    "yolov6_lite/yolov6_lite_m": "yolov6lite_m", "yolov6_lite/yolov6_lite_l": "yolov6lite_l",
}


def fixture(name: str) -> Path:
    return FIXTURES / f"{name}.py"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def model_fields(cfg) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ("name", "weights")}


# --------------------------------------------------------------------------- mapping
@pytest.mark.parametrize("upstream", list(SAME_MODEL))
def test_upstream_config_maps_to_the_same_model_as_the_shipped_yaml(upstream):
    """Every field (block from training_mode, CSP / BiFPAN / PAN structure, csp_e, fuse_P2, cspsppf,
    DFL, multipliers, image size) equals the hand-written YAML the model tests check key by key."""
    from_py = load_config(fixture(upstream))
    assert model_fields(from_py) == model_fields(load_config(SAME_MODEL[upstream]))
    assert from_py.model.name == Path(upstream).name


def test_config_sections_besides_the_model_are_defaults():
    cfg = load_config(fixture("qarepvgg/yolov6s_qa"))
    assert isinstance(cfg, Config) and cfg.path == str(fixture("qarepvgg/yolov6s_qa"))
    assert cfg.data == str(DEFAULT_DATA) and cfg.model.weights is None
    assert cfg.eval == Config().eval and cfg.quant == Config().quant and cfg.qat == Config().qat
    assert cfg.model.img_size == 640 and load_config(fixture("yolov6_lite/yolov6_lite_s")).model.img_size == 320


@pytest.mark.parametrize("upstream, spec, training_only", [
    ("yolov6n", "yolov6n_fuseab_train.txt", ("cls_preds_ab", "reg_preds_ab")),      # trained with --fuse_ab
    ("yolov6n", "yolov6n_distillns_train.txt", ("reg_preds_dist",)),                # trained with --distill
    ("yolov6_lite/yolov6_lite_s", "yolov6lite_s_train.txt", ()),
])
def test_built_model_has_upstream_keys_except_training_only_branches(upstream, spec, training_only):
    with torch.device("meta"):
        model = build_model(load_config(fixture(upstream)).model)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    theirs = [(k, s) for k, s in read_spec(spec) if not any(f".{b}." in k for b in training_only)]
    assert ours == theirs


@pytest.mark.skipif(not (SHARED / "weights" / "yolov6lite_s.pt").is_file(), reason="Lite-S weights not found")
def test_real_lite_s_checkpoint_loads_into_the_model_of_the_py_config():
    from yoloq.weights import load_weights
    cfg = load_config(fixture("yolov6_lite/yolov6_lite_s"))
    model = build_model(cfg.model)
    load_weights(model, str(SHARED / "weights" / "yolov6lite_s.pt"))        # strict: raises on any mismatch
    with torch.no_grad():
        out = model.fuse().eval()(torch.rand(1, 3, 320, 320))
    assert out.shape[-1] == 4 + 80 and torch.isfinite(out).all()


def test_eval_params_set_image_size_and_thresholds(tmp_path):
    cfg = load_config(fixture("experiment/yolov6n_with_eval_params"))
    assert cfg.model.img_size == 416                    # [train value, eval.py value]: eval.py's
    assert (cfg.eval.conf_thres, cfg.eval.iou_thres, cfg.eval.batch_size) == (0.03, 0.65, 8)
    assert cfg.model.neck == "RepPANNeck" and not cfg.model.fuse_p2
    text = fixture("experiment/yolov6n_with_eval_params").read_text()
    tweaked = write(tmp_path / "tweak.py", text.replace("letterbox_return_int=False", "letterbox_return_int=True")
                    .replace("batch_size=None", "batch_size=4"))
    with pytest.warns(UserWarning, match="letterbox_return_int ignored"):
        cfg = load_config(tweaked)
    assert cfg.eval.batch_size == 4


def test_upstream_quantization_settings_are_named_as_ignored():
    with pytest.warns(UserWarning, match="ptq / qat settings ignored"):
        cfg = load_config(fixture("repopt/yolov6s_opt_qat"))
    assert cfg.model.block == "repopt" and cfg.quant == Config().quant


# --------------------------------------------------------------------------- unsupported models
@pytest.mark.parametrize("upstream, named", [
    ("mbla/yolov6s_mbla", ["stage_block_type 'MBLABlock'", "MBLA models are not supported"]),
    ("base/yolov6s_base", ["training_mode 'conv_relu'", "model.neck.type 'CSPRepPANNeck'"]),
    ("yolov6l6", ["model.backbone.type 'CSPBepBackbone_P6'", "model.head.strides = [8, 16, 32, 64]"]),
])
def test_models_yoloq_cannot_build_are_named(upstream, named):
    with pytest.raises(ConfigError) as err:
        load_config(fixture(upstream))
    assert str(err.value).startswith(f"{fixture(upstream)}: cannot build this upstream model in yoloq")
    for text in named:
        assert text in str(err.value)


@pytest.mark.parametrize("change, named", [
    (("fuse_P2=True, cspsppf=True", "cspsppf=True"), "fuse_P2=False with neck RepBiFPANNeck"),
    (("reg_max=0,", "reg_max=16,"), "use_dfl=False needs reg_max = 0"),
    (("pretrained=None,", "pretrained=None, act='relu',"), "unknown field(s) model.act"),
    (("begin_indices=24,", "begin_indices=24, nms=True,"), "unknown field(s) model.head.nms"),
    (("type='RepBiFPANNeck'", "type='CSPRepBiFPANNeck', csp_e=0.5"), "upstream pairs CSP backbones with CSP necks"),
    (("width_multiple=0.25", "width_multiple=-1"), "model.width_multiple must be a number > 0"),
])
def test_inconsistent_fields_are_named(tmp_path, change, named):
    text = fixture("yolov6n").read_text()
    assert change[0] in text
    with pytest.raises(ConfigError, match=f"{tmp_path / 'c.py'}: cannot build.*" + named.replace("(", r"\(")
                       .replace(")", r"\)").replace("[", r"\[")):
        load_config(write(tmp_path / "c.py", text.replace(change[0], change[1], 1)))


def test_top_level_and_structure_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown top-level field.*use_checkpoint"):
        load_config(write(tmp_path / "a.py", fixture("yolov6s").read_text() + "use_checkpoint = True\n"))
    with pytest.raises(ConfigError, match="no 'model = dict"):
        load_config(write(tmp_path / "b.py", "solver = dict(lr0=0.01)\n"))
    with pytest.raises(ConfigError, match=r"c.py:2: not valid Python"):
        load_config(write(tmp_path / "c.py", "model = dict(\n  a=)\n"))


# --------------------------------------------------------------------------- never executed
def test_a_config_that_would_write_a_file_is_refused_unexecuted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                         # the fixture writes PWNED_BY_CONFIG relative to here
    with pytest.raises(ConfigError, match=r"executes_code.py:3: a call to 'open\('PWNED_BY_CONFIG'"):
        load_config(fixture("executes_code"))
    assert not (tmp_path / "PWNED_BY_CONFIG").exists()


@pytest.mark.parametrize("source, line, what", [
    ("import os\nmodel = dict()\n", 1, "an import"),
    ("model = dict(\n  type=__import__('os').system('touch {marker}'))\n", 2, "a call to '__import__('os').system'"),
    ("x = 1\nexec(\"open('{marker}', 'w')\")\n", 2, "the statement 'exec("),
    ("depth = 0.33\nmodel = dict(depth_multiple=depth)\n", 2, "the name 'depth'"),
    ("model = dict(type=os.path.sep)\n", 1, "attribute access 'os.path.sep'"),
    ("model = dict(\n\n  f=lambda: open('{marker}', 'w'))\n", 3, "the expression 'lambda"),
    ("model = dict(n=[open('{marker}', 'w') for _ in range(1)])\n", 1, "the expression '["),
    ("model = dict(big=9 ** 9 ** 9)\n", 1, "the expression '9 ** 9 ** 9'"),
    ("model = dict(s='a' * 10)\n", 1, "arithmetic on 'a' and 10"),
    ("model = dict(**{'a': 1})\n", 1, "dict() with positional or ** arguments"),
    ("model = {'a': 1, **other}\n", 1, "a dict key that is not a string literal"),
    ("def f():\n    pass\n", 1, "a function definition"),
    ("if True:\n    model = dict()\n", 1, "the statement 'if True"),
    ("model: dict = dict()\n", 1, "the statement 'model: dict"),
])
def test_anything_but_literals_is_an_error_naming_the_line(tmp_path, source, line, what):
    marker = tmp_path / "marker"
    path = write(tmp_path / "bad.py", source.replace("{marker}", str(marker)))
    with pytest.raises(ConfigError) as err:
        read_upstream_config(path)
    assert str(err.value).startswith(f"{path}:{line}: {what}")
    assert "without executing" in str(err.value)
    assert not marker.exists()


def test_literal_forms_upstream_uses():
    values = read_upstream_config(fixture("yolov6_lite/yolov6_lite_s"))
    assert values["solver"]["lr0"] == 0.1 * 4 and values["model"]["head"]["strides"] == [8, 16, 32, 64]
    values = read_upstream_config(fixture("yolov6m"))
    assert values["model"]["backbone"]["csp_e"] == float(2) / 3
    assert values["model"]["head"]["distill_weight"] == {"class": 2.0, "dfl": 1.0}


def test_all_accepted_literal_kinds(tmp_path):
    path = write(tmp_path / "ok.py", '"""doc"""\na = (1, -2.5, +3)\nb = {"k": [None, True, "s"]}\n'
                 'c = int("7") + float(1) // 2 - 3 * 2\nd = dict(e=dict(f=1 / 4))\na = [0]\n')
    assert read_upstream_config(path) == {"a": [0], "b": {"k": [None, True, "s"]}, "c": 1.0, "d": {"e": {"f": 0.25}}}
    with pytest.raises(ConfigError, match=r"ok2.py:1: a division by zero"):
        read_upstream_config(write(tmp_path / "ok2.py", "a = 1 / 0\n"))
