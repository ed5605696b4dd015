"""Benchmarks: yoloq's PTQ against peer libraries on the same model, data and evaluation.

``yoloq.bench.peers``: NNCF / AMD Quark / AIMET / onnxruntime in child processes with TensorRT-like
settings; ``yoloq/bench/peer_child.py``: the standalone script each child runs.
"""
