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
    assert code == 2 and "differs from this one in train" in err                    # changed settings
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
