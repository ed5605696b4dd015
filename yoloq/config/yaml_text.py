"""YAML as configs read it: safe, bounded, with ordinary numbers, and errors on one line.

* ``1e-3`` is a number. PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-3``), so a
  bare ``1e-3`` would be the string '1e-3'; every user writes it, so it resolves as a float here.
* Aliases may not expand a document beyond ``EXPAND_FACTOR`` times its own size (a "billion
  laughs" file is a few hundred bytes that expand to 10^9 values); a recursive alias is refused.
* Syntax and tag errors are one line: ``file:line:column: problem``.
"""
from __future__ import annotations

import re
from typing import Any

import yaml

from yoloq.config.base import ConfigError

EXPAND_FACTOR = 10          # values after alias expansion <= this x the values written, + EXPAND_SLACK
EXPAND_SLACK = 10_000
MAX_DEPTH = 100             # nesting of lists / mappings


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` / ``5E4`` as floats."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str, where: str) -> Any:
    """Parse ``text`` (from ``where``: a file or a flag) with the rules above; ConfigError otherwise."""
    try:
        data = yaml.load(text, Loader=ConfigLoader)        # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        raise ConfigError(f"{where}{_position(err)}: not valid YAML: {_problem(err)}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(err).split())}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply (more than ~{MAX_DEPTH} levels)") from None
    check_expansion(data, where)
    return data


def _position(err: yaml.MarkedYAMLError) -> str:
    mark = err.problem_mark or err.context_mark
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _problem(err: yaml.MarkedYAMLError) -> str:
    parts = [p for p in (err.context, err.problem) if p]
    return "; ".join(" ".join(p.split()) for p in parts) or type(err).__name__


def check_expansion(data: Any, where: str) -> None:
    """Refuse documents whose aliases expand far beyond what was written, or refer to themselves.
    Counts each distinct container once (written) and once per use (expanded), in time linear in
    the distinct containers."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def expanded(node: Any, depth: int) -> int:
        if not isinstance(node, (list, dict)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{where}: a YAML alias refers to itself (a recursive value)")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where}: YAML nested too deeply (more than {MAX_DEPTH} levels)")
        active.add(key)
        children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
        sizes[key] = 1 + sum(expanded(c, depth + 1) for c in children)
        active.discard(key)
        return sizes[key]

    total = expanded(data, 0)
    written = _written_size(data, set())
    if total > EXPAND_FACTOR * written + EXPAND_SLACK:
        raise ConfigError(f"{where}: YAML aliases expand {written} written values to {total}; refusing a value "
                          f"that large (an alias bomb?)")


def _written_size(node: Any, seen: set) -> int:
    """Values in the document as written: each container counted once however often it is aliased."""
    if not isinstance(node, (list, dict)) or id(node) in seen:
        return 1
    seen.add(id(node))
    children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
    return 1 + sum(_written_size(c, seen) for c in children)
