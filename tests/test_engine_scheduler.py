"""common.engine.scheduler: the one waiting queue (priorities, promotion, bounds, withdrawal, the wait estimate)
and the lanes (joins, retirements, contiguous lanes)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from common.engine.requests import RequestHandle
from common.engine.sampling import SamplingParams
from common.engine.scheduler import QueueFullError, Scheduler
from common.engine.sequence import BACKGROUND, INTERACTIVE, Sequence
from common.model.inputs import ImageInput, PreparedInputs
from tests.conftest import fixture_tokenizer

TOKENIZER = fixture_tokenizer()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def seq(name: str, priority: int = INTERACTIVE, view_bytes: int = 0) -> Sequence:
    images = [ImageInput(np.zeros(view_bytes // 4, np.float32), None, (1, 1))] if view_bytes else []
    prepared = PreparedInputs(np.array([0, 1, 2]), np.zeros(3, bool), images)
    handle = RequestHandle(lambda _: None)
    handle.name = name  # type: ignore[attr-defined]
    return Sequence.new(handle, prepared, SamplingParams(), 10, priority, TOKENIZER, None)


def names(scheduler: Scheduler, count: int) -> list[Any]:
    out = []
    for _ in range(count):
        picked = scheduler.next_prompt()
        out.append(picked.handle.name if picked is not None else None)  # type: ignore[attr-defined]
        if picked is not None:
            scheduler.prompt_done()
    return out


def test_interactive_before_background_fifo_within_class() -> None:
    scheduler = Scheduler(8, 512, clock=Clock())
    for name, priority in (("title", BACKGROUND), ("page-1", INTERACTIVE), ("tags", BACKGROUND),
                           ("page-2", INTERACTIVE)):
        scheduler.add(seq(name, priority))
    assert names(scheduler, 5) == ["page-1", "page-2", "title", "tags", None]


def test_background_promoted_after_waiting() -> None:
    clock = Clock()
    scheduler = Scheduler(8, 512, promote_after_s=30.0, clock=clock)
    scheduler.add(seq("title", BACKGROUND))
    clock.now = 31.0
    scheduler.add(seq("page"))
    assert names(scheduler, 1) == ["title"]  # waited long enough: it is not starved by later image requests


def test_a_withdrawn_request_frees_its_slot_at_once() -> None:
    scheduler = Scheduler(8, 512, max_waiting=2, clock=Clock())
    a, b = seq("a"), seq("b")
    scheduler.add(a)
    scheduler.add(b)
    with pytest.raises(QueueFullError):
        scheduler.add(seq("c"))
    assert scheduler.remove(a.handle) is a and scheduler.remove(a.handle) is None
    scheduler.add(seq("c"))
    assert names(scheduler, 2) == ["b", "c"]


def test_bytes_bound() -> None:
    scheduler = Scheduler(8, 512, max_waiting_bytes=100, clock=Clock())
    scheduler.add(seq("big", view_bytes=88))
    with pytest.raises(QueueFullError):
        scheduler.add(seq("more", view_bytes=20))
    scheduler.add(seq("small", view_bytes=8))
    empty = Scheduler(8, 512, max_waiting_bytes=100, clock=Clock())
    empty.add(seq("huge", view_bytes=500))  # one request alone is always admitted (its own limits were checked)


def test_a_prompt_starts_only_when_a_lane_is_free() -> None:
    scheduler = Scheduler(2, 512, clock=Clock())
    for name in "abc":
        scheduler.add(seq(name))
    assert names(scheduler, 3) == ["a", "b", None]  # two lanes
    assert [s.lane for s in scheduler.decoding] == [0, 1]
    assert scheduler.retire(0) == (1, 0)  # the last lane moves into the hole
    assert [s.handle.name for s in scheduler.decoding] == ["b"]  # type: ignore[attr-defined]
    assert names(scheduler, 1) == ["c"] and [s.lane for s in scheduler.decoding] == [0, 1]
    assert scheduler.retire(1) is None  # the last lane leaves without a move


def test_wait_estimate_counts_the_real_work() -> None:
    clock = Clock()
    scheduler = Scheduler(1, 512, clock=clock)
    for name in "ab":
        scheduler.add(seq(name))
        assert names(scheduler, 1) == [name]
        clock.now += 10.0
        scheduler.retire(0)
    for i in range(4):
        scheduler.add(seq(f"w{i}"))
    # Four waiting requests of about 10 s each (the measured service time moves toward 10 s).
    estimate = scheduler.wait_estimate_s()
    assert 4 * 7.0 < estimate <= 4 * 10.0
    names(scheduler, 1)
    assert scheduler.wait_estimate_s() > estimate - 1  # the running one still counts until it ends
