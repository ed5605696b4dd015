"""Deployment: ONNX Q/DQ export (``export_onnx``), TensorRT and onnxruntime helpers."""
from yoloq.runtime.onnx_export import ExportError, ExportInfo, count_qdq, export_onnx

__all__ = ["ExportError", "ExportInfo", "count_qdq", "export_onnx"]
