"""dsocr_torch/native.py: the C row products and a token's experts against the eager reference, built once into the
kernel folder, and refused cleanly where they cannot be built."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from dsocr_torch import aot, native
from dsocr_torch.weight_only import ROW_KERNELS, _experts, quantize_int8, row_product_reference

needs_native = pytest.mark.skipif(native.library() is None, reason="no AVX2 or no C compiler: Inductor's kernels serve")


Stored = tuple[torch.Tensor, torch.Tensor | None]


def stored(storage: str, shape: tuple[int, ...], generator: torch.Generator) -> Stored:
    weight = torch.randn(*shape, generator=generator)
    return quantize_int8(weight) if storage == "int8" else (weight.bfloat16(), None)


@needs_native
@pytest.mark.parametrize("storage", ["int8", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 8), (17, 31), (9, 32), (40, 100), (1200, 300)])
def test_row_product_equals_the_reference(storage: str, shape: tuple[int, int]) -> None:
    """Widths below, at and past the kernel's 8- and 32-wide steps (the scalar tail too); enough rows to use every
    thread; float32 summation order apart."""
    generator = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    weight, scales = stored(storage, shape, generator)
    x = torch.randn(shape[1], generator=generator)
    want = row_product_reference(x, weight, scales)
    got = native.row_product(x, weight, scales)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@needs_native
@pytest.mark.parametrize("storage", ["int8", "bf16"])
def test_a_tokens_experts_in_one_call_equal_the_reference(storage: str) -> None:
    """Routed experts from anywhere in the stacks (the last one too), a width with a tail, against SwiGLU per
    expert summed with the router's weights."""
    generator = torch.Generator().manual_seed(7)
    experts, inter, hidden, k = 9, 20, 44, 4
    gate_up, gate_up_scales = stored(storage, (experts, 2 * inter, hidden), generator)
    down, down_scales = stored(storage, (experts, hidden, inter), generator)
    x, routing = torch.randn(hidden, generator=generator), torch.rand(k, generator=generator)
    ids = torch.tensor([8, 0, 3, 5])
    per_expert = [(gate_up[e], None if gate_up_scales is None else gate_up_scales[e], down[e],
                   None if down_scales is None else down_scales[e]) for e in ids.tolist()]
    want = _experts("plain" if gate_up_scales is None else "plain_scaled", inter, x, routing, per_expert)
    got = native.experts(x, ids, routing, gate_up, gate_up_scales, down, down_scales)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert ROW_KERNELS._native_experts((gate_up, gate_up_scales, down, down_scales), k)  # the load's check agrees


@needs_native
def test_built_once_into_the_kernel_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(aot.KERNEL_CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(native, "library", native.library.__wrapped__)  # not this process's cached one
    assert native.library() is not None
    built = list(aot.kernel_folder().glob("decode_step-*.so"))
    assert len(built) == 1

    def no_building(path: Path) -> None:
        raise AssertionError("built again")

    monkeypatch.setattr(native, "_build", no_building)
    assert native.library() is not None  # loaded from the folder


def test_without_a_compiler_it_is_refused_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(aot.KERNEL_CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native, "_cpu_has_avx2_fma", lambda: True)
    with caplog.at_level(logging.WARNING, logger="dsocr_torch.native"):
        assert native.library.__wrapped__() is None
    assert "cannot be built" in caplog.text
    assert not list(aot.kernel_folder().glob("*decode_step*"))  # nothing half-written left behind


@needs_native
@pytest.mark.parametrize(("lanes", "heads", "kv_heads", "dim"), [(1, 10, 10, 128), (3, 4, 2, 20), (2, 6, 1, 7)])
def test_decode_attention_equals_sdpa_over_each_lanes_filled_keys(lanes: int, heads: int, kv_heads: int,
                                                                   dim: int) -> None:
    """Lanes of different lengths in a cache wider than any (capacity 64, read up to kv_length), grouped query
    heads, a head size with a tail; against torch's attention over each lane's own keys."""
    generator = torch.Generator().manual_seed(lanes * 100 + heads)
    cache_keys = torch.randn(lanes + 1, kv_heads, 64, dim, generator=generator)  # one lane more than used
    cache_values = torch.randn(lanes + 1, kv_heads, 64, dim, generator=generator)
    q = torch.randn(lanes, heads, 1, dim, generator=generator)
    lengths = torch.tensor([40, 1, 17][:lanes])
    assert native.decode_attention_serves(cache_keys)
    got = native.decode_attention(q, cache_keys, cache_values, lengths, kv_length=40)
    for lane, length in enumerate(lengths.tolist()):
        want = torch.nn.functional.scaled_dot_product_attention(
            q[lane : lane + 1], cache_keys[lane : lane + 1, :, :length], cache_values[lane : lane + 1, :, :length],
            enable_gqa=heads != kv_heads)
        torch.testing.assert_close(got[lane : lane + 1], want, rtol=1e-5, atol=1e-5)
    assert not native.decode_attention_serves(cache_keys.bfloat16())
    assert not native.decode_attention_serves(cache_keys.transpose(2, 3))
