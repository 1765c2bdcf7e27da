"""The torch backend behind common.engine.backend.Backend: a KV cache in lanes, prompt jobs, batched decode steps."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from common.engine.backend import ProgressCallback, StepControls, lane_capacity
from common.errors import InputError
from common.model.inputs import ImageInput, PreparedInputs
from dsocr_torch.language import KVCache
from dsocr_torch.loader import load_model
from dsocr_torch.model import DeepseekOCRForCausalLM, ImageTensors
from dsocr_torch.sampling import choose_tokens

log = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

DEFAULT_MAX_BATCH = {"cpu": 8, "cuda": 32}
# Prompt positions per prefill unit: bounds how long running sequences wait for a joining prompt.
PREFILL_CHUNK = {"cpu": 512, "cuda": 2048}


def default_kv_cache_bytes(device: torch.device) -> int:
    """CPU: half the machine's memory, reserved but only committed as positions are written (untouched pages
    of a fresh allocation cost nothing); CUDA: 60% of what is free once the weights are loaded."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.6)
    try:
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    return total // 2


class TorchPrefill:
    """One prompt into one lane: each vision view is a unit, then each chunk of prompt positions."""

    def __init__(self, backend: TorchBackend, lane: int, inputs: PreparedInputs) -> None:
        self._units = backend._prefill_units(lane, inputs)
        self._logits: torch.Tensor | None = None

    def advance(self) -> bool:
        try:
            self._logits = next(self._units)
        except StopIteration:
            raise RuntimeError("advance() after the prompt was complete") from None
        return self._logits is not None

    def logits(self) -> torch.Tensor:
        if self._logits is None:
            raise RuntimeError("the prompt is not complete")
        return self._logits

    def close(self) -> None:
        self._units.close()
        self._logits = None


class TorchBackend:
    name = "torch"

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
        self.eos_token_id = lm.eos_token_id
        self.vocab_size = lm.vocab_size
        self.asynchronous = device.type == "cuda"  # the loop queues a step before reading the previous tokens
        self.prefill_chunk = PREFILL_CHUNK.get(device.type, 512)
        model.pack_for_cpu_decode()  # once, at load: a first request pays nothing extra
        wanted = max_batch or DEFAULT_MAX_BATCH.get(device.type, 8)
        budget = int(kv_cache_gib * (1 << 30)) if kv_cache_gib is not None else default_kv_cache_bytes(device)
        per_position = KVCache.bytes_per_position(lm, model.cache_dtype)
        capacity = lane_capacity(lm.max_position_embeddings, max_context)
        lanes = min(wanted, budget // (per_position * capacity))
        if lanes < 1:
            raise InputError(
                f"a KV cache of {budget / (1 << 30):.2f} GiB cannot hold one sequence of {capacity} positions "
                f"({per_position * capacity / (1 << 30):.2f} GiB); raise --kv-cache-gib"
            )
        if lanes < wanted:
            log.warning("the KV-cache budget holds %d sequences, not the %d asked for", lanes, wanted)
        self.lanes, self.lane_capacity = lanes, capacity
        self.cache = model.new_cache(capacity, lanes)
        self.cuda_graphs = None
        if device.type == "cuda" and cuda_graphs is not False:
            from dsocr_torch.graphs import DecodeGraphs

            self.cuda_graphs = DecodeGraphs(model, self.cache, lanes)

    # ---- Backend protocol ------------------------------------------------------------------------------------

    def start_prefill(self, lane: int, inputs: PreparedInputs) -> TorchPrefill:
        if not 0 <= lane < self.lanes:
            raise ValueError(f"lane {lane} outside [0, {self.lanes})")
        if inputs.input_ids.ndim != 1 or inputs.input_ids.shape[0] == 0:
            raise InputError("the prompt must be a non-empty 1-D sequence of token ids")
        if inputs.input_ids.shape[0] >= self.lane_capacity:
            raise InputError(
                f"the prompt has {inputs.input_ids.shape[0]} tokens; the context holds {self.lane_capacity}"
            )
        return TorchPrefill(self, lane, inputs)

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
    def move_lane(self, src: int, dst: int) -> None:
        self.cache.move_lane(src, dst)

    def close(self) -> None:
        self.model = None
        self.cuda_graphs = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- prompt work -------------------------------------------------------------------------------------------

    def image_tensors(self, image: ImageInput) -> ImageTensors:
        model = self._model()

        def convert(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(model.device, model.dtype)

        local = convert(image.local_views) if image.has_crops else None
        return ImageTensors(convert(image.global_view)[None], local, tuple(image.crop_grid))

    def _prefill_units(self, lane: int, inputs: PreparedInputs) -> Iterator[torch.Tensor | None]:
        """Yields None after each unit of work and the last position's logits [1, V] after the last one."""
        model = self._model()
        if inputs.inputs_embeds is not None:
            embeds = torch.from_numpy(np.asarray(inputs.inputs_embeds, dtype=np.float32)).to(model.device, model.dtype)
            images: list[ImageInput] = []
        else:
            with torch.inference_mode():
                input_ids = torch.from_numpy(np.asarray(inputs.input_ids, dtype=np.int64)).to(model.device)
                embeds = model.model.embed_tokens(input_ids)
            images = inputs.images
        image_embeds = []
        for image in images:
            views = self.image_tensors(image)
            with torch.inference_mode():
                global_tokens = model.model.encode_views(views.global_view)["projector_out"][0]
            yield None
            local_tokens = None
            if views.local_views is not None:
                tiles = []
                for tile in views.local_views.split(1):
                    with torch.inference_mode():
                        tiles.append(model.model.encode_views(tile)["projector_out"])
                    yield None
                local_tokens = torch.cat(tiles)
            with torch.inference_mode():
                image_embeds.append(model.model.layout_image_tokens(global_tokens, local_tokens, views.crop_grid))
        with torch.inference_mode():
            if image_embeds:
                embeds = model.model.scatter_image_embeds(
                    embeds, torch.from_numpy(np.asarray(inputs.images_seq_mask, dtype=bool)).to(model.device),
                    torch.cat(image_embeds),
                )
            embeds = embeds.unsqueeze(0)
        length = embeds.shape[1]
        for start in range(0, length, self.prefill_chunk):
            end = min(start + self.prefill_chunk, length)
            with torch.inference_mode():
                hidden = model.model.decode(embeds[:, start:end], self.cache, start, lane=lane)
                logits = model.logits(hidden[:, -1]) if end == length else None
            yield logits

    def _model(self) -> DeepseekOCRForCausalLM:
        if self.model is None:
            raise RuntimeError("this backend was closed")
        return self.model


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
) -> TorchBackend:
    model = load_model(model_dir, device=device, dtype=dtype, progress=progress, pack=True)
    return TorchBackend(
        model, max_batch=max_batch, kv_cache_gib=kv_cache_gib, max_context=max_context, cuda_graphs=cuda_graphs
    )
