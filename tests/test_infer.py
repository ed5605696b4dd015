"""yoloq infer: boxes drawn where the detections are (and nowhere else), YOLO labels that are the
detections, a video round trip, PyTorch / quant.pt / ONNX models, clear errors."""
from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
import torch
import yaml
from torch import nn

from conftest import tiny_coco
from yoloq.cli import main as yoloq_main
from yoloq.config import EvalConfig
from yoloq.runtime.infer import detect, yolo_lines
from yoloq.runtime.ort import OnnxPredictor

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# letterboxed (64 x 64) boxes of the toy detector: class 0 at 0.9, class 2 at 0.6, one under the threshold
BOXES = torch.tensor([[8.0, 12.0, 40.0, 44.0], [30.0, 20.0, 60.0, 50.0], [2.0, 2.0, 10.0, 10.0]])
SCORES = {(0, 0): 0.9, (1, 2): 0.6, (2, 5): 0.1}


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        preds = torch.zeros(len(BOXES), 84)
        preds[:, :4] = BOXES
        for (k, cls), score in SCORES.items():
            preds[k, 4 + cls] = score
        self.register_buffer("preds", preds)

    def forward(self, x):
        return self.preds[None].expand(x.shape[0], -1, -1) + 0 * x.mean()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    data_yaml = tiny_coco(root)
    data = yaml.safe_load(data_yaml.read_text())
    data["names"] = [f"thing{i}" for i in range(80)]
    data_yaml.write_text(yaml.safe_dump(data))
    onnx = root / "toy.onnx"
    torch.onnx.export(Toy().eval(), torch.zeros(1, 3, 64, 64), str(onnx), input_names=["images"],
                      output_names=["outputs"], opset_version=13, dynamo=False,
                      dynamic_axes={"images": {0: "batch"}, "outputs": {0: "batch"}})
    cfg = root / "toy.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": "toy", "img_size": 64}, "data": str(data_yaml),
                                   "eval": {"batch_size": 4, "workers": 0}}))
    images = root / "images"
    images.mkdir()
    for name in ("000000000001.png", "000000000002.png"):
        shutil.copy(root / "val" / name, images / name)
    cv2.imwrite(str(images / "wide.jpg"), np.full((40, 120, 3), 200, np.uint8))
    return root, cfg, onnx, images


