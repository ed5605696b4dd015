"""Quantization-aware training: ``data`` (what it trains on), ``losses`` (distillation), ``step`` (the
distillation step of the training engine ``yoloq.train.engine``), ``guard`` (divergence checks),
``run`` (the recipe behind ``yoloq qat`` and ``yoloq.qat``)."""
from yoloq.errors import YoloqError


class QATError(YoloqError, ValueError):
    """Bad input to QAT; the message names the file / option / value."""
