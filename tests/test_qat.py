"""QAT (yoloq.recipes.qat): losses, optimizer groups, resume, divergence, DDP, end to end."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
from pytorch_quantization import nn as quant_nn                      # noqa: E402
from pytorch_quantization.nn import TensorQuantizer                  # noqa: E402
from pytorch_quantization.tensor_quant import QuantDescriptor        # noqa: E402

from yoloq.config import QATConfig                                   # noqa: E402
from yoloq.models.detector import Decode                               # noqa: E402
from yoloq.quant.learnable import QuantizerDivergenceError, learnable_quantizers, quantizer_parameters  # noqa: E402
from yoloq.quant.swap import swap_quantizers                          # noqa: E402
from yoloq.recipes.qat.losses import cwd_loss, head_loss                       # noqa: E402
from yoloq.recipes.qat.step import (DistillStep, QuantizerGroupError, build_optimizer,  # noqa: E402
                                    check_optimizer_covers_quantizers, make_teacher, parameter_groups, qat_loop)
from yoloq.train.dataset import make_train_loader                     # noqa: E402
from yoloq.train.engine import fit as engine_fit                      # noqa: E402
from conftest import REPO, needs_shared  # noqa: E402



# --------------------------------------------------------------------------- a tiny detector


def qconv(cin, cout, k=1, stride=1):
    return quant_nn.QuantConv2d(cin, cout, k, stride=stride, padding=k // 2,
                                quant_desc_input=QuantDescriptor(num_bits=8, calib_method="max"),
                                quant_desc_weight=QuantDescriptor(num_bits=8, axis=(0,)))


class TinyNeck(nn.Module):
    def __init__(self):
        super().__init__()
        self.p3, self.p4 = qconv(8, 8), qconv(8, 8, 3, 2)

    def forward(self, x):
        a = torch.relu(self.p3(x))
        return [a, torch.relu(self.p4(a))]


class TinyDetect(nn.Module):
    def __init__(self, nc=3):
        super().__init__()
        self.cls_preds = nn.ModuleList([qconv(8, nc), qconv(8, nc)])
        self.reg_preds = nn.ModuleList([qconv(8, 4), qconv(8, 4)])
        for c, r in zip(self.cls_preds, self.reg_preds):      # one tensor, two readers: one quantizer
            r._input_quantizer = c._input_quantizer

    def forward(self, feats):
        return [(c(f), r(f)) for f, c, r in zip(feats, self.cls_preds, self.reg_preds)]


class TinyDet(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(qconv(3, 8, 3, 2), nn.ReLU())
        self.neck = TinyNeck()
        self.detect = TinyDetect()
        self.decode = Decode([2, 4])

    def forward(self, x):
        return self.decode(self.detect(self.neck(self.backbone(x))))


def images(n=16, seed=0, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def calibrated_tiny_det(seed=0) -> nn.Module:
    """pytorch-quantization's own max calibration on a few images."""
    torch.manual_seed(seed)
    model = TinyDet().eval()
    tqs = list({id(m): m for m in model.modules() if isinstance(m, TensorQuantizer)}.values())
    for q in tqs:
        q.disable_quant()
        q.enable_calib()
    model(images(8, seed=99))
    for q in tqs:
        q.load_calib_amax()
        q.disable_calib()
        q.enable_quant()
    return model


def qcfg(**kw) -> QATConfig:
    base = dict(epochs=2, batch_size=4, lr=1e-3, quantizer_lr=1e-3, workers=0, seed=0)
    base.update(kw)
    return QATConfig(**base)


def student_teacher(kind="lsqplus", mode="symmetric"):
    student = calibrated_tiny_det()
    teacher = make_teacher(student)
    swap_quantizers(student, kind, mode)
    return student, teacher


def loader_of(data: torch.Tensor, batch_size: int, seed: int = 0):
    return make_train_loader(torch.utils.data.TensorDataset(data), batch_size, 0, seed, collate_fn=None)


def fit(student, teacher, loader, cfg, epochs, **kw):
    """The training engine with the distillation step, as ``yoloq qat`` runs it."""
    return engine_fit(student, loader, DistillStep(student, teacher, cfg), qat_loop(cfg, epochs), **kw)


# --------------------------------------------------------------------------- losses


def test_cwd_loss_is_channel_softmax_kl():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert float(cwd_loss([t], [t])) == pytest.approx(0.0, abs=1e-7)
    T = 2.0
    ps, pt = torch.softmax(s.flatten(2) / T, -1), torch.softmax(t.flatten(2) / T, -1)
    manual = (pt * (pt.log() - ps.log())).sum(-1).mean() * T * T
    assert float(cwd_loss([s], [t], T)) == pytest.approx(float(manual), rel=1e-5)
    assert float(cwd_loss([s, s], [t, t], T)) == pytest.approx(2 * float(manual), rel=1e-5)


