"""common.engine.generation: continuous batching and everything per sequence, on a scripted backend.

Each request's script is derived from its prompt, so a sequence that received another lane's tokens (a lane
mix-up when sequences join, leave or move) produces the wrong text and fails the comparison.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from common.engine.generation import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, StopMatcher
from common.engine.loop import GenerationLoop
from common.engine.sampling import SamplingParams
from common.errors import InputError
from common.model.inputs import ImageInput, PreparedInputs
from common.model.tokenizer import Tokenizer
from tests.conftest import MODEL_DIR
from tests.fakes import ScriptedBackend


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(MODEL_DIR)


def words(n: int, tag: int) -> list[int]:
    """A script of n distinct-looking ids tagged by the request (ids 1000 + 37 * tag + k)."""
    return [1000 + (37 * tag + k) % 5000 for k in range(n)]


def prompt(tag: int, length: int = 5, images: int = 0) -> PreparedInputs:
    ids = np.array([0] + [tag] * (length - 1), dtype=np.int64)
    view = ImageInput(np.zeros((3, 4, 4), np.float32), None, (1, 1))
    return PreparedInputs(ids, np.zeros_like(ids, dtype=bool), [view] * images)


def script_from_prompt(lengths: dict[int, int]) -> Any:
    return lambda inputs: words(lengths.get(int(inputs.input_ids[1]), 20), int(inputs.input_ids[1]))


def make_loop(tokenizer: Tokenizer, lengths: dict[int, int], **kwargs: Any) -> tuple[GenerationLoop, ScriptedBackend]:
    max_batch = kwargs.pop("max_batch", None)
    backend = ScriptedBackend(script_from_prompt(lengths), tokenizer.eos_id, **kwargs)
    return GenerationLoop(backend, tokenizer, max_batch=max_batch), backend


def greedy(n: int, **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, no_repeat_ngram_size=0, **kwargs)


def test_batched_sequences_each_get_their_own_tokens(tokenizer: Tokenizer) -> None:
    lengths = {tag: 3 + 4 * tag for tag in range(1, 7)}
    loop, backend = make_loop(tokenizer, lengths)
    gens = {tag: loop.submit(prompt(tag), greedy(100)) for tag in lengths}
    results = {tag: gen.run() for tag, gen in gens.items()}
    for tag, result in results.items():
        assert result.token_ids == words(lengths[tag], tag) + [tokenizer.eos_id]
        assert result.finish_reason == FINISH_STOP
        assert result.raw_text == tokenizer.decode(words(lengths[tag], tag)).strip()
    assert max(backend.batch_sizes) == 6  # all six decoded together
    assert 1 in backend.batch_sizes  # ...and the longest alone at the end: finished lanes left at once


def test_max_batch_bounds_the_decode_batch_and_queues_the_rest(tokenizer: Tokenizer) -> None:
    lengths = {tag: 10 for tag in range(1, 8)}
    loop, backend = make_loop(tokenizer, lengths, max_batch=3)
    gens = [loop.submit(prompt(tag), greedy(100)) for tag in lengths]
    for tag, gen in zip(lengths, gens, strict=True):
        assert gen.run().token_ids[:-1] == words(10, tag)
    assert max(backend.batch_sizes) == 3
    assert backend.lanes == 8 and loop.max_batch == 3


def test_joining_mid_flight_and_lane_moves_keep_sequences_apart(tokenizer: Tokenizer) -> None:
    lengths = {1: 40, 2: 5, 3: 30, 4: 12, 5: 25}
    loop, backend = make_loop(tokenizer, lengths)
    first = [loop.submit(prompt(tag), greedy(100)) for tag in (1, 2, 3)]
    for _ in range(8):  # the short one ends (its lane is refilled by the last), the others run on
        loop.step()
    assert first[1].done and not first[0].done
    late = [loop.submit(prompt(tag), greedy(100)) for tag in (4, 5)]
    for tag, gen in zip((1, 2, 3, 4, 5), first + late, strict=True):
        assert gen.run().token_ids[:-1] == words(lengths[tag], tag), tag


def test_cancel_mid_flight_leaves_the_others_unaffected(tokenizer: Tokenizer) -> None:
    lengths = {1: 30, 2: 30, 3: 30}
    loop, backend = make_loop(tokenizer, lengths)
    gens = [loop.submit(prompt(tag), greedy(100)) for tag in lengths]
    for _ in range(6):
        loop.step()
    steps = backend.steps
    gens[1].cancel()
    loop.step()
    assert gens[1].done and gens[1].result is not None
    assert gens[1].result.finish_reason == FINISH_CANCELLED
    assert backend.steps == steps + 1  # it ended within one step
    assert gens[1].result.token_ids == words(30, 2)[: len(gens[1].result.token_ids)]
    for tag in (1, 3):
        assert gens[tag - 1].run().token_ids[:-1] == words(30, tag)
    assert max(backend.batch_sizes[steps + 1 :]) == 2  # its lane was freed


def test_cancel_while_waiting_or_prefilling(tokenizer: Tokenizer) -> None:
    loop, backend = make_loop(tokenizer, {1: 20, 2: 20, 3: 20}, max_batch=1)
    running = loop.submit(prompt(1, images=2), greedy(100))
    queued = loop.submit(prompt(2), greedy(100))
    queued.cancel()
    loop.step()  # the first prompt's vision units run; the queued one is dropped without work
    assert queued.done and queued.result is not None and queued.result.finish_reason == FINISH_CANCELLED
    assert queued.result.completion_tokens == 0 and backend.requests == 1
    running.cancel()
    result = running.run()
    assert result.finish_reason == FINISH_CANCELLED
    assert loop.submit(prompt(3), greedy(100)).run().token_ids[:-1] == words(20, 3)


def test_a_long_prompt_stalls_running_sequences_one_unit_at_a_time(tokenizer: Tokenizer) -> None:
    loop, backend = make_loop(tokenizer, {1: 30, 2: 10})
    running = loop.submit(prompt(1), greedy(100))
    loop.step()
    loop.step()
    joining = loop.submit(prompt(2, images=5), greedy(100))  # 6 units of prompt work
    running.run()
    joining.run()
    events = backend.events
    first, last = events.index("prefill", 1), len(events)
    # between the joiner's start and its first decode, steps and prompt units alternate
    span = events[first:last]
    assert span.count("step") >= 5
    assert backend.prefill_units == 1 + 6


def test_stop_strings_finish_and_are_never_streamed(tokenizer: Tokenizer) -> None:
    text_ids = tokenizer.encode("alpha beta</table> gamma delta")
    backend = ScriptedBackend(text_ids, tokenizer.eos_id)
    loop = GenerationLoop(backend, tokenizer)
    gen = loop.submit(prompt(1), greedy(100, stop=("</table>", "zzz")))
    streamed = "".join(gen)
    assert streamed == "alpha beta"
    assert gen.result is not None and gen.result.finish_reason == FINISH_STOP
    assert gen.result.raw_text == "alpha beta"
    assert backend.steps < len(text_ids) - 2  # nothing ran after the stop string


def test_stop_matcher_is_incremental_and_finds_the_earliest() -> None:
    matcher = StopMatcher(("cd", "bcdx", "", "e"))
    assert matcher.stops == ("cd", "bcdx", "e")
    assert matcher.find("abc", 0) == -1
    assert matcher.held_back("abc") == 2  # "bc" may grow into "bcdx"
    assert matcher.find("abcd", 3) == 2  # found though it starts before the new part
    assert matcher.find("xxcd e", 5) == 5  # text before new_from was already checked
    assert matcher.held_back("abx") == 0


def test_max_new_tokens_and_capacity_give_length(tokenizer: Tokenizer) -> None:
    loop, _ = make_loop(tokenizer, {1: 50}, lane_capacity=20)
    result = loop.submit(prompt(1), greedy(8)).run()
    assert result.finish_reason == FINISH_LENGTH and result.token_ids == words(50, 1)[:8]
    capped = loop.submit(prompt(1, length=5), greedy(1000)).run()  # 20 positions: 5 prompt + 15 new at most
    assert capped.finish_reason == FINISH_LENGTH and capped.completion_tokens == 15
    with pytest.raises(InputError, match="context holds 20"):
        loop.submit(prompt(1, length=20), greedy(5))


def test_ngram_bans_reach_the_backend_per_lane(tokenizer: Tokenizer) -> None:
    repeating = [1000, 1001, 1000, 1001, 1000, 1001, 1000, 1001]
    backend = ScriptedBackend(lambda inputs: repeating if inputs.input_ids[1] == 1 else words(8, 2), tokenizer.eos_id)
    loop = GenerationLoop(backend, tokenizer)
    guarded = loop.submit(prompt(1), SamplingParams(max_new_tokens=8, no_repeat_ngram_size=2))
    free = loop.submit(prompt(2), SamplingParams(max_new_tokens=8, no_repeat_ngram_size=2))
    ids = guarded.run().token_ids
    pairs = list(zip(ids, ids[1:], strict=False))
    assert len(pairs) == len(set(pairs))  # no bigram repeats (the fake moves off a banned id)
    assert ids[:3] == repeating[:3] and ids != repeating
    assert free.run().token_ids == words(8, 2)


def test_priority_admits_lower_values_first(tokenizer: Tokenizer) -> None:
    loop, backend = make_loop(tokenizer, {1: 3, 2: 3, 3: 3}, max_batch=1)
    order: list[int] = []
    gens = []
    for tag, priority in ((1, 1), (2, 1), (3, 0)):
        gens.append(loop.submit(prompt(tag), greedy(10), priority=priority,
                                listener=lambda kind, _, tag=tag: order.append(tag) if kind == "done" else None))
    while loop.busy:
        loop.step()
    assert order == [3, 1, 2]


def test_worker_thread_drives_and_iterators_block(tokenizer: Tokenizer) -> None:
    lengths = {tag: 15 for tag in range(1, 5)}
    loop, backend = make_loop(tokenizer, lengths, step_s=0.002)
    stop = threading.Event()
    worker = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    worker.start()
    try:
        gens = [loop.submit(prompt(tag), greedy(100)) for tag in lengths]
        texts = {}

        def consume(tag: int) -> None:
            texts[tag] = "".join(gens[tag - 1])

        readers = [threading.Thread(target=consume, args=(tag,)) for tag in lengths]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(30)
        for tag in lengths:
            assert texts[tag] == tokenizer.decode(words(15, tag))
        assert max(backend.batch_sizes) > 1
    finally:
        stop.set()
        loop.wake()
        worker.join(10)
    assert not worker.is_alive()


def test_stopping_the_worker_cancels_what_runs(tokenizer: Tokenizer) -> None:
    loop, _ = make_loop(tokenizer, {1: 5000}, step_s=0.001)
    stop = threading.Event()
    worker = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    worker.start()
    gen = loop.submit(prompt(1), greedy(5000))
    time.sleep(0.05)
    stop.set()
    loop.wake()
    worker.join(10)
    assert gen.wait(5) and gen.result is not None and gen.result.finish_reason == FINISH_CANCELLED


def test_a_failing_prompt_fails_alone(tokenizer: Tokenizer) -> None:
    class Flaky(ScriptedBackend):
        def start_prefill(self, lane: int, inputs: PreparedInputs) -> Any:
            if inputs.input_ids[1] == 2:
                raise InputError("this prompt is broken")
            return super().start_prefill(lane, inputs)

    backend = Flaky(script_from_prompt({}), tokenizer.eos_id)
    loop = GenerationLoop(backend, tokenizer)
    good = loop.submit(prompt(1), greedy(10))
    bad = loop.submit(prompt(2), greedy(10))
    with pytest.raises(InputError, match="broken"):
        bad.run()
    assert good.run().completion_tokens == 10


def test_closing_an_iterator_early_cancels_and_sets_the_result(tokenizer: Tokenizer) -> None:
    loop, backend = make_loop(tokenizer, {1: 100})
    gen = loop.submit(prompt(1), greedy(100))
    stream = iter(gen)
    next(stream)
    stream.close()  # type: ignore[attr-defined]
    assert gen.result is not None and gen.result.finish_reason == FINISH_CANCELLED
    assert backend.steps < 5
