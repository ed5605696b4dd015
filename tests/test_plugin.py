"""yoloq in an existing YOLOv6 workflow: --weights / --random-weights, the `yoloq` command, the
Python API (the README example, run as written), and a release-format checkpoint on a YOLO-format
dataset end to end."""
from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from conftest import COCO, LITE_S_CFG, REPO, needs_coco, needs_shared
from yoloq.cli import main as yoloq_main
from yoloq.config import load_config


def test_version_and_usage(capsys):
    assert yoloq_main(["--version"]) == 0
    assert re.match(r"yoloq \d+\.\d+\.\d+", capsys.readouterr().out)
    assert yoloq_main(["quantize"]) == 2
    assert "unknown command 'quantize'" in capsys.readouterr().err


def test_console_script_runs_outside_the_checkout(tmp_path):
    exe = Path(sys.executable).with_name("yoloq")
    if not exe.is_file():
        pytest.skip(f"the yoloq console script is not installed next to {sys.executable}")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("yoloq ")


def test_config_without_weights_says_how_to_pass_them(tmp_path, capsys):
    cfg = yaml.safe_load(LITE_S_CFG.read_text())
    del cfg["model"]["weights"]
    cfg["data"] = str((REPO / "data" / "coco_shared.yaml").resolve())
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert yoloq_main(["ptq", "--cfg", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "model.weights is not set" in err and "--weights PATH" in err and "--random-weights" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@needs_shared
def test_random_weights_smoke_test_says_its_numbers_are_meaningless(tmp_path):
    assert yoloq_main(["ptq", "--cfg", "yolov6lite_s", "--random-weights", "--calib-images", "2", "--max-images", "2",
                       "--sensitivity", "off", "--no-diagnose", "--no-plots", "--workers", "0", "--out",
                       str(tmp_path), "--name", "smoke", "--no-progress"]) == 0
    report = json.loads((tmp_path / "smoke" / "report.json").read_text())
    assert any("meaningless" in n for n in report["notes"])
    assert "meaningless" in (tmp_path / "smoke" / "report.md").read_text()


# --------------------------------------------------------------------------- the Python API


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no ```python example"
    return blocks[0]


@pytest.mark.slow
@needs_shared
def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    """The example runs, its files reload, and its INT8 models keep the FP32 accuracy on the same 8
    val images. Measured: FP32 32.20, PTQ (entropy, 32 images, the config's transforms) 32.27,
    after one QAT epoch 32.23; the same PTQ without the transforms loses several points."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), namespace)          # noqa: S102 - our own README
    q, trained = namespace["q"], namespace["trained"]
    assert (tmp_path / "lite_s_int8.onnx").is_file() and (tmp_path / "lite_s_quant.pt").is_file()
    import yoloq
    reloaded = yoloq.load_quantized(tmp_path / "lite_s_quant.pt")
    x = torch.rand(1, 3, 320, 320)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), q(x), atol=1e-5)
    fp32_ap = namespace["model"].evaluate(max_images=8)["AP"]
    assert q.evaluate(max_images=8)["AP"] == pytest.approx(fp32_ap, abs=0.015)
    assert trained.evaluate(max_images=8)["AP"] == pytest.approx(fp32_ap, abs=0.015)


# --------------------------------------------------------------------------- upstream formats end to end


@contextlib.contextmanager
def upstream_class_names(model: nn.Module, monkeypatch):
    """While pickling, yoloq's module classes appear as upstream's ``yolov6.*`` classes, as in a
    release checkpoint written by upstream's trainer (torch.nn classes keep their own names)."""
    fake = types.ModuleType("yolov6.layers.common")
    monkeypatch.setitem(sys.modules, "yolov6", types.ModuleType("yolov6"))
    monkeypatch.setitem(sys.modules, "yolov6.layers", types.ModuleType("yolov6.layers"))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    classes = {type(m) for m in model.modules() if type(m).__module__.startswith("yoloq.")}
    saved = {cls: (cls.__module__, cls.__qualname__) for cls in classes}
    try:
        for cls in classes:
            cls.__module__, cls.__qualname__ = fake.__name__, cls.__name__
            setattr(fake, cls.__name__, cls)
        yield
    finally:
        for cls, (module, qualname) in saved.items():
            cls.__module__, cls.__qualname__ = module, qualname


def _yolo_dataset(root: Path) -> Path:
    """4 val images (YOLO labels from the official boxes) and 4 unlabeled train images of ../shared."""
    official = json.loads((COCO / "annotations" / "instances_val2017_official.json").read_text())
    index = {cat: i for i, cat in enumerate(sorted(c["id"] for c in official["categories"]))}
    for split, folder, images in (("val", "val2017", sorted(official["images"], key=lambda e: e["id"])[:4]),
                                  ("train", "train2017", None)):
        (root / "images" / split).mkdir(parents=True)
        names = [im["file_name"] for im in images] if images else sorted(p.name for p in (COCO / folder).iterdir())[:4]
        for name in names:
            (root / "images" / split / name).symlink_to(COCO / folder / name)
    (root / "labels" / "val").mkdir(parents=True)
    for im in sorted(official["images"], key=lambda e: e["id"])[:4]:
        lines = [f"{index[a['category_id']]} {(a['bbox'][0] + a['bbox'][2] / 2) / im['width']} "
                 f"{(a['bbox'][1] + a['bbox'][3] / 2) / im['height']} {a['bbox'][2] / im['width']} "
                 f"{a['bbox'][3] / im['height']}" for a in official["annotations"]
                 if a["image_id"] == im["id"] and not a["iscrowd"]]
        (root / "labels" / "val" / f"{Path(im['file_name']).stem}.txt").write_text("\n".join(lines) + "\n")
    names = yaml.safe_load((REPO / "data" / "coco_shared.yaml").read_text())["names"]
    data = root / "my_dataset.yaml"
    data.write_text(yaml.safe_dump({"train": str(root / "images" / "train"), "val": str(root / "images" / "val"),
                                    "nc": 80, "names": names, "is_coco": True}))
    return data


@pytest.mark.slow
@needs_coco
def test_release_checkpoint_on_a_yolo_dataset(tmp_path, monkeypatch):
    """`yoloq ptq --cfg yolov6s_qarepvgg.yaml --weights <release pickle> --data <YOLO data YAML>`: the
    upstream formats need no conversion, and the FP32 numbers are those of the checkpoint's weights."""
    from yoloq.models import build_model
    from yoloq.weights import read_checkpoint
    cfg = load_config("yolov6s_qarepvgg")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    model.cfg = None                                        # upstream's Model carries no yoloq config
    release = tmp_path / "yolov6s_qa_best.pt"
    with upstream_class_names(model, monkeypatch):
        torch.save({"model": model.half(), "ema": None, "updates": None, "optimizer": None, "epoch": -1}, release)
    assert read_checkpoint(release)[1]["format"] == "release"
    data = _yolo_dataset(tmp_path / "dataset")
    out = tmp_path / "runs"
    code = yoloq_main(["ptq", "--cfg", "yolov6s_qarepvgg.yaml", "--weights", str(release), "--data", str(data),
                       "--img-size", "320", "--calib-images", "4", "--max-images", "4", "--sensitivity", "off",
                       "--no-diagnose", "--no-plots", "--workers", "0", "--out", str(out), "--name", "qa",
                       "--no-progress"])
    assert code == 0
    report = json.loads((out / "qa" / "report.json").read_text())
    assert report["model"]["weights"] == str(release) and report["data"]["eval_images"] == 4
    assert report["calibration"]["images"] == 4
    assert all(Path(f).parent.name == "train" or "/" not in f for f in report["calibration"]["files"])
