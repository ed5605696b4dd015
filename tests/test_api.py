"""The Python API's types (yoloq.api): one return type per function, no attributes added to modules."""
from __future__ import annotations

import pytest
import torch
import yaml

import yoloq
from yoloq.api import FP32Model, QuantizedModel
from yoloq.config import load_config
from yoloq.errors import InputError
from yoloq.models import build_model
from yoloq.quant import Calibrate, quantize, save_quantized
from conftest import CONFIGS

SIZE = 64


@pytest.fixture(scope="module")
def lite_config(tmp_path_factory):
    """A Lite-S config at 64 px whose weights are a random model's state dict."""
    root = tmp_path_factory.mktemp("api")
    cfg = load_config(CONFIGS / "yolov6lite_s.yaml").with_overrides(model={"img_size": SIZE})
    torch.manual_seed(0)
    torch.save({"model_state_dict": build_model(cfg.model).state_dict()}, root / "w.pt")
    raw = yaml.safe_load((CONFIGS / "yolov6lite_s.yaml").read_text())
    raw["model"].update(img_size=SIZE, weights=str(root / "w.pt"))
    raw.pop("data")
    path = root / "lite.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_load_returns_an_fp32_model_and_leaves_the_module_alone(lite_config):
    model = yoloq.load(lite_config)
    assert type(model) is FP32Model and isinstance(model.model, torch.nn.Module)
    assert model.config.model.img_size == SIZE and model.config.path == str(lite_config)
    assert not hasattr(model.model, "yoloq_config")                 # the config travels in the wrapper
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(model(x), model.model(x))


def test_a_quant_pt_goes_to_load_quantized(lite_config, tmp_path):
    fp32 = yoloq.load(lite_config)
    qmodel = quantize(fp32.model, [Calibrate()], [torch.rand(2, 3, SIZE, SIZE)])
    save_quantized(qmodel, tmp_path / "quant.pt")
    with pytest.raises(InputError, match=r"yoloq.load_quantized\("):
        yoloq.load(tmp_path / "quant.pt")
    loaded = yoloq.load_quantized(tmp_path / "quant.pt")
    assert type(loaded) is QuantizedModel and loaded.config.model == qmodel.cfg
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))


def test_evaluate_names_what_it_accepts():
    with pytest.raises(InputError, match="expected a model from yoloq.load"):
        yoloq.evaluate(object(), data="coco_shared")
