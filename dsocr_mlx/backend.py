"""The MLX backend behind common.engine.backend.Backend: a laned KV cache, prompt jobs, pipelined batched decode.

MLX streams are thread-local, so the thread that loads the model must be the one that drives the generation
loop (the CLI's main thread, the server's worker thread); this backend starts no thread of its own. Forward
passes and token choices are queued with `mx.async_eval`, so the device computes step n+1 while the host reads
step n's tokens and does its per-sequence work.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np

from common.engine.backend import ProgressCallback, StepControls, lane_capacity
from common.errors import BackendUnavailableError, InputError
from common.model.inputs import ImageInput, PreparedInputs
from dsocr_mlx.cache import LanePool
from dsocr_mlx.loader import load_model
from dsocr_mlx.model import DeepseekOCRForCausalLM, scatter_image_embeds
from dsocr_mlx.sampling import choose_tokens

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8
PREFILL_CHUNK = 512  # prompt positions per prefill unit: bounds how long running sequences wait
DEFAULT_KV_FRACTION = 0.25  # of the device's memory, at most, for the KV cache (it grows as used)


class MlxPrefill:
    """One prompt into one lane: each vision view is a unit, then each chunk of prompt positions."""

    def __init__(self, backend: MlxBackend, lane: int, inputs: PreparedInputs) -> None:
        self._units = backend._prefill_units(lane, inputs)
        self._logits: mx.array | None = None

    def advance(self) -> bool:
        try:
            self._logits = next(self._units)
        except StopIteration:
            raise RuntimeError("advance() after the prompt was complete") from None
        return self._logits is not None

    def logits(self) -> mx.array:
        if self._logits is None:
            raise RuntimeError("the prompt is not complete")
        return self._logits

    def close(self) -> None:
        self._units.close()
        self._logits = None


class MlxBackend:
    name = "mlx"
    asynchronous = True  # the loop queues a step before reading the previous tokens

    def __init__(
        self,
        model: DeepseekOCRForCausalLM,
        device: str,
        compute_dtype: str,
        quantization: dict | None,
        *,
        max_batch: int | None = None,
        kv_cache_gib: float | None = None,
        max_context: int | None = None,
    ) -> None:
        self.model: DeepseekOCRForCausalLM | None = model
        lm = model.config.language
        self.device = device
        self.compute_dtype = compute_dtype
        self.dtype = f"q{quantization['bits']}" if quantization else compute_dtype
        self.eos_token_id = lm.eos_token_id
        self.vocab_size = lm.vocab_size
        self.lane_capacity = lane_capacity(lm.max_position_embeddings, max_context)
        kv_dtype = model.dtype
        per_lane = LanePool.bytes_per_position(lm, kv_dtype) * self.lane_capacity
        budget = int(kv_cache_gib * (1 << 30)) if kv_cache_gib is not None else _default_kv_bytes()
        wanted = max_batch or DEFAULT_MAX_BATCH
        self.lanes = min(wanted, budget // per_lane)
        if self.lanes < 1:
            raise InputError(
                f"a KV cache of {budget / (1 << 30):.2f} GiB cannot hold one sequence of {self.lane_capacity} "
                f"positions ({per_lane / (1 << 30):.2f} GiB); raise --kv-cache-gib"
            )
        if self.lanes < wanted:
            log.warning("the KV-cache budget holds %d sequences, not the %d asked for", self.lanes, wanted)
        self.pool = LanePool(lm, self.lanes, self.lane_capacity, kv_dtype)

    # ---- Backend protocol ------------------------------------------------------------------------------------

    def start_prefill(self, lane: int, inputs: PreparedInputs) -> MlxPrefill:
        if not 0 <= lane < self.lanes:
            raise ValueError(f"lane {lane} outside [0, {self.lanes})")
        if inputs.input_ids.ndim != 1 or inputs.input_ids.shape[0] == 0:
            raise InputError("the prompt must be a non-empty 1-D sequence of token ids")
        if inputs.input_ids.shape[0] >= self.lane_capacity:
            raise InputError(
                f"the prompt has {inputs.input_ids.shape[0]} tokens; the context holds {self.lane_capacity}"
            )
        return MlxPrefill(self, lane, inputs)

    def forward(self, batch: int, tokens: mx.array | np.ndarray) -> mx.array:
        if isinstance(tokens, np.ndarray):
            tokens = mx.array(tokens.astype(np.int32))
        logits = self._model().decode_step(tokens[:batch], self.pool)
        mx.async_eval(logits)
        return logits

    def gather(self, logits: mx.array, rows: Sequence[int] | None, extra: Sequence[mx.array]) -> mx.array:
        parts = []
        if rows is None:
            parts.append(logits)
        elif len(rows):
            parts.append(logits[mx.array(np.asarray(rows, dtype=np.int32))])
        parts.extend(extra)
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)

    def sample(self, logits: mx.array, controls: StepControls) -> mx.array:
        tokens = choose_tokens(logits, controls)
        mx.async_eval(tokens)
        return tokens

    def read(self, tokens: mx.array) -> np.ndarray:
        return np.array(tokens, dtype=np.int64)

    def move_lane(self, src: int, dst: int) -> None:
        self.pool.move_lane(src, dst)

    def close(self) -> None:
        self.model = None
        self.pool.release()

    # ---- prompt work -------------------------------------------------------------------------------------------

    def _prefill_units(self, lane: int, inputs: PreparedInputs) -> Iterator[mx.array | None]:
        """Yields None after each unit of work and the last position's logits [1, V] after the last one."""
        model = self._model()
        if inputs.inputs_embeds is not None:
            embeds = mx.array(np.asarray(inputs.inputs_embeds, dtype=np.float32)).astype(model.dtype)
            images: list[ImageInput] = []
        else:
            embeds = model.model.embed_tokens(mx.array(np.asarray(inputs.input_ids, dtype=np.int32)))
            images = inputs.images
        image_embeds = []
        for image in images:
            global_pixels = mx.array(np.ascontiguousarray(image.global_view.transpose(1, 2, 0)))[None]
            global_features = model.encode_views(global_pixels)[0]
            mx.eval(global_features)
            yield None
            local_features = None
            if image.has_crops:
                assert image.local_views is not None
                tiles = []
                for view in image.local_views:
                    tile = model.encode_views(mx.array(np.ascontiguousarray(view.transpose(1, 2, 0)))[None])
                    mx.eval(tile)
                    tiles.append(tile)
                    yield None
                local_features = mx.concatenate(tiles, axis=0)
            image_embeds.append(model.layout_image_tokens(global_features, local_features, image.crop_grid))
        if image_embeds:
            embeds = scatter_image_embeds(embeds, inputs.images_seq_mask, mx.concatenate(image_embeds, axis=0))
        embeds = embeds[None]
        length = embeds.shape[1]
        for start in range(0, length, PREFILL_CHUNK):
            end = min(start + PREFILL_CHUNK, length)
            hidden = model.prefill_lane(embeds[:, start:end], self.pool, lane, start)
            if end < length:
                mx.eval(self.pool.keys, self.pool.values)
                yield None
            else:
                logits = model.logits(hidden[:, -1])
                mx.async_eval(logits)
                yield logits

    def _model(self) -> DeepseekOCRForCausalLM:
        if self.model is None:
            raise BackendUnavailableError("the mlx backend was closed; load the model again")
        return self.model


