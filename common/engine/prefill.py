"""A prompt going into its KV-cache lane in bounded units of work, for every backend.

The units are: each view's vision encoding (an image's global view, then its tiles), then chunks of prompt
positions (the first chunk also gathers the prompt's embeddings). The engine core runs one unit between decode
steps, so a long prompt never stalls the running sequences for more than one unit; the chunk size is the
scheduler's (common.engine.scheduler).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from common.engine.backend import Backend, Trace
from common.model.inputs import PreparedInputs


class PrefillJob:
    """One prompt into one lane: `advance()` runs one unit; True once the prompt is in and `logits` is set."""

    def __init__(self, backend: Backend, lane: int, inputs: PreparedInputs, chunk: int,
                 trace: Trace | None = None) -> None:
        if chunk < 1:
            raise ValueError(f"prefill chunk must be at least 1 position, got {chunk}")
        self.lane, self.chunk = lane, chunk
        self.logits: Any = None
        self._units = self._run(backend, inputs, trace)

    def advance(self) -> bool:
        if self._units is None:
            raise RuntimeError("advance() after the prompt was complete or closed")
        try:
            next(self._units)
            return False
        except StopIteration:
            self._units = None
            return True

    def close(self) -> None:
        """Drops the job's device buffers (finished or abandoned)."""
        if self._units is not None:
            self._units.close()
            self._units = None

    def _run(self, backend: Backend, inputs: PreparedInputs, trace: Trace | None) -> Iterator[None]:
        views: list[Any] = []
        if inputs.inputs_embeds is None:
            for image in inputs.images:
                views.append(backend.encode_view(image.global_view, trace))
                yield
                for tile in image.local_views if image.has_crops else ():  # type: ignore[union-attr]
                    views.append(backend.encode_view(tile, trace))
                    yield
        embeds = backend.embed_prompt(_with_rows(inputs), views, trace)
        views.clear()  # the embeddings hold what is needed of them
        length = inputs.prompt_tokens
        for start in range(0, length, self.chunk):
            end = min(start + self.chunk, length)
            logits = backend.prefill(self.lane, embeds, start, end, trace)
            if end < length:
                yield
            else:
                self.logits = logits


def _with_rows(inputs: PreparedInputs) -> PreparedInputs:
    """`inputs` with `embedding_rows` set: a prompt without images takes every row from its own tokens."""
    if inputs.embedding_rows is not None or inputs.inputs_embeds is not None:
        return inputs
    if inputs.images:
        raise ValueError("a prompt with images needs its embedding_rows (common.model.prompt.prepare_inputs)")
    return replace(inputs, embedding_rows=np.arange(inputs.prompt_tokens, dtype=np.int64))
