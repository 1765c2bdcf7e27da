"""What only the MLX backend has: its devices and dtypes refused clearly, and a CLI that never aborts at exit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

mx = pytest.importorskip("mlx.core")

from common.engine.backend import BackendOptions
from common.errors import BackendUnavailableError, ConfigError
from dsocr_mlx import backend as mlx_backend
from tests.conftest import FIXTURES, MODEL_DIR, ROOT

pytestmark = pytest.mark.mlx


def test_backend_errors() -> None:
    if not mx.metal.is_available():
        with pytest.raises(BackendUnavailableError, match="metal"):
            mlx_backend.load(MODEL_DIR, BackendOptions("metal", "float32"))
    with pytest.raises(BackendUnavailableError):
        mlx_backend.load(MODEL_DIR, BackendOptions("cuda", "float32"))
    with pytest.raises(ConfigError, match="dtype"):
        mlx_backend.load(MODEL_DIR, BackendOptions("cpu", "int3"))
    with pytest.raises(BackendUnavailableError, match="dsocr convert"):  # MLX quantizes ahead, not at load
        mlx_backend.load(MODEL_DIR, BackendOptions("cpu", "float32", quantize="int8"))


@pytest.mark.slow
def test_cli_never_aborts_at_exit() -> None:
    """The MLX CLI once died with SIGABRT at exit ('terminate called without an active exception') now and then:
    many short runs, every one exits 0 with its JSON line."""
    runs = int(os.environ.get("DSOCR_MLX_EXIT_RUNS", "12"))
    image = FIXTURES / "images" / "doc_text.png"
    argv = [sys.executable, str(ROOT / "cli.py"), str(image), "--model", str(MODEL_DIR), "--backend", "mlx",
            "--device", "cpu", "--dtype", "float32", "--mode", "tiny", "--max-new-tokens", "2", "--json", "-q"]
    for run in range(runs):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"run {run}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        assert '"token_ids"' in proc.stdout, f"run {run}: no JSON line"
