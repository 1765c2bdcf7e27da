"""Process memory helpers (common/memory.py)."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest

from common.memory import collector_paused, memory_limit_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize("mib", [24, 96])  # below and above the largest threshold glibc's mappings can be given
def test_freed_heap_is_reused_instead_of_faulting_in_new_memory(mib: int) -> None:
    # A fresh process each: the allocator's state is per process. Default glibc unmaps a freed block this
    # large, so the second one faults in new pages; after keep_freed_heap the heap hands the same pages back.
    script = (
        "import resource, sys, numpy as np\n"
        "from common.memory import keep_freed_heap\n"
        "if sys.argv[1] == 'keep': assert keep_freed_heap()\n"
        "counts = []\n"
        "for _ in range(3):\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    block = np.ones(int(sys.argv[2]) << 20, dtype=np.uint8)\n"
        "    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "    del block\n"
        "print(counts[1], counts[2])\n"
    )

    def later_faults(mode: str) -> list[int]:
        done = subprocess.run([sys.executable, "-c", script, mode, str(mib)], capture_output=True, text=True,
                              check=True, cwd=str(Path(__file__).resolve().parent.parent))
        return [int(x) for x in done.stdout.split()]

    assert max(later_faults("keep")) <= 16
    assert later_faults("default")[0] > mib * 4  # the same allocation faults without it


def test_the_collector_is_paused_inside_and_restored_after() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()


def test_memory_limit_is_the_containers_where_a_cgroup_caps_it(tmp_path: Path) -> None:
    machine = memory_limit_bytes(tmp_path)  # no cgroup files: the machine's memory
    assert machine > 0
    (tmp_path / "memory.max").write_text("max\n")  # cgroup v2, unlimited
    assert memory_limit_bytes(tmp_path) == machine
    (tmp_path / "memory.max").write_text(f"{1 << 30}\n")  # a 1 GiB container
    assert memory_limit_bytes(tmp_path) == 1 << 30
    (tmp_path / "memory.max").unlink()
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{1 << 62}\n")  # cgroup v1, unlimited
    assert memory_limit_bytes(tmp_path) == machine
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{2 << 30}\n")
    assert memory_limit_bytes(tmp_path) == 2 << 30
