"""oneDNN-packed weights over memory they do not own (what the prepared-layout cache maps back)."""

from __future__ import annotations

import pytest
import torch

from dsocr_torch.language import Linear
from dsocr_torch.weights.onednn import (
    mapped_packing,
    pack_linear_weight,
    packed_memory,
    packed_metadata,
    packing_fingerprint,
)

pytestmark = pytest.mark.skipif(
    not Linear.packs(torch.bfloat16, torch.device("cpu")) or mapped_packing() is None,
    reason="no oneDNN bfloat16 packing, or no mapping of packed weights, with this CPU and torch",
)


@pytest.mark.parametrize("shape", [(96, 64), (130, 72)])  # blocked and padded shapes
def test_a_packed_weight_rebuilt_over_other_memory_computes_the_same(shape: tuple[int, int]) -> None:
    mapping = mapped_packing()
    assert mapping is not None
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    packed = pack_linear_weight(weight)
    memory = packed_memory(packed).clone()  # somewhere else, as a file map would be
    rebuilt = mapping.wrap(memory, shape, torch.bfloat16, packed_metadata(packed))
    assert torch.ops.mkldnn.data_ptr(rebuilt) == memory.data_ptr()
    for rows in (1, 5, 33):
        x = torch.randn(rows, shape[1]).bfloat16()
        expected = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        assert torch.equal(torch.ops.mkldnn._linear_pointwise(x, rebuilt, None, "none", [], ""), expected)
        assert torch.allclose(expected.float(), x.float() @ weight.float().T, rtol=2e-2, atol=2e-2)


def test_the_load_check_tells_a_different_packing() -> None:
    mapping = mapped_packing()
    assert mapping is not None
    weight = torch.randn(64, 64).bfloat16()
    packed = pack_linear_weight(weight)
    memory, metadata = packed_memory(packed).clone(), packed_metadata(packed)
    assert mapping.matches(weight, memory, metadata)
    assert not mapping.matches(weight, memory, metadata[:-1] + bytes([metadata[-1] ^ 1]))
    memory[0] ^= 1
    assert not mapping.matches(weight, memory, metadata)


def test_a_wrong_size_is_refused() -> None:
    mapping = mapped_packing()
    assert mapping is not None
    packed = pack_linear_weight(torch.randn(64, 64).bfloat16())
    with pytest.raises(RuntimeError, match="another size"):
        mapping.wrap(torch.zeros(64 * 64 * 2 + 4096, dtype=torch.uint8), (64, 64), torch.bfloat16,
                     packed_metadata(packed))


def test_the_packing_fingerprint_is_stable_and_names_no_paths() -> None:
    assert packing_fingerprint() == packing_fingerprint()
    assert len(packing_fingerprint()) == 16
