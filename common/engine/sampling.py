"""Sampling parameters, their validation and resolution from user options, and the reference token choice."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np

from common.errors import InputError

if TYPE_CHECKING:
    from common.engine.structured import JsonSpec

# The authors' vLLM recipe always lets table cells repeat; their ids come from the tokenizer.
NGRAM_WHITELIST_TOKENS: tuple[str, ...] = ("<td>", "</td>")

DEFAULT_MAX_NEW_TOKENS = 8192  # the official infer() value; a dense page needs a few thousand
# A bound far above any model context, so an absurd value is refused before anything is allocated.
MAX_NEW_TOKENS_BOUND = 1 << 20
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 1024  # all stop strings together
MAX_SEED = 2**63 - 1  # a signed 64-bit seed, what every backend's generator accepts
MAX_TOP_K = 2**31 - 1  # top-k travels as int32; anything past the vocabulary means "off" anyway
MAX_TEMPERATURE = 100.0
# The n-gram guard's work grows with both (the Hugging Face rule keeps an (n-1)-token key per position: ~20 MB per
# sequence at n=256 over an 8k context; the windowed rule compares up to `window` n-grams per step). The official
# recipes use n=20 to 35 and a window of 90.
MAX_NGRAM_SIZE = 256
MAX_NGRAM_WINDOW = 1024
MAX_TOP_LOGPROBS = 20  # as OpenAI


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    `max_new_tokens` is what the caller asked for: it must fit the sequence's lane with the prompt, or the
    request is refused (never shortened). None means "as many as fit, up to `default_max_new_tokens`". The budget
    is fitted once, when the engine core admits the request (`fit_max_tokens`).

    temperature 0 means greedy. `no_repeat_ngram_size` 0 disables the n-gram guard; `ngram_window` 0
    looks at the whole sequence including the prompt (the official Hugging Face `infer()`), a positive
    window looks at the last `ngram_window` tokens only (the authors' vLLM recipe). `json_spec` constrains
    the output to JSON (a schema or any object; see common.engine.structured), None = free text.
    """

    max_new_tokens: int | None = None
    default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    no_repeat_ngram_size: int = 20
    ngram_window: int = 0
    ngram_whitelist: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # keep going past EOS until the token budget (benchmarks)
    logprobs: int | None = None  # each token's log-probability and this many most likely ids; None = none
    json_spec: JsonSpec | None = None

    def __post_init__(self) -> None:
        for name, value in (("max_tokens", self.max_new_tokens), ("default_max_tokens", self.default_max_new_tokens)):
            if value is not None and not 1 <= value <= MAX_NEW_TOKENS_BOUND:
                raise InputError(f"{name} must be between 1 and {MAX_NEW_TOKENS_BOUND}, got {value}",
                                 param="max_tokens")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise InputError(f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {self.temperature}",
                             param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise InputError(f"top_k must be between 0 and {MAX_TOP_K}, got {self.top_k}", param="top_k")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"seed must be between 0 and {MAX_SEED}, got {self.seed}", param="seed")
        if not 0 <= self.no_repeat_ngram_size <= MAX_NGRAM_SIZE:
            raise InputError(
                f"no_repeat_ngram_size must be between 0 and {MAX_NGRAM_SIZE}, got {self.no_repeat_ngram_size}",
                param="no_repeat_ngram_size",
            )
        if not 0 <= self.ngram_window <= MAX_NGRAM_WINDOW:
            raise InputError(f"ngram_window must be between 0 and {MAX_NGRAM_WINDOW}, got {self.ngram_window}",
                             param="ngram_window")
        if 0 < self.ngram_window < self.no_repeat_ngram_size:
            raise InputError(
                f"ngram_window ({self.ngram_window}) must be 0 or at least no_repeat_ngram_size "
                f"({self.no_repeat_ngram_size})",
                param="ngram_window",
            )
        check_stop_strings(self.stop)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InputError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs}",
                             param="top_logprobs")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def fit_max_tokens(prompt_tokens: int, params: SamplingParams, capacity: int, model_context: int) -> int:
    """The token budget of a prompt in a lane of `capacity` positions (the model's context, or less with
    --max-context): an explicit max_tokens must fit, the default shrinks to fit. InputError when the prompt
    alone fills the lane or an explicit max_tokens does not fit."""
    room = capacity - prompt_tokens
    where = "the model's context" if capacity >= model_context else "each sequence's context (--max-context)"
    if room < 1:
        raise InputError(
            f"the prompt is {prompt_tokens} tokens; {where} is {capacity} tokens "
            "(shorten the text, or use fewer images or a smaller mode)",
            param="messages",
        )
    if params.max_new_tokens is not None:
        if params.max_new_tokens > room:
            raise InputError(
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({params.max_new_tokens}) exceeds {where} of "
                f"{capacity} tokens; ask for at most {room}",
                param="max_tokens",
            )
        return params.max_new_tokens
    return min(params.default_max_new_tokens, room)


def check_stop_strings(stop: tuple[str, ...]) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise InputError(f"at most {MAX_STOP_STRINGS} stop strings are accepted, got {len(stop)}", param="stop")
    total = sum(len(s) for s in stop)
    if total > MAX_STOP_CHARS:
        raise InputError(
            f"the stop strings are {total} characters together; at most {MAX_STOP_CHARS} are accepted", param="stop"
        )


