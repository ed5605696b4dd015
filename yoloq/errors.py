"""The one base class of user errors.

Every error caused by what a user passed (a config key, a file, a flag value, a dataset) derives
from :class:`YoloqError`. Command-line tools print such an error as one line and exit with code 2
(``yoloq.cli``); any other exception is a bug and keeps its traceback. Most subclasses also derive
from ``ValueError`` or ``RuntimeError`` so that library callers can catch them the usual way.
"""
from __future__ import annotations


class YoloqError(Exception):
    """Bad input: the message names the file, key or value at fault and what was expected."""


class InputError(YoloqError, ValueError):
    """A value, file or option the user gave is invalid (a generic user error)."""