def run(args, capsys):
    code = yoloq_main(["infer"] + [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_infer_draws_boxes_where_the_detections_are_and_writes_their_labels(tmp_path, setup, capsys):
    root, cfg, onnx, images = setup
    code, out, err = run(["--cfg", cfg, "--onnx", onnx, "--source", images, "--out", tmp_path, "--name", "r",
                          "--save-txt", "--save-conf", "--no-progress"], capsys)
    assert code == 0, err
    run_dir = tmp_path / "r"
    assert "3 image(s), 6 detection(s) above 0.4" in out
    assert sorted(p.name for p in run_dir.iterdir()) == [".yoloq-run", "000000000001.png", "000000000002.png", "labels",
                                                         "wide.jpg"]    # the run marker lets a rerun replace it
    expected = detect(OnnxPredictor(onnx), [cv2.imread(str(images / "000000000001.png"))], 64,
                      EvalConfig(conf_thres=0.4, iou_thres=0.45), 80)[0]
    assert len(expected) == 2 and sorted(expected[:, 5].tolist()) == [0.0, 2.0]
    original = cv2.imread(str(images / "000000000001.png"))
    drawn = cv2.imread(str(run_dir / "000000000001.png"))
    changed = np.any(drawn != original, axis=2)
    for x1, y1, x2, y2, _, _ in expected:                               # every box edge is drawn
        assert changed[int(round(y1)):int(round(y2)) + 1, int(round(x1))].mean() > 0.9
        assert changed[int(round(y2)), int(round(x1)):int(round(x2)) + 1].mean() > 0.9
    assert not changed[58:, :].any()                                    # below every box and label: untouched
    lines = (run_dir / "labels" / "000000000001.txt").read_text().splitlines()
    assert lines == yolo_lines(expected, 80, 64, save_conf=True)
    cls, cx, cy, w, h, conf = lines[0].split()
    x1, y1, x2, y2, score, c = expected[0]
    assert int(cls) == int(c) and float(conf) == pytest.approx(score, abs=1e-5)
    assert (float(cx), float(cy), float(w), float(h)) == pytest.approx(
        ((x1 + x2) / 160, (y1 + y2) / 128, (x2 - x1) / 80, (y2 - y1) / 64), abs=1e-6)


def test_infer_video_round_trip(tmp_path, setup, capsys):
    root, cfg, onnx, _ = setup
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (80, 64))
    for i in range(5):
        writer.write(np.full((64, 80, 3), 40 * i, np.uint8))
    writer.release()
    code, out, err = run(["--cfg", cfg, "--onnx", onnx, "--source", video, "--out", tmp_path / "runs",
                          "--save-txt", "--no-progress"], capsys)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "clip"
    capture = cv2.VideoCapture(str(run_dir / "clip.mp4"))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 5 and frames[0].shape == (64, 80, 3)
    assert np.abs(frames[2].astype(int) - 80).max() > 60                # boxes drawn over the flat frame
    labels = sorted(p.name for p in (run_dir / "labels").iterdir())
    assert labels == [f"clip_{i:06d}.txt" for i in range(1, 6)]
    assert all(len(p.read_text().splitlines()) == 2 for p in (run_dir / "labels").iterdir())


def test_infer_pytorch_and_quantized_models_and_errors(tmp_path, setup, capsys):
    from yoloq.models import build_model
    from yoloq.config import load_config
    from yoloq.quant.calibrate import calibrate
    from yoloq.quant.checkpoint import save_quantized
    from yoloq.quant.prepare import prepare
    root, _, _, images = setup
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": "tiny", "arch": "yolov6", "depth_multiple": 0.33,
                                             "width_multiple": 0.0625, "img_size": 64},
                                   "data": str(root / "data.yaml"), "eval": {"batch_size": 2, "workers": 0}}))
    torch.manual_seed(0)
    fp32 = build_model(load_config(cfg).model).fuse().eval()
    torch.save(fp32.state_dict(), tmp_path / "w.pt")
    qmodel = prepare(fp32)
    calibrate(qmodel, [torch.rand(2, 3, 64, 64)], "max", progress=False)
    save_quantized(qmodel, tmp_path / "quant.pt", meta={"name": "tiny"})
    for flag, path in (("--weights", tmp_path / "w.pt"), ("--ckpt", tmp_path / "quant.pt")):
        code, out, err = run(["--cfg", cfg, flag, path, "--source", images, "--out", tmp_path / "runs", "--name",
                              flag[2:], "--conf-thres", "0.01", "--device", "cpu", "--no-progress"], capsys)
        assert code == 0, err
        drawn = [p for p in (tmp_path / "runs" / flag[2:]).iterdir() if p.name != ".yoloq-run"]
        assert len(drawn) == 3 and "3 image(s)" in out
    code, _, err = run(["--cfg", cfg, "--engine", tmp_path / "m.engine", "--source", images], capsys)
    assert code == 2 and err.count("\n") == 1 and "m.engine" in err
    (tmp_path / "m.engine").write_bytes(b"x")
    code, _, err = run(["--cfg", cfg, "--engine", tmp_path / "m.engine", "--source", images], capsys)
    assert code == 2 and err.count("\n") == 1 and "TensorRT" in err
    code, _, err = run(["--cfg", cfg, "--source", tmp_path / "nothing_here"], capsys)
    assert code == 2 and "source not found" in err
    (tmp_path / "notes.txt").write_text("x")
    code, _, err = run(["--cfg", cfg, "--source", tmp_path / "notes.txt"], capsys)
    assert code == 2 and "not an image" in err and err.count("\n") == 1
    assert not (tmp_path / "runs" / "notes").exists()


def test_infer_replaces_only_its_own_runs(tmp_path, setup, capsys):
    """An --out/--name folder yoloq did not write is refused before any work; an earlier infer run
    is replaced; a --source inside the run folder is not deleted."""
    _, cfg, onnx, images = setup
    keep = tmp_path / "runs" / "keep"
    keep.mkdir(parents=True)
    (keep / "a.txt").write_text("hi")
    args = ["--cfg", cfg, "--onnx", onnx, "--source", images, "--out", tmp_path / "runs", "--no-progress"]
    code, _, err = run(args + ["--name", "keep"], capsys)
    assert code == 2 and "not a yoloq run" in err and (keep / "a.txt").read_text() == "hi"
    for _ in range(2):                                # the second run replaces the first
        code, _, err = run(args + ["--name", "mine"], capsys)
        assert code == 0, err
    assert (tmp_path / "runs" / "mine" / "wide.jpg").is_file()
    inside = tmp_path / "runs" / "mine" / "src"
    inside.mkdir()
    shutil.copy(images / "wide.jpg", inside / "wide.jpg")
    code, _, err = run(args[:4] + ["--source", inside, "--out", tmp_path / "runs", "--name", "mine"], capsys)
    assert code == 2 and "--source" in err and (inside / "wide.jpg").is_file()
    code, _, err = run(args + ["--name", "../escape"], capsys)
    assert code == 2 and "--name" in err and not (tmp_path / "escape").exists()
