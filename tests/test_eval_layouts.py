"""``eval --onnx`` on upstream YOLOv6's ONNX layouts: toy detectors exported in each layout
(yoloq's [B,N,4+nc], upstream's [B,N,5+nc] with objectness, centre/size boxes without it, the
end-to-end TensorRT outputs and the onnxruntime [M,7] rows) give exactly the detections and mAP of
yoloq's own layout; a real Lite-S exported in upstream's layout gives yoloq's mAP."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import LITE_S_CFG, needs_shared, tiny_coco
from yoloq.config import EvalConfig, load_config
from yoloq.data import load_data_config
from yoloq.errors import InputError
from yoloq.eval import evaluate, non_max_suppression
from yoloq.runtime.layouts import choose_layout, raw_to_yoloq
from yoloq.runtime.ort import OnnxPredictor

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")    # torch's legacy (TorchScript) exporter
EVAL = EvalConfig(batch_size=4, workers=0)
K_PAD = 7                                                              # padding rows after an end-to-end output


def fixed_predictions(n=60, nc=80) -> torch.Tensor:
    """[N, 4+nc] boxes on a 1/4-pixel grid (x1,y1,x2,y2; centre/size conversions are exact) and scores."""
    g = torch.Generator().manual_seed(5)
    xy = torch.round(torch.rand(n, 2, generator=g) * 160) / 4
    wh = torch.round(torch.rand(n, 2, generator=g) * 100 + 20) / 4
    return torch.cat((xy, xy + wh, torch.rand(n, nc, generator=g) ** 3), 1)


class Toy(nn.Module):
    """Outputs ``layout`` for the fixed predictions (the same for every image; 0 * input keeps the graph
    connected to the input)."""

    def __init__(self, layout: str):
        super().__init__()
        self.layout = layout
        preds = fixed_predictions()
        xyxy, scores = preds[:, :4], preds[:, 4:]
        xywh = torch.cat(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), 1)
        ones = torch.ones(len(preds), 1)
        self.register_buffer("raw", {"yoloq": preds, "xywh": torch.cat((xywh, scores), 1),
                                     "xywh-obj": torch.cat((xywh, ones, scores), 1),
                                     "xywh-halfobj": torch.cat((xywh, ones / 2, scores * 2), 1)}.get(layout, preds))
        rows = non_max_suppression(preds[None], EVAL.conf_thres, EVAL.iou_thres, EVAL.max_det)[0]
        padding = torch.full((K_PAD, 6), 3.0)                              # junk beyond num_dets
        self.register_buffer("rows", torch.cat((rows, padding)))
        self.register_buffer("count", torch.tensor([[len(rows)]], dtype=torch.int32))

    def forward(self, x):
        zero = 0 * x.mean()
        b = x.shape[0]
        if self.layout == "end2end-trt":
            rows = self.rows[None].expand(b, -1, -1) + zero
            return (self.count.expand(b, 1), rows[..., :4], rows[..., 4], rows[..., 5].to(torch.int32))
        if self.layout == "end2end-ort":
            rows = self.rows[:-K_PAD]
            k = rows.shape[0]
            index = torch.arange(b, dtype=torch.float32)[:, None].expand(b, k).reshape(-1, 1)
            tiled = rows[None].expand(b, k, 6).reshape(-1, 6) + zero
            return torch.cat((index, tiled[:, :4], tiled[:, 5:6], tiled[:, 4:5]), 1)   # batch, box, class, score
        return self.raw[None].expand(b, -1, -1) + zero


def export(model: nn.Module, path, names, size=64):
    axes = {"images": {0: "batch"}, **{n: {0: "batch"} for n in names}}
    if names == ["outputs"] and getattr(model, "layout", "") == "end2end-ort":
        axes["outputs"] = {0: "rows"}
    torch.onnx.export(model.eval(), torch.zeros(1, 3, size, size), str(path), input_names=["images"],
                      output_names=names, opset_version=13, dynamo=False, dynamic_axes=axes)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_data_config(tiny_coco(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    path = export(Toy("yoloq"), tmp_path_factory.mktemp("ref") / "yoloq.onnx", ["outputs"])
    predictor = OnnxPredictor(path)
    assert predictor.layout == "raw"
    return evaluate(predictor, tiny, EVAL, 64, progress=False)


@pytest.mark.parametrize("layout,requested,names", [
    ("xywh-obj", "auto", ["outputs"]),
    ("xywh-halfobj", "auto", ["outputs"]),                               # objectness multiplies the scores
    ("xywh", "xywh", ["outputs"]),
    ("end2end-trt", "auto", ["num_dets", "det_boxes", "det_scores", "det_classes"]),
    ("end2end-ort", "auto", ["outputs"]),
])
def test_upstream_layouts_give_yoloqs_detections_exactly(tmp_path, tiny, reference, layout, requested, names):
    path = export(Toy(layout), tmp_path / f"{layout}.onnx", names)
    predictor = OnnxPredictor(path, layout=requested)
    result = evaluate(predictor, tiny, EVAL, 64, progress=False)
    assert len(reference.detections) > 6 * 20
    assert result.detections == reference.detections
    assert result.stats == reference.stats


def test_layout_errors_name_the_file_and_the_shapes(tmp_path):
    with pytest.raises(InputError, match=r"m.onnx: output has 90 columns per box; for 80 classes expected 84.*85"):
        raw_to_yoloq(torch.zeros(1, 5, 90), "raw", 80, "m.onnx")
    with pytest.raises(InputError, match="--onnx-layout end2end-trt does not fit outputs"):
        choose_layout("end2end-trt", ["outputs"], [3], "m.onnx")
    with pytest.raises(InputError, match="match no known detector layout"):
        choose_layout("auto", ["a", "b"], [4, 1], "m.onnx")
    assert choose_layout("auto", ["det_classes", "num_dets", "det_scores", "det_boxes"], [2, 2, 2, 3], "m") == "end2end-trt"


def test_eval_cli_reads_an_upstream_onnx(tmp_path, tiny, reference, capsys):
    from yoloq.cli import main
    path = export(Toy("xywh-obj"), tmp_path / "upstream.onnx", ["outputs"])
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {{name: toy, img_size: 64}}\ndata: {tiny.path}\neval: {{batch_size: 4, workers: 0}}\n")
    code = main(["eval", "--cfg", str(cfg), "--onnx", str(path), "--out", str(tmp_path / "r.json"), "--no-progress",
                 "--no-plots"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "xywh-obj layout" in out and f"{len(reference.detections)} detections" in out


class UpstreamLayout(nn.Module):
    """yoloq's detector re-emitting upstream's export layout: cx, cy, w, h, objectness 1, scores."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        xyxy = out[..., :4]
        xywh = torch.cat(((xyxy[..., :2] + xyxy[..., 2:]) / 2, xyxy[..., 2:] - xyxy[..., :2]), -1)
        return torch.cat((xywh, torch.ones_like(out[..., :1]), out[..., 4:]), -1)


@pytest.mark.slow
@needs_shared
def test_real_lite_s_in_upstreams_layout_gives_yoloqs_map(tmp_path):
    from yoloq.models import load_model
    cfg = load_config(LITE_S_CFG)
    data = load_data_config(cfg.data)
    model = load_model(cfg.model).eval()
    ours = export(model, tmp_path / "yoloq.onnx", ["outputs"], 320)
    theirs = export(UpstreamLayout(model), tmp_path / "upstream.onnx", ["outputs"], 320)
    eval_cfg = EvalConfig(batch_size=8, workers=0)
    a = evaluate(OnnxPredictor(ours), data, eval_cfg, 320, max_images=16, progress=False)
    b = evaluate(OnnxPredictor(theirs), data, eval_cfg, 320, max_images=16, progress=False)
    assert OnnxPredictor(theirs).layout == "raw" and a.stats["AP"] > 0.1
    assert b.stats == pytest.approx(a.stats, abs=2e-4)          # box coding round trip: float32 rounding only
    assert abs(len(a.detections) - len(b.detections)) <= 2
