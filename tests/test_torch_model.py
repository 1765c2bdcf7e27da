"""What only the torch model has: its MoE dispatch's fallbacks (the parity of both backends: test_model_parity)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import one_torch_thread
from tests.helpers_backend import FAMILIES, check_decoder, generate, loaded


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_fallback_dispatch_matches_grouped_mm(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-expert fallback (used where grouped_mm is unavailable, e.g. float32 on CUDA) gives the reference's
    prefill, and the greedy tokens decoded after it."""
    from dsocr_torch.moe import MoEFeedForward

    backend, fixtures = loaded("torch", "cpu", family), FAMILIES[family]
    for module in backend.model.modules():
        if isinstance(module, MoEFeedForward):
            monkeypatch.setattr(module, "_use_grouped_mm", False)
    case_id = max(fixtures.case_ids(), key=lambda c: fixtures.case(c).get("input_len", 0))  # the longest prompt
    check_decoder(backend, fixtures, case_id)
    ids, _ = generate(backend, fixtures.from_embeds(case_id), 8)
    assert ids == fixtures.tensors(case_id)["greedy.ids"].tolist()[:8]
