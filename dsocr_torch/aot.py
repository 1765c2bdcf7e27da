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

import contextlib
import functools
import hashlib
import inspect
import logging
import os
import pickle
import platform
import subprocess
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

MAX_COMPILE_WORKERS = 8  # each imports torch and Inductor: ~0.5 GB
EXAMPLE_ROWS = 16  # the rows of an example input whose rows are dynamic

_loaded: dict[Path, Callable[..., torch.Tensor]] = {}
_lock = threading.Lock()
_fallback_folder: Path | None = None
_told = False  # whether this process has said that it compiles kernels


def kernel_folder() -> Path:
    """Where this process's packages are kept: one folder per torch version, CPU capability (the ISA Inductor
    generates vector code for follows ATEN_CPU_CAPABILITY, which the capability reports) and CPU."""
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


Signature = list[tuple[tuple[int | None, ...], torch.dtype]]  # per input: its shape (None: any rows) and dtype


def signature(tensors: tuple[torch.Tensor, ...], rows: tuple[int, ...] = ()) -> Signature:
    """The inputs' shapes and dtypes; the inputs numbered in `rows` take any number of rows (their first
    dimension, one size shared by all of them), so one package serves every weight of that width."""
    return [(((None,) + tuple(t.shape)[1:]) if i in rows else tuple(t.shape), t.dtype) for i, t in enumerate(tensors)]


def _package_name(fn: Callable[..., torch.Tensor], fixed: tuple[Any, ...], inputs: Signature) -> str:
    source = inspect.getsource(sys.modules[fn.__module__])
    key = (source, fn.__qualname__, fixed, [(str(dtype), shape) for shape, dtype in inputs], COMPILE_SETTINGS)
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:20]
    return f"{fn.__name__}-{digest}.pt2"


def writable_folder(folder: Path) -> Path:
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


def _choice_path(choice: tuple[str, str]) -> Path:
    name, module = choice
    digest = hashlib.sha256(inspect.getsource(sys.modules[module]).encode()).hexdigest()[:20]
    return kernel_folder() / f"choice-{name}-{digest}.txt"


def remembered(choice: tuple[str, str]) -> str | None:
    """What was measured on this CPU for `choice` (a name, the module whose code it is about), or None."""
    try:
        return _choice_path(choice).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def remember(choice: tuple[str, str], value: str) -> None:
    """Keeps `value` for `choice` (see remembered) in the kernel folder, where it can be written."""
    path = _choice_path(choice)
    partial = path.with_name(f".partial-{os.getpid()}-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(value, encoding="utf-8")
        os.replace(partial, path)
    except OSError as exc:
        log.info("cannot keep a measured choice in %s (%s)", path.parent, exc)
        partial.unlink(missing_ok=True)


def _compile(fn: Callable[..., torch.Tensor], fixed: tuple[Any, ...], inputs: Signature, path: str) -> None:
    """Compiles fn(*fixed, *inputs) into the package at `path` (also run in a worker process: plain arguments)."""
    target = Path(path)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations inside export, not ours to act on
        # Export traces shapes and dtypes only: zeros stand in for the (possibly mapped, inference-mode) inputs.
        examples = tuple(torch.zeros([EXAMPLE_ROWS if d is None else d for d in shape], dtype=dtype)
                         for shape, dtype in inputs)
        rows = torch.export.Dim("rows", min=2)
        dynamic = tuple({0: rows} if shape[:1] == (None,) else None for shape, _ in inputs)
        program = torch.export.export(_Kernel(fn, fixed), examples, dynamic_shapes=(dynamic,))
        partial = target.with_name(f".partial-{os.getpid()}-{threading.get_ident()}-{target.name}")
        try:
            with torch._inductor.config.patch(COMPILE_SETTINGS):
                torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)


def compile_kernels(specs: list[tuple[Callable[..., torch.Tensor], tuple[Any, ...], Signature]]) -> None:
    """Compiles the packages of `specs` (fn, fixed, signature: as aot_kernel's) that the folder lacks, several at
    a time in worker processes (the C++ compiler is most of the time, and a first load on a machine waits for
    every kernel). Where that fails, aot_kernel compiles them one at a time."""
    folder = writable_folder(kernel_folder())
    todo: dict[Path, tuple[Callable[..., torch.Tensor], tuple[Any, ...], list[Any]]] = {}
    for fn, fixed, inputs in specs:
        path = folder / _package_name(fn, fixed, inputs)
        if not path.exists():
            todo[path] = (fn, fixed, inputs)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(len(todo), cores, MAX_COMPILE_WORKERS)
    if workers < 2:
        return
    _tell_once(folder)
    log.info("compiling %d kernels in %d processes", len(todo), workers)
    jobs = [(fn, fixed, inputs, str(path)) for path, (fn, fixed, inputs) in todo.items()]
    with contextlib.ExitStack() as stack:
        running = []
        try:
            for share in (jobs[i::workers] for i in range(workers)):
                # A plain interpreter, not multiprocessing's spawn, which imports the caller's __main__ again (a
                # script without a main guard would run again in every worker).
                errors = stack.enter_context(tempfile.TemporaryFile())
                process = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                           stdout=subprocess.DEVNULL, stderr=errors)
                running.append((process, errors))
                assert process.stdin is not None
                process.stdin.write(pickle.dumps((sys.path, pickle.dumps(share))))
                process.stdin.close()
        except Exception as exc:  # what is not compiled here is compiled by aot_kernel
            log.info("cannot start compile workers (%s: %s)", type(exc).__name__, exc)
        for process, errors in running:
            if process.wait() != 0:
                errors.seek(0)
                tail = errors.read().decode(errors="replace").strip().splitlines()[-1:]
                log.info("a compile worker failed (%s); what it left is compiled one at a time", " ".join(tail))


_WORKER = ("import pickle, sys; path, jobs = pickle.load(sys.stdin.buffer); sys.path[:0] = path; "
           "from dsocr_torch.aot import compile_jobs; compile_jobs(pickle.loads(jobs))")


def compile_jobs(jobs: list[tuple[Callable[..., torch.Tensor], tuple[Any, ...], Signature, str]]) -> None:
    """A compile worker's share (see compile_kernels)."""
    for fn, fixed, inputs, path in jobs:
        _compile(fn, fixed, inputs, path)


def _tell_once(folder: Path) -> None:
    """A first load on a machine pauses to compile (several seconds a kernel): say so, once per process."""
    global _told
    if not _told:
        _told = True
        log.warning("compiling kernels for this CPU into %s: once per machine and torch version, a few seconds "
                    "each", folder)


def aot_kernel(
    fn: Callable[..., torch.Tensor], fixed: tuple[Any, ...], inputs: Signature
) -> Callable[..., torch.Tensor]:
    """fn(*fixed, *tensors) for tensors of the `inputs` signature, compiled (once per machine) and loaded (once
    per process). Raises where it cannot be compiled (e.g. no C++ compiler)."""
    path = writable_folder(kernel_folder()) / _package_name(fn, fixed, inputs)
    with _lock:
        kernel = _loaded.get(path)
        if kernel is None:
            if not path.exists():
                _tell_once(path.parent)
                log.info("compiling %s for %s", fn.__name__, [shape for shape, _ in inputs])
                _compile(fn, fixed, inputs, str(path))
            runner = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1).run

            def kernel(*args: torch.Tensor, _run: Any = runner) -> torch.Tensor:
                return _run(list(args))[0]

            _loaded[path] = kernel
    return kernel
