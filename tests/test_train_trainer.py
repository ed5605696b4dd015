"""The training engine with the detection step (yoloq.train.engine / detection / optim / run_log): resume,
DDP, NaN stops, schedule, EMA, L2."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from yoloq.config import AugmentConfig, LossConfig, ModelConfig, TrainConfig
from yoloq.models.blocks import QARepVGGBlock, RepVGGBlock
from yoloq.models.build import build_model
from yoloq.models.detector import init_head_biases
from yoloq.train.augment import Augmenter
from yoloq.train.dataset import AugmentedDataset, LabelledImage, LabelledImages, collate_targets, make_train_loader
from yoloq.train.detection import DetectionStep, train_loop
from yoloq.train.engine import fit as engine_fit, world_and_rank
from yoloq.train.errors import NonFiniteLossError, NonFiniteWeightsError, TrainError
from yoloq.train.guard import Guard
from yoloq.report.run_log import history_csv
from yoloq.train.losses import DetectionLoss
from yoloq.train.optim import custom_l2, make_ema, parameter_groups, set_learning_rate

TINY = ModelConfig(name="tiny", arch="yolov6", block="repvgg", depth_multiple=0.33, width_multiple=0.0625, nc=3,
                   img_size=64)
SIZE = 64


def synthetic_records(folder, n=8, seed=0) -> list[LabelledImage]:
    """Images with one or two coloured rectangles each (class = colour)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    records = []
    for i in range(n):
        image = np.full((80, 96, 3), 60, np.uint8)
        boxes, classes = [], []
        for _ in range(1 + i % 2):
            c = int(rng.integers(0, 3))
            x1, y1 = int(rng.integers(0, 50)), int(rng.integers(0, 40))
            x2, y2 = x1 + int(rng.integers(20, 45)), y1 + int(rng.integers(20, 38))
            cv2.rectangle(image, (x1, y1), (x2 - 1, y2 - 1), colours[c], -1)
            boxes.append([x1, y1, x2, y2])
            classes.append(c)
        path = folder / f"{i:04d}.png"
        cv2.imwrite(str(path), image)
        records.append(LabelledImage(str(path), np.array(boxes, np.float32), np.array(classes), i))
    return records


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = build_model(TINY)
    init_head_biases(model.detect)
    return model


def tcfg(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=2, nominal_batch_size=4, workers=0, lr0=0.01, warmup_epochs=1.0,
                warmup_min_steps=0, ema_tau=10.0)
    base.update(kw)
    return TrainConfig(**base)


def dataset_of(records, seed=0, augment=AugmentConfig(close_mosaic_epochs=1)):
    return AugmentedDataset(LabelledImages(records), Augmenter(augment, SIZE), seed=seed)


def probe_ap(model) -> dict:
    """A cheap stand-in for COCO AP: a deterministic function of the weights (best-epoch logic)."""
    with torch.no_grad():
        out = model(torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)))
    return {"AP": float(out[..., 4:].max())}


LOSS = DetectionLoss(TINY, LossConfig(atss_warmup_epochs=1))


def fit(model, loader, loss_fn, cfg: TrainConfig, close_mosaic_epochs: int = 0, repopt_scales=None, **kw):
    """The training engine with the detection step, as ``yoloq train`` runs it."""
    loop = train_loop(cfg, world_and_rank()[0], close_mosaic_epochs)
    return engine_fit(model, loader, DetectionStep(loss_fn, cfg, repopt_scales), loop, **kw)


