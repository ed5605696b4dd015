"""Bad input, hostile files and interrupted runs: one line and exit code 2, nothing run from a
checkpoint, nothing half-written, normal file modes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Tuple
import warnings

import pytest
import torch
import yaml
from conftest import COCO, CONFIGS, DATA_YAML, LITE_S_CFG, LITE_S_WEIGHTS, REPO, needs_coco, needs_shared

from yoloq.cli import main as yoloq_main
from yoloq.config import ConfigError, load_config
from yoloq.config.lookup import expand_path_vars
from yoloq.data.ground_truth import GroundTruthError, validate_ground_truth
from yoloq.io import atomic_write_text, check_output_file, staging_dir
from yoloq.safe_load import CheckpointError, check_archive


# --------------------------------------------------------------------------- a hostile TorchScript archive
class WritesOnLoad(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` creates a file: ``torch.jit.load`` (which
    ``torch.load(weights_only=False)`` calls for such archives) runs it while loading."""

    def __init__(self, marker: str):
        super().__init__()
        self.w = torch.zeros(2)
        self.marker = marker

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return (self.w, self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        written = torch.from_file(state[1], True, 2)      # shared=True creates the file
        self.w = state[0] + written.sum() * 0.0
        self.marker = state[1]
        self.training = state[2]

    def forward(self, x):
        return x + self.w


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    marker = folder / "pwned"
    path = folder / "weights.pt"
    torch.jit.save(torch.jit.script(WritesOnLoad(str(marker))), str(path))
    marker.unlink(missing_ok=True)
    torch.jit.load(str(path))                               # the archive really runs code when loaded ...
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_torchscript_archive_is_refused_before_loading(hostile):
    path, marker = hostile
    with pytest.raises(CheckpointError, match="TorchScript archive"):
        check_archive(path)
    assert not marker.exists()


def _refuses_torchscript(hostile, argv, tmp_path, capsys) -> None:
    path, marker = hostile
    args = [a.format(ckpt=path, tmp=tmp_path) for a in argv]
    assert yoloq_main(args) == 2
    err = capsys.readouterr().err
    assert "TorchScript archive" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


@needs_shared
@pytest.mark.parametrize("argv", [
    ["eval", "--cfg", str(LITE_S_CFG), "--weights", "{ckpt}", "--max-images", "1"],
    ["ptq", "--cfg", str(LITE_S_CFG), "--weights", "{ckpt}", "--calib-images", "1", "--max-images", "1",
     "--out", "{tmp}/ptq"],
])
def test_every_checkpoint_entry_point_refuses_torchscript(hostile, argv, tmp_path, capsys):
    _refuses_torchscript(hostile, argv, tmp_path, capsys)


@pytest.mark.parametrize("argv", [
    ["export", "--ckpt", "{ckpt}", "--out", "{tmp}/x.onnx"],
    ["qat", "--cfg", str(LITE_S_CFG), "--from", "{ckpt}", "--out", "{tmp}/qat"],
])
def test_export_and_qat_refuse_torchscript_without_any_shared_data(hostile, argv, tmp_path, capsys, monkeypatch):
    """The refusal comes before any weights or images are read: it holds with the shared folder
    pointing nowhere."""
    monkeypatch.setenv("YOLOQ_SHARED", str(tmp_path / "no_shared_folder"))
    _refuses_torchscript(hostile, argv, tmp_path, capsys)


def test_qat_resume_state_is_read_through_the_same_check(hostile, tmp_path):
    from yoloq.safe_load import load_plain
    with pytest.raises(CheckpointError, match="TorchScript"):
        load_plain(hostile[0])


def test_unknown_zip_layout_is_refused(tmp_path):
    import zipfile
    path = tmp_path / "odd.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("odd/data.pkl", b"x")
        z.writestr("odd/extra/run_me.py", b"print(1)")
    with pytest.raises(CheckpointError, match="not a torch.save checkpoint"):
        check_archive(path)


# --------------------------------------------------------------------------- configs and flags
@pytest.mark.parametrize("size", [300, 0, -320])
def test_img_size_rule_is_checked_at_config_time(size, tmp_path):
    cfg = yaml.safe_load(LITE_S_CFG.read_text())
    cfg["model"]["img_size"] = size
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=rf"model.img_size must be a positive multiple of 32.*got {size}"):
        load_config(tmp_path / "c.yaml")