def test_head_loss_zero_at_teacher_and_weighted_by_confidence():
    torch.manual_seed(0)
    cls, box = torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4)
    c, b = head_loss([(cls, box)], [(cls, box)])
    assert float(c) == pytest.approx(0.0, abs=1e-6) and float(b) == 0.0
    moved = box.clone()
    moved[:, :, 0, 0] += 1.0                                 # one anchor off by 1 in each of 4 sides
    _, b = head_loss([(cls, moved)], [(cls, box)])
    w = torch.sigmoid(cls).max(1).values.flatten(1)
    assert float(b) == pytest.approx(float((4 * w[:, 0] / w.sum(1)).mean()), rel=1e-5)
    c, _ = head_loss([(cls + 1, box)], [(cls, box)])
    assert float(c) > 0


# --------------------------------------------------------------------------- optimizer


def test_parameter_groups_and_quantizer_assertion():
    student, _ = student_teacher("lsqplus", "offset")
    groups = {g["name"]: g for g in parameter_groups(student, qcfg(lr=0.5, quantizer_lr=0.25))}
    assert list(groups) == ["decay", "no_decay", "bias", "quantizers", "weight_scales"]   # the engine's + QAT's
    assert groups["no_decay"]["params"] == []                # fused: no BatchNorm left
    qids = {id(p) for p in quantizer_parameters(student)}
    assert {id(p) for p in groups["quantizers"]["params"] + groups["weight_scales"]["params"]} == qids
    assert groups["quantizers"]["weight_decay"] == 0 and groups["weight_scales"]["weight_decay"] == 0
    assert groups["quantizers"]["lr"] == 0.25 and groups["weight_scales"]["lr"] == QATConfig().weight_scale_lr
    same = {g["name"]: g for g in parameter_groups(student, qcfg(lr=0.5, weight_scale_lr=None))}
    assert same["weight_scales"]["lr"] == 0.5            # None: the weights' learning rate
    assert all(p.dim() == 1 for p in groups["weight_scales"]["params"])
    assert all(p.dim() > 1 for p in groups["decay"]["params"]) and groups["decay"]["weight_decay"] == 5e-5
    assert all(p.dim() == 1 for p in groups["bias"]["params"]) and groups["bias"]["weight_decay"] == 0
    all_ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(all_ids) == sorted({id(p) for p in student.parameters()})        # each exactly once
    opt = build_optimizer(student, qcfg())
    check_optimizer_covers_quantizers(student, opt)
    # upstream's mistake: an optimizer over the conv parameters only
    convs_only = torch.optim.SGD([{"name": "weights", "params": [p for p in student.parameters()
                                                                 if id(p) not in qids]}], lr=0.1)
    with pytest.raises(QuantizerGroupError, match="not in the optimizer's quantizer group"):
        check_optimizer_covers_quantizers(student, convs_only)
    next(iter(learnable_quantizers(student).values())).scale.requires_grad_(False)
    with pytest.raises(QuantizerGroupError, match="does not require grad"):
        check_optimizer_covers_quantizers(student, opt)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind,mode", [("pact", "symmetric"), ("lsqplus", "offset"), ("fixed", "symmetric")])
def test_fit_reduces_the_distillation_loss(kind, mode):
    student, teacher = student_teacher(kind, mode)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    loader, sampler = loader_of(images(16), 4)
    result = fit(student, teacher, loader, qcfg(epochs=3), 3, sampler=sampler)
    assert len(result.history) == 3 and result.history[-1]["loss"] < result.history[0]["loss"]
    moved = {n for n, p in student.named_parameters() if not torch.equal(p.detach(), before[n])}
    weights = {n for n in before if n.endswith("weight")}
    assert weights <= moved                                   # every conv trained
    qnames = {n for n in before if "_quantizer" in n}
    assert len(qnames & moved) >= len(qnames) // 2            # quantizers train (offsets only move once clipped)
    assert all(p.grad is not None for p in student.parameters())   # every parameter reached by the loss
    assert not any(p.requires_grad for p in teacher.parameters())


