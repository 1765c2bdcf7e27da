"""Per-token log-probabilities (OpenAI's `logprobs`/`top_logprobs`): every backend's `logprobs`/`read_logprobs`
against `common.engine.sampling.reference_logprobs` on the same logits, and the scripted fake's made-up values.

The backends' rows come from the tiny models' real logits (the text-only case's reference embeddings, then one
decode step), with tokens chosen by the backend's own `sample` under a ban and an allowed-token mask: the
log-probabilities are the raw distribution's whatever `sample` applied, and `sample` leaves the logits as they
were.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from common.engine.backend import Backend, StepControls
from common.engine.sampling import reference_logprobs
from common.model.inputs import PreparedInputs
from tests.conftest import one_torch_thread
from tests.fakes import ScriptedBackend
from tests.helpers_backend import BACKENDS, FAMILIES, loaded, prefill, to_device, to_host

CASE = "pm12_text_only"  # the cheapest prompt: text only, from its reference embeddings
# Absolute, on float32 log-probabilities. The tiny models' rows reach log-probs of about -180, where float32's
# spacing is 1.5e-5: both backends are within half of it there (the rounding of the result itself).
TOLERANCE = 1e-5
TOPS = (0, 1, 5, 20)
FORCED = 1000  # the only id the masked row allows: far from the top of these models' distributions


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    name, device = request.param
    return loaded(name, device, "deepseek-ocr")


def _rows(backend: Backend) -> tuple[Any, np.ndarray, StepControls]:
    """Logits [4, V] (device) and their host copy: the prompt's last position, the next position (after the
    greedy token), the prompt's again twice; controls: greedy, greedy, the greedy id banned, only FORCED allowed."""
    first = prefill(backend, FAMILIES["deepseek-ocr"].from_embeds(CASE))
    greedy = backend.sample(first, StepControls.greedy(1))
    second = backend.forward(1, greedy)
    logits = backend.gather(first, None, [second, first, first])
    host = to_host(logits)
    controls = StepControls.greedy(4)
    controls.ban_rows = np.array([2], np.int64)
    controls.ban_ids = np.array([int(np.argmax(host[2]))], np.int64)
    words = (backend.vocab_size + 31) // 32
    allowed = np.full((4, words), -1, dtype=np.int32)
    allowed[3] = 0
    allowed[3, FORCED // 32] = 1 << (FORCED % 32)  # bit 8 of word 31
    controls.allowed = allowed
    return logits, host, controls


def _check(backend: Backend, logits: Any, host: np.ndarray, tokens: Any, chosen_ids: np.ndarray) -> dict[int, float]:
    """Every top against the reference; the largest absolute difference per top."""
    worst: dict[int, float] = {}
    for top in TOPS:
        chosen, ids, values = backend.read_logprobs(backend.logprobs(logits, tokens, top))
        rows = host.shape[0]
        assert chosen.dtype == np.float32 and chosen.shape == (rows,)
        assert ids.dtype == np.int64 and ids.shape == (rows, top)
        assert values.dtype == np.float32 and values.shape == (rows, top)
        diff = 0.0
        for row in range(rows):
            ref_chosen, ref_ids, ref_values = reference_logprobs(host[row], int(chosen_ids[row]), top)
            assert ids[row].tolist() == ref_ids, f"row {row}, top {top}"
            diff = max(diff, abs(float(chosen[row]) - ref_chosen),
                       float(np.max(np.abs(values[row] - np.asarray(ref_values)), initial=0.0)))
            assert np.all(np.diff(values[row]) <= 0), f"row {row}, top {top}: not descending"
            if top and ids[row, 0] == chosen_ids[row]:
                assert values[row, 0] == chosen[row]  # the same number, read from the same row
        assert diff <= TOLERANCE, f"top {top}: max|diff| {diff:.2e}"
        worst[top] = diff
    return worst


def test_logprobs_match_the_reference(backend: Backend) -> None:
    logits, host, controls = _rows(backend)
    tokens = backend.sample(logits, controls)
    chosen_ids = backend.read(tokens)
    assert np.array_equal(to_host(logits), host), "sample changed the logits it was given"
    greedy = np.argmax(host, axis=-1)
    assert chosen_ids[0] == greedy[0] and chosen_ids[1] == greedy[1] and chosen_ids[3] == FORCED
    assert chosen_ids[2] != greedy[2] and len(set(chosen_ids.tolist())) == 4
    worst = _check(backend, logits, host, tokens, chosen_ids)
    # Host tokens (a forced choice, as a teacher-forced test feeds them) work the same way.
    worst_host = _check(backend, logits, host, chosen_ids[::-1].copy(), chosen_ids[::-1])
    print(f"{backend.name}: max|diff| by top {worst}, host tokens {worst_host}")
    # Asking for log-probabilities changes nothing about the token choice.
    assert np.array_equal(backend.read(backend.sample(logits, controls)), chosen_ids)


def test_top_ties_go_to_the_lower_id(backend: Backend) -> None:
    vocab = backend.vocab_size
    rng = np.random.default_rng(7)
    host = rng.uniform(-1.0, 1.0, size=(3, vocab)).astype(np.float32)
    host[0, [9, 400, 3, 70000, 12]] = 6.0  # five equal maxima, ids out of order
    host[1, 1000:1030] = 2.5  # thirty equal values straddling the top 20
    host[1, [5, 6]] = [7.0, 3.0]
    host[2] = np.round(rng.normal(size=vocab))  # a few values, each many times: a flat distribution
    host[2, 17], host[2, 4] = 0.0, -0.0  # equal, whatever the sign
    logits = to_device(backend, host)
    tokens = np.array([400, 1029, 17], np.int64)
    _check(backend, logits, host, tokens, tokens)
    _, ids, _ = backend.read_logprobs(backend.logprobs(logits, tokens, 20))
    assert ids[0, :5].tolist() == [3, 9, 12, 400, 70000]
    assert ids[1].tolist() == [5, 6, *range(1000, 1018)]


# ---- the scripted fake --------------------------------------------------------------------------------------


def test_scripted_backend_logprobs_are_as_documented() -> None:
    script = [10, 20, 30, 40, 50]
    fake = ScriptedBackend(script, eos_token_id=1, lanes=2)
    prompt = PreparedInputs(np.array([0, 5, 6], np.int64), np.zeros(3, bool), [])
    lane0 = fake.prefill(0, fake.embed_prompt(prompt, []), 0, 3)
    seen: list[tuple[float, list[int], list[float]]] = []
    logits = lane0
    for position in range(len(script) + 2):  # past the script: EOS, and the positions go on
        tokens = fake.sample(logits, StepControls.greedy(1))
        chosen, ids, values = fake.read_logprobs(fake.logprobs(logits, tokens, 3))
        expected_id = script[position] if position < len(script) else 1
        assert tokens.tolist() == [expected_id]
        assert chosen.dtype == np.float32 and ids.dtype == np.int64 and values.dtype == np.float32
        seen.append((float(chosen[0]), ids[0].tolist(), values[0].tolist()))
        assert seen[-1] == (-0.5 * (position % 3), [expected_id + j for j in range(3)],
                            [-0.5 * (position % 3) - j for j in range(3)])
        logits = fake.forward(1, tokens)
    assert [s[0] for s in seen] == [0.0, -0.5, -1.0, 0.0, -0.5, -1.0, 0.0]
    assert not np.signbit(seen[0][0])  # 0.0, not -0.0
    # A second lane at its first position, batched with lane 0; a ban moves the chosen id and the top with it.
    lane1 = fake.prefill(1, fake.embed_prompt(prompt, []), 0, 3)
    batch = fake.gather(logits, None, [lane1])
    controls = StepControls.greedy(2)
    controls.ban_rows, controls.ban_ids = np.array([1], np.int64), np.array([10], np.int64)
    tokens = fake.sample(batch, controls)
    assert tokens.tolist() == [1, 11]
    chosen, ids, values = fake.read_logprobs(fake.logprobs(batch, tokens, 2))
    assert chosen.tolist() == [-0.5 * (7 % 3), 0.0]
    assert ids.tolist() == [[1, 2], [11, 12]]
    assert values.tolist() == [[-0.5, -1.5], [0.0, -1.0]]
    chosen, ids, values = fake.read_logprobs(fake.logprobs(batch, tokens, 0))
    assert ids.shape == values.shape == (2, 0) and chosen.shape == (2,)
    # The top ids wrap around the vocabulary.
    last = np.array([fake.vocab_size - 1], np.int64)
    assert fake.read_logprobs(fake.logprobs([fake.cursors[0]], last, 2))[1].tolist() == [[fake.vocab_size - 1, 0]]