def _default_kv_bytes() -> int:
    try:
        info = mx.metal.device_info() if mx.metal.is_available() else {}
        total = int(info.get("memory_size", 0))
    except (AttributeError, RuntimeError):
        total = 0
    if not total:
        import os

        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 16 << 30
    return int(total * DEFAULT_KV_FRACTION)


def load(
    model_dir: Path,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    progress: ProgressCallback | None = None,
    max_batch: int | None = None,
    kv_cache_gib: float | None = None,
    max_context: int | None = None,
    cuda_graphs: bool | None = None,
) -> MlxBackend:
    """Loads the model on MLX on the calling thread; `device` is "metal" (Apple GPU) or "cpu" (MLX's CPU)."""
    if device == "auto":
        device = "metal" if mx.metal.is_available() else "cpu"
    if device not in ("metal", "cpu"):
        raise BackendUnavailableError(f"the mlx backend runs on metal or cpu, not {device!r}")
    if device == "metal" and not mx.metal.is_available():
        raise BackendUnavailableError("--device metal: no Metal GPU is available to MLX here; use --device cpu")
    mx.set_default_device(mx.gpu if device == "metal" else mx.cpu)
    if dtype == "auto":
        # CPU: MLX's CPU kernels are float32-first (gather_mm is float32 only).
        dtype = "bfloat16" if device == "metal" else "float32"
    model, quantization = load_model(Path(model_dir), dtype, progress)
    return MlxBackend(
        model, device, dtype, quantization, max_batch=max_batch, kv_cache_gib=kv_cache_gib, max_context=max_context
    )
