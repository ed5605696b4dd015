"""Block reconstruction after calibration: AdaRound, BRECQ and QDrop under TensorRT's INT8 rules.

    info = reconstruct(qmodel, fp32_model, batches, ReconOptions(method="qdrop", iters=...))

``qmodel`` is a prepared, calibrated model (``yoloq.quant.prepare`` / ``calibrate``; bias
correction etc. may have run), ``fp32_model`` the FP32 model it was prepared from, ``batches``
calibration images (train split). Blocks are processed in execution order
(``yoloq.quant.recon_blocks``); for each block the inputs come from the *quantized* model with
every earlier block already reconstructed, the target is the FP32 model's block output, and the
objective is the squared error summed over the block's output elements, averaged over images
(AdaRound's ||W x - W~ x~||_F^2, here per output position: squared error summed over channels,
averaged over images and positions), plus lambda * f_reg (``yoloq.quant.adaround``).

- ``adaround``: per layer (blocks of one quantized conv), Nagel et al. 2020;
- ``brecq``: per block (modules of up to ``max_convs`` convs), Li et al. 2021; the loss is the
  plain output MSE (BRECQ's Fisher weighting needs task-loss gradients, i.e. labels: not used);
- ``qdrop``: per block, and every activation quantizer of the block lets each element through
  unquantized with probability ``drop_prob`` during training, Wei et al. 2022.

In every method the activation step sizes of the block's quantizers are learned too (LSQ
gradients, ``learn_act``). TensorRT's constraints hold throughout: weight scales stay the
calibrated per-channel amax / 127 (only the up/down choice is learned), activations stay
per-tensor symmetric, and a quantizer shared by several convs is one object whose step is
learned once -- by the first block that reads it -- and then kept for the later readers.

What stays behind is the ordinary prepared model: each conv weight is replaced by its learned
level in float (level * amax / 127, which the unchanged per-channel fake quantization maps onto
itself) and each learned step is written as amax = 127 * step into the same ``TensorQuantizer``.
``save_quantized`` / ``load_quantized``, QAT and the ONNX export take it as it is. A block whose
loss on the calibration images did not go down keeps its calibrated weights and ranges.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map
from tqdm import tqdm

from yoloq.config import RECON_METHODS, ConfigError
from yoloq.device import module_device, resolve_device
from yoloq.quant.adaround import AdaRoundWeight, LearnedStepQuantizer, annealed_beta
from yoloq.quant.batches import image_batches
from yoloq.quant.metrics import power_ratio_db
from yoloq.quant import backend
from yoloq.quant.backend import set_amax
from yoloq.quant.recon_blocks import Block, BlockWalk, ReconstructionError, find_blocks, run_chunked
from yoloq.quant.backend import TensorQuantizer
from yoloq.quant.scheme import DEAD_AMAX, QMAX
from yoloq.quant.state import quant_state, quantizer_slots

MIN_STEP = DEAD_AMAX / QMAX


@dataclass
class ReconOptions:
    method: str = "qdrop"           # adaround | brecq | qdrop
    iters: int = 300                # optimisation steps per block
    batch_size: int = 8             # images per step
    lr: float = 3e-3                # Adam, AdaRound's V
    act_lr: float = 1e-3            # Adam, activation steps, relative to each step's initial value (cosine decay)
    reg_weight: float = 0.01        # lambda of the rounding regularizer
    warmup: float = 0.2             # share of the steps without the regularizer
    drop_prob: float = 0.5          # QDrop: probability of keeping an activation element in float
    learn_act: bool = True          # learn the activation step sizes
    max_convs: int = 12             # block size limit (brecq / qdrop); adaround uses 1
    device: Optional[str] = None    # None: the quantized model's device; else auto | cpu | cuda | cuda:N
    chunk: int = 32                 # images per forward when computing block inputs / losses
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.method not in RECON_METHODS:
            raise ConfigError(f"reconstruction method '{self.method}' is not one of {', '.join(RECON_METHODS)}")
        checks = {"iters": self.iters >= 1, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
                  "act_lr": self.act_lr >= 0, "reg_weight": self.reg_weight >= 0, "warmup": 0 <= self.warmup < 1,
                  "drop_prob": 0 <= self.drop_prob < 1, "max_convs": self.max_convs >= 1, "chunk": self.chunk >= 1}
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"reconstruction option {key}={getattr(self, key)!r} is out of range")

    @property
    def block_size(self) -> int:
        return 1 if self.method == "adaround" else self.max_convs


# --------------------------------------------------------------------------- losses


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def squared_error(output: Any, target: Any) -> torch.Tensor:
    """Squared error summed over channels, averaged over images and output positions (summed over
    the outputs of a block with several). Per position, so that lambda weighs the rounding
    regularizer the same against a 160x160 map and a 5x5 one."""
    total = 0.0
    for o, r in zip(_tensors(output), _tensors(target)):
        positions = r[0, 0].numel() if r.dim() > 2 else 1
        total = total + ((o - r) ** 2).sum() / (r.shape[0] * positions)
    return total


@torch.no_grad()
def block_error(block: nn.Module, args: tuple, kwargs: dict, target: Any, chunk: int) -> dict:
    """Reconstruction loss (per image) and output SQNR of ``block`` on all images."""
    out = run_chunked(block, args, kwargs, chunk)
    err = float(squared_error(out, target))
    signal = float(squared_error([torch.zeros_like(r) for r in _tensors(target)], target))
    return {"loss": err, "sqnr_db": power_ratio_db(signal, err)}


# --------------------------------------------------------------------------- one block


@dataclass
class _Learnables:
    rounding: dict            # conv name -> AdaRoundWeight
    steps: dict               # id(TensorQuantizer) -> (TensorQuantizer, LearnedStepQuantizer)


def _make_learnables(qmodel: nn.Module, block: Block, module: nn.Module, claimed: set, opts: ReconOptions,
                     generator: torch.Generator) -> _Learnables:
    rounding = {}
    for name in block.layers:
        conv = qmodel.get_submodule(name)
        wq = backend.weight_quantizer(conv)
        if isinstance(wq, TensorQuantizer) and backend.is_enabled(wq) and backend.get_amax(wq) is not None:
            rounding[name] = AdaRoundWeight(conv.weight, backend.get_amax(wq))
    steps = {}
    for slot in quantizer_slots(module, (TensorQuantizer,)):
        q = slot.quantizer
        amax = backend.get_amax(q)
        if slot.is_weight or not backend.is_enabled(q) or id(q) in steps or amax is None:
            continue
        learn = opts.learn_act and id(q) not in claimed
        wrapper = LearnedStepQuantizer(amax, learn, opts.drop_prob if opts.method == "qdrop" else 0.0)
        wrapper.generator = generator
        steps[id(q)] = (q, wrapper.to(amax.device))
    return _Learnables(rounding, steps)


@contextmanager
def _swapped_in(qmodel: nn.Module, module: nn.Module, learn: _Learnables):
    """Put the AdaRound / learned-step modules in place of the block's quantizers; always put the
    originals back. The block's own parameters are frozen meanwhile."""
    convs = {name: qmodel.get_submodule(name) for name in learn.rounding}
    saved_w = {name: backend.weight_quantizer(conv) for name, conv in convs.items()}
    act_slots = [s for s in quantizer_slots(module, (TensorQuantizer,)) if id(s.quantizer) in learn.steps]
    saved_a = [(s.holder, s.attr, s.quantizer) for s in act_slots]
    grads = {p: p.requires_grad for p in module.parameters()}
    try:
        for p in grads:
            p.requires_grad_(False)
        for name, conv in convs.items():
            backend.set_weight_quantizer(conv, learn.rounding[name].to(conv.weight.device))
        for holder, attr, q in saved_a:
            setattr(holder, attr, learn.steps[id(q)][1])
        yield
    finally:
        for name, conv in convs.items():
            backend.set_weight_quantizer(conv, saved_w[name])
        for holder, attr, q in saved_a:
            setattr(holder, attr, q)
        for p, flag in grads.items():
            p.requires_grad_(flag)


