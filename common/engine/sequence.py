"""One request inside the engine: its inputs, its per-sequence state, where it runs, and how each generated
token changes it (output processing: common.engine.output does the text)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from common.engine.backend import StepControls
from common.engine.constraints import Constraint, StructuredOutputError, bans_within
from common.engine.ngram import NGramGuard
from common.engine.output import OutputState, result_of
from common.engine.prefill import PrefillJob
from common.engine.requests import FINISH_LENGTH, FINISH_STOP, RequestHandle, TokenLogprob
from common.engine.sampling import SamplingParams
from common.model.inputs import PreparedInputs
from common.model.tokenizer import Tokenizer

StepLogprobs = tuple[np.ndarray, np.ndarray, np.ndarray]  # chosen [B], top ids [B, k], top log-probs [B, k]
INTERACTIVE, BACKGROUND = 0, 1  # priorities: a user is watching / titles, tags and other background work


@dataclass(eq=False)
class Sequence:
    """One request inside the engine: its inputs, its per-sequence state, and where it runs."""

    handle: RequestHandle
    prepared: PreparedInputs | None  # dropped once the prompt is in (the views are no longer needed)
    params: SamplingParams
    max_tokens: int  # fitted to its lane at submission
    priority: int
    guard: NGramGuard
    output: OutputState
    rng: np.random.Generator | None
    constraint: Constraint | None
    nbytes: int  # what its inputs hold while it waits
    prompt_tokens: int
    image_tokens: int
    crop_grid: list[int] | None
    order: int = 0
    t_submit: float = field(default_factory=time.perf_counter)
    t_start: float = 0.0  # left the queue
    t_first: float | None = None  # first token
    lane: int = -1
    job: PrefillJob | None = None
    failure: Exception | None = None  # ends the sequence with this error instead of a result

    @classmethod
    def new(cls, handle: RequestHandle, prepared: PreparedInputs, params: SamplingParams, max_tokens: int,
            priority: int, tokenizer: Tokenizer, constraint: Constraint | None) -> Sequence:
        guard = NGramGuard(params.no_repeat_ngram_size, params.ngram_window, params.ngram_whitelist)
        guard.reset(prepared.input_ids.tolist())
        first = prepared.images[0] if prepared.images else None
        return cls(
            handle=handle, prepared=prepared, params=params, max_tokens=max_tokens, priority=priority, guard=guard,
            output=OutputState.new(tokenizer, params.stop, logprobs=params.logprobs is not None),
            rng=None if params.greedy else np.random.default_rng(params.seed), constraint=constraint,
            nbytes=inputs_nbytes(prepared), prompt_tokens=prepared.prompt_tokens, image_tokens=prepared.image_tokens,
            crop_grid=list(first.crop_grid) if first is not None and first.has_crops else None,
        )

    def take_token(self, token: int, eos_id: int, now: float, logprobs: StepLogprobs | None = None, row: int = 0
                   ) -> str | None:
        """Appends one generated token (with its log-probabilities, row `row` of the step's, when the request asked
        for them); returns a finish reason when the sequence ends with it."""
        if self.t_first is None:
            self.t_first = now
        self.output.ids.append(token)
        constraint = self.constraint
        if constraint is not None and not constraint.consume(token):
            self.failure = StructuredOutputError(
                f"token {token} at position {len(self.output.ids)} left the JSON grammar: {constraint.error}"
            )
            return FINISH_STOP
        if token == eos_id and (not self.params.ignore_eos or constraint is not None):
            return FINISH_STOP
        if logprobs is not None and self.params.logprobs is not None:
            chosen, top_ids, top_logprobs = logprobs
            top = self.params.logprobs
            self.output.add_logprob(TokenLogprob(token, float(chosen[row]), top_ids[row, :top].tolist(),
                                                 top_logprobs[row, :top].tolist()), self.handle)
        if self.output.add_text(token, self.handle):
            return FINISH_STOP  # a stop string
        if constraint is not None and constraint.finished:
            return FINISH_STOP  # the JSON is complete: only EOS could follow, no step is spent on it
        if len(self.output.ids) >= self.max_tokens:
            return FINISH_LENGTH
        self.guard.push(token)
        return None

    def end(self, reason: str) -> None:
        """Gives the handle the result (or the sequence's error); the inputs are dropped."""
        self.prepared = None
        text = self.output.flush(self.handle, reason)
        if self.failure is not None:
            self.handle._finish(error=self.failure)
            return
        self.handle._finish(result_of(self.output, text, reason, prompt_tokens=self.prompt_tokens,
                                      image_tokens=self.image_tokens, crop_grid=self.crop_grid,
                                      t_submit=self.t_submit, t_start=self.t_start, t_first=self.t_first))


def inputs_nbytes(prepared: PreparedInputs) -> int:
    """Bytes the prepared views hold (what a waiting request keeps in memory)."""
    total = 0
    for image in prepared.images:
        total += image.global_view.nbytes + (image.local_views.nbytes if image.local_views is not None else 0)
    return total


def step_controls(sequences: list[Sequence], allowed: np.ndarray | None) -> StepControls:
    """How to choose the next token of each lane (lane i = sequences[i]): its sampling parameters and its own
    uniform draw, the n-gram bans (within its grammar's mask when it has one), and the masks."""
    controls = StepControls.greedy(len(sequences))
    ban_rows: list[int] = []
    ban_ids: list[int] = []
    for lane, seq in enumerate(sequences):
        params = seq.params
        if seq.rng is not None:
            controls.temperature[lane], controls.top_k[lane] = params.temperature, params.top_k
            controls.top_p[lane], controls.uniform[lane] = params.top_p, seq.rng.random()
        banned = seq.guard.banned()
        if allowed is not None and seq.constraint is not None:
            banned = bans_within(allowed[lane], banned)
        if banned:
            ban_rows.extend([lane] * len(banned))
            ban_ids.extend(banned)
    controls.ban_rows = np.asarray(ban_rows, dtype=np.int64)
    controls.ban_ids = np.asarray(ban_ids, dtype=np.int64)
    controls.allowed = allowed
    return controls
