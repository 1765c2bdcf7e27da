"""common/ must stay framework-free: importing every module pulls in neither torch nor mlx."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_common_imports_no_framework() -> None:
    modules = sorted(p.stem for p in (ROOT / "common").glob("*.py") if p.stem != "__init__")
    assert {"config", "backend", "engine", "sampling", "hub", "device"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module('common.' + m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlx', 'mlx_lm'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"common imported a framework: {out.stdout}"
