"""Output processing, per sequence: generated ids -> text deltas, stop strings, finish reasons, the result.

Runs on the engine core's thread after each decode step. It knows nothing of lanes or devices: it takes one
token, says whether the sequence ends with it, and hands new text to the request's handle (holding back what
could still grow into a stop string).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from common.engine.requests import FINISH_CANCELLED, GenerationResult, RequestHandle, TokenLogprob
from common.model.tokenizer import StreamingDetokenizer, Tokenizer


class StopMatcher:
    """Stop strings checked incrementally: each new piece of text is searched once, near its start."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find(self, text: str, new_from: int) -> int:
        """Earliest index of a stop string in `text` that ends at or after `new_from`, or -1.

        Text before `new_from` was checked already and held no stop string, so only matches reaching into the
        new part are possible: each stop is searched from `new_from - len(stop) + 1`.
        """
        hits = [i for s in self.stops if (i := text.find(s, max(0, new_from - len(s) + 1))) >= 0]
        return min(hits, default=-1)

    def held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that could still grow into a stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest


@dataclass
class OutputState:
    """A sequence's generated ids and text, and how much of the text its handle has been given."""

    detok: StreamingDetokenizer
    stops: StopMatcher
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    stopped_at: int | None = None  # where a stop string begins: the text ends there
    logprobs: list[TokenLogprob] | None = None  # per token, when the request asked for them

    @classmethod
    def new(cls, tokenizer: Tokenizer, stops: tuple[str, ...], logprobs: bool = False) -> OutputState:
        return cls(StreamingDetokenizer(tokenizer), StopMatcher(stops), logprobs=[] if logprobs else None)

    def add_logprob(self, entry: TokenLogprob, handle: RequestHandle) -> None:
        assert self.logprobs is not None
        self.logprobs.append(entry)
        handle._push(logprob=entry)

    def add_text(self, token: int, handle: RequestHandle) -> bool:
        """Detokenizes one accepted token and gives the handle what is safe to show; True when a stop string
        ended the text."""
        before = len(self.text)
        self.text += self.detok.add(token)
        if not self.stops:
            self._emit(handle, len(self.text))
            return False
        hit = self.stops.find(self.text, before)
        if hit >= 0:
            self.stopped_at = hit
            self._emit(handle, hit)
            return True
        self._emit(handle, len(self.text) - self.stops.held_back(self.text))
        return False

    def flush(self, handle: RequestHandle, reason: str) -> str:
        """The final text: what the detokenizer still held, unless a stop string or a cancel ended it first."""
        if self.stopped_at is None and reason != FINISH_CANCELLED:
            self.text += self.detok.flush()
            self._emit(handle, len(self.text))
        return self.text if self.stopped_at is None else self.text[: self.stopped_at]

    def _emit(self, handle: RequestHandle, upto: int) -> None:
        if upto > self.emitted:
            handle._push(self.text[self.emitted : upto])
            self.emitted = upto


def result_of(output: OutputState, text: str, reason: str, *, prompt_tokens: int, image_tokens: int,
              crop_grid: list[int] | None, t_submit: float, t_start: float, t_first: float | None) -> GenerationResult:
    """The request's result, with its timings (seconds): queue_s, ttft_s (from leaving the queue), decode_s,
    total_s, and decode_tokens_per_s when more than one token was decoded."""
    end = time.perf_counter()
    start = t_start or end
    timings = {
        "queue_s": start - t_submit,
        "ttft_s": (t_first - start) if t_first is not None else 0.0,
        "total_s": end - t_submit,
        "decode_s": (end - t_first) if t_first is not None else 0.0,
    }
    if len(output.ids) > 1 and timings["decode_s"] > 0:
        timings["decode_tokens_per_s"] = (len(output.ids) - 1) / timings["decode_s"]
    return GenerationResult(text=text, token_ids=list(output.ids), finish_reason=reason, prompt_tokens=prompt_tokens,
                            completion_tokens=len(output.ids), image_tokens=image_tokens, crop_grid=crop_grid,
                            timings=timings, logprobs=output.logprobs)