# --------------------------------------------------------------------------- resume


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    records = synthetic_records(tmp_path / "img")
    cfg = tcfg()

    def run(out, **kw):
        ds = dataset_of(records)
        loader, sampler = make_train_loader(ds, cfg.batch_size, 0, cfg.seed)
        return fit(tiny_model(), loader, LOSS, cfg, sampler=sampler, dataset=ds, close_mosaic_epochs=1,
                   evaluate=probe_ap, out_dir=out, fingerprint={"run": 1}, **kw)

    full = run(tmp_path / "full")
    part = run(tmp_path / "part", stop_after_epoch=1)
    assert len(part.history) == 1 and (tmp_path / "part" / "last.pt").is_file()
    resumed = run(tmp_path / "part", resume=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for key, value in full.model_state.items():
        assert torch.equal(value, resumed.model_state[key]), key
    for key, value in full.ema_state.items():
        assert torch.equal(value, resumed.ema_state[key]), key
    strip = lambda h: [{k: v for k, v in r.items() if "seconds" not in k} for r in h]   # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    assert (tmp_path / "part" / "results.csv").read_text().count("\n") == 4          # header + 3 epochs
    assert (tmp_path / "part" / "best.pt").is_file()
    with pytest.raises(TrainError, match="differs from this one"):
        ds = dataset_of(records)
        loader, sampler = make_train_loader(ds, 2, 0, 0)
        fit(tiny_model(), loader, LOSS, cfg, sampler=sampler, dataset=ds, out_dir=tmp_path / "part", resume=True,
            fingerprint={"run": 2})


# --------------------------------------------------------------------------- DDP


class InterleavedShards(Sampler):
    """One process seeing, step by step, rank 0's batch then rank 1's batch of a 2-process
    DistributedSampler: with accumulation over 2 micro-batches this is what DDP averages."""

    def __init__(self, dataset, batch_size, seed=0):
        self.shards = [DistributedSampler(dataset, 2, r, shuffle=True, seed=seed) for r in range(2)]
        self.batch_size = batch_size

    def set_epoch(self, epoch):
        for s in self.shards:
            s.set_epoch(epoch)

    def __iter__(self):
        a, b = (list(s) for s in self.shards)
        for i in range(0, len(a), self.batch_size):
            yield from a[i:i + self.batch_size] + b[i:i + self.batch_size]

    def __len__(self):
        return sum(len(s) for s in self.shards)


def _ddp_worker(rank: int, world: int, init_file: str, folder: str, out: str):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from pathlib import Path
        records = synthetic_records(Path(folder))
        ds = dataset_of(records)
        loader, sampler = make_train_loader(ds, 2, 0, 0)                  # 2 images per rank and step
        result = fit(tiny_model(), loader, LOSS, tcfg(epochs=2), sampler=sampler, dataset=ds, close_mosaic_epochs=1)
        torch.save(result.model_state, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_two_cpu_processes_match_one_process_accumulating_their_batches(tmp_path):
    out = str(tmp_path / "state")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "img"), out), nprocs=2, join=True)
    s0, s1 = (torch.load(f"{out}.{r}", weights_only=True) for r in range(2))
    ds = dataset_of(synthetic_records(tmp_path / "img"))
    sampler = InterleavedShards(ds, 2)
    loader = DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate_targets)
    single = fit(tiny_model(), loader, LOSS, tcfg(epochs=2), sampler=sampler, dataset=ds,  # accumulates 2 batches
                 close_mosaic_epochs=1).model_state
    start = tiny_model().state_dict()
    params = [k for k, _ in tiny_model().named_parameters()]
    for key in params:
        assert torch.equal(s0[key], s1[key]), key                          # ranks stay in sync
        assert torch.allclose(s0[key], single[key], rtol=1e-4, atol=1e-6), key
    assert any(not torch.equal(s0[k], start[k]) for k in params)


# --------------------------------------------------------------------------- NaN


def test_nan_loss_stops_with_the_step_and_the_bad_part(tmp_path):
    parts = {"cls": torch.tensor(0.5), "iou": torch.tensor(0.3), "dfl": torch.tensor(float("nan"))}
    err = Guard().nonfinite_loss(torch.tensor(float("nan")), parts, ["dfl"], "epoch 3 step 7", None, None)
    assert isinstance(err, NonFiniteLossError)
    assert str(err).startswith("epoch 3 step 7: loss part(s) dfl not finite (cls 0.5, iou 0.3")

    model = tiny_model()
    with torch.no_grad():
        model.detect.reg_preds[0].bias[0] = float("inf")                   # one box distance blows up
    ds = dataset_of(synthetic_records(tmp_path / "img", n=4), augment=AugmentConfig(mosaic=0.0))
    loader, sampler = make_train_loader(ds, 2, 0, 0)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1 step 1: loss part\(s\) .*iou.* not finite"):
        fit(model, loader, LOSS, tcfg(), sampler=sampler, dataset=ds, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists() or list((tmp_path / "run").iterdir()) == []   # no logs, no checkpoints


def test_nonfinite_weights_stop_before_any_checkpoint(tmp_path):
    """lr0 inf: the first update makes the weights non-finite while the loss of that step was
    finite; the run stops naming the step and the parameter, and writes no best.pt / last.pt."""
    ds = dataset_of(synthetic_records(tmp_path / "img", n=4), augment=AugmentConfig(mosaic=0.0))
    loader, sampler = make_train_loader(ds, 2, 0, 0)
    cfg = tcfg(epochs=1, lr0=float("inf"), warmup_epochs=0.0, nominal_batch_size=2)
    with pytest.raises(NonFiniteWeightsError, match=r"epoch 1 step 1: parameter '.+' became NaN/inf after the update"):
        fit(tiny_model(), loader, LOSS, cfg, sampler=sampler, dataset=ds, out_dir=tmp_path / "run", evaluate=probe_ap)
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "best.pt").exists()
    ema = tiny_model()
    with torch.no_grad():
        next(ema.parameters())[0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="epoch 2: the EMA of parameter '.+' is NaN/inf"):
        Guard().check_ema(ema, "epoch 2")


# --------------------------------------------------------------------------- optimizer pieces