def _optimizer(learn: _Learnables, opts: ReconOptions) -> tuple[torch.optim.Optimizer, list]:
    groups = [{"params": [r.v for r in learn.rounding.values()], "lr": opts.lr}] if learn.rounding else []
    act_groups = []
    for _, w in learn.steps.values():
        if w.scale.requires_grad and opts.act_lr > 0:
            group = {"params": [w.scale], "lr": opts.act_lr * float(w.scale), "base_lr": opts.act_lr * float(w.scale)}
            act_groups.append(group)
    return torch.optim.Adam(groups + act_groups), act_groups


def _train(module: nn.Module, args: tuple, kwargs: dict, target: Any, learn: _Learnables, opts: ReconOptions,
           generator: torch.Generator, bar: Optional[tqdm]) -> None:
    opt, act_groups = _optimizer(learn, opts)
    n = tree_flatten(target)[0][0].shape[0]
    wrappers = [w for _, w in learn.steps.values()]
    for w in wrappers:
        w.dropping = True
    device = _tensors(target)[0].device
    for step in range(opts.iters):
        idx = torch.randint(n, (min(opts.batch_size, n),), generator=generator, device=device)
        pick = lambda v: v[idx] if isinstance(v, torch.Tensor) and v.dim() > 0 else v  # noqa: E731
        with torch.enable_grad():
            out = module(*tree_map(pick, args), **tree_map(pick, kwargs))
            loss = squared_error(out, tree_map(pick, target))
            beta = annealed_beta(step, opts.iters, opts.warmup)
            if beta is not None and learn.rounding and opts.reg_weight > 0:
                loss = loss + opts.reg_weight * sum(r.regularizer(beta) for r in learn.rounding.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
        for g in act_groups:                       # cosine decay of the step-size learning rates
            g["lr"] = 0.5 * g["base_lr"] * (1 + math.cos(math.pi * (step + 1) / opts.iters))
        opt.step()
        with torch.no_grad():
            for w in wrappers:
                w.scale.clamp_(min=MIN_STEP)
        if bar is not None:
            bar.update(1)
    for w in wrappers:
        w.dropping = False
    for r in learn.rounding.values():
        r.hard = True


@torch.no_grad()
def _commit(qmodel: nn.Module, learn: _Learnables) -> None:
    for name, r in learn.rounding.items():
        conv = qmodel.get_submodule(name)
        conv.weight.copy_(r.rounded_weight().to(conv.weight.dtype))
    for q, w in learn.steps.values():
        if w.scale.requires_grad:
            set_amax(q, w.amax())


def reconstruct_block(qmodel: nn.Module, block: Block, args: tuple, kwargs: dict, target: Any, claimed: set,
                      opts: ReconOptions, generator: torch.Generator, bar: Optional[tqdm] = None) -> dict:
    """Learn the rounding and activation steps of one block; returns its record for the report."""
    start = time.perf_counter()
    module = qmodel.get_submodule(block.name)
    learn = _make_learnables(qmodel, block, module, claimed, opts, generator)
    before = block_error(module, args, kwargs, target, opts.chunk)
    learned_steps = sum(w.scale.requires_grad for _, w in learn.steps.values())
    record = {"block": block.name, "layers": len(block.layers), "rounded_layers": len(learn.rounding),
              "learned_act": learned_steps, "shared_act": len(learn.steps) - learned_steps,
              "loss_before": before["loss"], "sqnr_before_db": before["sqnr_db"]}
    claimed.update(learn.steps)
    if not learn.rounding and not learned_steps:
        if bar is not None:
            bar.update(opts.iters)
        return {**record, "loss_after": before["loss"], "sqnr_after_db": before["sqnr_db"], "kept": False,
                "changed_weights": 0.0, "undecided": 0.0, "seconds": time.perf_counter() - start,
                "note": "nothing to learn (layers in float, shared ranges already learned)"}
    with _swapped_in(qmodel, module, learn):
        cpu = time.process_time()
        _train(module, args, kwargs, target, learn, opts, generator, bar)
        record["train_cpu_seconds"] = round(time.process_time() - cpu, 3)
        after = block_error(module, args, kwargs, target, opts.chunk)
    kept = after["loss"] < before["loss"]
    if kept:
        _commit(qmodel, learn)
    sizes = [r.v.numel() for r in learn.rounding.values()]
    mean = lambda f: sum(f(r) * s for r, s in zip(learn.rounding.values(), sizes)) / max(1, sum(sizes))  # noqa: E731
    return {**record, "loss_after": after["loss"] if kept else before["loss"],
            "sqnr_after_db": after["sqnr_db"] if kept else before["sqnr_db"], "kept": kept,
            "loss_learned": after["loss"], "changed_weights": mean(lambda r: r.changed_fraction()),
            "undecided": mean(lambda r: r.undecided_fraction()), "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------- the model


@contextmanager
def _on_device(models: list[nn.Module], device: torch.device):
    homes = [next(m.parameters()).device for m in models]
    modes = [m.training for m in models]
    try:
        for m in models:
            m.to(device).eval()
        yield
    finally:
        for m, home, mode in zip(models, homes, modes):
            m.to(home).train(mode)


def reconstruct(qmodel: nn.Module, fp32_model: nn.Module, batches: Iterable, opts: Optional[ReconOptions] = None,
                max_images: Optional[int] = None) -> dict:
    """Reconstruct ``qmodel`` in place block by block (module docstring). Returns the record for the
    report: settings, blocks found, per-block loss before / after, time."""
    opts = opts or ReconOptions()
    state = quant_state(qmodel)
    if not state.calib.method:
        raise ReconstructionError("reconstruction needs a calibrated model: run calibrate() first")
    if state.qat_kind:
        raise ReconstructionError(f"reconstruction works on PTQ models (pytorch-quantization TensorQuantizers); "
                                  f"this one carries QAT quantizers ({state.qat_kind})")
    images = torch.cat(image_batches(batches, "reconstruction"))
    images = images[:max_images] if max_images else images
    device = module_device(qmodel) if opts.device is None else resolve_device(opts.device)
    blocks, graph = find_blocks(qmodel, opts.block_size)
    start, cpu_start = time.perf_counter(), time.process_time()
    records: list[dict] = []
    claimed: set[int] = set()
    generator = torch.Generator(device=device).manual_seed(opts.seed)
    total = len(blocks) * opts.iters
    with _on_device([qmodel, fp32_model], device), backend.quiet(), \
            tqdm(total=total, desc=f"reconstruct ({opts.method})", disable=not opts.progress) as bar:
        def visit(block: Block, q_args, q_kwargs, fp_args, fp_kwargs):
            target = run_chunked(fp32_model.get_submodule(block.name), fp_args, fp_kwargs, opts.chunk)
            bar.set_postfix_str(block.name)
            records.append(reconstruct_block(qmodel, block, q_args, q_kwargs, target, claimed, opts, generator, bar))
            return run_chunked(qmodel.get_submodule(block.name), q_args, q_kwargs, opts.chunk), target
        BlockWalk(graph, blocks, qmodel, fp32_model, opts.chunk).run(images.to(device), visit)
    settings = {k: v for k, v in asdict(opts).items() if k != "progress"}
    return {"method": opts.method, "settings": settings, "device": str(device), "images": int(images.shape[0]),
            "blocks": records, "block_size": opts.block_size, "seconds": round(time.perf_counter() - start, 2),
            "cpu_seconds": round(time.process_time() - cpu_start, 2), "threads": torch.get_num_threads(),
            "improved": sum(r["kept"] for r in records)}
