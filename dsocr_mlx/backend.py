"""The MLX backend behind common.engine.backend.Backend: a laned KV cache, prompt work, pipelined batched decode.

MLX streams are thread-local, so the thread that loads the model must be the one that runs it: the engine core's
thread (common.engine.core), which also outlives the backend. Forward
passes and token choices are queued with `mx.async_eval`, so the device computes step n+1 while the host reads
step n's tokens and does its per-sequence work.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np

from common.engine.backend import BackendOptions, ProgressCallback, StepControls, Trace, lane_capacity, lanes_within
from common.errors import BackendUnavailableError
from common.memory import memory_limit_bytes
from common.model.inputs import PreparedInputs
from dsocr_mlx.cache import KVCache
from dsocr_mlx.loader import load_model
from dsocr_mlx.model import DeepseekOCRForCausalLM
from dsocr_mlx.sampling import choose_tokens, token_logprobs

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8
DEFAULT_KV_FRACTION = 0.25  # of the device's memory, at most, for the KV cache (it grows as used)


class MlxBackend:
    name = "mlx"
    asynchronous = True  # steps are queued with mx.async_eval; the host reads step n's tokens while n+1 runs

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
        wanted = max_batch or DEFAULT_MAX_BATCH
        budget = int(kv_cache_gib * (1 << 30)) if kv_cache_gib is not None else _default_kv_bytes()
        capacity = lane_capacity(lm.max_position_embeddings, max_context)
        lanes = lanes_within(wanted, budget, KVCache.bytes_per_position(lm, model.dtype), capacity)
        if lanes < wanted:
            log.warning("the KV-cache budget holds %d sequences, not the %d asked for", lanes, wanted)
        self.lanes, self.lane_capacity = lanes, capacity
        self.cache = KVCache(lm, lanes, capacity, model.dtype)

    # ---- prompt work ---------------------------------------------------------------------------------------

    def encode_view(self, pixels: np.ndarray, trace: Trace | None = None) -> mx.array:
        nhwc = mx.array(np.ascontiguousarray(np.asarray(pixels, dtype=np.float32).transpose(1, 2, 0)))
        features = self._model().encode_views(nhwc[None], trace)[0]
        mx.eval(features)  # the view is this unit's work, not the next one's
        return features

    def embed_prompt(self, inputs: PreparedInputs, views: Sequence[mx.array], trace: Trace | None = None) -> mx.array:
        model = self._model()
        if inputs.inputs_embeds is not None:
            embeds = mx.array(np.asarray(inputs.inputs_embeds, dtype=np.float32)).astype(model.dtype)
        else:
            ids = mx.array(np.asarray(inputs.input_ids, dtype=np.int32))
            rows = inputs.embedding_rows
            embeds = model.embed_prompt(ids, views, None if rows is None else mx.array(np.asarray(rows, np.int32)))
        if trace is not None:
            trace["inputs_embeds"] = embeds
        return embeds

    def prefill(
        self, lane: int, embeds: mx.array, start: int, end: int, trace: Trace | None = None
    ) -> mx.array | None:
        model = self._model()
        hidden = model.prefill(embeds[None, start:end], self.cache, lane, start, trace)
        if end < embeds.shape[0]:
            mx.eval(self.cache.keys, self.cache.values)  # the chunk is this unit's work
            return None
        logits = model.logits(hidden[:, -1])
        mx.async_eval(logits)
        return logits

    # ---- decode steps --------------------------------------------------------------------------------------

    def forward(self, batch: int, tokens: mx.array | np.ndarray) -> mx.array:
        if isinstance(tokens, np.ndarray):
            tokens = mx.array(tokens.astype(np.int32))
        logits = self._model().decode_step(tokens[:batch], self.cache)
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

    def logprobs(self, logits: mx.array, tokens: mx.array | np.ndarray, top: int) -> tuple[mx.array, ...]:
        if isinstance(tokens, np.ndarray):
            tokens = mx.array(tokens.astype(np.int32))
        handle = token_logprobs(logits, tokens, top)
        mx.async_eval(*handle)
        return handle

    def read_logprobs(self, handle: tuple[mx.array, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        chosen, ids, values = handle
        return np.array(chosen, dtype=np.float32), np.array(ids, dtype=np.int64), np.array(values, dtype=np.float32)

    def move_lane(self, src: int, dst: int) -> None:
        self.cache.move_lane(src, dst)

    def close(self) -> None:
        mx.synchronize()  # what was queued with async_eval finishes on the owning thread
        self.model = None
        self.cache.release()

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
        total = memory_limit_bytes()
    return int(total * DEFAULT_KV_FRACTION)


def load(model_dir: Path, options: BackendOptions, progress: ProgressCallback | None = None) -> MlxBackend:
    """Loads the model on MLX on the calling thread; the device is "metal" (Apple GPU) or "cpu" (MLX's CPU)."""
    device, dtype = options.device, options.dtype
    if options.quantize != "none":
        raise BackendUnavailableError(
            f"--quantize {options.quantize} is for the torch backend; MLX loads weights quantized by `dsocr convert`"
        )
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
    return MlxBackend(model, device, dtype, quantization, max_batch=options.max_batch,
                      kv_cache_gib=options.kv_cache_gib, max_context=options.max_context)
