"""Config lookup by bare name, the shipped YAMLs inside the package, ${YOLOQ_SHARED}, and a real
non-editable `pip install` that finds the configs without the source tree."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from yoloq.config import lookup as config_lookup
from yoloq.config import ConfigError, load_config
from yoloq.data import load_data_config
from yoloq.config.lookup import (CONFIG_DIR, DATA_DIR, available_configs, expand_path_vars, find_config,
                                 find_data_config, shared_dir)
from conftest import REPO, SHARED  # noqa: E402


def test_bare_names_resolve_to_the_shipped_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                       # no configs/ here: only the package can answer
    for name in ("yolov6s_qarepvgg", "yolov6s_qarepvgg.yaml"):
        assert find_config(name) == CONFIG_DIR / "yolov6s_qarepvgg.yaml"
        cfg = load_config(name)
        assert cfg.model.name == "yolov6s_qarepvgg" and cfg.model.block == "qarepvggv2"
        assert cfg.data == str(DATA_DIR / "coco_shared.yaml")
    assert find_data_config("coco_shared") == DATA_DIR / "coco_shared.yaml"


def test_repo_configs_folder_is_the_packaged_one():
    """configs/ and data/ in the checkout are links to the package folders, so both paths work."""
    assert (REPO / "configs").resolve() == CONFIG_DIR and (REPO / "data").resolve() == DATA_DIR
    shipped = available_configs()
    assert "yolov6lite_s" in shipped and "yolov6s_qarepvgg" in shipped and len(shipped) >= 12
    assert load_config(REPO / "configs" / "yolov6lite_s.yaml").model == load_config("yolov6lite_s").model


def test_missing_name_lists_the_available_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config("yolov6s_qarepvg")
    message = str(err.value)
    assert "config file not found: yolov6s_qarepvg" in message
    assert all(name in message for name in available_configs())
    with pytest.raises(ConfigError, match="dataset YAML not found: nope.*coco_shared"):
        load_data_config("nope")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_an_existing_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "yolov6lite_s.yaml").write_text("model:\n  name: mine\n  arch: lite\n  width_multiple: 0.7\n")
    assert load_config("yolov6lite_s.yaml").model.name == "mine"
    assert load_config("yolov6lite_s").model.name == "yolov6lite_s"        # no such file here: shipped one


def test_yoloq_shared_variable_moves_the_shared_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLOQ_SHARED", str(tmp_path / "elsewhere"))
    cfg = load_config("yolov6lite_s")
    assert cfg.model.weights == str(tmp_path / "elsewhere" / "weights" / "yolov6lite_s.pt")
    dc = load_data_config(cfg.data)
    assert dc.val_ann == str(tmp_path / "elsewhere" / "coco" / "annotations" / "instances_val2017.json")
    assert dc.train_images == str(tmp_path / "elsewhere" / "coco" / "train2017")


def test_default_shared_dir_is_the_checkouts_sibling(monkeypatch, tmp_path):
    monkeypatch.delenv("YOLOQ_SHARED", raising=False)
    if SHARED.is_dir():
        assert shared_dir() == SHARED.resolve()
        assert load_config("yolov6lite_s").model.weights == str(SHARED.resolve() / "weights" / "yolov6lite_s.pt")
    # no checkout (an installed package): ../shared from the current directory
    monkeypatch.setattr(config_lookup, "_source_checkout", lambda: None)
    (tmp_path / "shared").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert shared_dir() == (tmp_path / "shared").resolve()


def test_unset_variable_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_VAR_YOLOQ", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  weights: ${NO_SUCH_VAR_YOLOQ}/w.pt\n")
    with pytest.raises(ConfigError, match=r"c.yaml: model.weights: environment variable \$NO_SUCH_VAR_YOLOQ"):
        load_config(cfg)
    monkeypatch.setenv("MY_WEIGHTS", str(tmp_path))
    assert expand_path_vars("$MY_WEIGHTS/a/${MY_WEIGHTS}", "x") == f"{tmp_path}/a/{tmp_path}"


def test_an_empty_variable_never_becomes_a_path_at_the_root(tmp_path, monkeypatch):
    """``YOLOQ_SHARED=`` means the default folder, as for shared_dir(); any other empty variable is
    named (``${DATA}/coco`` would otherwise read ``/coco``)."""
    monkeypatch.setenv("YOLOQ_SHARED", "")
    assert load_config("yolov6lite_s").model.weights == str(shared_dir() / "weights" / "yolov6lite_s.pt")
    monkeypatch.setenv("EMPTY_VAR_YOLOQ", "")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  weights: ${EMPTY_VAR_YOLOQ}/w.pt\n")
    with pytest.raises(ConfigError, match=r"model.weights: environment variable \$EMPTY_VAR_YOLOQ in .* is empty"):
        load_config(cfg)


def _site_packages(python) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.mark.slow
def test_non_editable_install_ships_the_configs(tmp_path):
    """`pip install` of the built wheel (not editable) into a fresh venv: configs by name from another
    directory, shared data found as ../shared of the working folder, no source tree on the path.

    Offline and independent of the base Python's packages (issue 27: a base Python with setuptools 65.5
    and no `wheel` could not build it): the wheel is built by this interpreter's setuptools (the `dev`
    extra brings one with bdist_wheel) and installed by this interpreter's pip into the site-packages of
    a venv without pip. The venv reads the dependencies (PyYAML, ...) from this interpreter's
    site-packages through a .pth file, which adds those folders without running their .pth files (so
    not this checkout's editable install either)."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copytree(REPO / "yoloq", src / "yoloq", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel, = dist.glob("yoloq-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    venv_site = _site_packages(python)
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                          str(venv_site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    (venv_site / "test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    work = tmp_path / "work" / "me"
    work.mkdir(parents=True)
    (tmp_path / "work" / "shared").symlink_to(SHARED if SHARED.is_dir() else tmp_path)
    probe = textwrap.dedent("""
        import json, yoloq
        from yoloq.config import ConfigError, load_config
        from yoloq.data import load_data_config
        cfg = load_config("yolov6lite_s.yaml")
        data = load_data_config(cfg.data)
        try:
            load_config("no_such_model")
            missing = ""
        except ConfigError as err:
            missing = str(err)
        print(json.dumps({"package": yoloq.__file__, "cfg": cfg.path, "weights": cfg.model.weights,
                          "val_ann": data.val_ann, "missing": missing}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "YOLOQ_SHARED")}
    out = subprocess.run([str(python), "-c", probe], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    venv_lib = str(venv / "lib")
    assert found["package"].startswith(venv_lib) and found["cfg"].startswith(venv_lib)
    assert found["cfg"].endswith("resources/configs/yolov6lite_s.yaml")
    shared = tmp_path / "work" / "shared"
    assert found["weights"] == str(shared.resolve() / "weights" / "yolov6lite_s.pt")
    assert found["val_ann"] == str(shared.resolve() / "coco" / "annotations" / "instances_val2017.json")
    assert "yolov6s_qarepvgg" in found["missing"]
