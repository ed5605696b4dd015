"""The one boundary to pytorch-quantization (yoloq/quant/backend.py): no other module of the package
imports the library or touches its private attributes, and the adapter's functions do what the
rest of the package relies on."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from yoloq.quant import backend
from conftest import REPO

PACKAGE = REPO / "yoloq"
ADAPTER = PACKAGE / "quant" / "backend.py"
# pytorch-quantization's private names yoloq would otherwise reach into
PRIVATE = {"_disabled", "_if_calib", "_if_quant", "_calibrator", "_amax", "_input_quantizer", "_weight_quantizer",
           "_calib_hist", "_calib_bin_edges", "_calib_amax", "_learn_amax", "_fake_quant", "_scale_amax",
           "_num_bits", "_unsigned", "_narrow_range", "_axis", "_quant_desc", "_compute_amax_percentile",
           "_compute_amax_entropy", "_compute_amax_mse"}
LIBRARY = "pytorch_quantization"


def contacts(path: Path) -> list[str]:
    """Every place ``path`` imports the library or names one of its private attributes (as an
    attribute, or as a string handed to getattr / setattr / register_buffer ...)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    found = set()
    for node in ast.walk(tree):
        what = None
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == LIBRARY for a in node.names):
            what = "import " + ", ".join(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == LIBRARY:
            what = f"from {node.module} import ..."
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE:
            what = f".{node.attr}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip(".") in PRIVATE:
            what = repr(node.value)
        if what:
            found.add(f"{where}:{node.lineno}: {what}")
    return sorted(found)


def test_only_the_adapter_touches_pytorch_quantization():
    offenders = [c for p in sorted(PACKAGE.rglob("*.py")) if p != ADAPTER for c in contacts(p)]
    assert offenders == [], "use yoloq.quant.backend instead:\n" + "\n".join(offenders)


def test_the_scan_finds_each_kind_of_contact(tmp_path):
    """The scan itself: it must see an import, an attribute and a getattr string."""
    src = tmp_path / "bad.py"
    src.write_text("import pytorch_quantization\nfrom pytorch_quantization.nn import TensorQuantizer\n"
                   "def f(q):\n    q._disabled = True\n    return getattr(q, '_amax', None)\n")
    found = contacts(src)
    assert len(found) == 4 and any("._disabled" in f for f in found) and any("'_amax'" in f for f in found)
    assert contacts(ADAPTER)                       # the adapter is where they are


def test_enable_amax_and_calibration_mode_round_trip():
    q = backend.tensor_quantizer(8, None, narrow_range=False)
    assert backend.is_enabled(q) and backend.get_amax(q) is None
    backend.set_amax(q, 2.0)
    x = torch.linspace(-3, 3, 13)
    assert torch.equal(q(x), torch.clamp(torch.round(x * 127 / 2), -128, 127) * 2 / 127)
    buffer = backend.get_amax(q)
    backend.set_amax(q, 4.0)
    assert backend.get_amax(q) is buffer and float(buffer) == 4.0       # same buffer, updated in place
    backend.set_enabled(q, False)
    assert not backend.is_enabled(q) and torch.equal(q(x), x)
    backend.set_enabled(q, True)

    class Seen:
        def __init__(self):
            self.inputs = []

        def collect(self, t):
            self.inputs.append(t)

    seen = Seen()
    with backend.collecting({"site": q}, {"site": seen}):
        assert torch.equal(q(x), x)                  # float path while collecting
    assert len(seen.inputs) == 1 and not torch.equal(q(x), x)          # quantizing again afterwards
    w = backend.tensor_quantizer(8, 0, narrow_range=True)
    weight = torch.randn(4, 3, 3, 3)
    backend.set_amax(w, backend.channel_max(w, weight))
    assert backend.get_amax(w).shape == (4, 1, 1, 1)
    with backend.fake_quant_off([w]):
        assert torch.equal(w(weight), weight)
    assert not torch.equal(w(weight), weight)


def test_quant_conv_holds_the_parameters_and_retype_keeps_the_object():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    q = backend.quant_conv(conv, backend.descriptor(8, None, False), lambda c: backend.descriptor(8, 0, True))
    assert q.weight is conv.weight and q.bias is conv.bias
    assert isinstance(backend.input_quantizer(q), backend.TensorQuantizer)

    class Plus(backend.QuantConv2d):
        pass

    backend.retype(q, Plus)
    assert isinstance(q, Plus) and q.weight is conv.weight
    with pytest.raises(TypeError, match="not a subclass"):
        backend.retype(q, nn.Linear)
