"""common.engine.core: continuous batching, admission and everything per sequence, on a scripted backend.

Each request's script is derived from its prompt, so a sequence that received another lane's tokens (a lane
mix-up when sequences join, leave or move) produces the wrong text and fails the comparison. The core runs on
its own thread; `core.paused()` queues several requests before any of them starts, where a test needs that.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from common.engine.core import EngineCore, EngineUnavailableError
from common.engine.requests import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, RequestHandle
from common.engine.sampling import SamplingParams
from common.engine.scheduler import QueueFullError
from common.engine.sequence import BACKGROUND, INTERACTIVE
from common.errors import InputError
from common.model.inputs import ImageInput, PreparedInputs
from common.model.tokenizer import Tokenizer
from tests.conftest import fixture_tokenizer
from tests.fakes import ScriptedBackend


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return fixture_tokenizer()


def words(n: int, tag: int) -> list[int]:
    """A script of n distinct-looking ids tagged by the request (ids 1000 + 37 * tag + k)."""
    return [1000 + (37 * tag + k) % 5000 for k in range(n)]


def prompt(tag: int, length: int = 5, images: int = 0, tiles: int = 0) -> PreparedInputs:
    ids = np.array([0] + [tag] * (length - 1), dtype=np.int64)
    local = np.zeros((tiles, 3, 4, 4), np.float32) if tiles else None
    view = ImageInput(np.zeros((3, 4, 4), np.float32), local, (tiles, 1) if tiles else (1, 1))
    rows = np.arange(length, dtype=np.int64) if images else None
    return PreparedInputs(ids, np.zeros_like(ids, dtype=bool), [view] * images, embedding_rows=rows)


def script_from_prompt(lengths: dict[int, int]) -> Any:
    return lambda inputs: words(lengths.get(int(inputs.input_ids[1]), 20), int(inputs.input_ids[1]))


@pytest.fixture
def make_core(tokenizer: Tokenizer) -> Iterator[Any]:
    cores: list[EngineCore] = []

    def make(lengths: dict[int, int] | None = None, backend: ScriptedBackend | None = None,
             **kwargs: Any) -> tuple[EngineCore, ScriptedBackend]:
        core_kwargs = {k: kwargs.pop(k) for k in ("max_batch", "max_waiting", "max_waiting_bytes") if k in kwargs}
        backend = backend or ScriptedBackend(script_from_prompt(lengths or {}), tokenizer.eos_id, **kwargs)
        core = EngineCore(lambda: backend, tokenizer, **core_kwargs).start()
        core.wait_ready()
        cores.append(core)
        return core, backend

    yield make
    for core in cores:
        core.close()


def greedy(n: int | None, **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, no_repeat_ngram_size=0, **kwargs)


def test_batched_sequences_each_get_their_own_tokens(make_core: Any, tokenizer: Tokenizer) -> None:
    lengths = {tag: 3 + 4 * tag for tag in range(1, 7)}
    core, backend = make_core(lengths)
    with core.paused():
        handles = {tag: core.submit(prompt(tag), greedy(100)) for tag in lengths}
    for tag, handle in handles.items():
        result = handle.run()
        assert result.token_ids == words(lengths[tag], tag) + [tokenizer.eos_id]
        assert result.finish_reason == FINISH_STOP
        assert result.text == tokenizer.decode(words(lengths[tag], tag))
    assert max(backend.batch_sizes) == 6  # all six decoded together
    assert 1 in backend.batch_sizes  # ...and the longest alone at the end: finished lanes left at once


def test_max_batch_bounds_the_decode_batch_and_queues_the_rest(make_core: Any) -> None:
    lengths = {tag: 10 for tag in range(1, 8)}
    core, backend = make_core(lengths, max_batch=3)
    with core.paused():
        handles = [core.submit(prompt(tag), greedy(100)) for tag in lengths]
    for tag, handle in zip(lengths, handles, strict=True):
        assert handle.run().token_ids[:-1] == words(10, tag)
    assert max(backend.batch_sizes) == 3
    assert backend.lanes == 8 and core.max_batch == 3


def test_joining_mid_flight_and_lane_moves_keep_sequences_apart(make_core: Any) -> None:
    lengths = {1: 40, 2: 5, 3: 30, 4: 12, 5: 25}
    core, backend = make_core(lengths, step_s=0.002)
    first = [core.submit(prompt(tag), greedy(100)) for tag in (1, 2, 3)]
    assert first[1].wait(10) and not first[0].done  # the short one ended, its lane refilled by the last
    late = [core.submit(prompt(tag), greedy(100)) for tag in (4, 5)]
    for tag, handle in zip((1, 2, 3, 4, 5), first + late, strict=True):
        assert handle.run().token_ids[:-1] == words(lengths[tag], tag), tag


def test_cancel_mid_flight_leaves_the_others_unaffected(make_core: Any) -> None:
    lengths = {1: 300, 2: 300, 3: 300}
    core, backend = make_core(lengths, step_s=0.002)
    with core.paused():
        handles = [core.submit(prompt(tag), greedy(None)) for tag in lengths]
    while backend.steps < 6:
        time.sleep(0.001)
    with core.paused():  # between two iterations
        steps = backend.steps
        handles[1].cancel()
    assert handles[1].wait(5)
    result = handles[1].result
    assert result is not None and result.finish_reason == FINISH_CANCELLED
    assert backend.steps <= steps + 1  # it ended at the core's next look
    assert result.token_ids == words(300, 2)[: len(result.token_ids)]
    for tag in (1, 3):
        assert handles[tag - 1].run().token_ids[:-1] == words(300, tag)
    assert max(backend.batch_sizes[steps + 1 :]) == 2  # its lane was freed


def test_cancel_while_waiting_is_immediate_and_while_prefilling_is_prompt(make_core: Any) -> None:
    core, backend = make_core({1: 20, 2: 20, 3: 20}, max_batch=1, prefill_s=0.2)
    running = core.submit(prompt(1, images=1, tiles=3), greedy(100))
    queued = core.submit(prompt(2), greedy(100))
    queued.cancel()  # from this thread, without waiting for the core
    assert queued.done and queued.result is not None and queued.result.finish_reason == FINISH_CANCELLED
    assert queued.result.completion_tokens == 0
    running.cancel()
    assert running.run().finish_reason == FINISH_CANCELLED
    assert backend.requests <= 1  # the queued one never started
    assert core.submit(prompt(3), greedy(100)).run().token_ids[:-1] == words(20, 3)


def test_a_long_prompt_stalls_running_sequences_one_unit_at_a_time(make_core: Any) -> None:
    core, backend = make_core({1: 60, 2: 10}, step_s=0.002)
    running = core.submit(prompt(1), greedy(100))
    while backend.steps < 2:
        time.sleep(0.001)
    joining = core.submit(prompt(2, images=1, tiles=5), greedy(100))  # 6 views + embed + 1 chunk
    running.run()
    joining.run()
    events = backend.events
    first = events.index("prefill", 1)
    assert events[first:].count("step") >= 5  # decode steps ran between the joiner's units
    assert backend.prefill_units == 2 + 2  # each prompt: embed + one chunk (views are counted apart)


def test_stop_strings_finish_and_are_never_streamed(make_core: Any, tokenizer: Tokenizer) -> None:
    text_ids = tokenizer.encode("alpha beta</table> gamma delta")
    core, backend = make_core(backend=ScriptedBackend(text_ids, tokenizer.eos_id))
    handle = core.submit(prompt(1), greedy(100, stop=("</table>", "zzz")))
    assert "".join(handle) == "alpha beta"
    assert handle.result is not None and handle.result.finish_reason == FINISH_STOP
    assert handle.result.text == "alpha beta"
    assert backend.steps < len(text_ids) - 2  # nothing ran after the stop string


def test_eos_unicode_and_usage(make_core: Any, tokenizer: Tokenizer) -> None:
    text = "你好，世界！ Invoice 🧾 total: 12.50"
    ids = tokenizer.encode(text) + [tokenizer.eos_id]
    core, _ = make_core(backend=ScriptedBackend(ids, tokenizer.eos_id))
    handle = core.submit(prompt(1, length=7), greedy(100))
    deltas = list(handle)
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)
    result = handle.result
    assert result is not None and result.finish_reason == FINISH_STOP and result.token_ids == ids
    assert (result.prompt_tokens, result.completion_tokens, result.image_tokens) == (7, len(ids), 0)


def test_the_token_budget_is_fitted_once_to_the_lane(make_core: Any) -> None:
    core, _ = make_core({1: 50}, lane_capacity=20)
    result = core.submit(prompt(1), greedy(8)).run()
    assert result.finish_reason == FINISH_LENGTH and result.token_ids == words(50, 1)[:8]
    # No max_new_tokens: as many as the lane holds (20 positions: 5 prompt + 15 new).
    default = core.submit(prompt(1, length=5), greedy(None)).run()
    assert default.finish_reason == FINISH_LENGTH and default.completion_tokens == 15
    # An explicit budget that does not fit is refused, never shortened.
    with pytest.raises(InputError, match=r"plus max_tokens \(16\) exceeds .* of 20 tokens; ask for at most 15") as err:
        core.submit(prompt(1, length=5), greedy(16))
    assert err.value.param == "max_tokens"
    with pytest.raises(InputError, match="the prompt is 20 tokens"):
        core.submit(prompt(1, length=20), greedy(None))


def test_ngram_bans_reach_the_backend_per_lane(make_core: Any, tokenizer: Tokenizer) -> None:
    repeating = [1000, 1001, 1000, 1001, 1000, 1001, 1000, 1001]
    backend = ScriptedBackend(lambda inputs: repeating if inputs.input_ids[1] == 1 else words(8, 2), tokenizer.eos_id)
    core, _ = make_core(backend=backend)
    with core.paused():
        guarded = core.submit(prompt(1), SamplingParams(max_new_tokens=8, no_repeat_ngram_size=2))
        free = core.submit(prompt(2), SamplingParams(max_new_tokens=8, no_repeat_ngram_size=2))
    ids = guarded.run().token_ids
    pairs = list(zip(ids, ids[1:], strict=False))
    assert len(pairs) == len(set(pairs))  # no bigram repeats (the fake moves off a banned id)
    assert ids[:3] == repeating[:3] and ids != repeating
    assert free.run().token_ids == words(8, 2)


def test_interactive_requests_are_admitted_before_background_ones(make_core: Any) -> None:
    core, _ = make_core({1: 3, 2: 3, 3: 3}, max_batch=1)
    order: list[int] = []
    with core.paused():
        for tag, priority in ((1, BACKGROUND), (2, BACKGROUND), (3, INTERACTIVE)):
            handle = core.submit(prompt(tag), greedy(10), priority=priority)
            handle.add_done_callback(lambda _, tag=tag: order.append(tag))
    while len(order) < 3:
        time.sleep(0.01)
    assert order == [3, 1, 2]


def test_many_reader_threads(make_core: Any, tokenizer: Tokenizer) -> None:
    lengths = {tag: 15 for tag in range(1, 5)}
    core, backend = make_core(lengths, step_s=0.002)
    with core.paused():
        handles = [core.submit(prompt(tag), greedy(100)) for tag in lengths]
    texts: dict[int, str] = {}
    readers = [threading.Thread(target=lambda tag=tag: texts.__setitem__(tag, "".join(handles[tag - 1])))
               for tag in lengths]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(30)
    assert texts == {tag: tokenizer.decode(words(15, tag)) for tag in lengths}
    assert max(backend.batch_sizes) > 1


def test_an_event_loop_reads_text_in_coalesced_pieces_with_keepalives(make_core: Any, tokenizer: Tokenizer) -> None:
    core, backend = make_core({1: 40}, step_s=0.01, prefill_s=0.3)

    async def read() -> list[str | None]:
        handle = core.submit(prompt(1), greedy(100))
        pieces: list[str | None] = []
        async for delta in handle.stream(idle_s=0.05):
            pieces.append(None if delta is None else delta.text)
            await asyncio.sleep(0.03)  # a slow reader: what arrives meanwhile comes in one piece
        return pieces

    pieces = asyncio.run(read())
    assert None in pieces[:4]  # keep-alives while the prompt went in
    text = [p for p in pieces if p is not None]
    assert "".join(text) == tokenizer.decode(words(40, 1))
    assert len(text) < 40  # fewer wake-ups than tokens


def test_closing_the_core_cancels_what_runs_and_refuses_more(make_core: Any) -> None:
    core, backend = make_core({1: 5000}, step_s=0.001)
    handle = core.submit(prompt(1), greedy(None))
    waiting = core.submit(prompt(1), greedy(None))
    time.sleep(0.05)
    core.close()
    assert handle.wait(5) and handle.result is not None and handle.result.finish_reason == FINISH_CANCELLED
    assert waiting.wait(5) and waiting.result is not None and waiting.result.finish_reason == FINISH_CANCELLED
    assert backend.closed
    with pytest.raises(EngineUnavailableError):
        core.submit(prompt(1), greedy(5))


def test_a_failing_prompt_fails_alone(make_core: Any, tokenizer: Tokenizer) -> None:
    class Flaky(ScriptedBackend):
        def embed_prompt(self, inputs: PreparedInputs, views: Any, trace: Any = None) -> Any:
            if inputs.input_ids[1] == 2:
                raise InputError("this prompt is broken")
            return super().embed_prompt(inputs, views, trace)

    core, _ = make_core(backend=Flaky(script_from_prompt({}), tokenizer.eos_id))
    with core.paused():
        good = core.submit(prompt(1), greedy(10))
        bad = core.submit(prompt(2), greedy(10))
    with pytest.raises(InputError, match="broken"):
        bad.run()
    assert good.run().completion_tokens == 10


def test_an_interrupt_inside_the_backend_reaches_every_reader(make_core: Any, tokenizer: Tokenizer) -> None:
    core, _ = make_core(backend=ScriptedBackend(words(50, 1), tokenizer.eos_id, interrupt_on=2, step_s=0.002))
    first = core.submit(prompt(1), greedy(None))
    second = core.submit(prompt(2), greedy(None))
    with pytest.raises(KeyboardInterrupt):
        second.run()
    assert first.wait(5) and isinstance(first.error, KeyboardInterrupt)
    assert core.state == "closed"


def test_closing_an_iterator_early_cancels_and_sets_the_result(make_core: Any) -> None:
    core, backend = make_core({1: 1000}, step_s=0.002)
    handle = core.submit(prompt(1), greedy(None))
    stream = iter(handle)
    next(stream)
    stream.close()  # type: ignore[attr-defined]
    assert handle.wait(5) and handle.result is not None and handle.result.finish_reason == FINISH_CANCELLED
    assert backend.steps < 100


def test_the_queue_is_bounded_by_count_and_bytes(make_core: Any) -> None:
    core, _ = make_core({1: 50}, max_batch=1, max_waiting=2, step_s=0.01)
    with core.paused():
        handles = [core.submit(prompt(1), greedy(None)) for _ in range(2)]
        with pytest.raises(QueueFullError):
            core.submit(prompt(1), greedy(None))
        assert core.full()
    for handle in handles:
        handle.cancel()
    core.limit_queue(None, 100)
    big = prompt(1, images=1, tiles=1)  # 2 views of 3x4x4 float32: 384 bytes
    with core.paused():
        first = core.submit(big, greedy(None))  # one request alone is always admitted
        with pytest.raises(QueueFullError):
            core.submit(big, greedy(None))
    first.cancel()


def test_refusals_happen_on_the_submitting_thread_before_any_work(make_core: Any) -> None:
    core, backend = make_core({1: 5})
    with pytest.raises(InputError, match="non-empty"):
        core.submit(PreparedInputs(np.zeros(0, np.int64), np.zeros(0, bool), []), greedy(5))
    with pytest.raises(InputError, match="structured output is not available"):
        from common.engine.structured import json_object_spec

        core.submit(prompt(1), SamplingParams(json_spec=json_object_spec()))
    assert backend.requests == 0


def test_a_core_whose_load_fails_reports_it() -> None:
    def broken() -> Any:
        raise RuntimeError("no weights here")

    core = EngineCore(broken, fixture_tokenizer()).start()
    with pytest.raises(RuntimeError, match="no weights here"):
        core.wait_ready(10)
    assert core.state == "error"
    with pytest.raises(EngineUnavailableError, match="failed to load: no weights here"):
        core.submit(prompt(1), greedy(5))


def test_on_finish_sees_every_request_once(make_core: Any) -> None:
    core, _ = make_core({1: 5, 2: 5})
    seen: list[RequestHandle] = []
    core.on_finish = seen.append
    handles = [core.submit(prompt(tag), greedy(10)) for tag in (1, 2)]
    cancelled = core.submit(prompt(1), greedy(10))
    cancelled.cancel()
    for handle in handles:
        handle.run()
    deadline = time.monotonic() + 5
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(h.id for h in seen) == sorted(h.id for h in [*handles, cancelled])


def test_call_runs_on_the_cores_thread_between_iterations(make_core: Any) -> None:
    core, backend = make_core({1: 50}, step_s=0.002)
    handle = core.submit(prompt(1), greedy(None))
    seen = core.call(lambda b: (threading.current_thread().name, b is backend))
    assert seen == ("dsocr-engine", True)
    with pytest.raises(ZeroDivisionError):
        core.call(lambda b: 1 / 0)
    assert handle.run().token_ids[:-1] == words(50, 1)  # the requests went on


def test_a_sequence_whose_token_choice_fails_fails_alone(make_core: Any, tokenizer: Tokenizer) -> None:
    """One request's row makes the backend's token choice raise: that request ends with the error, the others in
    its decode batch go on with their own tokens."""

    class Picky(ScriptedBackend):
        def sample(self, logits: Any, controls: Any) -> Any:
            if (controls.top_k == 7777).any():
                raise OverflowError("top_k does not fit")
            return super().sample(logits, controls)

    core, backend = make_core(backend=Picky(script_from_prompt({1: 30, 2: 30, 3: 30}), tokenizer.eos_id))
    with core.paused():
        good = [core.submit(prompt(tag), greedy(100)) for tag in (1, 3)]
        bad = core.submit(prompt(2), SamplingParams(max_new_tokens=100, temperature=1.0, top_k=7777, seed=1))
    with pytest.raises(OverflowError):
        bad.run()
    for tag, handle in zip((1, 3), good, strict=True):
        assert handle.run().token_ids[:-1] == words(30, tag)
    assert max(backend.batch_sizes) == 2  # the bad one never decoded with them


def test_a_sequence_whose_output_processing_fails_fails_alone(make_core: Any, tokenizer: Tokenizer) -> None:
    class Breaking:
        """A constraint whose bookkeeping raises at its 3rd token (a bug in it, not in the batch)."""

        finished, error = False, None

        def __init__(self) -> None:
            self.seen = 0

        def fill_mask(self, row: np.ndarray) -> None:
            row[:] = -1

        def consume(self, token_id: int) -> bool:
            self.seen += 1
            if self.seen == 3:
                raise RuntimeError("constraint bookkeeping broke")
            return True

    backend = ScriptedBackend(script_from_prompt({1: 20, 2: 20}), tokenizer.eos_id)
    core = EngineCore(lambda: backend, tokenizer, constraints=lambda spec: Breaking()).start()
    core.wait_ready()
    try:
        from common.engine.structured import json_object_spec

        with core.paused():
            good = core.submit(prompt(1), greedy(100))
            bad = core.submit(prompt(2), SamplingParams(max_new_tokens=100, json_spec=json_object_spec()))
        with pytest.raises(RuntimeError, match="bookkeeping"):
            bad.run()
        assert good.run().token_ids[:-1] == words(20, 1)
    finally:
        core.close()
