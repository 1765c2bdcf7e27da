"""`dsocr --version`: the package's version, the backend libraries found, and the device autodetection picks."""

from __future__ import annotations

import argparse
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from common.model.device import select_backend

PACKAGE = "dsocr"


def installed_version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _torch_line() -> str:
    found = installed_version("torch")
    if found is None:
        return "torch not installed"
    try:
        import torch

        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            return (f"torch {torch.__version__} (CUDA {torch.version.cuda}, {count} device{'s' * (count != 1)}: "
                    f"{torch.cuda.get_device_name(0)})")
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
        return f"torch {torch.__version__} ({built}, no CUDA device visible)"
    except Exception as exc:  # a broken install: say so rather than fail --version
        return f"torch {found} (cannot be imported: {type(exc).__name__}: {exc})"


def _device_line() -> str:
    if installed_version("torch") is None and installed_version("mlx") is None:
        return "device: none (install a backend: pip install 'dsocr[torch]', or 'dsocr[mlx]' on a Mac)"
    try:
        backend, device = select_backend()
    except Exception as exc:
        return f"device: unknown ({type(exc).__name__}: {exc})"
    return f"device: {device} with the {backend} backend (what --device auto picks here)"


def version_report() -> str:
    """Several lines: dsocr's version, Python, each backend library (or "not installed"), the autodetected device."""
    mlx = installed_version("mlx")
    lines = [
        f"{PACKAGE} {installed_version(PACKAGE) or 'unknown (not installed: running from a checkout)'}",
        f"python {platform.python_version()} ({platform.system()} {platform.machine()})",
        _torch_line(),
        f"mlx {mlx}" if mlx else "mlx not installed",
        _device_line(),
    ]
    return "\n".join(lines)


class VersionAction(argparse._VersionAction):  # a _VersionAction, so no DSOCR_* variable is made for it
    """--version: prints version_report(), computed only when asked (it imports the frameworks)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        kwargs.setdefault("help", "print the version, the backend libraries found and the device that would be used")
        super().__init__(option_strings, dest=dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(version_report(), flush=True)
        parser.exit()
