"""Quantization-aware training: ``losses`` (distillation), ``trainer`` (the loop), ``guard``
(divergence checks), ``run`` (the pipeline behind ``yoloq qat``)."""
from yoloq.errors import YoloqError


class QATError(YoloqError, ValueError):
    """Bad input to QAT; the message names the file / option / value."""
