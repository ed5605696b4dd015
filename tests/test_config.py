"""Config loader: validation messages, type checks, path resolution."""
from __future__ import annotations

from pathlib import Path

import pytest

from yoloq.config import Config, ConfigError, DataConfig, ModelConfig, load_config, resolve_path
from yoloq.data import load_data_config
from conftest import REPO  # noqa: E402



def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_unknown_key_names_key_and_closest_match(tmp_path):
    cfg = write(tmp_path / "c.yaml", "model:\n  widht_multiple: 0.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    msg = str(err.value)
    assert "'widht_multiple'" in msg and "did you mean 'width_multiple'" in msg
    assert str(cfg) in msg and "model" in msg


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    cfg = write(tmp_path / "c.yaml", "quant:\n  zzz: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'zzz'; valid keys: .*calib"):
        load_config(cfg)


def test_unknown_section(tmp_path):
    cfg = write(tmp_path / "c.yaml", "modle:\n  arch: yolov6\n")
    with pytest.raises(ConfigError, match="unknown section 'modle'.*did you mean 'model'"):
        load_config(cfg)


@pytest.mark.parametrize("section, key, value, expect", [
    ("model", "width_multiple", "'wide'", "must be a number"),
    ("model", "width_multiple", "true", "must be a number"),
    ("model", "nc", "80.5", "must be an integer"),
    ("model", "nc", "true", "must be an integer"),
    ("model", "use_dfl", "1", "must be true/false"),
    ("model", "block", "3", "must be a string"),
    ("quant", "skip_layers", "backbone.stem", "must be a list"),
])
def test_type_errors_name_the_key(tmp_path, section, key, value, expect):
    cfg = write(tmp_path / "c.yaml", f"{section}:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=f"'{key}' {expect}"):
        load_config(cfg)


def test_int_is_accepted_where_a_float_is_expected(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", "model:\n  width_multiple: 1\n"))
    assert cfg.model.width_multiple == 1.0 and isinstance(cfg.model.width_multiple, float)


def test_defaults_and_sections(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", "model:\n  arch: yolov6\n"))
    assert isinstance(cfg, Config) and isinstance(cfg.model, ModelConfig)
    assert cfg.model.arch == "yolov6" and cfg.model.block == "repvgg"
    assert cfg.eval.conf_thres == 0.03 and cfg.eval.iou_thres == 0.65 and cfg.eval.max_det == 300
    assert cfg.data is None and cfg.path == str(tmp_path / "c.yaml")


def test_relative_paths_resolve_against_the_yaml_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)     # the working directory must not matter
    cfg_path = write(tmp_path / "configs" / "sub" / "c.yaml",
                     "model:\n  weights: ../w/model.pt\ndata: ../../data/d.yaml\n")
    cfg = load_config(cfg_path)
    assert cfg.model.weights == str((tmp_path / "configs" / "w" / "model.pt").resolve())
    assert cfg.data == str((tmp_path / "data" / "d.yaml").resolve())


def test_absolute_and_home_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_path(str(tmp_path / "a.pt"), Path("/elsewhere")) == str(tmp_path / "a.pt")
    assert resolve_path("~/b.pt", Path("/elsewhere")) == str(tmp_path / "home" / "b.pt")
    assert resolve_path(None, tmp_path) is None and resolve_path("", tmp_path) == ""


def test_data_must_be_a_path(tmp_path):
    cfg = write(tmp_path / "c.yaml", "data:\n  train_images: x\n")
    with pytest.raises(ConfigError, match="'data' must be the path of a dataset YAML"):
        load_config(cfg)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping at top level"):
        load_config(write(tmp_path / "list.yaml", "- a\n- b\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path / "sec.yaml", "model: 3\n"))


def test_data_config_paths_resolve_against_its_directory(tmp_path):
    data = write(tmp_path / "data" / "d.yaml",
                 "train_images: ../coco/train\ntrain_ann: ../coco/a.json\nval_images: /abs/val\n"
                 "val_ann: ../coco/v.json\nnc: 2\nnames: [a, b]\n")
    dc = load_data_config(data)
    assert isinstance(dc, DataConfig)
    assert dc.train_images == str((tmp_path / "coco" / "train").resolve())
    assert dc.train_ann == str((tmp_path / "coco" / "a.json").resolve())
    assert dc.val_images == "/abs/val"
    assert dc.val_ann_official is None
    assert dc.nc == 2 and dc.names == ["a", "b"] and dc.path == str(data)


def test_data_config_unknown_key(tmp_path):
    data = write(tmp_path / "d.yaml", "val_image: x\n")
    with pytest.raises(ConfigError, match="unknown key 'val_image'.*did you mean 'val_images'"):
        load_data_config(data)


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.data is None or Path(cfg.data).is_absolute()
    shared = REPO / "data" / "coco_shared.yaml"
    dc = load_data_config(shared)
    assert dc.nc == 80 and len(dc.names) == 80
    assert Path(dc.val_images).is_absolute()


# --------------------------------------------------------------------------- the quant section: nested and flat keys

NESTED_QUANT = """quant:
  seed: 3
  loader: {batch_size: 4}
  calibration: {method: entropy, images: 32, auto_methods: [max, mse]}
  transforms: {channel_scale: all, channel_scale_alpha: 0.8, bias_correction: auto, images: 16}
  reconstruction: {method: brecq, iters: 7, reg_weight: 0.1, device: cpu}
  sensitivity: {metric: map, images: 4}
  partial: {skip_layers: [backbone.stem], max_drop: 0.5}
"""
FLAT_QUANT = """quant:
  seed: 3
  batch_size: 4
  calib: entropy
  calib_images: 32
  auto_methods: [max, mse]
  channel_scale: all
  channel_scale_alpha: 0.8
  bias_correction: auto
  transform_images: 16
  reconstruct: brecq
  recon_iters: 7
  recon_lambda: 0.1
  recon_device: cpu
  sensitivity: map
  sensitivity_images: 4
  skip_layers: [backbone.stem]
  max_drop: 0.5
"""


def test_quant_section_nested_and_earlier_flat_keys_read_the_same(tmp_path):
    nested = load_config(write(tmp_path / "n.yaml", NESTED_QUANT)).quant
    flat = load_config(write(tmp_path / "f.yaml", FLAT_QUANT)).quant
    assert nested == flat
    assert (nested.calibration.method, nested.calibration.images, nested.loader.batch_size) == ("entropy", 32, 4)
    assert nested.transforms.bias_correction == "auto" and nested.reconstruction.reg_weight == 0.1
    assert nested.sensitivity.metric == "map" and nested.partial.max_drop == 0.5 and nested.seed == 3
    dotted = Config().with_overrides(quant={"calibration.method": "mse", "transforms.images": 8, "recon_iters": 9})
    assert (dotted.quant.calibration.method, dotted.quant.transforms.images, dotted.quant.reconstruction.iters) \
        == ("mse", 8, 9)
    assert dotted.quant.calibration.images == 256                       # the rest of the section kept


@pytest.mark.parametrize("text, match", [
    ("quant:\n  calib: max\n  calibration: {method: mse}\n", "'calib' and 'calibration.method' both set"),
    ("quant:\n  calibration: {method: kl}\n", r"quant.calibration.method: 'kl' is not one of"),
    ("quant:\n  calib: kl\n", r"quant.calibration.method: 'kl' is not one of"),
    ("quant:\n  calibration: {imags: 3}\n", r"quant.calibration: unknown key 'imags' \(did you mean 'images'\?\)"),
    ("quant:\n  calib_image: 3\n", r"quant: unknown key 'calib_image' \(did you mean 'calib_images'\?\)"),
    ("quant:\n  transforms: 3\n", "quant.transforms: expected a mapping"),
    ("quant:\n  transforms: {images: 0}\n", r"quant.transforms.images must be >= 1"),
    ("quant:\n  reconstruction: {device: gpu0}\n", "reconstruction.device must be null .* cuda:N"),
])
def test_quant_section_errors_name_the_key(tmp_path, text, match):
    cfg = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match=match) as err:
        load_config(cfg)
    assert str(cfg) in str(err.value)
