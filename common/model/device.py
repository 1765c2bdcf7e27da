"""Backend and device selection: Apple Silicon with MLX -> MLX on Metal; CUDA -> torch on CUDA; else torch on CPU.

Frameworks are only probed when a choice has to be made, so importing this module stays framework-free.
"""

from __future__ import annotations

import importlib.util
import platform

from common.errors import BackendUnavailableError

DEVICES = ("auto", "cpu", "cuda", "metal")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def metal_available() -> bool:
    if not (is_apple_silicon() and _installed("mlx")):
        return False
    import mlx.core as mx

    return bool(mx.metal.is_available())


def cuda_available() -> bool:
    if not _installed("torch"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def select_backend(backend: str | None = None, device: str | None = None) -> tuple[str, str]:
    """Resolves (backend, device) from the user's optional choices; raises with a clear message if impossible."""
    backend = None if backend in (None, "auto") else backend
    device = None if device in (None, "auto") else device
    if backend not in (None, "torch", "mlx"):
        raise BackendUnavailableError(f"unknown backend {backend!r}; choose torch or mlx")
    if device not in (None, "cpu", "cuda", "metal"):
        raise BackendUnavailableError(f"unknown device {device!r}; choose auto, cpu, cuda or metal")

    if device == "metal":
        if backend == "torch":
            raise BackendUnavailableError("--device metal runs on the mlx backend; drop --backend torch")
        if not metal_available():
            raise BackendUnavailableError(
                "--device metal needs Apple Silicon with mlx installed (pip install 'dsocr[mlx]')"
            )
        return "mlx", "metal"
    if device == "cuda":
        if backend == "mlx":
            raise BackendUnavailableError("the mlx backend cannot use CUDA; use --backend torch")
        if not cuda_available():
            raise BackendUnavailableError(
                "--device cuda: no CUDA device is visible to torch (or torch is not installed)"
            )
        return "torch", "cuda"
    if device == "cpu":
        if backend is None:
            backend = "torch" if _installed("torch") else "mlx" if _installed("mlx") else "torch"
        return backend, "cpu"

    # device auto
    if backend == "mlx":
        return "mlx", "metal" if metal_available() else "cpu"
    if backend == "torch":
        return "torch", "cuda" if cuda_available() else "cpu"
    if metal_available():
        return "mlx", "metal"
    if cuda_available():
        return "torch", "cuda"
    if not _installed("torch") and _installed("mlx"):
        return "mlx", "cpu"
    return "torch", "cpu"
