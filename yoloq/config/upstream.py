"""Upstream YOLOv6 ``.py`` configs (``configs/*.py`` of meituan/YOLOv6), read without executing them.

The file is parsed with :mod:`ast`; only top-level ``name = value`` assignments are read, and a value
may only be a literal: numbers, strings, booleans, ``None``, lists / tuples, ``{...}`` dicts with
string keys, ``dict(key=value, ...)``, ``float(number)`` / ``int(number)``, unary ``-``/``+`` and
``+ - * / //`` on numbers (upstream writes ``csp_e=float(2)/3`` and ``lr0=0.1 * 4``). Anything else
(an import, a name, attribute access, any other call, a statement other than an assignment) is an
error naming its line. Nothing from the file is ever executed.

The ``model`` dict and ``training_mode`` map to yoloq's :class:`~yoloq.config.ModelConfig`; the other
sections of the returned :class:`~yoloq.config.Config` are yoloq's defaults (data: the shipped COCO
subset YAML; eval image size from ``eval_params.img_size`` where set, else 640, 320 for Lite).
Training-only fields (``solver``, ``data_aug``, ``pretrained``, loss settings, anchor-aided and
distillation settings) are ignored: the anchor-aided (``--fuse_ab``) and distillation
(``--distill``) heads are train.py flags upstream, not config fields, and their extra branches in a
checkpoint are loaded and ignored (yoloq.weights). Fields yoloq cannot build are named in one
:class:`~yoloq.config.ConfigError`.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import operator
import warnings
from pathlib import Path
from typing import Any

from yoloq.config.base import ConfigError
from yoloq.config.sections import Config, EvalConfig, ModelConfig
from yoloq.errors import short_repr

_BIN_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
            ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv}
_NUMBER_CALLS = {"float": float, "int": int}
_CONSTANT_TYPES = (str, int, float, bool, type(None))
# Bounds on what a config file may make yoloq compute (upstream's configs are a few KB, numbers
# below 10^4, expressions a few terms): a hostile file is an error, never a hang or a crash.
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 50                  # nesting of expressions, lists and dicts
MAX_NUMBER = 1e12               # |any number| read or computed; NaN / inf refused too


# --------------------------------------------------------------------------- reading literals
def _reject(node: ast.AST, path: Path, what: str) -> ConfigError:
    return ConfigError(f"{path}:{getattr(node, 'lineno', '?')}: {what} is not allowed; yoloq reads upstream "
                       "configs without executing them and accepts only literals (numbers, strings, "
                       "True/False/None, lists, dicts, dict(...), float()/int() of numbers, + - * / on numbers)")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bounded(value: Any, node: ast.AST, path: Path) -> Any:
    """A number read or computed from the file, refused when not finite or beyond MAX_NUMBER."""
    if not _number(value):
        return value
    finite = math.isfinite(value) if isinstance(value, float) else True      # huge ints overflow isfinite
    if not finite or abs(value) > MAX_NUMBER:
        what = "a non-finite number" if not finite else f"a number beyond +-{MAX_NUMBER:g}"
        raise ConfigError(f"{path}:{getattr(node, 'lineno', '?')}: {what}; upstream config values are small "
                          f"finite numbers")
    return value


def _call(node: ast.Call, path: Path, depth: int) -> Any:
    name = node.func.id if isinstance(node.func, ast.Name) else None
    if name == "dict":
        if node.args or any(k.arg is None for k in node.keywords):
            raise _reject(node, path, "dict() with positional or ** arguments")
        return {k.arg: _literal(k.value, path, depth + 1) for k in node.keywords}
    if name in _NUMBER_CALLS:
        if len(node.args) != 1 or node.keywords:
            raise _reject(node, path, f"{name}() with other than one argument")
        value = _literal(node.args[0], path, depth + 1)
        if not (_number(value) or isinstance(value, str)) or (isinstance(value, str) and len(value) > 64):
            raise _reject(node, path, f"{name}({short_repr(value)})")
        try:
            return _bounded(_NUMBER_CALLS[name](value), node, path)
        except (ValueError, OverflowError) as err:
            raise _reject(node, path, f"{name}({short_repr(value)}) ({err})") from None
    called = ast.unparse(node.func) if name is None else name
    raise _reject(node, path, f"a call to '{called}'")


def _literal(node: ast.AST, path: Path, depth: int = 0) -> Any:
    """The value of a literal expression node; anything else raises ConfigError naming the line."""
    if depth > MAX_DEPTH:
        raise ConfigError(f"{path}:{getattr(node, 'lineno', '?')}: expression nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, ast.Constant):
        if not isinstance(node.value, _CONSTANT_TYPES):
            raise _reject(node, path, f"the constant {short_repr(node.value)}")
        return _bounded(node.value, node, path)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, path, depth + 1) for e in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for key, value in zip(node.keys, node.values):
            if key is None or not isinstance(key, ast.Constant) or not isinstance(key.value, str):
                raise _reject(node, path, "a dict key that is not a string literal (or ** unpacking)")
            out[key.value] = _literal(value, path, depth + 1)
        return out
    if isinstance(node, ast.Call):
        return _call(node, path, depth)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand, path, depth + 1)
        if not _number(value):
            raise _reject(node, path, f"a sign on {short_repr(value)}")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
        left, right = _literal(node.left, path, depth + 1), _literal(node.right, path, depth + 1)
        if not (_number(left) and _number(right)):
            raise _reject(node, path, f"arithmetic on {short_repr(left)} and {short_repr(right)}")
        try:
            return _bounded(_BIN_OPS[type(node.op)](left, right), node, path)
        except ZeroDivisionError as err:
            raise _reject(node, path, "a division by zero") from err
        except OverflowError:
            raise _bounded(math.inf, node, path) from None
    if isinstance(node, ast.Name):
        raise _reject(node, path, f"the name '{node.id[:60]}'")
    if isinstance(node, ast.Attribute):
        raise _reject(node, path, f"attribute access '{ast.unparse(node)[:60]}'")
    raise _reject(node, path, f"the expression '{ast.unparse(node)[:60]}'")


def read_upstream_config(path: str | Path) -> dict[str, Any]:
    """Top-level ``name = literal`` assignments of an upstream ``.py`` config, never executed."""
    path = Path(path)
    if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes; an upstream model config is a few KB (at most "
                          f"{MAX_FILE_BYTES >> 10} KiB read)")
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path}") from err
    except (SyntaxError, ValueError, UnicodeDecodeError) as err:
        line = getattr(err, "lineno", "?")
        text = " ".join(str(getattr(err, "msg", None) or err).split())
        raise ConfigError(f"{path}:{line}: not valid Python: {text[:200]}") from None
    except (RecursionError, MemoryError):
        raise ConfigError(f"{path}: an expression too long or nested too deeply to read (upstream configs "
                          f"have a few terms per value)") from None
    values: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue                                  # a docstring or bare string
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = _literal(node.value, path)
            continue
        kind = {ast.Import: "an import", ast.ImportFrom: "an import", ast.FunctionDef: "a function definition",
                ast.ClassDef: "a class definition"}.get(type(node), f"the statement '{ast.unparse(node)[:60]}'")
        raise _reject(node, path, kind)
    return values


# --------------------------------------------------------------------------- mapping to ModelConfig
# upstream training_mode -> yoloq block (upstream's default when absent: repvgg)
TRAINING_MODES = {"repvgg": "repvgg", "qarepvgg": "qarepvgg", "qarepvggv2": "qarepvggv2",
                  "repopt": "repopt", "hyper_search": "hyper_search", "conv_silu": "conv_silu"}
# neck -> (BiFPAN: takes C2 from a fuse_P2 backbone, CSP stages)
NECKS = {"RepBiFPANNeck": (True, False), "CSPRepBiFPANNeck": (True, True), "RepPANNeck": (False, False)}
BACKBONES = {"EfficientRep": False, "CSPBepBackbone": True}          # -> CSP stages
# the fixed layout yoloq builds (upstream's values in every supported config)
FIXED_YOLOV6 = {"backbone.num_repeats": [1, 6, 12, 18, 6], "backbone.out_channels": [64, 128, 256, 512, 1024],
                "neck.num_repeats": [12, 12, 12, 12], "neck.out_channels": [256, 128, 128, 256, 256, 512],
                "head.num_layers": 3, "head.strides": [8, 16, 32]}
FIXED_LITE = {"backbone.num_repeats": [1, 3, 7, 3], "backbone.out_channels": [24, 32, 64, 128, 256],
              "backbone.scale_size": 0.5, "neck.in_channels": [256, 128, 64], "neck.unified_channels": 96,
              "head.num_layers": 4, "head.strides": [8, 16, 32, 64]}
# keys read or knowingly ignored (training-only: losses, assigner, anchors for --fuse_ab, distillation)
SECTION_KEYS = {
    "model": {"type", "pretrained", "scales", "depth_multiple", "width_multiple", "backbone", "neck", "head"},
    "backbone": {"type", "num_repeats", "out_channels", "fuse_P2", "cspsppf", "csp_e", "stage_block_type",
                 "scale_size"},
    "neck": {"type", "num_repeats", "out_channels", "csp_e", "stage_block_type", "in_channels", "unified_channels"},
    "head": {"type", "in_channels", "num_layers", "begin_indices", "anchors", "anchors_init", "out_indices",
             "strides", "atss_warmup_epoch", "iou_type", "use_dfl", "reg_max", "distill_weight", "distil_weight"},
}
TOP_LEVEL_IGNORED = {"solver", "data_aug"}                  # training hyper-parameters
TOP_LEVEL_WARNED = {"ptq", "qat"}                           # upstream quantization settings: yoloq uses its own
EVAL_MAPPED = {"img_size", "conf_thres", "iou_thres", "batch_size"}
EVAL_REPORTING = {"verbose", "do_coco_metric", "do_pr_metric", "plot_curve", "plot_confusion_matrix"}
# letterbox / inference settings yoloq does not apply -> the values that mean "upstream's standard
# protocol" (no warning): the v0.3-era names and today's (shrink_size, infer_on_rect, since 2023)
EVAL_NOT_APPLIED = {"test_load_size": (None,), "letterbox_return_int": (None, False), "force_no_pad": (None, False),
                    "not_infer_on_rect": (None, False), "scale_exact": (None, False),
                    "shrink_size": (None, 0, False), "infer_on_rect": (None, False)}


def _section(raw: dict, key: str, problems: list[str]) -> dict:
    value = raw.get(key)
    if not isinstance(value, dict):
        problems.append(f"model.{key} must be a dict, got {short_repr(value)}")
        return {}
    unknown = sorted(set(value) - SECTION_KEYS[key])
    if unknown:
        problems.append(f"unknown field(s) model.{key}.{', model.{key}.'.join(unknown)}")
    return value


def _check_fixed(sections: dict, fixed: dict, problems: list[str]) -> None:
    """Layout values yoloq does not parametrise must equal the standard ones (when present)."""
    for dotted, expected in fixed.items():
        section, key = dotted.split(".")
        if key in sections[section] and sections[section][key] != expected:
            problems.append(f"model.{dotted} = {short_repr(sections[section][key])} (yoloq builds {expected!r})")


def _multiplier(model: dict, key: str, problems: list[str]) -> float:
    value = model.get(key)
    if not _number(value) or value <= 0:
        problems.append(f"model.{key} must be a number > 0, got {short_repr(value)}")
        return 1.0
    return float(value)


def _head_dfl(head: dict, problems: list[str]) -> tuple[bool, int]:
    use_dfl, reg_max = head.get("use_dfl", False), head.get("reg_max", 0)
    if not isinstance(use_dfl, bool) or not isinstance(reg_max, int) or isinstance(reg_max, bool):
        problems.append(f"model.head.use_dfl / reg_max must be a bool / an int, got {short_repr(use_dfl)} / "
                        f"{short_repr(reg_max)}")
        return False, 0
    if use_dfl != (reg_max > 0):
        problems.append(f"model.head.use_dfl={use_dfl} needs reg_max {'> 0' if use_dfl else '= 0'}, got {reg_max}")
    return use_dfl, reg_max


def _yolov6_fields(raw: dict, sections: dict, problems: list[str]) -> dict:
    backbone, neck, head = sections["backbone"], sections["neck"], sections["head"]
    mode = raw.get("training_mode", "repvgg")
    if not isinstance(mode, str) or mode not in TRAINING_MODES:
        problems.append(f"training_mode {short_repr(mode)} (yoloq builds {', '.join(TRAINING_MODES)})")
    b_type, n_type = backbone.get("type"), neck.get("type")
    b_type = b_type if isinstance(b_type, str) else repr(type(b_type))
    n_type = n_type if isinstance(n_type, str) else repr(type(n_type))
    if b_type not in BACKBONES:
        problems.append(f"model.backbone.type {short_repr(b_type)} (yoloq builds {', '.join(BACKBONES)})")
    if n_type not in NECKS:
        problems.append(f"model.neck.type {short_repr(n_type)} (yoloq builds {', '.join(NECKS)})")
    for name, section in (("backbone", backbone), ("neck", neck)):
        if section.get("stage_block_type", "BepC3") != "BepC3":
            problems.append(f"model.{name}.stage_block_type {short_repr(section['stage_block_type'])} (yoloq builds BepC3 "
                            "CSP stages only; MBLA models are not supported)")
    if head.get("type", "EffiDeHead") != "EffiDeHead":
        problems.append(f"model.head.type {short_repr(head['type'])} (yoloq builds EffiDeHead)")
    fuse_p2, cspsppf = backbone.get("fuse_P2", False), backbone.get("cspsppf", False)
    csp = BACKBONES.get(b_type, False)
    csp_e = 0.5
    if b_type in BACKBONES and n_type in NECKS:
        bifpn, csp_neck = NECKS[n_type]
        if csp != csp_neck:
            problems.append(f"backbone {b_type} with neck {n_type}: upstream pairs CSP backbones with CSP necks only")
        if bool(fuse_p2) != bifpn:
            problems.append(f"model.backbone.fuse_P2={fuse_p2} with neck {n_type} (a BiFPAN neck needs fuse_P2=True, "
                            "RepPANNeck needs it off)")
    if csp:
        csp_e = backbone.get("csp_e")
        if not _number(csp_e) or not _number(neck.get("csp_e")) or abs(csp_e - neck["csp_e"]) > 1e-12:
            problems.append(f"model.backbone.csp_e / model.neck.csp_e must be equal numbers, got "
                            f"{short_repr(csp_e)} / {short_repr(neck.get('csp_e'))}")
            csp_e = 0.5
    use_dfl, reg_max = _head_dfl(head, problems)
    return dict(arch="yolov6", block=TRAINING_MODES.get(mode, "repvgg"), backbone=b_type or "", neck=n_type or "",
                csp_e=float(csp_e), fuse_p2=bool(fuse_p2), cspsppf=bool(cspsppf), use_dfl=use_dfl, reg_max=reg_max,
                depth_multiple=_multiplier(raw["model"], "depth_multiple", problems),
                width_multiple=_multiplier(raw["model"], "width_multiple", problems))


def _lite_fields(raw: dict, sections: dict, problems: list[str]) -> dict:
    if sections["neck"].get("type") != "Lite_EffiNeck":
        problems.append(f"model.neck.type {short_repr(sections['neck'].get('type'))} with Lite_EffiBackbone "
                        "(yoloq builds Lite_EffiNeck)")
    if sections["head"].get("type", "Lite_EffideHead") != "Lite_EffideHead":
        problems.append(f"model.head.type {short_repr(sections['head']['type'])} (yoloq builds Lite_EffideHead)")
    if _head_dfl(sections["head"], problems) != (False, 0):
        problems.append("model.head.use_dfl: the Lite head has no DFL")
    return dict(arch="lite", backbone="Lite_EffiBackbone", neck="Lite_EffiNeck", use_dfl=False, reg_max=0,
                width_multiple=_multiplier(raw["model"], "width_multiple", problems))


def model_config_from_upstream(raw: dict, name: str, where: str) -> ModelConfig:
    """The yoloq ModelConfig of an upstream config's literal values (:func:`read_upstream_config`)."""
    if not isinstance(raw.get("model"), dict):
        raise ConfigError(f"{where}: no 'model = dict(...)' assignment; is this an upstream YOLOv6 model config?")
    problems: list[str] = []
    unknown = sorted(set(raw["model"]) - SECTION_KEYS["model"])
    if unknown:
        problems.append(f"unknown field(s) model.{', model.'.join(unknown)}")
    sections = {key: _section(raw["model"], key, problems) for key in ("backbone", "neck", "head")}
    lite = sections["backbone"].get("type") == "Lite_EffiBackbone"
    fields = _lite_fields(raw, sections, problems) if lite else _yolov6_fields(raw, sections, problems)
    _check_fixed(sections, FIXED_LITE if lite else FIXED_YOLOV6, problems)
    if problems:
        raise ConfigError(f"{where}: cannot build this upstream model in yoloq: {'; '.join(problems)}")
    try:                                    # ModelConfig's ranges (multipliers, csp_e, reg_max) name the field
        return ModelConfig(name=name, img_size=320 if lite else 640, **fields)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _eval_value(value: Any) -> Any:
    """eval_params items may be [train value, eval.py value]: yoloq evaluates like eval.py."""
    return value[-1] if isinstance(value, list) and value else value


