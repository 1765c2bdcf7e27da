"""Process memory helpers (common/memory.py)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.memory import collector_paused


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


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True,
                          cwd=str(Path(__file__).resolve().parent.parent))
    return done.stdout


_FAULTS = "import resource\ndef faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_prefaulted_heap_serves_the_next_allocation_without_faults() -> None:
    script = _FAULTS + (
        "import sys, numpy as np\n"
        "from common.memory import keep_freed_heap, prefault_heap\n"
        "assert keep_freed_heap()\n"
        "if sys.argv[1] == 'prefault':\n"
        "    thread = prefault_heap(64 << 20)\n"
        "    thread.join()\n"
        "before = faults()\n"
        "block = np.ones(48 << 20, dtype=np.uint8)\n"
        "print(faults() - before)\n"
    )
    assert int(_run(script, "prefault")) <= 64
    assert int(_run(script, "none")) > 48 * 4  # the block is new memory without it (a fault maps 4 KiB or more)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_the_first_page_heap_is_recorded_and_faulted_in_by_the_next_process(tmp_path: Path) -> None:
    # A "page" allocates and frees 64 MiB; the first process records it, the next one finds it faulted in.
    record = tmp_path / "heap.json"
    script = _FAULTS + (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from common.memory import HeapWarmup, keep_freed_heap\n"
        "assert keep_freed_heap()\n"
        "warmup = HeapWarmup(Path(sys.argv[1]))\n"
        "warmup.ready()\n"
        "before = faults()\n"
        "block = np.ones(64 << 20, dtype=np.uint8)\n"
        "print(faults() - before)\n"
        "del block\n"
        "warmup.note()\n"
    )
    first = int(_run(script, str(record)))
    recorded = json.loads(record.read_text())["page_heap_bytes"]
    assert first > 64 * 4 and recorded >= 64 << 20
    assert int(_run(script, str(record))) <= 64
    assert json.loads(record.read_text())["page_heap_bytes"] == recorded  # a need already recorded: no rewrite


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_corrupt_or_unwritable_record_loses_nothing(tmp_path: Path) -> None:
    record = tmp_path / "heap.json"
    record.write_text("{not json")
    script = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from common.memory import HeapWarmup, keep_freed_heap\n"
        "assert keep_freed_heap()\n"
        "for path in sys.argv[1:]:\n"
        "    warmup = HeapWarmup(Path(path))\n"
        "    warmup.ready()\n"
        "    block = np.ones(32 << 20, dtype=np.uint8)\n"
        "    del block\n"
        "    warmup.note()\n"
    )
    _run(script, str(record), str(tmp_path / "missing" / "heap.json"))  # exits 0: nothing raised
    assert json.loads(record.read_text())["page_heap_bytes"] >= 32 << 20  # recorded over the corrupt file
    assert [p.name for p in tmp_path.iterdir()] == ["heap.json"]  # no folder made, no temporary left behind
