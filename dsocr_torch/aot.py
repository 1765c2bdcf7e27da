"""Kernels compiled ahead of time by AOTInductor, kept on disk, and loaded with its C++ package loader.

torch.compile would give the same code, but each process pays for it at load (importing Dynamo and Inductor,
tracing every kernel again, fetching it from Inductor's cache: seconds), and each call pays Dynamo's guards
(tens of microseconds; a decode step makes hundreds of calls). A compiled package is loaded in milliseconds
and called through the package loader's C++ runner.

Packages live in a folder per torch version, CPU capability and CPU (`DSOCR_KERNEL_CACHE`, else
~/.cache/dsocr/kernels), named by the kernel, its fixed arguments, its inputs' dtypes and shapes, and the source
of the module that defines it, so a changed kernel is compiled again. A package is written to a temporary
name and renamed, so concurrent processes never load half a file.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import platform
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

KERNEL_CACHE_ENV = "DSOCR_KERNEL_CACHE"

# Inductor settings the packages are compiled with (part of their names). Contracting a multiply and an add into
# one FMA is what lets the int8 row product keep up with memory on AVX2; results move by float rounding only, and
# every kernel is checked against the eager reference at load.
COMPILE_SETTINGS = {"cpp.enable_floating_point_contract_flag": "fast"}

_loaded: dict[Path, Callable[..., torch.Tensor]] = {}
_lock = threading.Lock()
_fallback_folder: Path | None = None
_told = False  # whether this process has said that it compiles kernels


def kernel_folder() -> Path:
    """Where this process's packages are kept: one folder per torch version and CPU capability (the ISA
    Inductor generates code for follows ATEN_CPU_CAPABILITY, which the capability reports)."""
    root = os.environ.get(KERNEL_CACHE_ENV)
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsocr" / "kernels")
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return Path(root).expanduser() / f"torch-{torch.__version__}-{capability}-{_cpu_fingerprint()}"


@functools.cache
def _cpu_fingerprint() -> str:
    """The CPU's model and instruction-set flags, hashed: Inductor compiles with -march=native, so a package
    from another CPU (a home folder shared between machines) could use instructions this one lacks."""
    description = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            description += "".join(sorted({line for line in cpuinfo if line.startswith(("model name", "flags"))}))
    except OSError:
        pass
    return hashlib.sha256(description.encode()).hexdigest()[:8]


class _Kernel(nn.Module):
    """fn(*fixed, *tensors) as a module torch.export can trace (the fixed arguments are Python values)."""

    def __init__(self, fn: Callable[..., torch.Tensor], fixed: tuple[Any, ...]) -> None:
        super().__init__()
        self.fn, self.fixed = fn, fixed

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.fn(*self.fixed, *tensors)


def _package_name(fn: Callable[..., torch.Tensor], fixed: tuple[Any, ...], tensors: tuple[torch.Tensor, ...]) -> str:
    source = inspect.getsource(sys.modules[fn.__module__])
    inputs = [(str(t.dtype), tuple(t.shape)) for t in tensors]
    key = (source, fn.__qualname__, fixed, inputs, COMPILE_SETTINGS)
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:20]
    return f"{fn.__name__}-{digest}.pt2"


def _writable(folder: Path) -> Path:
    """`folder`, created; a temporary folder for this process where it cannot be written."""
    global _fallback_folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return folder
    except OSError as exc:
        if _fallback_folder is None:
            _fallback_folder = Path(tempfile.mkdtemp(prefix="dsocr-kernels-"))
            log.warning("cannot write compiled kernels to %s (%s); compiling them into %s for this run only",
                        folder, exc, _fallback_folder)
        return _fallback_folder


def _compile(module: _Kernel, tensors: tuple[torch.Tensor, ...], path: Path) -> None:
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations inside export, not ours to act on
        # Export traces shapes and dtypes only: zeros stand in for the (possibly mapped, inference-mode) inputs.
        examples = tuple(torch.zeros(t.shape, dtype=t.dtype) for t in tensors)
        program = torch.export.export(module, examples)
        partial = path.with_name(f".partial-{os.getpid()}-{threading.get_ident()}-{path.name}")
        try:
            with torch._inductor.config.patch(COMPILE_SETTINGS):
                torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


def _tell_once(folder: Path) -> None:
    """A first load on a machine pauses to compile (several seconds a kernel): say so, once per process."""
    global _told
    if not _told:
        _told = True
        log.warning("compiling kernels for this CPU into %s: once per machine and torch version, a few seconds "
                    "each", folder)


def aot_kernel(
    fn: Callable[..., torch.Tensor], fixed: tuple[Any, ...], tensors: tuple[torch.Tensor, ...]
) -> Callable[..., torch.Tensor]:
    """fn(*fixed, *tensors') for tensors' of the dtypes and shapes of `tensors`, compiled (once per machine) and
    loaded (once per process). Raises where it cannot be compiled (e.g. no C++ compiler)."""
    path = _writable(kernel_folder()) / _package_name(fn, fixed, tensors)
    with _lock:
        kernel = _loaded.get(path)
        if kernel is None:
            if not path.exists():
                _tell_once(path.parent)
                log.info("compiling %s for %s", fn.__name__, [list(t.shape) for t in tensors])
                _compile(_Kernel(fn, fixed), tensors, path)
            runner = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1).run

            def kernel(*args: torch.Tensor, _run: Any = runner) -> torch.Tensor:
                return _run(list(args))[0]

            _loaded[path] = kernel
    return kernel
