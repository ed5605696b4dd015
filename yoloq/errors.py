"""The one base class of user errors.

Every error caused by what a user passed (a config key, a file, a flag value, a dataset) derives
from :class:`YoloqError`. Command-line tools print such an error as one line and exit with code 2
(``yoloq.cli``); any other exception is a bug and keeps its traceback. Most subclasses also derive
from ``ValueError`` or ``RuntimeError`` so that library callers can catch them the usual way.
"""
from __future__ import annotations

import reprlib


class YoloqError(Exception):
    """Bad input: the message names the file, key or value at fault and what was expected."""


class InputError(YoloqError, ValueError):
    """A value, file or option the user gave is invalid (a generic user error)."""


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 60, 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6


def short_repr(value, limit: int = 100) -> str:
    """``repr(value)`` for an error message, bounded: a value from a file can be huge or nested
    (YAML aliases expand to billions of items), and a message must stay one short line."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
