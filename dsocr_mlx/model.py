"""DeepSeek-OCR and DeepSeek-OCR 2 on MLX: vision encoder -> projector -> DeepSeek-V2 MoE decoder.

Mirrors dsocr_torch/model.py: DeepSeek-OCR encodes views with SAM -> CLIP, DeepSeek-OCR 2 with SAM -> a Qwen2
encoder with learned queries; `MODEL_CLASSES` registers each family's `model.*` class. Where each vision token
sits in the prompt is decided once, framework-free, by common.model.prompt (`PreparedInputs.embedding_rows`);
`embed_prompt` only gathers them. MLX convolutions are channels-last, so pixels go in as NHWC and SAM's output
stays [B, g, g, C]; everything after the projector is layout-independent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_causal_mask

from common.engine.backend import Trace
from common.model.config import ModelConfig
from common.model.families import DEEPSEEK_OCR, DEEPSEEK_OCR_2
from dsocr_mlx import clip as clip_module
from dsocr_mlx import sam as sam_module
from dsocr_mlx.cache import KVCache
from dsocr_mlx.language import DeepseekV2DecoderLayer, decoder_forward, stack_experts
from dsocr_mlx.qwen2 import Qwen2Decoder2Encoder

SAM_PREFIX = "model.sam_model."
CLIP_PREFIX = "model.vision_model."
Sanitizer = Callable[[dict[str, mx.array]], dict[str, mx.array]]


class Projector(nn.Module):
    """`model.projector.layers`: Linear(vision features -> hidden) with bias."""

    def __init__(self, input_dim: int, n_embed: int) -> None:
        super().__init__()
        self.layers = nn.Linear(input_dim, n_embed, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.layers(x)


class DeepseekOCRModel(nn.Module):
    """`model.*` of DeepSeek-OCR: token embeddings, decoder layers, final norm, SAM + CLIP, the projector and
    the layout embeddings. Another family's class overrides `build_vision`, `project`, `encode_views` and
    `TOWERS`."""

    # Vision towers whose checkpoint tensors need `sanitize` (PyTorch conv layouts), by name prefix.
    TOWERS: tuple[tuple[str, Sanitizer], ...] = ((SAM_PREFIX, sam_module.sanitize), (CLIP_PREFIX, clip_module.sanitize))

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        lm = cfg.language
        self.embed_tokens = nn.Embedding(lm.vocab_size, lm.hidden_size)
        self.layers = [DeepseekV2DecoderLayer(lm, i) for i in range(lm.num_hidden_layers)]
        self.norm = nn.RMSNorm(lm.hidden_size, eps=lm.rms_norm_eps)
        self.build_vision(cfg)
        # The authors' spelling: "seperator".
        if cfg.family.layout.row_newlines:
            self.image_newline = mx.zeros((lm.hidden_size,))
        if cfg.family.layout.separator:
            self.view_seperator = mx.zeros((lm.hidden_size,))

    def build_vision(self, cfg: ModelConfig) -> None:
        assert cfg.clip is not None
        self.sam_model = sam_module.ImageEncoderViT(cfg.sam)
        self.vision_model = clip_module.VitModel(cfg.clip)
        self.projector = Projector(cfg.projector.input_dim, cfg.projector.n_embed)

    def vision_modules(self) -> list[Any]:
        """Everything that is not the decoder (what the loader evaluates after it)."""
        decoder = {"embed_tokens", "layers", "norm"}
        return [value for name, value in self.items() if name not in decoder]

    def project(self, sam_out: mx.array, clip_out: mx.array) -> mx.array:
        """cat(CLIP tokens without CLS, SAM features) on channels -> projector: [B, g*g, hidden]."""
        batch, grid_h, grid_w, channels = sam_out.shape
        features = mx.concatenate([clip_out[:, 1:], sam_out.reshape(batch, grid_h * grid_w, channels)], axis=-1)
        return self.projector(features)

    def encode_views(self, pixels: mx.array, trace: Trace | None = None) -> mx.array:
        """[B, S, S, 3] NHWC pixels -> [B, g*g, hidden] projected features (row-major over the g x g grid)."""
        sam_out = self.sam_model(pixels)
        clip_out = self.vision_model(sam_out)
        projected = self.project(sam_out, clip_out)
        record_views(trace, sam_out=sam_out, clip_out=clip_out, projector_out=projected)
        return projected


class DeepseekOCR2Model(DeepseekOCRModel):
    """`model.*` of DeepSeek-OCR 2: SAM (net_3 as wide as the encoder) + the Qwen2 encoder, whose query
    outputs (one per vision token) go through the projector."""

    TOWERS = ((SAM_PREFIX, sam_module.sanitize),)  # the Qwen2 encoder has no convolutions

    def build_vision(self, cfg: ModelConfig) -> None:
        assert cfg.qwen2 is not None
        self.sam_model = sam_module.ImageEncoderViT(cfg.sam)
        self.qwen2_model = Qwen2Decoder2Encoder(cfg.qwen2, cfg.family.view_sizes)
        self.projector = Projector(cfg.projector.input_dim, cfg.projector.n_embed)

    def project(self, queries: mx.array) -> mx.array:
        return self.projector(queries)

    def encode_views(self, pixels: mx.array, trace: Trace | None = None) -> mx.array:
        sam_out = self.sam_model(pixels)
        batch, grid_h, grid_w, channels = sam_out.shape
        full = self.qwen2_model(sam_out.reshape(batch, grid_h * grid_w, channels))
        queries = full[:, grid_h * grid_w :]  # only the queries' outputs leave the encoder
        projected = self.project(queries)
        record_views(trace, sam_out=sam_out, qwen2_full_out=full, qwen2_out=queries, projector_out=projected)
        return projected


# Each family's `model.*` class; the decoder and the token embeddings are shared.
MODEL_CLASSES: dict[str, type[DeepseekOCRModel]] = {
    DEEPSEEK_OCR.name: DeepseekOCRModel,
    DEEPSEEK_OCR_2.name: DeepseekOCR2Model,
}


class DeepseekOCRForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = MODEL_CLASSES[cfg.family.name](cfg)
        self.lm_head = nn.Linear(cfg.language.hidden_size, cfg.language.vocab_size, bias=False)

    @property
    def layers(self) -> list[DeepseekV2DecoderLayer]:
        return self.model.layers

    @property
    def dtype(self) -> mx.Dtype:
        return self.model.norm.weight.dtype

    # ---- the units of work the backend runs -----------------------------------------------------------

    def encode_views(self, pixels: mx.array, trace: Trace | None = None) -> mx.array:
        """[B, S, S, 3] NHWC pixels -> [B, g*g, hidden] projected features (row-major over the g x g grid)."""
        return self.model.encode_views(pixels.astype(self.dtype), trace)

    def embed_prompt(self, input_ids: mx.array, views: Sequence[mx.array], rows: mx.array | None) -> mx.array:
        """input_ids [L] -> inputs_embeds [L, hidden], gathered by `rows` as dsocr_torch's `embed_prompt` does."""
        tokens = self.model.embed_tokens(input_ids)
        if rows is None:
            return tokens
        layout = [getattr(self.model, name, None) for name in ("image_newline", "view_seperator")]
        extra = [mx.zeros((1, tokens.shape[-1]), tokens.dtype) if e is None else e.astype(tokens.dtype)[None]
                 for e in layout]
        return mx.concatenate([tokens, *views, *extra], axis=0)[rows]

    def prefill(
        self, inputs_embeds: mx.array, cache: KVCache, lane: int, start: int, trace: Trace | None = None
    ) -> mx.array:
        """inputs_embeds [1, T, hidden] at positions start.. of `lane` -> final-normed hidden [1, T, hidden]."""
        length = inputs_embeds.shape[1]
        views = cache.prefill_views(lane, start, length)
        mask: Any = "causal" if start == 0 else create_causal_mask(length, offset=start)
        hidden = decoder_forward(self.model.layers, self.model.norm, inputs_embeds, views, mask, trace)
        cache.host_lengths[lane] = start + length
        return hidden

    def decode_step(self, tokens: mx.array, cache: KVCache) -> mx.array:
        """Token ids [B] for lanes [0, B), one position each at the lane's own offset -> logits [B, vocab]."""
        batch = tokens.shape[0]
        views, positions, kv_length = cache.decode_views(batch)
        lengths = cache.host_lengths[:batch]
        mask = None
        if min(lengths) + 1 != kv_length:  # a lane shorter than the longest must not see past its end
            mask = (mx.arange(kv_length)[None, :] <= positions[:, None]).reshape(batch, 1, 1, kv_length)
        embeds = self.model.embed_tokens(tokens)[:, None]
        hidden = decoder_forward(self.model.layers, self.model.norm, embeds, views, mask)
        for lane in range(batch):
            cache.host_lengths[lane] += 1
        return self.logits(hidden[:, 0])

    def logits(self, hidden: mx.array) -> mx.array:
        return self.lm_head(hidden).astype(mx.float32)

    # ---- weights ------------------------------------------------------------------------------------

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Official Hugging Face names/layouts -> this model's; idempotent (sanitising twice equals once).

        Per-expert tensors are stacked; the vision towers' conv weights go from OIHW to OHWI through their own
        `sanitize`. Nothing else is renamed or dropped.
        """
        weights = stack_experts(dict(weights), self.config.language)
        for prefix, tower_sanitize in self.model.TOWERS:
            tower = {k[len(prefix) :]: weights.pop(k) for k in [k for k in weights if k.startswith(prefix)]}
            weights.update({prefix + k: v for k, v in tower_sanitize(tower).items()})
        return weights


def record_views(trace: Trace | None, **outputs: mx.array) -> None:
    """Appends one dict per view of the batch to trace["views"] (names: common.engine.backend.Backend); SAM's
    features go in as NCHW, as the torch backend (and the reference) record them."""
    if trace is None:
        return
    outputs["sam_out"] = outputs["sam_out"].transpose(0, 3, 1, 2)
    views = trace.setdefault("views", [])
    for i in range(next(iter(outputs.values())).shape[0]):
        views.append({name: value[i : i + 1] for name, value in outputs.items()})
