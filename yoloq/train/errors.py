"""Errors of the training engine: bad input a user can fix (one line, exit 2; see yoloq.errors)."""
from __future__ import annotations

from yoloq.errors import YoloqError


class TrainError(YoloqError, ValueError):
    """Bad training input (data, config, scales file, checkpoint); the message names the culprit."""


class NonFiniteLossError(TrainError):
    """The loss became NaN/inf; the message names the epoch, the step and the loss part(s)."""


class NonFiniteWeightsError(TrainError):
    """The weights (or their EMA) became NaN/inf after an update; the message names the parameter."""


class ScalesMismatchError(TrainError):
    """A RepOpt scales file does not fit the model it is applied to."""
