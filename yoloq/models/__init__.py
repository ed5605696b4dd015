"""YOLOv6 model family (EfficientRep / CSPBep / Lite) with swappable Rep blocks."""
from .build import build_model  # noqa: F401
