"""The package's structure as docs/ARCHITECTURE.md states it: imports point one way through the
layers its "Dependencies point one way" line lists, no modules import each other in a circle, and
every module and name the document cites exists.

Imports are read with ``ast`` from every ``yoloq/**/*.py``, at module level and inside functions
(a lazy import is a dependency all the same). ``from yoloq.a import b`` depends on the module
``yoloq.a.b`` when there is one, else on ``yoloq.a`` (whose ``__init__`` then runs). The implicit
import of a module's parent packages is not counted: Python puts a package in ``sys.modules``
before its ``__init__`` runs, so it never closes a circle.
"""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path
from typing import NamedTuple

from conftest import REPO  # noqa: E402

PACKAGE = REPO / "yoloq"
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"
LAYER_LINE = "Dependencies point one way:"
NOT_PYTHON_NAMES = {"yoloq.variant"}        # the ONNX metadata key of exported files


class Import(NamedTuple):
    source: str          # importing module, e.g. "yoloq.config.load"
    target: str          # imported yoloq module
    line: int

    def where(self) -> str:
        return f"{module_files()[self.source].relative_to(REPO)}:{self.line}"


def module_files() -> dict[str, Path]:
    """{dotted module name: file} of every module of the package (a package is its ``__init__``)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement loads (relative imports made absolute)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names]


def _owning_module(name: str, modules: dict) -> str | None:
    """The module a dotted name lives in: the longest prefix that is a module of the package."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def package_imports() -> list[Import]:
    """Every import of one yoloq module by another, module-level or inside a function."""
    modules = module_files()
    found = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported_names(node, module, path.name == "__init__.py"):
                target = _owning_module(name, modules) if name.split(".")[0] == "yoloq" else None
                if target is not None and target != module:
                    found.append(Import(module, target, node.lineno))
    return list(dict.fromkeys(found))           # one per line: `from a import b, c` is one import


def stated_layers(text: str) -> list[list[str]]:
    """The groups of docs/ARCHITECTURE.md's layer line, lowest first: ``a``, ``b`` ← ``c`` ← ..."""
    start = text.index(LAYER_LINE) + len(LAYER_LINE)
    paragraph = text[start:].split("\n\n", 1)[0]
    return [re.findall(r"`(\w+)`", group) for group in paragraph.split("←")]


def layer_name(module: str) -> str:
    """``yoloq.quant.calibrate`` -> ``quant``; ``yoloq.errors`` -> ``errors``; ``yoloq`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def upward_imports(imports: list[Import], layers: list[list[str]]) -> list[str]:
    rank = {name: i for i, group in enumerate(layers) for name in group}
    return [f"{imp.where()}: {imp.source} (layer {layer_name(imp.source)}) imports {imp.target} "
            f"(layer {layer_name(imp.target)}, higher)"
            for imp in imports if rank[layer_name(imp.target)] > rank[layer_name(imp.source)]]


def import_cycles(imports: list[Import]) -> list[list[Import]]:
    """One circle of imports per back edge a depth-first walk meets (empty when there is none)."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:                          # the first import of each module by each other one
        edges.setdefault(imp.source, {}).setdefault(imp.target, imp)
    state, path, cycles = {}, [], []

    def visit(module: str) -> None:
        state[module] = "open"
        for imp in edges.get(module, {}).values():
            if state.get(imp.target) == "open":
                first = next(i for i, step in enumerate(path) if step.source == imp.target)
                cycles.append(path[first:] + [imp])
            elif imp.target not in state:
                path.append(imp)
                visit(imp.target)
                path.pop()
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module)
    return cycles


# --------------------------------------------------------------------------- the tests


def test_every_module_belongs_to_a_stated_layer():
    layers = stated_layers(ARCHITECTURE.read_text(encoding="utf-8"))
    named = [name for group in layers for name in group]
    assert all(layers) and len(named) == len(set(named)), f"layer line of {ARCHITECTURE.name}: {layers}"
    unplaced = sorted({layer_name(m) for m in module_files()} - set(named))
    assert not unplaced, f"yoloq modules / packages in no layer of {ARCHITECTURE.name}: {unplaced}"
    assert not set(named) - {layer_name(m) for m in module_files()}, "the layer line names a module that does not exist"


def test_imports_point_down_the_stated_layers():
    layers = stated_layers(ARCHITECTURE.read_text(encoding="utf-8"))
    imports = package_imports()
    assert len(imports) > 300 and {(i.source, i.target) for i in imports} >= {("yoloq.api", "yoloq.models")}
    upward = upward_imports(imports, layers)
    assert not upward, "imports against the layer order of docs/ARCHITECTURE.md:\n" + "\n".join(upward)


def test_no_import_cycles():
    cycles = import_cycles(package_imports())
    text = ["  " + " -> ".join(f"{imp.source} ({imp.where()})" for imp in cycle) + f" -> {cycle[-1].target}"
            for cycle in cycles]
    assert not cycles, "modules that import each other in a circle:\n" + "\n".join(text)


def test_the_checks_see_lazy_imports_upward_imports_and_circles():
    """The walker itself: a function-level import counts, a higher layer is flagged, a circle found."""
    tree = ast.parse("def f():\n    from yoloq.cli.common import run_command\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert _owning_module(_imported_names(node, "yoloq.io", False)[0], module_files()) == "yoloq.cli.common"
    layers = [["io"], ["cli"]]
    up = Import("yoloq.io", "yoloq.cli.common", 7)
    assert upward_imports([up], layers) and not upward_imports([Import("yoloq.cli.common", "yoloq.io", 3)], layers)
    circle = [Import("yoloq.io", "yoloq.errors", 1), Import("yoloq.errors", "yoloq.io", 2)]
    assert [sorted(c) for c in import_cycles(circle)] == [sorted(circle)]
    assert not import_cycles(circle[:1])


# --------------------------------------------------------------------------- what the document names


def test_every_path_the_architecture_doc_names_exists():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    paths = []
    for ref in re.findall(r"yoloq/[a-z_][a-z0-9_/{},.]*", text):
        ref = ref.rstrip(".,")
        brace = re.search(r"\{([^}]*)\}", ref)
        names = brace.group(1).split(",") if brace else [""]
        paths += [ref.replace(brace.group(0), n) if brace else ref for n in names]
    assert len(paths) > 60
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, f"{ARCHITECTURE.name} names paths that do not exist: {missing}"


def test_every_dotted_name_the_architecture_doc_names_exists():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    modules = module_files()
    missing = []
    for name in sorted(set(re.findall(r"\byoloq(?:\.\w+)+", text)) - NOT_PYTHON_NAMES):
        owner = _owning_module(name, modules)
        obj = importlib.import_module(owner)
        for attr in name[len(owner) + 1:].split(".") if name != owner else []:
            obj = getattr(obj, attr, None)
        if obj is None:
            missing.append(name)
    assert not missing, f"{ARCHITECTURE.name} names what yoloq does not have: {missing}"


PACKAGES_LISTING_MODULES = ("yoloq.config", "yoloq.quant", "yoloq.recipes.qat")


def test_package_docstrings_list_every_module():
    """The packages whose docstring is their table of contents name each of their modules."""
    modules = module_files()
    for package in PACKAGES_LISTING_MODULES:
        doc = ast.get_docstring(ast.parse(modules[package].read_text(encoding="utf-8")))
        own = [m.rpartition(".")[2] for m in modules if m.rpartition(".")[0] == package]
        unnamed = [name for name in own if f"``{name}``" not in doc]
        assert own and not unnamed, f"{modules[package].relative_to(REPO)}: its module list lacks {unnamed}"