def test_img_size_flag_is_checked_too(capsys):
    assert yoloq_main(["eval", "--cfg", str(LITE_S_CFG), "--img-size", "300"]) == 2
    assert "model.img_size must be a positive multiple of 32" in capsys.readouterr().err


def test_binary_config_names_the_file(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=f"{path}: not a text"):
        load_config(path)


def test_unknown_choice_names_key_and_closest_value():
    cfg = load_config(LITE_S_CFG)
    with pytest.raises(ConfigError, match="quant.calibration.method: 'entopy' is not one of .*did you mean 'entropy'"):
        cfg.with_overrides(quant={"calib": "entopy"})
    with pytest.raises(ConfigError, match="qat.lr must be > 0"):
        cfg.with_overrides(qat={"lr": -1.0})


# --------------------------------------------------------------------------- outputs
def test_output_paths_are_checked_before_the_work(tmp_path, capsys):
    with pytest.raises(OSError, match="is an existing directory"):
        check_output_file(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="is a file, not a directory"):
        check_output_file(blocker / "sub" / "out.json")
    assert yoloq_main(["eval", "--cfg", str(LITE_S_CFG), "--out", str(tmp_path)]) == 2
    assert "is an existing directory" in capsys.readouterr().err


def test_files_and_folders_get_normal_modes(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a" / "report.md", "x")
        with staging_dir(tmp_path / "run", "ptq") as stage:
            atomic_write_text(stage / "b.json", "{}")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644
    assert ((tmp_path / "run").stat().st_mode & 0o777) == 0o755
    assert ((tmp_path / "run" / "b.json").stat().st_mode & 0o777) == 0o644


def test_stale_staging_folders_of_killed_runs_are_removed(tmp_path):
    stale = tmp_path / ".run.999999999.abcd.tmp"        # no such pid
    stale.mkdir()
    (stale / "half.json").write_text("{")
    with staging_dir(tmp_path / "run", "ptq"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_sigterm_cleans_the_staging_folder(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from yoloq.cli.common import run_command
        from yoloq.io import staging_dir
        def main(argv):
            with staging_dir(Path({str(tmp_path)!r}) / "run", "ptq") as stage:
                (stage / "part.json").write_text("{{")
                print("ready", flush=True)
                time.sleep(60)
        sys.exit(run_command(main, []))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "SIGTERM" in err
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- data
def _gt(**change) -> dict:
    data = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
            "categories": [{"id": 1, "name": "person"}],
            "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 2, 30, 40]}]}
    data.update(change)
    return data


@pytest.mark.parametrize("change, message", [
    ({"annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 2, -3, 4]}]},
     r"annotation 7 \(image 1\): bbox \[1, 2, -3, 4\] has a negative width or height"),
    ({"annotations": [{"id": 8, "image_id": 1, "category_id": 1, "bbox": ["1", 2, 3, 4]}]},
     r"annotation 8 \(image 1\): bbox .* must hold 4 finite numbers"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "c.jpg"}]}, "image id 1 is listed twice"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 3, "file_name": "a.jpg"}]}, "a.jpg is listed twice"),
    ({"annotations": [{"id": 9, "image_id": 5, "category_id": 1, "bbox": [1, 2, 3, 4]}]}, "image_id is not in"),
    ({"annotations": [{"id": 9, "image_id": 1, "category_id": 4, "bbox": [1, 2, 3, 4]}]}, "category_id 4"),
])


def test_ground_truth_errors_name_file_image_and_annotation(change, message):
    with pytest.raises(GroundTruthError, match=message):
        validate_ground_truth(_gt(**change), "gt.json")


def test_ground_truth_without_annotations_and_zero_size_boxes():
    data = _gt()
    del data["annotations"]
    with pytest.raises(GroundTruthError, match="no 'annotations' list"):
        validate_ground_truth(data, "info.json")
    with pytest.warns(UserWarning, match=r"1 zero-size box.*annotation 11 \(image 2"):
        validate_ground_truth(_gt(annotations=[{"id": 11, "image_id": 2, "category_id": 1, "bbox": [5, 5, 4, 0]}]),
                              "gt.json")


