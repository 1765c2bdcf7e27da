"""The small interface every backend implements, and the inputs it receives.

The CLI and the server never import torch or mlx: they call `load_backend(...)` and hand the backend to
`common.engine.loop.GenerationLoop`, which feeds it `PreparedInputs` (made by `common.model.prompt.prepare_inputs`)
and drives batched decode steps.
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


@dataclass
class StepControls:
    """How to pick the next token of every lane in a decode batch; host arrays, one row per lane [0, B).

    Built by the generation loop (common.engine.generation) from each sequence's parameters and guards, applied by
    the backend on its device: bans and the allowed-token mask first (-inf logits), then greedy argmax for
    rows with temperature 0 or sampling (`common.engine.sampling.reference_sample` defines the arithmetic) with the
    row's own uniform draw, so a seeded sequence picks the same tokens whatever else is in the batch.
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


class PrefillJob(Protocol):
    """The prompt of one sequence going into its KV-cache lane, in bounded units of work.

    The loop calls `advance()` between decode steps, so a long prompt (vision views, then chunks of the
    prompt) never stalls the running sequences for more than one unit.
    """

    def advance(self) -> bool:
        """Runs one unit (one vision view, or one chunk of prompt positions); True once the prompt is in."""
        ...

    def logits(self) -> Any:
        """After the last unit: the last prompt position's logits, a device array [1, V]."""
        ...

    def close(self) -> None:
        """Drops the job's device buffers (finished or abandoned)."""
        ...


@runtime_checkable
class Backend(Protocol):
    """A loaded model on one device, driven step by step by `common.engine.loop.GenerationLoop`.

    The backend owns tensors only: a KV cache of `lanes` lanes, each holding up to `lane_capacity` positions.
    A decode step runs the lanes [0, B) together. Device values (`Logits`, `Tokens`) are opaque handles; only
    `read` brings tokens to the host, so a backend with an asynchronous device can run the next forward pass
    while the host works on the previous tokens. Everything per sequence (sampling parameters, guards, stop
    strings, detokenizing, cancellation) lives in the loop.
    """

    name: str  # "torch" or "mlx"
    device: str  # "cpu", "cuda", "metal"
    dtype: str  # "float32", "bfloat16", "float16", or a quantization such as "q4"
    eos_token_id: int
    vocab_size: int  # logits width (the model's vocab_size, may exceed the tokenizer's)
    lanes: int  # sequences that can hold a KV cache at once
    lane_capacity: int  # positions per lane: prompt + generated tokens

    def start_prefill(self, lane: int, inputs: PreparedInputs) -> PrefillJob:
        """Prepares to write `inputs`' prompt into `lane` (from position 0); no work happens yet."""
        ...

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

    def move_lane(self, src: int, dst: int) -> None:
        """Moves a lane's cached positions to another lane (the loop keeps decoding lanes contiguous)."""
        ...

    def close(self) -> None: ...


def lane_capacity(model_context: int, max_context: int | None) -> int:
    """Positions per KV-cache lane: the model's context, or less when the user asks (to fit more lanes)."""
    if max_context is None:
        return model_context
    if max_context < 16:
        raise InputError(f"max_context must be at least 16 positions, got {max_context}")
    return min(max_context, model_context)


BACKENDS = ("torch", "mlx")


def load_backend(
    name: str,
    model_dir: str | Path,
    device: str,
    dtype: str = "auto",
    progress: ProgressCallback | None = None,
    *,
    max_batch: int | None = None,
    kv_cache_gib: float | None = None,
    max_context: int | None = None,
    cuda_graphs: bool | None = None,
) -> Backend:
    """Imports the named backend lazily (so `common` stays framework-free) and loads the model.

    `max_batch` bounds the lanes (sequences decoded together), `kv_cache_gib` the KV cache's memory (each
    backend has a per-device default), `max_context` the positions per lane (prompt + output; default and
    most: the model's `max_position_embeddings`), `cuda_graphs` turns decode-step capture on or off (CUDA).
    """
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module_name = {"torch": "dsocr_torch.backend", "mlx": "dsocr_mlx.backend"}[name]
    framework = {"torch": "torch", "mlx": "mlx"}[name]
    try:
        importlib.import_module(framework)
    except ImportError:
        extra = {"torch": "torch", "mlx": "mlx"}[name]
        raise BackendUnavailableError(
            f"the {name} backend needs {framework}, which is not installed: pip install 'dsocr[{extra}]'"
        ) from None
    module = importlib.import_module(module_name)
    return module.load(
        Path(model_dir),
        device=device,
        dtype=dtype,
        progress=progress,
        max_batch=max_batch,
        kv_cache_gib=kv_cache_gib,
        max_context=max_context,
        cuda_graphs=cuda_graphs,
    )
