"""The small interface every backend implements (torch: dsocr_torch, MLX: dsocr_mlx), and how one is loaded.

A backend owns tensors only: the model's weights and a KV cache of `lanes` lanes. It offers the units of work the
engine core (common.engine.core) schedules: a view's vision encoding, a prompt's embeddings, a chunk of prompt
positions written into a lane (the three make a `common.engine.prefill.PrefillJob`), and a decode step for lanes
[0, B). Everything per sequence (sampling parameters, guards, stop strings, detokenizing, cancellation) and every
scheduling decision (which sequences run, in which lane, how big a prompt chunk is) lives in common.engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from common.errors import BackendUnavailableError, InputError
from common.model.inputs import PreparedInputs

ProgressCallback = Callable[[str, int, int], None]  # (what, done, total), e.g. ("weights", 3, 12)
Trace = dict[str, Any]  # intermediates a parity test asks for (see Backend); None on every real request

BACKENDS = ("torch", "mlx")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE_CHOICES = ("none", "bf16", "int8")  # --quantize: weight-only storage of the decoder (torch, CPU)


@dataclass
class StepControls:
    """How to pick the next token of every lane in a decode batch; host arrays, one row per lane [0, B).

    Built by the engine core from each sequence's parameters and guards, applied by the backend on its device:
    bans and the allowed-token mask first (-inf logits), then greedy argmax for rows with temperature 0 or
    sampling (`common.engine.sampling.reference_sample` defines the arithmetic) with the row's own uniform draw,
    so a seeded sequence picks the same tokens whatever else is in the batch.
    """

    temperature: np.ndarray  # float32 [B]; 0 = greedy
    top_k: np.ndarray  # int32 [B]; 0 = off
    top_p: np.ndarray  # float32 [B]; 1 = off
    uniform: np.ndarray  # float32 [B] in [0, 1); used by sampled rows only
    ban_rows: np.ndarray  # int64 [N]: (ban_rows[i], ban_ids[i]) may not be chosen
    ban_ids: np.ndarray  # int64 [N]
    allowed: np.ndarray | None = None  # int32 [B, ceil(V / 32)] bitmask (bit j of word w = id 32w + j) or None

    @property
    def batch(self) -> int:
        return int(self.temperature.shape[0])

    @property
    def all_greedy(self) -> bool:
        return not bool(np.any(self.temperature > 0))

    def select(self, rows: Sequence[int]) -> StepControls:
        """The controls of the given rows, in that order (row i of the result is row rows[i] of these)."""
        index = np.asarray(rows, dtype=np.int64)
        where = {int(old): new for new, old in enumerate(rows)}
        keep = np.isin(self.ban_rows, index)
        return StepControls(
            self.temperature[index], self.top_k[index], self.top_p[index], self.uniform[index],
            np.asarray([where[int(r)] for r in self.ban_rows[keep]], dtype=np.int64), self.ban_ids[keep],
            self.allowed[index] if self.allowed is not None else None,
        )

    @classmethod
    def greedy(cls, batch: int) -> StepControls:
        """Every row greedy, nothing banned (benchmarks and tests)."""
        return cls(np.zeros(batch, np.float32), np.zeros(batch, np.int32), np.ones(batch, np.float32),
                   np.zeros(batch, np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))


@runtime_checkable
class Backend(Protocol):
    """A loaded model on one device. Device values (`Features`, `Embeds`, `Logits`, `Tokens`) are opaque handles;
    only `read` brings tokens to the host, so an `asynchronous` backend can run the next forward pass while the
    host works on the previous tokens.

    `trace`, where a method takes one, collects intermediates for parity tests under the same names in every
    backend: `encode_view` appends a dict per view to trace["views"] (the encoder outputs: "sam_out", then
    "clip_out" or "qwen2_out", and "projector_out"); `embed_prompt` sets trace["inputs_embeds"] [L, hidden];
    `prefill` appends each decoder layer's output to trace["layer_outputs"] ([1, T, hidden] per chunk) and sets
    trace["final_norm"]. Values are device arrays of the backend's framework.
    """

    name: str  # "torch" or "mlx"
    device: str  # "cpu", "cuda", "metal"
    dtype: str  # "float32", "bfloat16", "float16", or a quantization such as "q4"
    eos_token_id: int
    vocab_size: int  # logits width (the model's vocab_size, may exceed the tokenizer's)
    lanes: int  # sequences that can hold a KV cache at once
    lane_capacity: int  # positions per lane: prompt + generated tokens
    asynchronous: bool  # forward passes queue on the device; the core reads step n's tokens while n+1 runs

    # ---- prompt work, in the units a PrefillJob interleaves with decode steps --------------------------------

    def encode_view(self, pixels: np.ndarray, trace: Trace | None = None) -> Any:
        """One view, float32 [3, S, S] -> its projected vision tokens [(S/64)^2, hidden] on the device."""
        ...

    def embed_prompt(self, inputs: PreparedInputs, views: Sequence[Any], trace: Trace | None = None) -> Any:
        """The prompt's input embeddings [L, hidden] on the device: row i is row `inputs.embedding_rows[i]` of
        the table [token embeddings of `inputs.input_ids` (L rows); every view's tokens, in `views` order; the
        model's image_newline; its view_seperator]. With `inputs.inputs_embeds` (parity tests): those."""
        ...

    def prefill(self, lane: int, embeds: Any, start: int, end: int, trace: Trace | None = None) -> Any | None:
        """Writes prompt positions [start, end) of `embeds` into `lane` (chunks come in order from 0); after the
        last chunk (end == len(embeds)) returns the last position's logits [1, V], else None."""
        ...

    # ---- decode steps ------------------------------------------------------------------------------------------

    def forward(self, batch: int, tokens: Any) -> Any:
        """One decode step for lanes [0, batch): appends `tokens` (Tokens [batch]) -> logits [batch, V]."""
        ...

    def gather(self, logits: Any, rows: Sequence[int] | None, extra: Sequence[Any]) -> Any:
        """Logits rows in a new lane order: logits[rows] (all rows when None) followed by each `extra` [1, V]."""
        ...

    def sample(self, logits: Any, controls: StepControls) -> Any:
        """Applies bans and masks and picks one token per row -> Tokens [B] (device, not read back)."""
        ...

    def read(self, tokens: Any) -> np.ndarray:
        """Tokens -> host int64 [B]; the step's one synchronisation."""
        ...

    def logprobs(self, logits: Any, tokens: Any, top: int) -> Any:
        """Log-probabilities under the model's raw distribution (log-softmax of `logits` [B, V] in float32, before
        temperature, bans or masks) of the chosen `tokens` (Tokens [B], as `sample` returned them) and of the `top`
        most likely ids of each row (0 <= top <= 20; ties by lower id): a device handle, queued like `sample`'s
        result (no host sync here)."""
        ...

    def read_logprobs(self, handle: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A `logprobs` handle -> host arrays: chosen float32 [B], top ids int64 [B, top], top log-probs float32
        [B, top] (descending)."""
        ...

    def move_lane(self, src: int, dst: int) -> None:
        """Moves a lane's cached positions to another lane (the scheduler keeps decoding lanes contiguous)."""
        ...

    def close(self) -> None: ...


def lane_capacity(model_context: int, max_context: int | None) -> int:
    """Positions per KV-cache lane: the model's context, or less when the user asks (to fit more lanes)."""
    if max_context is None:
        return model_context
    if max_context < 16:
        raise InputError(f"max_context must be at least 16 positions, got {max_context}")
    return min(max_context, model_context)


def lanes_within(wanted: int, budget_bytes: int, bytes_per_position: int, capacity: int) -> int:
    """How many lanes of `capacity` positions a KV-cache budget holds, at most `wanted` (the one KV-budget rule of
    every backend); InputError when not even one fits."""
    per_lane = bytes_per_position * capacity
    lanes = min(wanted, budget_bytes // per_lane)
    if lanes < 1:
        raise InputError(
            f"a KV cache of {budget_bytes / (1 << 30):.2f} GiB cannot hold one sequence of {capacity} positions "
            f"({per_lane / (1 << 30):.2f} GiB); raise --kv-cache-gib or lower --max-context"
        )
    return lanes


@dataclass(frozen=True)
class BackendOptions:
    """How a backend loads: its device and compute dtype, and the bounds of its KV cache (see `load_backend`)."""

    device: str = "cpu"
    dtype: str = "auto"
    max_batch: int | None = None
    kv_cache_gib: float | None = None
    max_context: int | None = None
    cuda_graphs: bool | None = None
    quantize: str = "none"  # torch on the CPU: the decoder's weights stored as "bf16" or "int8", computed in dtype


def load_backend(
    name: str,
    model_dir: str | Path,
    device: str,
    dtype: str = "auto",
    progress: ProgressCallback | None = None,
    **bounds: Any,
) -> Backend:
    """Imports the named backend lazily (so `common` stays framework-free) and loads the model.

    `bounds` are BackendOptions' other fields: `max_batch` bounds the lanes (sequences decoded together),
    `kv_cache_gib` the KV cache's memory (each backend has a per-device default), `max_context` the positions per
    lane (prompt + output; default and most: the model's `max_position_embeddings`), `cuda_graphs` turns
    decode-step capture on or off (CUDA), `quantize` stores the decoder's weights as bf16 or int8 (torch, CPU).
    """
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    try:
        importlib.import_module(name)
    except ImportError:
        raise BackendUnavailableError(
            f"the {name} backend needs {name}, which is not installed: pip install 'dsocr[{name}]'"
        ) from None
    module = importlib.import_module(f"dsocr_{name}.backend")
    return module.load(Path(model_dir), BackendOptions(device, dtype, **bounds), progress)