def stop_strings(stop: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Stop strings as given, empty ones left out (an empty string would stop at once), within the limits."""
    if stop is None:
        return ()
    items = (stop,) if isinstance(stop, str) else tuple(stop)
    return tuple(s for s in items if s)


@dataclass(frozen=True)
class SamplingOptions:
    """Generation options as users give them; None = the default (greedy, as the official code)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | tuple[str, ...] | None = None
    no_repeat_ngram_size: int | None = None
    ngram_window: int | None = None
    json_spec: JsonSpec | None = None  # JSON output (common.engine.structured); None = free text
    logprobs: int | None = None  # top alternatives per token with its log-probability; None = no log-probabilities

    def resolve(self, default_max_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> SamplingParams:
        """SamplingParams (`default_max_tokens` when no max_tokens is given); InputError naming the option for a
        bad value."""
        extra: dict[str, int] = {}
        if self.no_repeat_ngram_size is not None:
            extra["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        if self.ngram_window is not None:
            extra["ngram_window"] = self.ngram_window
        return SamplingParams(
            max_new_tokens=self.max_tokens,
            default_max_new_tokens=default_max_tokens,
            temperature=0.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=stop_strings(self.stop),
            json_spec=self.json_spec,
            logprobs=self.logprobs,
            **extra,
        )


# ---- the token choice every backend implements on its device ------------------------------------------------


def allowed_from_bitmask(words: np.ndarray, vocab_size: int) -> np.ndarray:
    """bool [vocab_size] from an int32 bitmask row (bit j of word w allows id 32 * w + j)."""
    bits = np.unpackbits(np.ascontiguousarray(words, dtype="<i4").view(np.uint8), bitorder="little")
    return bits[:vocab_size].astype(bool)


def reference_sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, uniform: float) -> int:
    """The reference choice for one row of masked logits (-inf = not allowed); backends match it.

    Greedy (temperature 0): the first index of the maximum. Otherwise the logits are divided by the
    temperature; without top-k/top-p the token is drawn by inverse CDF in id order. With top-k and/or top-p
    the candidates are sorted by logit (descending, ties by id): the first `top_k` stay, then top-p keeps a
    candidate while the probability mass ranked before it is below `top_p` (the most likely always stays,
    as in Hugging Face's warper), and the draw walks the kept candidates in that order. `uniform` is the
    sequence's own draw in [0, 1), so the choice depends on nothing else in the batch.
    """
    x = np.asarray(logits, dtype=np.float64)
    if temperature <= 0.0:
        return int(np.argmax(x))
    x = x / temperature
    if top_k <= 0 and top_p >= 1.0:
        order = np.arange(x.shape[0])
    else:
        order = np.lexsort((np.arange(x.shape[0]), -x))  # by logit descending, then id
        if top_k > 0:
            order = order[:top_k]
        x = x[order]
        if top_p < 1.0:
            probs = _softmax(x)
            before = np.cumsum(probs) - probs
            keep = before < top_p
            keep[0] = True
            order, x = order[keep], x[keep]
    probs = _softmax(x)
    cumulative = np.cumsum(probs)
    index = int(np.searchsorted(cumulative, uniform * cumulative[-1], side="right"))
    last_possible = int(np.flatnonzero(probs > 0)[-1])
    return int(order[min(index, last_possible)])


def reference_logprobs(logits_row: np.ndarray, chosen: int, top: int) -> tuple[float, list[int], list[float]]:
    """The reference log-probabilities of one row of raw logits [V] (before temperature, bans or masks); backends
    match them (`Backend.logprobs`). The log-softmax is taken in float64: the chosen id's value, and the `top` most
    likely ids with theirs, by logit descending, ties by lower id (so their log-probs never increase)."""
    x = np.asarray(logits_row, dtype=np.float64)
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    peak = x.max()
    logprobs = x - (peak + np.log(np.exp(x - peak).sum()))
    order = np.lexsort((np.arange(x.shape[0]), -x))[:top]  # by logit descending, then id
    return float(logprobs[chosen]), [int(i) for i in order], [float(logprobs[i]) for i in order]


def _softmax(x: np.ndarray) -> np.ndarray:
    finite = np.isfinite(x)
    if not finite.any():
        return np.full(x.shape, 1.0 / x.shape[0])
    e = np.where(finite, np.exp(x - x[finite].max()), 0.0)
    return e / e.sum()


class _TokenLookup(Protocol):
    def token_to_id(self, token: str) -> int | None: ...


def ngram_whitelist_ids(tokenizer: _TokenLookup) -> tuple[int, ...]:
    """Ids of NGRAM_WHITELIST_TOKENS in this tokenizer (tokens it lacks are left out)."""
    ids = (tokenizer.token_to_id(token) for token in NGRAM_WHITELIST_TOKENS)
    return tuple(i for i in ids if i is not None)


def with_ngram_whitelist(params: SamplingParams, whitelist: tuple[int, ...]) -> SamplingParams:
    """The windowed (vLLM recipe) n-gram rule always carries the whitelist; the Hugging Face rule never does."""
    if params.ngram_window > 0 and params.no_repeat_ngram_size > 0 and not params.ngram_whitelist:
        return replace(params, ngram_whitelist=whitelist)
    return params
