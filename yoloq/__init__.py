"""yoloq: YOLOv6 INT8 quantization toolkit."""
__version__ = "0.1.0"
