"""The house rules of the package layout (docs/architecture.md), checked from the source and in fresh processes.

- Every import arrow, lazy imports inside functions included, points down the wings: a wing imports only the
  wings that ``ALLOWED`` lists for it, and no module imports a module that imports it back (no circle).
- The formulas wing imports torch and the standard library alone; nothing below the CLI imports typer; nothing
  outside the report wing imports matplotlib; no module passes 400 lines.
- Importing the pure modules, or the package and its light modules, loads nothing heavy (fresh processes).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "attnprobe"
MAX_LINES = 400

# What each part of the package may import (besides itself). Top-level modules are parts of their own; a
# subpackage is a wing. The order is the data's path: formulas and runtime at the bottom, the CLI at the top.
_BOTTOM = {"errors", "version", "config"}
ALLOWED = {
    "errors": set(),
    "version": set(),
    "config": {"errors"},
    "formulas": set(),
    "runtime": {"errors"},
    "capture": {"formulas"},
    "models": {"errors", "config", "formulas", "capture"},
    "data": {"errors"},
    "scanning": _BOTTOM | {"formulas", "runtime", "capture", "models", "data"},
    "training": _BOTTOM | {"formulas", "runtime", "capture", "models", "data", "scanning"},
    "report": _BOTTOM | {"formulas", "runtime", "capture", "models", "data", "scanning", "training"},
    "saobp": {"formulas", "models"},
    "hf": {"training"},
    "api": _BOTTOM | {"runtime", "models", "scanning"},
    "cli": _BOTTOM | {"runtime", "models", "data", "scanning", "training", "report"},
    "__init__": {"errors", "version", "models"},
    "__main__": {"cli"},
}


def _modules() -> dict[str, Path]:
    """``attnprobe.x.y`` -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every import statement of a file, at any depth (lazy ones too): ``(line, absolute module name)``.
    ``from attnprobe.x import y`` names ``attnprobe.x.y`` where y is a module, else ``attnprobe.x``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; the package uses absolute imports"
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else node.module))
    return found


def _part(module: str) -> str:
    """The wing of a subpackage module, or the top-level module's own name (``__init__`` for the package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, set[str]]:
    return {name: {target for _, target in _imports(path) if target in MODULES and target != name}
            for name, path in MODULES.items()}


def test_every_part_is_known():
    assert {_part(m) for m in MODULES} == set(ALLOWED)


def test_arrows_point_down_the_wings():
    wrong = []
    for name, path in MODULES.items():
        for line, target in _imports(path):
            if target.split(".")[0] != "attnprobe":
                continue
            src, dst = _part(name), _part(target)
            if dst != src and dst not in ALLOWED[src]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({src}) imports {target} ({dst})")
    assert not wrong, "\n".join(wrong)


def _circles(graph: dict[str, set[str]]) -> list[str]:
    """Every import circle a depth-first walk of ``graph`` meets, as ``a -> b -> a``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return circles


def test_no_import_circle():
    circles = _circles(_graph())
    assert not circles, "\n".join(circles)


def test_circles_are_found(tmp_path):
    """The circle search finds a circle that a lazy import inside a function closes."""
    (tmp_path / "a.py").write_text("import attnprobe.b\n")
    (tmp_path / "b.py").write_text("def f():\n    from attnprobe import a\n")
    MODULES.update({"attnprobe.a": tmp_path / "a.py", "attnprobe.b": tmp_path / "b.py"})
    try:
        graph = {name: deps for name, deps in _graph().items() if name in ("attnprobe.a", "attnprobe.b")}
    finally:
        del MODULES["attnprobe.a"], MODULES["attnprobe.b"]
    assert _circles(graph) == ["attnprobe.a -> attnprobe.b -> attnprobe.a"]


def _third_party(path: Path) -> set[str]:
    return {target.split(".")[0] for _, target in _imports(path)} - set(sys.stdlib_module_names) - {"attnprobe"}


def test_formulas_import_torch_alone():
    for name, path in MODULES.items():
        if _part(name) == "formulas":
            assert _third_party(path) <= {"torch"}, f"{name} imports {_third_party(path) - {'torch'}}"


@pytest.mark.parametrize("package, only", [("typer", {"cli"}), ("matplotlib", {"report"})])
def test_heavy_packages_stay_in_their_wing(package, only):
    users = {_part(name) for name, path in MODULES.items() if package in _third_party(path)}
    assert users <= only, f"{package} imported outside {only}: {users - only}"


def test_no_module_over_the_limit():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by responsibility): {long}"


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(','.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.strip().split(","))


@pytest.mark.parametrize("module", ["attnprobe.formulas.metrics", "attnprobe.formulas.blocks",
                                    "attnprobe.formulas.saobp", "attnprobe.capture.probe",
                                    "attnprobe.capture.attention"])
def test_pure_modules_import_only_torch(module):
    mods = _imported_after(f"import {module}")
    assert "torch" in mods
    for heavy in ("transformers", "pandas", "matplotlib", "pyarrow"):
        assert heavy not in mods, f"{module} imports {heavy}"


def test_package_import_is_light():
    mods = _imported_after("import attnprobe, attnprobe.config, attnprobe.data.sources, attnprobe.runtime.outputs")
    for heavy in ("torch", "transformers", "pandas", "matplotlib", "pyarrow"):
        assert heavy not in mods
