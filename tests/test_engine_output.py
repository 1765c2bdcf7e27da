"""common.engine.output: stop strings found incrementally, text held back while it could still become one."""

from __future__ import annotations

from common.engine.output import OutputState, StopMatcher
from common.engine.requests import FINISH_CANCELLED, FINISH_STOP, RequestHandle
from tests.conftest import fixture_tokenizer


def test_stop_matcher_is_incremental_and_finds_the_earliest() -> None:
    matcher = StopMatcher(("cd", "bcdx", "", "e"))
    assert matcher.stops == ("cd", "bcdx", "e")
    assert matcher.find("abc", 0) == -1
    assert matcher.held_back("abc") == 2  # "bc" may grow into "bcdx"
    assert matcher.find("abcd", 3) == 2  # found though it starts before the new part
    assert matcher.find("xxcd e", 5) == 5  # text before new_from was already checked
    assert matcher.held_back("abx") == 0


def test_text_that_may_become_a_stop_string_is_held_back_then_released() -> None:
    tokenizer = fixture_tokenizer()
    handle = RequestHandle(lambda _: None)
    state = OutputState.new(tokenizer, ("</table>",))
    shown: list[str] = []
    for token in tokenizer.encode("cell</tab"):
        assert not state.add_text(token, handle)
        shown.append("".join(handle._pending))
        handle._pending.clear()
    assert "".join(shown) == "cell"  # "</tab" could still become "</table>"
    assert state.flush(handle, FINISH_STOP) == "cell</tab"
    assert "".join(handle._pending) == "</tab"  # released at the end


def test_a_cancelled_sequence_keeps_what_it_showed() -> None:
    tokenizer = fixture_tokenizer()
    handle = RequestHandle(lambda _: None)
    state = OutputState.new(tokenizer, ())
    for token in tokenizer.encode("partial text"):
        state.add_text(token, handle)
    assert state.flush(handle, FINISH_CANCELLED) == state.text
