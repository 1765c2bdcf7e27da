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
def test_compiled_once_in_workers_then_loaded_from_the_folder(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """compile_kernels compiles what the folder lacks in worker processes (where there are 2+ cores); aot_kernel
    then loads each package (once per process), whose rows are dynamic; another process loads without compiling."""
    x, weight = torch.randn(24), torch.randn(16, 24).bfloat16()
    inputs = aot.signature((x, weight), rows=(1,))  # the weight's rows are dynamic
    assert inputs == [((24,), torch.float32), ((None, 24), torch.bfloat16)]
    x8, w8 = x[:8], weight[:, :8].contiguous()  # a package's inputs are contiguous (the kernels' callers see to it)
    narrow = aot.signature((x8, w8), rows=(1,))
    aot.compile_kernels([(scaled_sum, (0.5,), inputs), (scaled_sum, (0.5,), narrow)])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cores >= 2:
        assert len(list(folder.glob("*.pt2"))) == 2  # by the workers

        def no_compiling(*args: object) -> None:
            raise AssertionError("compiled in this process")

        monkeypatch.setattr(aot, "_compile", no_compiling)
    kernel = aot.aot_kernel(scaled_sum, (0.5,), inputs)
    for rows in (16, 3, 1000):  # one package serves every number of rows
        w = torch.randn(rows, 24).bfloat16()
        torch.testing.assert_close(kernel(x, w), scaled_sum(0.5, x, w), rtol=1e-5, atol=1e-5)
    narrow_kernel = aot.aot_kernel(scaled_sum, (0.5,), narrow)
    torch.testing.assert_close(narrow_kernel(x8, w8), scaled_sum(0.5, x8, w8), rtol=1e-5, atol=1e-5)
    assert sorted(p.name.split("-")[0] for p in folder.glob("*.pt2")) == ["scaled_sum", "scaled_sum"]
    assert not list(folder.glob(".partial-*"))
    assert aot.aot_kernel(scaled_sum, (0.5,), inputs) is kernel  # loaded once per process

    # Another process (nothing loaded yet) maps the package without compiling.
    monkeypatch.setattr(aot, "_loaded", {})

    def compiled_again(*args: object) -> None:
        raise AssertionError("compiled again")

    monkeypatch.setattr(aot, "_compile", compiled_again)
    other_x = torch.randn(24)
    again = aot.aot_kernel(scaled_sum, (0.5,), inputs)
    torch.testing.assert_close(again(other_x, weight), scaled_sum(0.5, other_x, weight), rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError, match="compiled again"):  # another fixed argument is another package
        aot.aot_kernel(scaled_sum, (0.25,), inputs)


def test_an_unwritable_folder_compiles_into_a_temporary_one(folder: Path, monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(aot.KERNEL_CACHE_ENV, str(blocker / "kernels"))  # under a file: cannot be created
    monkeypatch.setattr(aot, "_fallback_folder", None)
    written = aot.writable_folder(aot.kernel_folder())
    assert written.is_dir() and blocker not in written.parents


def test_a_measured_choice_is_kept_in_the_folder(folder: Path) -> None:
    """What a load measured (e.g. the faster int8 form) is read back by later loads on this CPU; a changed source
    of the module it is about is another choice."""
    choice = ("example", __name__)
    assert aot.remembered(choice) is None
    aot.remember(choice, "words")
    assert aot.remembered(choice) == "words"
    assert aot.remembered(("example", "dsocr_torch.aot")) is None
    assert not [path for path in folder.iterdir() if path.name.startswith(".partial")]
