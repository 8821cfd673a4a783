"""The pure modules depend on torch alone; the package import and the CLI's --help import nothing heavy."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(','.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.strip().split(","))


@pytest.mark.parametrize("module", ["attnprobe.metrics", "attnprobe.saobp", "attnprobe.probe"])
def test_pure_modules_import_only_torch(module):
    mods = _imported_after(f"import {module}")
    assert "torch" in mods
    for heavy in ("transformers", "pandas", "matplotlib", "pyarrow"):
        assert heavy not in mods, f"{module} imports {heavy}"


def test_package_import_is_light():
    mods = _imported_after("import attnprobe, attnprobe.config, attnprobe.data, attnprobe.outputs")
    for heavy in ("torch", "transformers", "pandas", "matplotlib", "pyarrow"):
        assert heavy not in mods
