"""Evaluation at scale: batch-wise NMS and COCO rows equal the per-image results, no raw output
outlives its batch, per-image timing, the sharded evaluation over 2 gloo processes equals one
process exactly, and ``--device`` errors."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import weakref

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import REPO, tiny_coco
from yoloq.config import EvalConfig
from yoloq.data import load_data_config
from yoloq.data.coco import ImageMeta
from yoloq.eval import CocoDetections, evaluate, evaluate_model, non_max_suppression
from yoloq.eval.coco_eval import scale_boxes
from yoloq.eval.detections import batch_rows
from yoloq.eval.loop import shard_indices


def _preds(batch=4, n=200, nc=5, seed=0, spread=600.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, n, 2, generator=g) * spread
    sizes = torch.rand(batch, n, 2, generator=g) * 80 + 4
    scores = torch.rand(batch, n, nc, generator=g) ** 3
    return torch.cat((centres - sizes / 2, centres + sizes / 2, scores), 2)


# --------------------------------------------------------------------------- batch-wise NMS
@pytest.mark.parametrize("max_det", [300, 7])
def test_batched_nms_equals_one_image_at_a_time(max_det):
    """Batch-wise NMS: every image gets exactly what it gets alone (no suppression across images,
    max_det per image, score order kept)."""
    preds = _preds()
    preds[2, :, 4:] = 0.0                                   # an image without candidates
    together = non_max_suppression(preds, 0.2, 0.5, max_det)
    for b in range(preds.shape[0]):
        alone = non_max_suppression(preds[b:b + 1], 0.2, 0.5, max_det)[0]
        assert torch.equal(together[b], alone), b
    assert together[2].shape == (0, 6) and all(len(t) <= max_det for t in together)
    assert len(together[0]) == max_det if max_det == 7 else len(together[0]) > 7


@pytest.mark.parametrize("budget", [1, 500, 10 ** 9])
def test_nms_gives_the_same_rows_however_the_batch_is_split_into_calls(monkeypatch, budget):
    """Images share an nms call while their candidates fit the budget; an image over it is suppressed
    class by class: the rows are the same either way (budget 1: every image alone, class by class)."""
    import yoloq.eval.nms as nms_module
    preds = _preds(batch=5, n=300, nc=6, seed=2)
    reference = non_max_suppression(preds, 0.1, 0.5, 50)
    monkeypatch.setitem(nms_module.CALL_BUDGET, "cpu", budget)
    assert all(torch.equal(a, b) for a, b in zip(non_max_suppression(preds, 0.1, 0.5, 50), reference))


def test_nms_keeps_precision_far_from_the_origin():
    """The per-group shift is applied in float64: two boxes with IoU just above the threshold are
    still told apart at 5000 px (in float32 the shifted coordinates would round)."""
    a = torch.tensor([5000.0, 5000.0, 5100.0, 5100.0])
    b = a + torch.tensor([0.0, 0.0, 0.0, 54.0])             # IoU = 100 / 154 = 0.6494
    preds = torch.zeros(1, 2, 4 + 80)
    preds[0, :, :4] = torch.stack((a, b))
    preds[0, :, 4 + 79] = torch.tensor([0.9, 0.8])          # the last class: the largest shift
    assert len(non_max_suppression(preds, 0.1, 0.65)[0]) == 2
    assert len(non_max_suppression(preds, 0.1, 0.64)[0]) == 1


# --------------------------------------------------------------------------- COCO rows
def test_batch_rows_equal_the_per_image_mapping():
    metas = [ImageMeta(11, "a", 480, 640, 0.5, (0.0, 40.0)), ImageMeta(42, "b", 300, 200, 1.0667, (53.0, 0.0))]
    dets = non_max_suppression(_preds(batch=2, nc=80, spread=320.0), 0.3, 0.6)
    rows = batch_rows(torch.cat(dets), torch.cat([torch.full((len(d),), i) for i, d in enumerate(dets)]), metas,
                      list(range(1, 81)))
    expected = []
    for d, m in zip(dets, metas):                           # the former per-image code
        xyxy = scale_boxes(d[:, :4].double(), m)
        for box, s, c in zip(torch.cat((xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]), 1).tolist(), d[:, 4].tolist(),
                             d[:, 5].long().tolist()):
            expected.append({"image_id": m.image_id, "category_id": c + 1, "bbox": [round(v, 3) for v in box],
                             "score": round(s, 5)})
    got = CocoDetections(rows).to_list()
    assert len(got) == len(expected) > 20
    for g, e in zip(got, expected):
        assert (g["image_id"], g["category_id"]) == (e["image_id"], e["category_id"])
        assert g["bbox"] == pytest.approx(e["bbox"], abs=1.001e-3) and g["score"] == pytest.approx(e["score"], abs=1e-5)


# --------------------------------------------------------------------------- memory and timing
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_data_config(tiny_coco(tmp_path_factory.mktemp("tiny")))


class Watched:
    """Predictor whose every output is watched: when it is called, no earlier output may still be
    alive (the evaluation keeps only the NMS rows of a batch, never the raw predictions)."""

    def __init__(self, n_boxes=4000, delay=0.0):
        self.alive, self.calls, self.n_boxes, self.delay = [], 0, n_boxes, delay

    def __call__(self, images):
        assert all(ref() is None for ref in self.alive), f"raw outputs of earlier batches still held (call {self.calls})"
        self.calls += 1
        time.sleep(self.delay)
        g = torch.Generator().manual_seed(self.calls)
        scores = torch.zeros(images.shape[0], self.n_boxes, 80)
        scores[..., 0] = torch.rand(images.shape[0], self.n_boxes, generator=g)        # one class: a cheap NMS
        out = torch.cat((torch.rand(images.shape[0], self.n_boxes, 2, generator=g) * 40,
                         torch.rand(images.shape[0], self.n_boxes, 2, generator=g) * 20 + 41, scores), 2)
        self.alive.append(weakref.ref(out))
        return out


def test_evaluation_holds_no_raw_outputs_and_times_each_stage(tiny):
    predictor = Watched(delay=0.05)
    result = evaluate(predictor, tiny, EvalConfig(batch_size=2, workers=0, max_det=300), 64, progress=False)
    assert predictor.calls == 3 and result.n_images == 6
    assert len(result.detections) <= 6 * 300
    t = result.timing
    assert t["inference_ms"] >= 0.05 * 1000 / 2 * 0.95          # 50 ms per call of 2 images
    assert t["preprocess_ms"] > 0 and t["nms_ms"] > 0 and t["processes"] == 1 and t["batch_size"] == 2


# --------------------------------------------------------------------------- sharding
def test_shards_are_whole_batches_covering_every_image_once():
    for n, batch, world in [(500, 16, 2), (6, 4, 2), (3, 8, 2), (101, 8, 3), (10, 1, 4)]:
        shards = [shard_indices(n, batch, r, world) for r in range(world)]
        assert [i for s in shards for i in s] == list(range(n))
        assert all(s.start % batch == 0 for s in shards)


class ContentBoxes(torch.nn.Module):
    """A deterministic stand-in detector whose boxes and scores depend on the image content."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.head = torch.nn.Linear(8, 40 * 84)
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        feats = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1)
        raw = self.head(feats).view(-1, 40, 84)
        xy = torch.sigmoid(raw[..., :2]) * 48
        wh = torch.sigmoid(raw[..., 2:4]) * 30 + 4
        return torch.cat((xy, xy + wh, torch.sigmoid(raw[..., 4:] * 4)), 2)


