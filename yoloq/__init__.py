"""yoloq: YOLOv6 INT8 quantization toolkit.

    import yoloq
    model = yoloq.load("yolov6lite_s")
    q = yoloq.ptq(model, data="coco_shared", method="auto")
    q.evaluate(); q.export_onnx("m.onnx"); q.save("quant.pt")

See ``yoloq.api`` (the Python API) and ``yoloq.cli`` (the ``yoloq`` command).
"""
from yoloq.version import __version__

_API = ("load", "load_quantized", "ptq", "qat", "evaluate", "FP32Model", "QuantizedModel")


def __getattr__(name: str):
    # the API pulls in torch; `yoloq --version` and `import yoloq` stay light (PEP 562)
    if name in _API:
        from yoloq import api
        return getattr(api, name)
    raise AttributeError(f"module 'yoloq' has no attribute {name!r}")


__all__ = ["__version__", *_API]
