"""The waiting order: image requests before text-only ones, promotion after a long wait, withdrawal, estimates."""

from __future__ import annotations

import pytest

from common.engine.queue import QueueFullError, RequestQueue


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_interactive_before_background_fifo_within_class() -> None:
    queue: RequestQueue[str] = RequestQueue(8, clock=Clock())
    queue.push("title", background=True)
    queue.push("page-1")
    queue.push("tags", background=True)
    queue.push("page-2")
    assert [queue.pop() for _ in range(5)] == ["page-1", "page-2", "title", "tags", None]


def test_background_promoted_after_waiting() -> None:
    clock = Clock()
    queue: RequestQueue[str] = RequestQueue(8, promote_after_s=30.0, clock=clock)
    queue.push("title", background=True)
    clock.now = 31.0
    queue.push("page")
    assert queue.pop() == "title"  # waited long enough: it is not starved by later image requests


def test_withdrawn_request_frees_its_slot_at_once() -> None:
    queue: RequestQueue[str] = RequestQueue(2, clock=Clock())
    queue.push("a")
    queue.push("b")
    with pytest.raises(QueueFullError):
        queue.push("c")
    assert queue.remove("a") and not queue.remove("a")
    queue.push("c")
    assert [queue.pop(), queue.pop()] == ["b", "c"]


def test_bytes_bound() -> None:
    queue: RequestQueue[str] = RequestQueue(8, max_bytes=100, clock=Clock())
    queue.push("big", nbytes=90)
    with pytest.raises(QueueFullError):
        queue.push("more", nbytes=20)
    queue.push("small", nbytes=10)
    empty: RequestQueue[str] = RequestQueue(8, max_bytes=100, clock=Clock())
    empty.push("huge", nbytes=500)  # one request alone is always admitted (its own limits were checked)


def test_wait_estimate_counts_the_real_work() -> None:
    clock = Clock()
    queue: RequestQueue[str] = RequestQueue(16, clock=clock)
    for name in ("a", "b"):
        queue.push(name)
        assert queue.pop() == name
        clock.now += 10.0
        queue.done(name)
    for i in range(4):
        queue.push(f"w{i}")
    # Four waiting requests of about 10 s each (the measured service time moves toward 10 s).
    estimate = queue.wait_estimate_s()
    assert 4 * 7.0 < estimate <= 4 * 10.0
    queue.pop()
    assert queue.wait_estimate_s() > estimate - 1  # the running one still counts until it is done
