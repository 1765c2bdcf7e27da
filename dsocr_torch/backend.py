"""The torch backend behind common.engine.backend.Backend: a KV cache in lanes, prompt work, batched decode steps."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from common.engine.backend import BackendOptions, ProgressCallback, StepControls, Trace, lane_capacity, lanes_within
from common.memory import memory_limit_bytes
from common.model.inputs import PreparedInputs
from dsocr_torch import native
from dsocr_torch.cache import KVCache
from dsocr_torch.model import DeepseekOCRForCausalLM
from dsocr_torch.sampling import choose_tokens, token_logprobs
from dsocr_torch.weights.loader import load_model

log = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

DEFAULT_MAX_BATCH = {"cpu": 8, "cuda": 32}


def default_kv_cache_bytes(device: torch.device) -> int:
    """CPU: half the machine's memory (or its container's limit), reserved but only committed as positions are
    written (untouched pages of a fresh allocation cost nothing); CUDA: 60% of what is free once the weights are
    loaded."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.6)
    return memory_limit_bytes() // 2


class TorchBackend:
    name = "torch"
    asynchronous: bool  # CUDA: a step is queued before the previous step's tokens are read; CPU: runs in the call

    def __init__(
        self,
        model: DeepseekOCRForCausalLM,
        *,
        max_batch: int | None = None,
        kv_cache_gib: float | None = None,
        max_context: int | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        self.model: DeepseekOCRForCausalLM | None = model
        device = model.device
        lm = model.config.language
        self.device = device.type
        self.dtype = _DTYPE_NAMES[model.dtype]
        if model.weight_storage != "none":  # e.g. "float32 (int8 weights)": the compute dtype, the decoder's storage
            self.dtype += f" ({model.weight_storage} weights)"
        self.eos_token_id = lm.eos_token_id
        self.vocab_size = lm.vocab_size
        self.asynchronous = device.type == "cuda"
        model.pack_for_cpu_decode()  # once, at load: a first request pays nothing extra
        if device.type == "cpu":
            native.library()  # the C decode kernels, built once per machine: at load, not in a first request
        wanted = max_batch or DEFAULT_MAX_BATCH.get(device.type, 8)
        budget = int(kv_cache_gib * (1 << 30)) if kv_cache_gib is not None else default_kv_cache_bytes(device)
        capacity = lane_capacity(lm.max_position_embeddings, max_context)
        lanes = lanes_within(wanted, budget, KVCache.bytes_per_position(lm, model.cache_dtype), capacity)
        if lanes < wanted:
            log.warning("the KV-cache budget holds %d sequences, not the %d asked for", lanes, wanted)
        self.lanes, self.lane_capacity = lanes, capacity
        self.cache = model.new_cache(capacity, lanes)
        self.cuda_graphs = None
        if device.type == "cuda" and cuda_graphs is not False:
            from dsocr_torch.graphs import DecodeGraphs

            self.cuda_graphs = DecodeGraphs(model, self.cache, lanes)

    # ---- prompt work ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_view(self, pixels: np.ndarray, trace: Trace | None = None) -> torch.Tensor:
        model = self._model()
        view = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(model.device)
        return model.encode_views(view[None], trace)[0]

    @torch.inference_mode()
    def embed_prompt(
        self, inputs: PreparedInputs, views: Sequence[torch.Tensor], trace: Trace | None = None
    ) -> torch.Tensor:
        model = self._model()
        if inputs.inputs_embeds is not None:
            embeds = torch.from_numpy(np.asarray(inputs.inputs_embeds, dtype=np.float32)).to(model.device, model.dtype)
        else:
            ids = torch.from_numpy(np.asarray(inputs.input_ids, dtype=np.int64)).to(model.device)
            rows = inputs.embedding_rows
            rows = None if rows is None else torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(model.device)
            embeds = model.embed_prompt(ids, views, rows)
        if trace is not None:
            trace["inputs_embeds"] = embeds
        return embeds

    @torch.inference_mode()
    def prefill(
        self, lane: int, embeds: torch.Tensor, start: int, end: int, trace: Trace | None = None
    ) -> torch.Tensor | None:
        model = self._model()
        hidden = model.prefill(embeds[None, start:end], self.cache, lane, start, trace)
        return model.logits(hidden[:, -1]) if end == embeds.shape[0] else None

    # ---- decode steps --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, batch: int, tokens: torch.Tensor | np.ndarray) -> torch.Tensor:
        model = self._model()
        if isinstance(tokens, np.ndarray):
            tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(model.device, non_blocking=True)
        if self.cuda_graphs is not None:
            return self.cuda_graphs.step(tokens[:batch])
        return model.decode_step(tokens[:batch], self.cache)

    def gather(self, logits: torch.Tensor, rows: Sequence[int] | None, extra: Sequence[torch.Tensor]) -> torch.Tensor:
        parts = []
        if rows is None:
            parts.append(logits)
        elif len(rows):
            parts.append(logits.index_select(0, torch.tensor(list(rows), device=logits.device)))
        parts.extend(extra)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, controls: StepControls) -> torch.Tensor:
        return choose_tokens(logits, controls)

    def read(self, tokens: torch.Tensor) -> np.ndarray:
        return tokens.cpu().numpy().astype(np.int64, copy=False)

    @torch.inference_mode()
    def logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor | np.ndarray, top: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(tokens, np.ndarray):
            tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(logits.device, non_blocking=True)
        return token_logprobs(logits, tokens, top)  # queued on the device; read_logprobs copies

    def read_logprobs(self, handle: tuple[torch.Tensor, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        values, ids = handle
        values = values.cpu().numpy().astype(np.float32, copy=False)
        return values[:, 0].copy(), ids.cpu().numpy().astype(np.int64, copy=False), values[:, 1:].copy()

    @torch.inference_mode()
    def move_lane(self, src: int, dst: int) -> None:
        self.cache.move_lane(src, dst)

    def close(self) -> None:
        self.model = None
        self.cuda_graphs = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _model(self) -> DeepseekOCRForCausalLM:
        if self.model is None:
            raise RuntimeError("this backend was closed")
        return self.model


def load(model_dir: Path, options: BackendOptions, progress: ProgressCallback | None = None) -> TorchBackend:
    model = load_model(model_dir, device=options.device, dtype=options.dtype, progress=progress, pack=True,
                       quantize=options.quantize)
    return TorchBackend(model, max_batch=options.max_batch, kv_cache_gib=options.kv_cache_gib,
                        max_context=options.max_context, cuda_graphs=options.cuda_graphs)
