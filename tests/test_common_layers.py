"""common/ is framework-free and layered: no torch or mlx, no import cycles, no import from a higher layer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

# Lowest first; a module may import from its own layer and the ones before it (common/__init__.py says why).
LAYERS = ["", "model", "engine", "documents", "serve", "options"]  # "" = the root utility modules


def common_modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for path in sorted((ROOT / "common").rglob("*.py"))
    }


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The common modules `path` imports at run time (module level or inside functions; not TYPE_CHECKING)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name for name in found if name in known}


def layer_of(module: str) -> int:
    parts = module.split(".")
    package = parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""
    return LAYERS.index(package)


def test_every_subpackage_is_a_layer_and_says_what_it_owns() -> None:
    packages = {p.parent.name for p in (ROOT / "common").glob("*/__init__.py")}
    assert packages == set(LAYERS) - {""}
    for package in packages:
        docstring = ast.get_docstring(ast.parse((ROOT / "common" / package / "__init__.py").read_text()))
        assert docstring and len(docstring) > 80, f"common/{package}/__init__.py needs a docstring saying what it owns"


def test_no_import_from_a_higher_layer() -> None:
    modules = common_modules()
    known = set(modules)
    upward = [
        f"{module} (layer {LAYERS[layer_of(module)] or 'root'}) imports {target} (layer {LAYERS[layer_of(target)]})"
        for module, path in modules.items()
        for target in imports_of(path, known)
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_no_import_cycles() -> None:
    modules = common_modules()
    known = set(modules)
    graph = {module: imports_of(path, known) - {module, "common"} for module, path in modules.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_common_imports_no_framework() -> None:
    modules = sorted(common_modules())
    assert {"common.model.config", "common.engine.backend", "common.engine.engine"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlx', 'mlx_lm'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"common imported a framework: {out.stdout}"
