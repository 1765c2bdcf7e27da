"""Cold start on the torch CPU path: memory-mapped weights, the prepared-layout cache, packing while loading."""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import CheckpointError
from dsocr_torch.language import Linear
from tests.conftest import MODEL_DIR, MODEL_FILES
from tests.helpers_backend import FAMILIES, backend_of, prefill

CACHE = ".dsocr-prepared"


@pytest.fixture
def model_dir(prepared_model_copy: Path) -> Path:
    return prepared_model_copy


def _logits(model: torch.nn.Module) -> torch.Tensor:
    """The last logits of a fixture prompt through a backend around `model` (which packs it as loading does)."""
    return prefill(backend_of(model), FAMILIES["deepseek-ocr"].from_embeds("pm07_gray_tiny"))


def _load(folder: Path, dtype: str = "float32", **kwargs: object) -> torch.nn.Module:
    from dsocr_torch.weights.loader import load_model

    return load_model(folder, device="cpu", dtype=dtype, **kwargs)


def _mapped_file(address: int) -> str | None:
    """The file /proc/self/maps names for the mapping that holds `address` (None: anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) == 6 else None
    raise AssertionError(f"address {address:#x} is not mapped")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_is_written_once_then_mapped_with_identical_results(
    model_dir: Path, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dsocr_torch.weights.prepared import PreparedCache

    reference = _logits(_load(model_dir, dtype, prepared_cache=False))
    assert not (model_dir / CACHE).exists()
    first = _logits(_load(model_dir, dtype))
    cache = model_dir / CACHE / f"{dtype}.bin"
    assert cache.is_file()
    written = cache.stat()

    def no_rewrite(self: PreparedCache) -> None:
        raise AssertionError("a valid cache was written again")

    monkeypatch.setattr(PreparedCache, "create", no_rewrite)
    second = _logits(_load(model_dir, dtype))
    assert torch.equal(first, reference)
    assert torch.equal(second, reference)
    assert (cache.stat().st_ino, cache.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    assert list((model_dir / CACHE).iterdir()) == [cache]  # no temporary file left behind


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_weights_are_views_of_the_files_not_copies(model_dir: Path) -> None:
    from dsocr_torch.moe import MoEFeedForward

    _load(model_dir, "bfloat16")  # writes the cache
    model = _load(model_dir, "bfloat16")
    checkpoint = str(model_dir / "model.safetensors")
    for weight in (model.model.embed_tokens.weight, model.model.sam_model.patch_embed.proj.weight):
        assert _mapped_file(weight.data_ptr()) == checkpoint
    moe = next(m for m in model.modules() if isinstance(m, MoEFeedForward))
    for stack in (moe.gate_up_by_input, moe.down_by_input):
        assert _mapped_file(stack.data_ptr()) == str(model_dir / CACHE / "bfloat16.bin")
    assert moe.experts[3].up_proj.weight.data_ptr() == moe.gate_up_stacked[3, moe.intermediate :].data_ptr()


def test_a_changed_checkpoint_rebuilds_the_cache(model_dir: Path) -> None:
    original = _logits(_load(model_dir))
    tensors = load_file(str(model_dir / "model.safetensors"))
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    tensors[name] = tensors[name] * 3
    save_file(tensors, str(model_dir / "model.safetensors"))
    expected = _logits(_load(model_dir, prepared_cache=False))
    assert not torch.equal(expected, original)
    assert torch.equal(_logits(_load(model_dir)), expected)
    assert torch.equal(_logits(_load(model_dir)), expected)


def test_a_damaged_cache_is_rebuilt(model_dir: Path) -> None:
    reference = _logits(_load(model_dir, prepared_cache=False))
    _load(model_dir)
    cache = model_dir / CACHE / "float32.bin"
    size = cache.stat().st_size
    with cache.open("r+b") as handle:
        handle.truncate(size // 2)
    assert torch.equal(_logits(_load(model_dir)), reference)
    assert cache.stat().st_size == size
    with cache.open("r+b") as handle:  # a header from another checkpoint
        handle.seek(40)
        handle.write(b"0000")
    assert torch.equal(_logits(_load(model_dir)), reference)


def test_no_cache_where_it_cannot_be_written_or_is_turned_off(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = _logits(_load(model_dir, prepared_cache=False))
    (model_dir / CACHE).write_text("a file where the cache folder would go")
    assert torch.equal(_logits(_load(model_dir)), reference)
    (model_dir / CACHE).unlink()
    monkeypatch.setenv("DSOCR_PREPARED_CACHE", "0")
    assert torch.equal(_logits(_load(model_dir)), reference)
    assert not (model_dir / CACHE).exists()


def test_packing_while_loading_equals_packing_after(model_dir: Path) -> None:
    from dsocr_torch.language import Linear

    if not Linear.packs(torch.bfloat16, torch.device("cpu")):
        pytest.skip("no oneDNN bfloat16 packing on this CPU")
    later = _load(model_dir, "bfloat16", prepared_cache=False)
    count = later.pack_for_cpu_decode()
    packed = _load(model_dir, "bfloat16", pack=True)
    linears = packed.decode_linears()
    assert count == len(linears) > 0
    assert all(linear.packed is not None and linear.weight.is_meta for linear in linears.values())
    assert packed.pack_for_cpu_decode() == count  # idempotent: already packed
    assert torch.equal(_logits(packed), _logits(later))


needs_packing = pytest.mark.skipif(
    not Linear.packs(torch.bfloat16, torch.device("cpu")), reason="no oneDNN bfloat16 packing on this CPU"
)


@pytest.mark.slow
@needs_packing
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_packed_weights_are_mapped_from_the_cache(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dsocr_torch.weights.onednn import mapped_packing
    from dsocr_torch.weights.prepared import PreparedCache

    if mapped_packing() is None:
        pytest.skip("this torch build cannot map packed weights")
    reference = _load(model_dir, "bfloat16", prepared_cache=False)
    reference.pack_for_cpu_decode()
    expected = _logits(reference)
    first = _load(model_dir, "bfloat16", pack=True)  # packs, writes the cache, then maps it
    monkeypatch.setattr(PreparedCache, "create", lambda *a: pytest.fail("a valid cache was written again"))
    second = _load(model_dir, "bfloat16", pack=True)
    cache = str(model_dir / CACHE / "bfloat16.bin")
    for model in (first, second):
        linears = model.decode_linears().values()
        assert linears and all(linear.weight.is_meta for linear in linears)
        assert {_mapped_file(torch.ops.mkldnn.data_ptr(linear.packed)) for linear in linears} == {cache}
        assert torch.equal(_logits(model), expected)


@pytest.mark.slow
@needs_packing
def test_packed_weights_from_another_machine_are_packed_again(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dsocr_torch.weights import loader
    from dsocr_torch.weights.onednn import MappedPacking, mapped_packing

    if mapped_packing() is None:
        pytest.skip("this torch build cannot map packed weights")
    expected = _logits(_load(model_dir, "bfloat16", pack=True, prepared_cache=False))
    _load(model_dir, "bfloat16", pack=True)
    cache = model_dir / CACHE / "bfloat16.bin"

    def rewritten(patch: tuple[object, str, object] | None = None) -> bool:
        before = cache.stat().st_ino
        with monkeypatch.context() as patched:
            if patch is not None:
                patched.setattr(*patch)
            assert torch.equal(_logits(_load(model_dir, "bfloat16", pack=True)), expected)
        return cache.stat().st_ino != before

    assert not rewritten()
    # another CPU, torch or oneDNN (the cache's key), or packing that gives other bytes (the check at load)
    assert rewritten((loader, "packing_fingerprint", lambda: "another machine"))
    assert rewritten((MappedPacking, "matches", lambda *args: False))


@needs_packing
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_without_mapped_packing_weights_are_packed_on_every_load(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dsocr_torch.weights import loader

    expected = _logits(_load(model_dir, "bfloat16", pack=True, prepared_cache=False))
    monkeypatch.setattr(loader, "mapped_packing", lambda: None)
    for _ in range(2):  # writes the cache, then reads it
        model = _load(model_dir, "bfloat16", pack=True)
        linears = model.decode_linears().values()
        places = {_mapped_file(torch.ops.mkldnn.data_ptr(linear.packed)) for linear in linears}
        assert not any(place and place.startswith(str(model_dir)) for place in places)  # heap, not a file
        assert torch.equal(_logits(model), expected)
    assert (model_dir / CACHE / "bfloat16.bin").is_file()


def test_loads_where_the_kernel_cannot_fill_page_tables(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dsocr_torch.weights import checkpoint

    reference = _logits(_load(model_dir, "bfloat16", prepared_cache=False))
    _load(model_dir, "bfloat16")  # writes the cache
    calls: list[int] = []
    monkeypatch.setattr(checkpoint, "_madvise", lambda: lambda start, length, advice: calls.append(advice) or -1)
    assert torch.equal(_logits(_load(model_dir, "bfloat16")), reference)  # maps pages in a read per page instead
    assert calls and set(calls) == {checkpoint._MADV_POPULATE_READ}


def test_progress_counts_the_bytes_of_work(model_dir: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    _load(model_dir, prepared_cache=False, progress=lambda what, done, total: calls.append((what, done, total)))
    assert calls and {what for what, _, _ in calls} == {"weights (MiB)"}
    done = [d for _, d, _ in calls]
    assert done == sorted(done)
    total = calls[-1][2]
    assert done[-1] == total == (model_dir / "model.safetensors").stat().st_size >> 20  # every tensor converted


def test_a_tensor_whose_bytes_do_not_fit_its_shape_is_named(tmp_path: Path) -> None:
    from dsocr_torch.weights.loader import load_model

    for name in MODEL_FILES:
        shutil.copy(MODEL_DIR / name, tmp_path / name)
    raw = (MODEL_DIR / "model.safetensors").read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    header["model.norm.weight"]["shape"] = [41]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (length - len(text))
    assert len(text) == length
    (tmp_path / "model.safetensors").write_bytes(raw[:8] + text + raw[8 + length :])
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has 80 bytes for shape \[41\]"):
        load_model(tmp_path, device="cpu", dtype="float32")


def test_expert_stacks_of_the_wrong_shape_are_refused() -> None:
    from common.model.config import load_config
    from dsocr_torch.moe import MoEFeedForward

    moe = MoEFeedForward(load_config(MODEL_DIR).language)
    (gate_up, down) = moe.stack_shapes()
    with pytest.raises(ValueError, match="expert stacks"):
        moe.bind_stacked_experts("cpu", torch.float32, (torch.zeros(gate_up), torch.zeros(gate_up)))
    moe.bind_stacked_experts("cpu", torch.float32, (torch.zeros(gate_up), torch.ones(down)))
    assert bool((moe.experts[0].down_proj.weight == 1).all())


def test_temporary_files_of_dead_writers_are_removed(model_dir: Path) -> None:
    folder = model_dir / CACHE
    folder.mkdir()
    dead = folder / "float32.bin.tmp-999999999"
    alive = folder / f"float32.bin.tmp-{os.getppid()}"  # another process, still running
    dead.write_bytes(b"x")
    alive.write_bytes(b"x")
    _load(model_dir)
    assert not dead.exists()
    assert alive.exists()
