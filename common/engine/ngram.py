"""No-repeat n-gram guard: which token ids may not come next.

Two semantics, both framework-free (backends turn the ids into -inf logits):

* ``window == 0``: Hugging Face ``no_repeat_ngram_size`` as the official ``infer()`` uses it (n=20, 35 in
  eval mode). Every complete n-gram of the WHOLE sequence counts - the prompt (BOS, the run of ``<image>``
  ids, the text) and the generated tokens. The tokens that followed earlier occurrences of the last n-1
  tokens are banned. n=1 bans every token seen so far.
* ``window > 0``: the authors' vLLM recipe (n=30, window 90, ``<td>``/``</td>`` whitelisted). Only n-grams
  lying entirely inside the last ``window`` tokens count, and whitelisted ids are never banned. vLLM hands
  its logits processors the generated tokens only, so `NGramGuard` leaves the prompt out in this mode.

``n == 0`` disables the guard.

Written here rather than taken from transformers or vLLM: theirs are logits processors over framework tensors, and
this one must run on the host for every lane of a batch, in both backends, incrementally (a push per token, the
ban list per step) instead of rescanning the sequence each step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def banned_ngram_tokens(
    sequence: Sequence[int], n: int, window: int = 0, whitelist: Iterable[int] = ()
) -> list[int]:
    """Reference (non-incremental) ban list for the step after `sequence`, sorted ascending.

    `sequence` is everything the rule looks at: for the Hugging Face rule the prompt plus the generated
    tokens, for the windowed rule what the caller chooses (the vLLM recipe passes generated tokens only).
    """
    if n <= 0:
        return []
    tokens = [int(t) for t in sequence]
    length = len(tokens)
    if length < n - 1:
        return []
    # n-grams considered start at [first, length - n]; the window keeps only those inside the last tokens.
    first = max(0, length - window) if window > 0 else 0
    prefix = tokens[length - (n - 1) :] if n > 1 else []
    banned: set[int] = set()
    for start in range(first, length - n + 1):
        if tokens[start : start + n - 1] == prefix:
            banned.add(tokens[start + n - 1])
    banned.difference_update(int(t) for t in whitelist)
    return sorted(banned)


class NGramGuard:
    """Incremental form of `banned_ngram_tokens` for a generation loop.

    ``reset(prompt_ids)`` once per request, ``push(token_id)`` after each sampled token, ``banned()`` before
    sampling the next one. For ``window == 0`` a map from each (n-1)-token prefix to the set of tokens that
    followed it is kept up to date in O(n) per token (independent of the sequence length, which reaches
    8192 new tokens plus the prompt). The windowed mode scans its window (at most `window` n-grams).

    `include_prompt` (default: only for ``window == 0``) says whether prompt ids enter the history; the
    vLLM recipe that the windowed mode reproduces sees generated tokens only.
    """

    def __init__(
        self,
        n: int,
        window: int = 0,
        whitelist: Iterable[int] = (),
        *,
        include_prompt: bool | None = None,
    ) -> None:
        if n < 0:
            raise ValueError(f"n-gram size must be >= 0, got {n}")
        if window < 0:
            raise ValueError(f"n-gram window must be >= 0, got {window}")
        self.n = int(n)
        self.window = int(window)
        self.whitelist = frozenset(int(t) for t in whitelist)
        self.include_prompt = (self.window == 0) if include_prompt is None else bool(include_prompt)
        self._tokens: list[int] = []
        self._followers: dict[tuple[int, ...], set[int]] = {}

    @property
    def enabled(self) -> bool:
        return self.n > 0

    def reset(self, prompt_ids: Iterable[int] = ()) -> None:
        """Start a new sequence; the prompt enters the history when `include_prompt` is set."""
        self._tokens = []
        self._followers = {}
        if self.enabled and self.include_prompt:
            for token_id in prompt_ids:
                self.push(token_id)

    def push(self, token_id: int) -> None:
        """Append one token to the history."""
        if not self.enabled:
            return
        tokens = self._tokens
        tokens.append(int(token_id))
        if self.window > 0:
            # Keep a bounded history: the window is all the windowed rule ever looks at.
            if len(tokens) > 2 * self.window + 64:
                del tokens[: len(tokens) - self.window]
            return
        if len(tokens) >= self.n:
            prefix = tuple(tokens[len(tokens) - self.n : -1])
            followers = self._followers.get(prefix)
            if followers is None:
                self._followers[prefix] = {tokens[-1]}
            else:
                followers.add(tokens[-1])

    def banned(self) -> list[int]:
        """Token ids that may not be sampled next, sorted ascending."""
        if not self.enabled:
            return []
        if self.window > 0:
            return banned_ngram_tokens(self._tokens[-self.window :], self.n, self.window, self.whitelist)
        tokens = self._tokens
        if len(tokens) < self.n - 1:
            return []
        prefix = tuple(tokens[len(tokens) - (self.n - 1) :]) if self.n > 1 else ()
        followers = self._followers.get(prefix)
        if not followers:
            return []
        if self.whitelist:
            followers = followers - self.whitelist
        return sorted(followers)
