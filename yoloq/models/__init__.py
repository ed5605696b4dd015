"""YOLOv6 model family (EfficientRep / CSPBep / Lite) with swappable Rep blocks."""
from yoloq.models.build import build_model, load_model

__all__ = ["build_model", "load_model"]