def _tiny_eval(model):
    """A deterministic stand-in metric for the tiny model (no COCO): higher is better."""
    with torch.no_grad():
        return {"AP": float(-model(images(4, seed=7)).abs().mean())}


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    data = images(12)
    cfg = qcfg(epochs=2)

    def run(out, **kw):
        student, teacher = student_teacher("lsqplus", "offset")
        loader, sampler = loader_of(data, 4)
        return fit(student, teacher, loader, cfg, 2, sampler=sampler, evaluate=_tiny_eval, out_dir=out,
                   fingerprint={"run": 1}, **kw), student

    full, _ = run(tmp_path / "full")
    part, _ = run(tmp_path / "part", stop_after_epoch=1)
    assert len(part.history) == 1 and (tmp_path / "part" / "last.pt").is_file()
    resumed, _ = run(tmp_path / "part", resume=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    for key, value in full.model_state.items():
        assert torch.equal(value, resumed.model_state[key]), key
    assert resumed.best_epoch == full.best_epoch
    assert [r["AP"] for r in resumed.history] == [r["AP"] for r in full.history]
    student, teacher = student_teacher("lsqplus", "offset")
    loader, sampler = loader_of(data, 4)
    with pytest.raises(ValueError, match="differs from this one: run: 1 -> 2"):
        fit(student, teacher, loader, cfg, 2, sampler=sampler, out_dir=tmp_path / "part", resume=True,
            fingerprint={"run": 2})


def test_a_last_pt_of_the_qat_loop_before_the_one_engine_resumes(tmp_path):
    """QAT's last.pt before the one engine: the student under 'student', a scheduler, no scaler,
    optimizer groups without the (empty) no_decay group. Resuming from it gives the uninterrupted run."""
    data, cfg = images(12), qcfg(epochs=2)

    def run(out, **kw):
        student, teacher = student_teacher("lsqplus", "offset")
        loader, sampler = loader_of(data, 4)
        return fit(student, teacher, loader, cfg, 2, sampler=sampler, evaluate=_tiny_eval, out_dir=out,
                   fingerprint={"run": 1}, **kw)

    full = run(tmp_path / "full")
    run(tmp_path / "old", stop_after_epoch=1)
    last = tmp_path / "old" / "last.pt"
    state = torch.load(last, weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert groups[1]["name"] == "no_decay" and groups[1]["params"] == []
    old = {k: v for k, v in state.items() if k not in ("model", "scaler", "opt_step")}
    old["student"] = state["model"]
    old["optimizer"] = {**state["optimizer"], "param_groups": [groups[0], *groups[2:]]}
    torch.save(old, last)
    resumed = run(tmp_path / "old", resume=True)
    for key, value in full.model_state.items():
        assert torch.equal(value, resumed.model_state[key]), key
    assert [r["AP"] for r in resumed.history] == [r["AP"] for r in full.history]


def test_nan_and_exploding_scales_stop_with_the_quantizer_name():
    student, teacher = student_teacher("lsqplus", "symmetric")
    name, q = next(iter(learnable_quantizers(student).items()))
    with torch.no_grad():
        q.scale.fill_(float("nan"))
    loader, sampler = loader_of(images(8), 4)
    with pytest.raises(QuantizerDivergenceError, match=f"epoch 1 step 1: loss part.*became NaN/inf.*'{name}'"):
        fit(student, teacher, loader, qcfg(), 1, sampler=sampler)

    student, teacher = student_teacher("pact")
    with pytest.raises(QuantizerDivergenceError, match=r"epoch 1 step \d+: quantizer '.+'"):
        fit(student, teacher, loader, qcfg(quantizer_lr=1e7, max_scale_growth=10.0), 1, sampler=sampler)


def test_absurd_learning_rate_stops_with_step_and_parameter_and_saves_nothing(tmp_path):
    """lr 1e30: the weights go non-finite in the first update; the run stops naming the step and the
    parameter, and no checkpoint of the diverged model is written."""
    student, teacher = student_teacher("pact")
    loader, sampler = loader_of(images(8), 4)
    with pytest.raises(QuantizerDivergenceError, match=r"epoch 1 step \d+: parameter '.+' became NaN/inf.*lower --lr"):
        fit(student, teacher, loader, qcfg(lr=1e30), 1, sampler=sampler, out_dir=tmp_path)
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists()


def test_exploding_loss_and_collapsed_map_stop_the_run(tmp_path):
    from yoloq.recipes.qat.guard import DivergenceGuard
    guard = DivergenceGuard(qcfg(max_loss_growth=10.0))
    student, _ = student_teacher("pact")
    terms = lambda v: {"loss": torch.tensor(v), "cwd": torch.tensor(v / 2)}            # noqa: E731
    for _ in range(5):
        guard.check_loss(torch.tensor(1.0), terms(1.0), "epoch 1 step 1")
    guard.check_loss(torch.tensor(9.0), terms(9.0), "epoch 1 step 6")               # 9x: still allowed
    with pytest.raises(QuantizerDivergenceError, match=r"epoch 1 step 7: the loss exploded to 20.*cwd 10"):
        guard.check_loss(torch.tensor(20.0), terms(20.0), "epoch 1 step 7")
    guard.check_map(0.05, 0.30, 1)
    with pytest.raises(QuantizerDivergenceError, match=r"epoch 2: val AP collapsed to 0.10 from 30.00"):
        guard.check_map(0.001, 0.30, 2)
    # end to end: an evaluation that collapses stops fit before best.pt / last.pt are written
    student, teacher = student_teacher("pact")
    loader, sampler = loader_of(images(8), 4)
    with pytest.raises(QuantizerDivergenceError, match="val AP collapsed"):
        fit(student, teacher, loader, qcfg(), 1, sampler=sampler, out_dir=tmp_path, evaluate=lambda m: {"AP": 0.0},
            extra={"ptq": {"AP": 0.25}})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- distributed


def _ddp_worker(rank: int, world: int, init_file: str, out: str):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        student, teacher = student_teacher("lsqplus", "offset")
        loader, sampler = loader_of(images(16), 2)              # per rank 2 images a step
        result = fit(student, teacher, loader, qcfg(), 2, sampler=sampler)
        torch.save(result.model_state, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_two_cpu_processes_match_one_process_with_the_combined_batch(tmp_path):
    out = str(tmp_path / "state")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    s0 = torch.load(f"{out}.0", weights_only=True)
    s1 = torch.load(f"{out}.1", weights_only=True)
    student, teacher = student_teacher("lsqplus", "offset")
    loader, sampler = loader_of(images(16), 4)                  # one process, 2 x 2 images a step
    single = fit(student, teacher, loader, qcfg(), 2, sampler=sampler).model_state
    for key in single:
        assert torch.equal(s0[key], s1[key]), key               # ranks stay in sync
        assert torch.allclose(s0[key], single[key], rtol=1e-4, atol=1e-6), key


# --------------------------------------------------------------------------- end to end (real data)


@pytest.mark.slow
@needs_shared
def test_run_qat_end_to_end_on_lite_s(tmp_path):
    """PTQ with the config's transforms (bias correction changes the weights), then two QAT epochs:
    outputs, the best epoch as the argmax of the per-epoch AP, a quant.pt whose own AP on the same
    images is the reported QAT AP, and an FP32 column that is the PTQ report's (the FP32 model on
    the same images)."""
    from yoloq.api import evaluate
    from yoloq.config import load_config
    from yoloq.recipes.ptq import run_ptq
    from yoloq.recipes.qat.run import load_qat, run_qat

    cfg = load_config(REPO / "configs" / "yolov6lite_s.yaml")
    ptq = run_ptq(cfg, out=str(tmp_path / "ptq"), name="lite_max", progress=False, plots=False, max_images=4,
                  quant={"calib": "max", "calib_images": 8, "sensitivity": "off", "diagnose": False,
                         "bias_correction": True, "transform_images": 8})
    ptq_dir = tmp_path / "ptq" / "lite_max"
    result = run_qat(cfg, from_dir=str(ptq_dir), max_images=4, out=str(tmp_path / "qat"), progress=False,
                     qat={"quantizer": "pact", "epochs": 2, "images": 8, "batch_size": 4, "workers": 0})
    out = tmp_path / "qat" / "lite_max_pact"
    for f in ("report.md", "report.json", "curves.csv", "curves.png", "quant.pt", "last.pt", "best.pt"):
        assert (out / f).is_file(), f
    r = result.report
    aps = [row["AP"] for row in r["history"]]
    best = aps.index(max(aps)) + 1                                    # the first epoch with the highest AP
    assert len(aps) == 2 and r["best_epoch"] == best
    assert r["qat"]["AP"] == aps[best - 1] and r["qat_last"]["AP"] == aps[-1]
    assert r["fp32"] == pytest.approx(ptq.fp32) and r["ptq"]["AP"] == pytest.approx(ptq.int8["AP"])
    model, meta = load_qat(out / "quant.pt")
    assert meta["qat"] == "pact" and meta["best_epoch"] == best
    assert evaluate(model, config=cfg, max_images=4)["AP"] == pytest.approx(r["qat"]["AP"], abs=1e-9)
    x = torch.rand(1, 3, 320, 320)
    with torch.no_grad():
        assert torch.equal(model(x), result.model(x))
    with pytest.raises(ValueError, match="--resume"):
        run_qat(cfg, from_dir=str(ptq_dir), out=str(tmp_path / "qat"), progress=False,
                qat={"quantizer": "pact", "epochs": 1, "images": 8})
