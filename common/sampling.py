"""Generation policy shared by every backend: sampling parameters and their validation."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

from common.errors import InputError

# The authors' vLLM recipe always lets table cells repeat; their ids come from the tokenizer.
NGRAM_WHITELIST_TOKENS: tuple[str, ...] = ("<td>", "</td>")

DEFAULT_MAX_NEW_TOKENS = 8192  # the official infer() value; a dense page needs a few thousand


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 means greedy. `no_repeat_ngram_size` 0 disables the n-gram guard; `ngram_window` 0
    looks at the whole sequence including the prompt (the official Hugging Face `infer()`), a positive
    window looks at the last `ngram_window` tokens only (the authors' vLLM recipe).
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    no_repeat_ngram_size: int = 20
    ngram_window: int = 0
    ngram_whitelist: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}", param="max_tokens")
        if not 0.0 <= self.temperature <= 100.0:
            raise InputError(f"temperature must be between 0 and 100, got {self.temperature}", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}", param="top_k")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InputError(f"seed must be between 0 and {2**63 - 1}, got {self.seed}", param="seed")
        if self.no_repeat_ngram_size < 0:
            raise InputError(
                f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}", param="no_repeat_ngram_size"
            )
        if self.ngram_window < 0:
            raise InputError(f"ngram_window must be >= 0, got {self.ngram_window}", param="ngram_window")
        if 0 < self.ngram_window < self.no_repeat_ngram_size:
            raise InputError(
                f"ngram_window ({self.ngram_window}) must be 0 or at least no_repeat_ngram_size "
                f"({self.no_repeat_ngram_size})",
                param="ngram_window",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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