def _eval_tiny(data_yaml, model):
    torch.set_num_threads(1)
    return evaluate_model(model, load_data_config(data_yaml), EvalConfig(batch_size=2, workers=0), 64, progress=False)


def _shard_worker(rank: int, world: int, init_file: str, data_yaml: str, out: str):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = ContentBoxes()
        result = _eval_tiny(data_yaml, model)
        torch.save({"stats": result.stats, "rows": torch.from_numpy(result.detections.rows), "seen": model.seen,
                    "n": result.n_images, "processes": result.timing["processes"],
                    "per_class": result.per_class}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_one_process_result_exactly(tmp_path, tiny):
    data_yaml = tiny.path
    out = str(tmp_path / "shard")
    mp.spawn(_shard_worker, args=(2, str(tmp_path / "init"), data_yaml, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    single_model = ContentBoxes()
    single = _eval_tiny(data_yaml, single_model)
    assert single.n_images == 6 and len(single.detections) > 0
    assert [r["seen"] for r in ranks] == [2, 4]               # each process ran only its own whole batches (1 and 2)
    for r in ranks:
        assert r["processes"] == 2 and r["n"] == 6
        assert r["stats"] == single.stats                      # every stat, to the last bit
        assert np.array_equal(r["rows"].numpy(), single.detections.rows)
        assert r["per_class"] == single.per_class


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_torchrun_tools_eval_is_sharded_and_equals_one_process(tmp_path, tiny):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(json.dumps({"model": {"name": "tiny", "arch": "yolov6", "depth_multiple": 0.33,
                                         "width_multiple": 0.0625, "img_size": 64},
                               "data": tiny.path, "eval": {"batch_size": 2, "workers": 0, "conf_thres": 0.3}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    common = ["--cfg", str(cfg), "--random-weights", "--no-progress", "--device", "cpu", "--no-plots"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "tools" / "eval.py"), *common, "--out", str(tmp_path / "two.json")]
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "sharded over 2 processes" in two.stdout and two.stdout.count("wrote ") == 1     # rank 0 alone
    one = subprocess.run([sys.executable, str(REPO / "tools" / "eval.py"), *common, "--out", str(tmp_path / "one.json")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("two.json", "one.json"))
    assert a["stats"] == b["stats"] and a["detections"] == b["detections"] and len(a["detections"]) > 0
    table = lambda out: [line for line in out.splitlines() if line.startswith("| A")]   # noqa: E731
    assert table(two.stdout) == table(one.stdout)


def test_gpu_evaluation_turns_tf32_off_and_restores_it():
    """FP32 stays FP32 on a GPU: cuDNN's default TF32 convolutions are off while a model is evaluated."""
    from yoloq.eval.coco_eval import full_fp32
    backends = torch.backends
    saved = backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32
    try:
        backends.cudnn.allow_tf32 = backends.cuda.matmul.allow_tf32 = True
        with full_fp32(torch.device("cuda", 0)):
            assert not backends.cudnn.allow_tf32 and not backends.cuda.matmul.allow_tf32
        assert backends.cudnn.allow_tf32 and backends.cuda.matmul.allow_tf32
        with full_fp32(torch.device("cpu")):
            assert backends.cudnn.allow_tf32                   # nothing to change on the CPU
    finally:
        backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32 = saved


# --------------------------------------------------------------------------- --device
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("command", [["eval", "--cfg", "yolov6lite_s.yaml"], ["bench-eval"]])
def test_device_cuda_without_a_gpu_is_one_line_exit_2(command):
    proc = subprocess.run([sys.executable, "-c", "import sys; from yoloq.cli import main; sys.exit(main())", *command,
                           "--device", "cuda"],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: device 'cuda': no CUDA GPU")
