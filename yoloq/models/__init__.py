"""YOLOv6 model family (EfficientRep / CSPBep / Lite) with swappable Rep blocks."""
from yoloq.models.build import build_model, load_model, load_weights

__all__ = ["build_model", "load_model", "load_weights"]