def _eval_number(values: dict, key: str, kind: type, where: str) -> Any:
    value = values.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float) if kind is float else int) or isinstance(value, bool):
        raise ConfigError(f"{where}: eval_params.{key} must be {'a number' if kind is float else 'an integer'}, "
                          f"got {short_repr(value)}")
    return kind(value)


def apply_eval_params(params: Any, model: ModelConfig, where: str) -> tuple[EvalConfig, ModelConfig]:
    """Upstream ``eval_params`` -> (EvalConfig, ModelConfig with the eval image size), both validated
    (ranges name the field); settings yoloq does not apply are named in a warning, reporting switches
    are ignored."""
    if params is None:
        return EvalConfig(), model
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: eval_params must be a dict, got {short_repr(params)}")
    unknown = sorted(set(params) - EVAL_MAPPED - EVAL_REPORTING - set(EVAL_NOT_APPLIED))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) eval_params.{', eval_params.'.join(unknown)}")
    values = {k: _eval_value(v) for k, v in params.items()}
    mapped = {key: _eval_number(values, key, kind, where) for key, kind in
              (("conf_thres", float), ("iou_thres", float), ("batch_size", int))}
    img_size = _eval_number(values, "img_size", int, where)
    try:
        eval_cfg = EvalConfig(**{k: v for k, v in mapped.items() if v is not None})
        if img_size is not None:
            model = dataclasses.replace(model, img_size=img_size)
    except ConfigError as err:
        raise ConfigError(f"{where}: eval_params: {err}") from None
    not_applied = sorted(k for k, default in EVAL_NOT_APPLIED.items() if values.get(k) not in default)
    if not_applied:
        warnings.warn(f"{where}: eval_params {', '.join(not_applied)} ignored; yoloq evaluates with its "
                      "standard letterbox protocol (docs/formats.md)", stacklevel=3)
    return eval_cfg, model


