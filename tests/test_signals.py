"""SIGTERM sent to a whole process group during training (a terminal, `timeout`, a scheduler): the
DataLoader workers leave it to the main process, which stops once with its one "terminated" line."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from conftest import REPO, tiny_coco
from yoloq.cli.common import EXIT_TERMINATED, run_command


def _sigterm_soon(delay: float) -> None:
    threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM)).start()


def test_sigterm_swallowed_by_a_del_is_raised_again():
    """Python ignores an exception raised inside ``__del__`` (a DataLoader iterator joining its
    workers at the end of an epoch); the run must still stop."""
    class SlowToDelete:
        def __del__(self):
            time.sleep(0.5)                                 # SIGTERM arrives in here

    def main(argv):
        _sigterm_soon(0.1)
        obj = SlowToDelete()
        del obj
        time.sleep(10)                                      # the re-sent SIGTERM ends this
        return 0
    start = time.time()
    assert run_command(main, []) == EXIT_TERMINATED
    assert time.time() - start < 5


def test_a_forked_child_ignores_the_inherited_handler():
    """A DataLoader worker forked a moment before has only the main process's handler: SIGTERM
    there must not raise (a traceback per worker) but leave the stopping to the main process."""
    def main(argv):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:                                        # the child: the inherited handler
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                os.write(write, b"alive")
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        os.close(write)
        return 0 if os.read(read, 5) == b"alive" else 1
    assert run_command(main, []) == 0


def test_sigterm_to_the_process_group_during_training_stops_quietly(tmp_path):
    """Training with DataLoader workers (train and evaluation), SIGTERM to the process group at
    three moments: each time exit 143, one "terminated" line, no worker traceback, last.pt kept."""
    root = tmp_path / "data"
    root.mkdir()
    data = tiny_coco(root)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"name": "tiny", "arch": "yolov6", "block": "repvgg", "depth_multiple": 0.33,
                  "width_multiple": 0.0625, "img_size": 64},
        "data": str(data), "eval": {"batch_size": 2, "workers": 2},
        "train": {"batch_size": 2, "nominal_batch_size": 2, "warmup_min_steps": 0}, "augment": {"close_mosaic_epochs": 1}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for trial, delay in enumerate((0.4, 1.3, 2.2)):
        run_dir = tmp_path / "runs" / f"t{trial}"
        cmd = [sys.executable, str(REPO / "tools" / "train.py"), "--cfg", str(cfg), "--epochs", "500", "--workers",
               "2", "--out", str(tmp_path / "runs"), "--name", f"t{trial}", "--no-progress", "--device", "cpu"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            deadline = time.time() + 240
            while not (run_dir / "last.pt").is_file() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.1)
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(delay)                               # inside a later epoch or its evaluation
            os.killpg(proc.pid, signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"trial {trial}: still running 60 s after SIGTERM")
        assert proc.returncode == 143, err[-2000:]
        assert err.count("terminated (SIGTERM)") == 1 and "Traceback" not in err, err[-2000:]
        assert (run_dir / "last.pt").is_file()
