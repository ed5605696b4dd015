"""Every quantization stage runs on the model's device (yoloq.device), and quantized checkpoints do
not depend on the device they were written on.

On a CPU-only machine these check the plumbing: after every step the tensors a stage made sit on
``module_device(model)``, the checkpoint holds CPU tensors only, and ``--device cuda`` is one
line (``--device cpu`` giving the default run's numbers: tests/test_determinism.py). The ``gpu``
test runs the same stages on CUDA and compares them with the CPU."""
from __future__ import annotations

import pytest
import torch

from yoloq.config import load_config
from yoloq.device import module_device
from yoloq.models import build_model
from yoloq.quant import (BiasCorrect, Calibrate, ChannelScale, Equalize, FloatSE, Partial, Prepare, Reconstruct,
                         quant_state, quantize)
from yoloq.quant import backend
from yoloq.quant.checkpoint import load_quantized, save_quantized
from conftest import CONFIGS

SIZE = 64
STEPS = [Equalize(), Prepare(), FloatSE(), ChannelScale("all", 0.5, images=4),
         Calibrate("auto", auto_methods=("max", "percentile-99.9", "entropy", "mse"), auto_images=2),
         BiasCorrect(images=4), Reconstruct("qdrop", images=4, options=(("iters", 2), ("batch_size", 2))),
         Partial("fast", images=2, skip_count=1)]


def lite(device: str = "cpu") -> torch.nn.Module:
    cfg = load_config(CONFIGS / "yolov6lite_s.yaml").with_overrides(model={"img_size": SIZE})
    torch.manual_seed(0)
    return build_model(cfg.model).fuse().eval().to(device)


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.rand(2, 3, SIZE, SIZE, generator=gen) for _ in range(2)]


def tensors_off(qmodel: torch.nn.Module, device: torch.device) -> list[str]:
    """Names of the parameters, buffers and quantizer ranges of ``qmodel`` not on ``device``
    (site quantizers of float layers are held by no module: they are checked through the state)."""
    state = quant_state(qmodel)
    found = [f"param {n}" for n, p in qmodel.named_parameters() if p.device != device]
    found += [f"buffer {n}" for n, b in qmodel.named_buffers() if b.device != device]
    for site, q in state.quantizers.items():
        amax = backend.get_amax(q) if isinstance(q, backend.TensorQuantizer) else None
        if amax is not None and amax.device != device:
            found.append(f"amax of site {site}")
    found += [f"bias shift {n}" for n, t in state.bias_shifts.items() if t.device.type != "cpu"]   # stored on the CPU
    return found


@pytest.mark.parametrize("upto", range(1, len(STEPS) + 1))
def test_every_stage_leaves_its_tensors_on_the_model_device(upto):
    fp32 = lite()
    device = module_device(fp32)
    recipe = STEPS[:upto] if upto > 4 else STEPS[:upto] + [Calibrate("max")]     # something to run on
    qmodel = quantize(fp32, recipe, batches())
    assert tensors_off(qmodel, device) == []
    with torch.no_grad():
        assert qmodel(batches()[0].to(device)).device == device


def test_checkpoint_holds_cpu_tensors_and_loads_onto_a_device(tmp_path):
    qmodel = quantize(lite(), STEPS[:6], batches())
    save_quantized(qmodel, tmp_path / "quant.pt")
    locations = set()

    def remember(storage, location):
        locations.add(location)
        return storage
    torch.load(tmp_path / "quant.pt", map_location=remember, weights_only=True)
    assert locations == {"cpu"}                                          # nothing tied to the device it ran on
    loaded, _ = load_quantized(tmp_path / "quant.pt", device="cpu")
    assert tensors_off(loaded, torch.device("cpu")) == []
    x = batches()[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
@pytest.mark.parametrize("command", [["ptq", "--cfg", "yolov6lite_s"], ["bench-fidelity", "--cfg", "yolov6lite_s",
                                                                         "--ckpt", "nowhere.pt"]])
def test_cuda_on_a_cpu_machine_is_one_line(tmp_path, command, capsys):
    from yoloq.cli import main as yoloq_main
    out = tmp_path / "runs"
    assert yoloq_main([*command, "--device", "cuda", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: device 'cuda': no CUDA GPU"), lines
    assert not out.exists()


# --device cpu giving the default run's numbers: tests/test_determinism.py (the two-run test)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_stage_on_cuda_matches_the_cpu(tmp_path):
    cpu = quantize(lite("cpu"), STEPS, batches())
    gpu = quantize(lite("cuda"), STEPS, batches())
    assert tensors_off(gpu, module_device(gpu)) == [] and module_device(gpu).type == "cuda"
    assert quant_state(gpu).skip_layers == quant_state(cpu).skip_layers
    amax_cpu = {s: float(backend.get_amax(q)) for s, q in quant_state(cpu).quantizers.items()}
    amax_gpu = {s: float(backend.get_amax(q)) for s, q in quant_state(gpu).quantizers.items()}
    assert amax_gpu == pytest.approx(amax_cpu, rel=1e-2)
    x = batches()[0]
    with torch.no_grad():
        ref = cpu(x)
        err = (gpu(x.cuda()).cpu() - ref)[..., 4:].abs().mean()
    assert float(err) < 0.02
    save_quantized(gpu, tmp_path / "gpu.pt")                           # written on the GPU, read on the CPU
    back, _ = load_quantized(tmp_path / "gpu.pt", device="cpu")
    with torch.no_grad():
        assert torch.allclose(back(x), gpu(x.cuda()).cpu(), atol=1e-4)