def load_upstream_config(path: str | Path) -> Config:
    """A Config from an upstream YOLOv6 ``.py`` config: model (and eval image size / thresholds) from
    the file, everything else yoloq's defaults; data = the shipped COCO subset YAML."""
    from yoloq.config.lookup import DEFAULT_DATA
    path = Path(path)
    raw = read_upstream_config(path)
    unknown = sorted(set(raw) - {"model", "training_mode", "eval_params"} - TOP_LEVEL_IGNORED - TOP_LEVEL_WARNED)
    if unknown:
        raise ConfigError(f"{path}: unknown top-level field(s) {', '.join(unknown)}; yoloq reads model, "
                          f"training_mode and eval_params and ignores {', '.join(sorted(TOP_LEVEL_IGNORED))}")
    model = model_config_from_upstream(raw, path.stem, str(path))
    eval_cfg, model = apply_eval_params(raw.get("eval_params"), model, str(path))
    ignored = sorted(TOP_LEVEL_WARNED & set(raw))
    if ignored:
        warnings.warn(f"{path}: upstream {' / '.join(ignored)} settings ignored; yoloq's quant / qat settings "
                      "apply (see yoloq ptq -h and yoloq qat -h)", stacklevel=2)
    return Config(model=model, data=str(DEFAULT_DATA), eval=eval_cfg, path=str(path))