def test_warmup_and_cosine_schedule():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    opt = torch.optim.SGD(parameter_groups(model, 5e-4), lr=0.1, momentum=0.9, nesterov=True)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1, 2]      # conv weight / BN weight / biases
    cfg = TrainConfig(epochs=10, lr0=0.01, lrf=0.01, warmup_bias_lr=0.1, momentum=0.937, warmup_momentum=0.8)
    lrs = lambda: {g["name"]: g["lr"] for g in opt.param_groups}           # noqa: E731
    set_learning_rate(opt, cfg, step=0, epoch=0, warmup_steps=100)
    assert lrs() == {"decay": 0.0, "no_decay": 0.0, "bias": 0.1} and opt.param_groups[0]["momentum"] == 0.8
    set_learning_rate(opt, cfg, step=50, epoch=0, warmup_steps=100)
    assert lrs()["decay"] == pytest.approx(0.005) and lrs()["bias"] == pytest.approx(0.055)
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.8685)
    set_learning_rate(opt, cfg, step=500, epoch=5, warmup_steps=100)       # half way: (1 + lrf) / 2
    assert lrs()["decay"] == pytest.approx(0.01 * 0.505) and opt.param_groups[0]["momentum"] == 0.937
    set_learning_rate(opt, cfg, step=999, epoch=10, warmup_steps=100)
    assert lrs()["bias"] == pytest.approx(0.01 * 0.01)


def test_ema_decay_ramp():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = make_ema(model, decay=0.9, tau=2.0)
    ema.update_parameters(model)                                            # first update copies
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update_parameters(model)                                            # d = 0.9 (1 - e^(-1/2))
    d = 0.9 * (1 - math.exp(-0.5))
    assert ema.module.weight.item() == pytest.approx(d * 1.0 + (1 - d) * 3.0)


def test_custom_l2_by_hand():
    block = RepVGGBlock(1, 2, 3, 1)                                         # no identity branch
    with torch.no_grad():
        block.rbr_dense.conv.weight.fill_(1.0)
        block.rbr_1x1.conv.weight.fill_(2.0)
        for bn, gamma in ((block.rbr_dense.bn, 1.0), (block.rbr_1x1.bn, 2.0)):
            bn.weight.fill_(gamma)
            bn.running_var.fill_(1.0 - bn.eps)                              # sigma = 1, so t = gamma
    # ring: 8 weights of 1 per output channel -> 16; centre: (1*1 + 2*2)^2 / (1 + 4) = 5 per channel -> 10
    assert custom_l2(block).item() == pytest.approx(26.0)
    groups = parameter_groups(block, 5e-4, "custom_l2")
    decayed = {id(p) for p in groups[0]["params"]}
    assert id(block.rbr_dense.conv.weight) not in decayed and id(block.rbr_1x1.conv.weight) not in decayed
    with pytest.raises(ValueError, match="weight_decay_mode"):          # a ConfigError
        parameter_groups(block, 5e-4, "l1")
    qa = QARepVGGBlock(1, 2, 3, 1)                                          # 1x1 without BN: t1 = 1
    with torch.no_grad():
        qa.rbr_dense.conv.weight.fill_(1.0)
        qa.rbr_1x1.weight.fill_(2.0)
        qa.rbr_dense.bn.running_var.fill_(1.0 - qa.rbr_dense.bn.eps)
    # ring 16; centre (1*1 + 2*1)^2 / (1 + 1) = 4.5 per channel -> 9
    assert custom_l2(qa).item() == pytest.approx(25.0)


def test_custom_l2_enters_the_training_loss(tmp_path):
    ds = dataset_of(synthetic_records(tmp_path / "img", n=4), augment=AugmentConfig(mosaic=0.0))
    loader, sampler = make_train_loader(ds, 2, 0, 0)
    result = fit(tiny_model(), loader, LOSS, tcfg(epochs=1, weight_decay_mode="custom_l2"), sampler=sampler,
                 dataset=ds)
    assert result.history[0]["l2"] > 0


def test_history_csv_has_one_row_per_epoch_and_all_columns():
    text = history_csv([{"epoch": 1, "cls": 0.5}, {"epoch": 2, "cls": 0.25, "AP": 0.1}])
    assert text.splitlines() == ["epoch,cls,AP", "1,0.5,", "2,0.25,0.1"]


def test_default_workers_fit_the_machine(tmp_path):
    """train / qat default to this machine's cores - 1 DataLoader workers (at most 4 / 2), so a small
    machine gets no PyTorch warning about more workers than it can run."""
    import os
    import warnings
    from yoloq.config import QATConfig
    cores = len(os.sched_getaffinity(0))
    assert TrainConfig().workers == max(0, min(4, cores - 1)) and QATConfig().workers == max(0, min(2, cores - 1))
    ds = dataset_of(synthetic_records(tmp_path / "img", n=2), augment=AugmentConfig(mosaic=0.0))
    loader, _ = make_train_loader(ds, 2, TrainConfig().workers, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # PyTorch's "... worker processes in total" warning
        assert sum(len(images) for images, _ in loader) == 2
