"""yoloq train and yoloq repopt-scales on a tiny synthetic COCO set: a run and its outputs,
the RepOpt pipeline end to end, and bad input (exit status 2, one line naming the culprit)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, tiny_coco
from yoloq.cli import main as yoloq_main
from yoloq.weights import read_checkpoint

TRAIN, SCALES = "train", "repopt-scales"


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory):
    return tiny_coco(tmp_path_factory.mktemp("tiny_coco"))


def config(tmp_path: Path, data: Path, block: str = "repvgg", width: float = 0.0625) -> Path:
    cfg = {"model": {"name": f"tiny_{block}", "arch": "yolov6", "block": block, "depth_multiple": 0.33,
                     "width_multiple": width, "img_size": 64},
           "data": str(data), "eval": {"batch_size": 4, "workers": 0},
           "train": {"batch_size": 2, "nominal_batch_size": 2, "workers": 0, "warmup_min_steps": 0},
           "augment": {"close_mosaic_epochs": 1}}
    path = tmp_path / f"tiny_{block}_{width}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(command: str, args, capsys) -> tuple[int, str, str]:
    code = yoloq_main([command] + [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.filterwarnings("ignore:no detections to evaluate")
def test_train_cli_writes_checkpoints_logs_and_resumes(tmp_path, data_yaml, capsys):
    cfg = config(tmp_path, data_yaml)
    args = ["--cfg", cfg, "--epochs", 2, "--out", tmp_path / "runs", "--name", "t", "--no-progress",
            "--device", "cpu"]
    code, out, err = run(TRAIN, args + ["--set", "train.eval_interval=2"], capsys)
    assert code == 0, err
    assert "tiny_repvgg" not in out and "t: AP" in out                       # --name used
    run_dir = tmp_path / "runs" / "t"
    rows = (run_dir / "results.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,cls,iou") and "AP" in rows[0] and len(rows) == 3
    assert any(run_dir.joinpath("tensorboard").iterdir())
    state, info = read_checkpoint(run_dir / "best.pt")                      # a plain checkpoint of the EMA
    assert "detect.cls_preds.0.weight" in state and info["meta"]["arch"] == "tiny_repvgg" and info["meta"]["epoch"] == 2
    # a second run of the same name must be a resume
    code, _, err = run(TRAIN, args + ["--set", "train.eval_interval=2"], capsys)
    assert code == 2 and "already holds a run" in err and err.count("\n") == 1
    code, _, err = run(TRAIN, args + ["--resume", "--set", "train.eval_interval=1"], capsys)
    assert code == 2 and "differs from this one: train.eval_interval: 2 -> 1" in err     # changed settings
    code, _, err = run(TRAIN, args + ["--resume", "--set", "train.eval_interval=2"], capsys)
    assert code == 0, err                                                   # nothing left to do: 2 of 2 epochs


def test_repopt_pipeline_through_the_tools(tmp_path, data_yaml, capsys):
    """hyper-search training -> scales file -> RepOpt target training with the RepOptimizer."""
    hs_cfg, target_cfg = config(tmp_path, data_yaml, "hyper_search"), config(tmp_path, data_yaml, "repopt")
    common = ["--epochs", 1, "--out", tmp_path / "runs", "--no-progress", "--device", "cpu",
              "--set", "train.eval_interval=0"]
    assert run(TRAIN, ["--cfg", hs_cfg, "--name", "hs"] + common, capsys)[0] == 0
    scales = tmp_path / "scales.pt"
    code, out, err = run(SCALES, ["--cfg", hs_cfg, "--weights", tmp_path / "runs/hs/best.pt", "--out", scales], capsys)
    assert code == 0 and scales.is_file(), err
    hs_state, _ = read_checkpoint(tmp_path / "runs/hs/best.pt")
    saved = torch.load(scales, weights_only=True)["blocks"]
    name = next(iter(saved))
    assert torch.equal(saved[name]["scale_conv"], hs_state[f"{name}.scale_conv.weight"])
    code, _, err = run(TRAIN, ["--cfg", target_cfg, "--name", "opt", "--scales", scales] + common, capsys)
    assert code == 0, err
    # bad input: no scales, scales of another model, a file that is not a scales file
    code, _, err = run(TRAIN, ["--cfg", target_cfg, "--name", "opt2"] + common, capsys)
    assert code == 2 and "set train.scales (or --scales)" in err and err.count("\n") == 1
    wide_cfg = config(tmp_path, data_yaml, "repopt", width=0.125)
    code, _, err = run(TRAIN, ["--cfg", wide_cfg, "--name", "opt3", "--scales", scales] + common, capsys)
    assert code == 2 and str(scales) in err and "the model's block is" in err and err.count("\n") == 1
    code, _, err = run(TRAIN, ["--cfg", target_cfg, "--name", "opt4", "--scales", tmp_path / "runs/hs/best.pt"]
                       + common, capsys)
    assert code == 2 and "not a RepOpt scales file" in err


def test_bad_training_input_exits_2_with_one_line(tmp_path, data_yaml, capsys):
    cfg = config(tmp_path, data_yaml)
    common = ["--cfg", cfg, "--epochs", 1, "--out", tmp_path / "runs", "--no-progress", "--device", "cpu"]
    code, _, err = run(TRAIN, common + ["--data", data_yaml.parent / "nolabels.yaml"], capsys)
    assert code == 2 and "unlabelled.json: none of its 6 images has a box; training needs labels" in err
    assert err.count("\n") == 1
    code, _, err = run(TRAIN, common + ["--set", "train.lr0=0.1", "--set", "train.lr=0.1"], capsys)  # flags add up
    assert code == 2 and "unknown key 'lr'" in err and "lr0" in err
    code, _, err = run(TRAIN, common + ["--set", "loss.iou_type=ciou"], capsys)
    assert code == 2 and "loss.iou_type" in err
    code, _, err = run(TRAIN, common + ["--img-size", 100], capsys)
    assert code == 2 and "multiple of 32" in err


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path, data_yaml):
    """tools/train.py under torchrun (gloo): both ranks train their shard, rank 0 evaluates and writes."""
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as sock:                                          # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = config(tmp_path, data_yaml)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(REPO / "tools" / "train.py"), "--cfg", str(cfg), "--epochs", "2", "--out", str(tmp_path / "runs"),
           "--name", "ddp", "--no-progress", "--device", "cpu", "--set", "train.eval_interval=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1                                 # rank 0 only
    run_dir = tmp_path / "runs" / "ddp"
    assert len((run_dir / "results.csv").read_text().splitlines()) == 3
    state = torch.load(run_dir / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["fingerprint"]["world"] == 2


# --------------------------------------------------------------------------- YOLO-format labels


def yolo_copy(coco_yaml: Path, root: Path) -> Path:
    """The tiny COCO set as an upstream YOLO dataset: images/<split>/, labels/<split>/*.txt
    (class cx cy w h, normalised), a data YAML with is_coco (class index -> COCO category id)."""
    import json
    import shutil
    for split in ("train", "val"):
        coco = json.loads((coco_yaml.parent / f"{split}.json").read_text())
        cat_ids = sorted(c["id"] for c in coco["categories"])
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for image in coco["images"]:
            shutil.copy(coco_yaml.parent / split / image["file_name"], root / "images" / split / image["file_name"])
            lines = []
            for ann in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
                x, y, w, h = ann["bbox"]
                W, H = image["width"], image["height"]
                lines.append(f"{cat_ids.index(ann['category_id'])} {(x + w / 2) / W} {(y + h / 2) / H} {w / W} {h / H}")
            (root / "labels" / split / f"{Path(image['file_name']).stem}.txt").write_text("\n".join(lines) + "\n")
    path = root / "yolo.yaml"
    path.write_text(yaml.safe_dump({"train": str(root / "images" / "train"), "val": str(root / "images" / "val"),
                                    "nc": 80, "names": [f"c{i}" for i in range(80)], "is_coco": True}))
    return path


def test_training_on_yolo_labels_gives_the_loss_of_the_same_coco_json(tmp_path, data_yaml, capsys):
    yolo = yolo_copy(data_yaml, tmp_path / "yolo")
    cfg = config(tmp_path, data_yaml)
    common = ["--cfg", cfg, "--epochs", 2, "--out", tmp_path / "runs", "--no-progress", "--device", "cpu",
              "--set", "train.eval_interval=0"]
    losses = {}
    for name, data in (("coco", data_yaml), ("yolo", yolo)):
        code, _, err = run(TRAIN, common + ["--name", name, "--data", data], capsys)
        assert code == 0, err
        rows = (tmp_path / "runs" / name / "results.csv").read_text().splitlines()
        header = rows[0].split(",")
        losses[name] = [float(r.split(",")[header.index(k)]) for r in rows[1:] for k in ("cls", "iou")]
    assert len(losses["yolo"]) == 4
    assert losses["yolo"] == pytest.approx(losses["coco"], rel=1e-4)
    bad = tmp_path / "yolo" / "labels" / "train" / "000000000003.txt"
    bad.write_text("0 0.5 0.5 1.5 0.2\n")                                  # w > 1: not normalised
    code, _, err = run(TRAIN, common + ["--name", "bad", "--data", yolo], capsys)
    assert code == 2 and f"{bad}:1" in err and "not normalized" in err and err.count("\n") == 1
    assert not (tmp_path / "runs" / "bad").exists()


# --------------------------------------------------------------------------- failed runs leave nothing


def test_failed_training_runs_leave_no_folder(tmp_path, data_yaml, capsys):
    cfg = config(tmp_path, data_yaml)
    out = tmp_path / "runs"
    common = ["--cfg", cfg, "--epochs", 1, "--out", out, "--no-progress", "--set", "train.eval_interval=1"]
    for device in ("cuda:7", "tpu"):                                       # no such device here
        if device.startswith("cuda") and torch.cuda.device_count() > 7:
            continue
        code, _, err = run(TRAIN, common + ["--name", "dev", "--device", device], capsys)
        assert code == 2 and f"device '{device}'" in err and err.count("\n") == 1, err
    code, _, err = run(TRAIN, common + ["--name", "nan", "--device", "cpu", "--set", "train.lr0=.inf",
                                        "train.warmup_epochs=0"], capsys)
    assert code == 2 and "became NaN/inf after the update" in err and err.count("\n") == 1, err
    lite = tmp_path / "lite.yaml"
    lite.write_text(yaml.safe_dump({"model": {"name": "tiny_lite", "arch": "lite", "backbone": "Lite_EffiBackbone",
                                              "neck": "Lite_EffiNeck", "width_multiple": 0.25, "img_size": 64},
                                    "data": str(data_yaml), "train": {"workers": 0}}))
    code, _, err = run(TRAIN, ["--cfg", lite, "--epochs", 1, "--out", out, "--name", "lite", "--device", "cpu",
                               "--no-progress"], capsys)
    assert code == 2 and "'tiny_lite' is not trainable" in err and err.count("\n") == 1, err
    assert not out.exists() or list(out.iterdir()) == []                 # no run.json, tensorboard/, best.pt


def test_resume_refuses_a_last_pt_that_is_code(tmp_path, data_yaml, capsys):
    """--resume reads last.pt like every other loader: a TorchScript archive or a pickle that would run
    code is one line naming the file, never a traceback."""
    import os
    import pickle
    cfg = config(tmp_path, data_yaml)
    args = ["--cfg", cfg, "--epochs", 2, "--out", tmp_path / "runs", "--name", "r", "--no-progress", "--device", "cpu",
            "--set", "train.eval_interval=0"]
    code, _, err = run(TRAIN, args[:3] + ["1"] + args[4:], capsys)
    assert code == 0, err
    last = tmp_path / "runs" / "r" / "last.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(last))
    code, _, err = run(TRAIN, args + ["--resume"], capsys)
    assert code == 2 and str(last) in err and "TorchScript" in err and err.count("\n") == 1, err

    class Runs:                                                            # pickled: calls os.getpid on load
        def __reduce__(self):
            return os.getpid, ()
    last.write_bytes(pickle.dumps(Runs()))
    code, _, err = run(TRAIN, args + ["--resume"], capsys)
    assert code == 2 and str(last) in err and err.count("\n") == 1, err
