"""What only the torch model has: its MoE prompt-chunk dispatches (the parity of both backends: test_model_parity)."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from tests.conftest import one_torch_thread
from tests.helpers_backend import FAMILIES, check_decoder, generate, loaded


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.mark.parametrize("dispatch", ["onednn", "grouped_mm", "matmul_per_expert"])
@pytest.mark.parametrize("family", FAMILIES)
def test_moe_prefill_dispatch_matches_the_reference(family: str, dispatch: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Each prompt-chunk dispatch (oneDNN per expert: the CPU's; grouped_mm; a matmul per expert where grouped_mm
    is unavailable, e.g. float32 on CUDA) gives the reference's prefill, and the greedy tokens decoded after it."""
    from dsocr_torch import moe
    from dsocr_torch.weights import onednn

    backend, fixtures = loaded("torch", "cpu", family), FAMILIES[family]
    calls = {"onednn": 0, "grouped_mm": 0}
    linear, grouped_mm = onednn.linear, moe.F.grouped_mm

    def counted_linear(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["onednn"] += 1
        return linear(*args, **kwargs)

    def counted_grouped_mm(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["grouped_mm"] += 1
        return grouped_mm(*args, **kwargs)

    # moe's own view of onednn (the decoder's Linear layers keep theirs)
    fast = onednn.linear_is_fast if dispatch == "onednn" else (lambda dtype: False)
    monkeypatch.setattr(moe, "onednn", SimpleNamespace(linear=counted_linear, linear_is_fast=fast))
    monkeypatch.setattr(moe.F, "grouped_mm", counted_grouped_mm)
    for module in backend.model.modules():
        if isinstance(module, moe.MoEFeedForward):
            monkeypatch.setattr(module, "_use_grouped_mm", dispatch == "grouped_mm")
    case_id = max(fixtures.case_ids(), key=lambda c: fixtures.case(c).get("input_len", 0))  # the longest prompt
    check_decoder(backend, fixtures, case_id)
    ids, _ = generate(backend, fixtures.from_embeds(case_id), 8)
    assert ids == fixtures.tensors(case_id)["greedy.ids"].tolist()[:8]
    assert (calls["onednn"] > 0) == (dispatch == "onednn")
    assert (calls["grouped_mm"] > 0) == (dispatch == "grouped_mm")