@needs_coco
def test_truncated_jpeg_is_a_failed_image(tmp_path):
    from yoloq.data.coco import CocoDetectionDataset, FailedItem
    src = sorted((COCO / "val2017").glob("*.jpg"))[0]
    data = src.read_bytes()
    (tmp_path / src.name).write_bytes(data[: len(data) // 2])
    item = CocoDetectionDataset(tmp_path, None, 64)[0]
    assert isinstance(item, FailedItem) and "truncated JPEG" in item.reason


@needs_shared
def test_every_val_image_missing_is_one_line(tmp_path, capsys):
    data = yaml.safe_load(DATA_YAML.read_text())
    base = DATA_YAML.parent
    data = {k: (str((base / expand_path_vars(v, k)).resolve())
                if isinstance(v, str) and k.endswith(("_images", "_ann", "_official")) else v)
            for k, v in data.items()}
    data["val_images"] = str(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(data))
    with warnings.catch_warnings():      # the shared annotations' zero-size box warning, if not shown before
        warnings.simplefilter("ignore")
        code = yoloq_main(["eval", "--cfg", str(LITE_S_CFG), "--data", str(tmp_path / "d.yaml"), "--max-images", "3",
                           "--workers", "0", "--out", str(tmp_path / "r.json"), "--no-progress"])
    assert code == 2
    assert "none of the 3 images listed in" in capsys.readouterr().err


# --------------------------------------------------------------------------- checkpoints
def test_corrupt_onnx_is_one_line(tmp_path, capsys):
    bad = tmp_path / "m.onnx"
    bad.write_bytes(b"\x08\x07 not a protobuf" * 20)
    assert yoloq_main(["eval", "--cfg", str(LITE_S_CFG), "--onnx", str(bad), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not a readable ONNX file" in err and len(err.strip().splitlines()) == 1


@needs_shared
def test_non_finite_fp32_weights_are_named(tmp_path):
    from yoloq.models import load_model
    ckpt = torch.load(LITE_S_WEIGHTS, map_location="cpu", weights_only=True)
    for value in ckpt["model_state_dict"].values():
        if value.is_floating_point():
            value.fill_(float("nan"))
    torch.save(ckpt, tmp_path / "nan.pt")
    cfg = load_config(LITE_S_CFG)
    with pytest.raises(CheckpointError, match=r"tensors hold NaN/inf values .*weights are not finite"):
        load_model(cfg.model, tmp_path / "nan.pt")


@pytest.fixture(scope="module")
def tiny_quant_ckpt(tmp_path_factory):
    """A real quantized checkpoint of a random Lite-S (calibrated on noise)."""
    from yoloq.models import build_model
    from yoloq.quant import Calibrate, quantize, save_quantized
    cfg = load_config(CONFIGS / "yolov6lite_s.yaml").with_overrides(model={"img_size": 64})
    torch.manual_seed(0)
    model = build_model(cfg.model).fuse().eval()
    qmodel = quantize(model, [Calibrate()], [torch.rand(2, 3, 64, 64)])
    path = tmp_path_factory.mktemp("q") / "quant.pt"
    save_quantized(qmodel, path, meta={"name": "tiny"})
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model_config"].update(width_multiple=0.9), "weights do not fit model"),
    (lambda c: c["model_config"].update(img_size=300), "model.img_size must be a positive multiple of 32"),
    (lambda c: next(iter(c["input_quantizers"].values())).update(type="os:system"), "unsupported quantizer type 'os:system'"),
    (lambda c: next(iter(c["input_quantizers"].values())).update(amax=torch.ones(3)), "amax has 3 values"),
    (lambda c: c["weight_amax"].update({next(iter(c["weight_amax"])): -torch.ones(1)}), "amax has 1 values|finite and > 0"),
    (lambda c: c.update(placement={"sites": "x"}), "inconsistent quantized checkpoint"),
])


def test_edited_quantized_checkpoint_is_named_not_a_traceback(tiny_quant_ckpt, tmp_path, edit, message):
    from yoloq.quant.checkpoint import QuantCheckpointError, load_quantized
    ckpt = torch.load(tiny_quant_ckpt, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(QuantCheckpointError, match=message):
        load_quantized(tmp_path / "edited.pt")


@needs_shared
def test_checkpoints_given_to_the_wrong_tool_say_which_tool(tiny_quant_ckpt, tmp_path, capsys):
    assert yoloq_main(["eval", "--cfg", str(LITE_S_CFG), "--weights", str(tiny_quant_ckpt), "--out",
                       str(tmp_path / "r.json")]) == 2
    assert "a yoloq quantized checkpoint (written by ptq / qat)" in capsys.readouterr().err
    assert yoloq_main(["export", "--ckpt", str(LITE_S_WEIGHTS), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "quantize them first: yoloq ptq" in capsys.readouterr().err
