"""dsocr_torch/aot.py: kernels compiled once per machine into the kernel folder, loaded by later processes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from dsocr_torch import aot


def scaled_sum(scale: float, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x.unsqueeze(0) * weight.float()).sum(-1) * scale


needs_compiler = pytest.mark.skipif(
    not any(shutil.which(name) for name in ("g++", "c++", "clang++")), reason="no C++ compiler here"
)


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(aot.KERNEL_CACHE_ENV, str(tmp_path / "kernels"))
    monkeypatch.setattr(aot, "_loaded", {})
    return aot.kernel_folder()


def test_the_folder_is_keyed_by_torch_version_cpu_capability_and_cpu(folder: Path) -> None:
    capability = torch.backends.cpu.get_cpu_capability().lower()
    assert folder.name.startswith(f"torch-{torch.__version__}-{capability}-")
    assert folder.name == aot.kernel_folder().name and len(folder.name.rsplit("-", 1)[1]) == 8


@pytest.mark.slow
@needs_compiler
def test_compiled_once_then_loaded_from_the_folder(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, weight = torch.randn(24), torch.randn(16, 24).bfloat16()
    inputs = aot.signature((x, weight), rows=(1,))  # the weight's rows are dynamic
    assert inputs == [((24,), torch.float32), ((None, 24), torch.bfloat16)]
    kernel = aot.aot_kernel(scaled_sum, (0.5,), inputs)
    for rows in (16, 3, 1000):  # one package serves every number of rows
        w = torch.randn(rows, 24).bfloat16()
        torch.testing.assert_close(kernel(x, w), scaled_sum(0.5, x, w), rtol=1e-5, atol=1e-5)
    packages = sorted(folder.glob("*.pt2"))
    assert [p.name.split("-")[0] for p in packages] == ["scaled_sum"]
    assert not list(folder.glob(".partial-*"))
    assert aot.aot_kernel(scaled_sum, (0.5,), inputs) is kernel  # loaded once per process

    # Another process (nothing loaded yet) maps the package without compiling.
    monkeypatch.setattr(aot, "_loaded", {})

    def no_compiling(*args: object) -> None:
        raise AssertionError("compiled again")

    monkeypatch.setattr(aot, "_compile", no_compiling)
    again = aot.aot_kernel(scaled_sum, (0.5,), inputs)
    other_x = torch.randn(24)
    torch.testing.assert_close(again(other_x, weight), scaled_sum(0.5, other_x, weight), rtol=1e-5, atol=1e-5)
    # Another width or fixed argument is another package.
    with pytest.raises(AssertionError, match="compiled again"):
        aot.aot_kernel(scaled_sum, (0.25,), inputs)
    with pytest.raises(AssertionError, match="compiled again"):
        aot.aot_kernel(scaled_sum, (0.5,), aot.signature((x[:8], weight[:, :8]), rows=(1,)))


@pytest.mark.slow
@needs_compiler
def test_several_kernels_are_compiled_in_worker_processes(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """compile_kernels compiles what the folder lacks in worker processes; aot_kernel then only loads."""
    if (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) < 2:
        pytest.skip("one CPU core: compile_kernels leaves the compiling to aot_kernel")
    specs = [(scaled_sum, (0.5,), aot.signature((torch.randn(width), torch.randn(4, width).bfloat16()), rows=(1,)))
             for width in (8, 12)]
    aot.compile_kernels(specs)
    assert len(list(folder.glob("*.pt2"))) == 2

    def no_compiling(*args: object) -> None:
        raise AssertionError("compiled in this process")

    monkeypatch.setattr(aot, "_compile", no_compiling)
    for width in (8, 12):
        x, w = torch.randn(width), torch.randn(5, width).bfloat16()
        kernel = aot.aot_kernel(scaled_sum, (0.5,), aot.signature((x, w), rows=(1,)))
        torch.testing.assert_close(kernel(x, w), scaled_sum(0.5, x, w), rtol=1e-5, atol=1e-5)


def test_an_unwritable_folder_compiles_into_a_temporary_one(folder: Path, monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(aot.KERNEL_CACHE_ENV, str(blocker / "kernels"))  # under a file: cannot be created
    monkeypatch.setattr(aot, "_fallback_folder", None)
    written = aot._writable(aot.kernel_folder())
    assert written.is_dir() and blocker not in written.parents
