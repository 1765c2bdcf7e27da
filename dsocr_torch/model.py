"""DeepSeek-OCR and DeepSeek-OCR 2: a vision encoder, a linear projector and the DeepSeek-V2 MoE decoder.

DeepSeek-OCR encodes each view with SAM ViT-B + CLIP-L, DeepSeek-OCR 2 with SAM ViT-B + a Qwen2 encoder
with learned queries; the decoder is the same. `MODEL_CLASSES` registers each family's `model.*` class. Where
each vision token sits in the prompt is decided once, framework-free, by common.model.prompt (the rows of
`PreparedInputs.embedding_rows`); `embed_prompt` only gathers them. Attribute paths equal the checkpoint's tensor
names (`model.layers.3.mlp.experts.7.up_proj.weight`, `model.sam_model.neck.0.weight`,
`model.qwen2_model.query_768.weight`, `lm_head.weight`, ...).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from common.engine.backend import Trace
from common.model.config import LanguageConfig, ModelConfig
from common.model.families import DEEPSEEK_OCR, DEEPSEEK_OCR_2
from dsocr_torch.cache import CacheWrite, KVCache
from dsocr_torch.clip import VitModel
from dsocr_torch.language import MLP, Attention, Linear, RMSNorm, rope_tables
from dsocr_torch.moe import MoEFeedForward
from dsocr_torch.qwen2 import Qwen2Decoder2Encoder
from dsocr_torch.sam import ImageEncoderViT


class DeepseekV2DecoderLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = Attention(cfg, layer_idx)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp: MoEFeedForward | MLP = (
            MoEFeedForward(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        write: CacheWrite,
        trace: Trace | None = None,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, write)
        normed = self.post_attention_layernorm(h)
        if isinstance(self.mlp, MoEFeedForward):
            return h + self.mlp(normed, trace, self.layer_idx)
        return h + self.mlp(normed)


class Projector(nn.Module):
    """`model.projector.layers`: one Linear from the vision features to the decoder width."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.Linear(cfg.projector.input_dim, cfg.projector.n_embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DeepseekOCRModel(nn.Module):
    """`model.*` of DeepSeek-OCR: the decoder, SAM + CLIP-L, the projector and the layout embeddings.

    Another family's class overrides `build_vision`, `project` and `encode_views`; the rest is shared.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        lm = cfg.language
        self.config = cfg
        self.embed_tokens = nn.Embedding(lm.vocab_size, lm.hidden_size)
        self.layers = nn.ModuleList(DeepseekV2DecoderLayer(lm, i) for i in range(lm.num_hidden_layers))
        self.norm = RMSNorm(lm.hidden_size, lm.rms_norm_eps)
        self.build_vision(cfg)
        if cfg.family.layout.row_newlines:
            self.image_newline = nn.Parameter(torch.zeros(lm.hidden_size))
        if cfg.family.layout.separator:
            self.view_seperator = nn.Parameter(torch.zeros(lm.hidden_size))  # sic: the checkpoint's spelling
        self._rope_f32: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rope_cast: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---- vision -------------------------------------------------------------------------------------
    def build_vision(self, cfg: ModelConfig) -> None:
        assert cfg.clip is not None
        self.sam_model = ImageEncoderViT(cfg.sam)
        self.vision_model = VitModel(cfg.clip)
        self.projector = Projector(cfg)

    def project(self, sam_out: torch.Tensor, clip_out: torch.Tensor) -> torch.Tensor:
        """cat(CLIP tokens without CLS, SAM features) on channels -> projector: [B, g*g, hidden]."""
        return self.projector(torch.cat((clip_out[:, 1:], sam_out.flatten(2).transpose(1, 2)), dim=-1))

    def encode_views(self, pixels: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        """pixels [B, 3, S, S] -> projected vision tokens [B, (S/64)^2, hidden], row-major over the token grid."""
        sam_out = self.sam_model(pixels)
        clip_out = self.vision_model(sam_out)
        projected = self.project(sam_out, clip_out)
        record_views(trace, sam_out=sam_out, clip_out=clip_out, projector_out=projected)
        return projected

    # ---- decoder ------------------------------------------------------------------------------------
    def rope_table(self, needed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [positions, head_dim] in `dtype`, covering at least `needed` positions (built once)."""
        if self._rope_cast is None or self._rope_cast[0].dtype != dtype or self._rope_cast[0].shape[0] < needed:
            lm = self.config.language
            # Positions past max_position_embeddings keep the same formula (as the reference's RoPE does).
            size = max(lm.max_position_embeddings, needed)
            cos, sin = rope_tables(lm.head_dim, size, lm.rope_theta)
            device = self.embed_tokens.weight.device
            self._rope_cast = (cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype))
        return self._rope_cast

    def rope(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rope_table(start + length, dtype)
        return cos[start : start + length], sin[start : start + length]

    def prefill(
        self, inputs_embeds: torch.Tensor, cache: KVCache, lane: int, start: int, trace: Trace | None = None
    ) -> torch.Tensor:
        """inputs_embeds [1, T, hidden] at positions start.. of `lane` -> final-norm hidden [1, T, hidden]."""
        length = inputs_embeds.shape[1]
        cos, sin = self.rope(start, length, inputs_embeds.dtype)
        hidden = self._layers(inputs_embeds, cos, sin, cache, CacheWrite(start=start, lane=lane), trace)
        cache.set_length(lane, start + length)
        return hidden

    def decode_batch(self, inputs_embeds: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Decode: inputs_embeds [B, 1, hidden], one token per lane of [0, B) -> final-norm hidden [B, 1, hidden].

        Each lane's token goes at its own position (`cache.lengths`), read on the device: no host sync. The
        host only decides how far to read keys (the longest lane) and whether lanes need a mask.
        """
        batch = inputs_embeds.shape[0]
        host = cache.host_lengths[:batch]
        kv_length = max(host) + 1
        cache.clean_to(batch, kv_length)
        hidden = self.decode_static(inputs_embeds, cache, kv_length, masked=min(host) + 1 != kv_length)
        cache.lengths[:batch] += 1
        for lane in range(batch):
            cache.host_lengths[lane] += 1
        return hidden

    def decode_static(
        self, inputs_embeds: torch.Tensor, cache: KVCache, kv_length: int, masked: bool = True
    ) -> torch.Tensor:
        """The decode step's device work with static shapes for a given (batch, kv_length): what a CUDA graph
        captures. Positions come from `cache.lengths`; writes past the cache's end are clamped (a padded row of
        a graph bucket may sit on a full, unused lane). Lengths are not advanced here."""
        batch = inputs_embeds.shape[0]
        positions = cache.lengths[:batch]
        mask = None
        if masked:
            keys_at = torch.arange(kv_length, device=positions.device)
            mask = (keys_at[None, :] <= positions[:, None]).view(batch, 1, 1, kv_length)
        cos_table, sin_table = self.rope_table(max(kv_length, cache.capacity), inputs_embeds.dtype)
        at = positions.clamp(max=cache.capacity - 1)
        cos = cos_table[at].view(batch, 1, 1, -1)
        sin = sin_table[at].view(batch, 1, 1, -1)
        write = CacheWrite(lane=None, positions=at, kv_length=kv_length, mask=mask)
        return self._layers(inputs_embeds, cos, sin, cache, write, None)

    def _layers(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        write: CacheWrite,
        trace: Trace | None,
    ) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, cos, sin, cache, write, trace)
            if trace is not None:
                trace.setdefault("layer_outputs", []).append(h)
        h = self.norm(h)
        if trace is not None:
            trace["final_norm"] = h
        return h


class DeepseekOCR2Model(DeepseekOCRModel):
    """`model.*` of DeepSeek-OCR 2: SAM ViT-B (net_3 as wide as the encoder) + the Qwen2 encoder, whose
    query outputs (one per vision token) go through the projector."""

    def build_vision(self, cfg: ModelConfig) -> None:
        assert cfg.qwen2 is not None
        self.sam_model = ImageEncoderViT(cfg.sam)
        self.qwen2_model = Qwen2Decoder2Encoder(cfg.qwen2, cfg.family.view_sizes)
        self.projector = Projector(cfg)

    def project(self, queries: torch.Tensor) -> torch.Tensor:
        return self.projector(queries)

    def encode_views(self, pixels: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        sam_out = self.sam_model(pixels)
        features = sam_out.flatten(2).transpose(1, 2)  # [B, n, dim], row-major over SAM's grid
        full = self.qwen2_model(features)
        queries = full[:, features.shape[1] :]  # only the queries' outputs leave the encoder
        projected = self.project(queries)
        record_views(trace, sam_out=sam_out, qwen2_full_out=full, qwen2_out=queries, projector_out=projected)
        return projected


def _dense_linears(module: nn.Module, prefix: str) -> Iterator[tuple[str, Linear]]:
    """(name, Linear) under `module` in module order, leaving out routed experts."""
    for name, child in module.named_children():
        if isinstance(child, Linear):
            yield f"{prefix}.{name}", child
        elif not (isinstance(module, MoEFeedForward) and child is module.experts):
            yield from _dense_linears(child, f"{prefix}.{name}")


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
        self.lm_head = Linear(cfg.language.hidden_size, cfg.language.vocab_size, bias=False)
        self.weight_storage = "none"  # the loader's --quantize: "bf16"/"int8" decoder weights (weight_only.py)

    @property
    def device(self) -> torch.device:
        # The embedding table, never packed (see pack_for_cpu_decode), tells the compute device and dtype.
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def pack_for_cpu_decode(self) -> int:
        """Packs the decoder's dense Linear weights for oneDNN where that is faster (bfloat16 on CPU).

        Idempotent; returns how many layers are packed. After packing, those layers' `weight` Parameters
        are meta tensors (the values live in oneDNN's layout only), so the model is for inference only.
        Routed experts are skipped: their per-expert weights are views of the stacks the MoE reads.
        """
        return sum(int(linear.pack_weight()) for linear in self.decode_linears().values())

    def decode_linears(self) -> dict[str, Linear]:
        """The Linear layers `pack_for_cpu_decode` packs, by module name: the decoder's, without routed experts."""
        return dict(_dense_linears(self.model.layers, "model.layers")) | {"lm_head": self.lm_head}

    def vision_towers(self) -> dict[str, nn.Module]:
        """The vision encoders and the projector, by module name (what `--quantize` keeps stored in bf16)."""
        names = ("sam_model", "vision_model", "qwen2_model", "projector")
        return {f"model.{name}": getattr(self.model, name) for name in names if hasattr(self.model, name)}

    def moe_layers(self) -> list[tuple[str, MoEFeedForward]]:
        # Only a decoder layer's `mlp` is ever one: no walk over the thousands of expert modules.
        layers = enumerate(self.model.layers)
        return [(f"model.layers.{i}.mlp", layer.mlp) for i, layer in layers if isinstance(layer.mlp, MoEFeedForward)]

    def new_cache(self, capacity: int, lanes: int = 1) -> KVCache:
        return KVCache.allocate(self.config.language, lanes, capacity, self.device, self.cache_dtype)

    @property
    def cache_dtype(self) -> torch.dtype:
        return KVCache.dtype_for(self.device, self.dtype)

    # ---- the units of work the backend runs -----------------------------------------------------------

    def encode_views(self, pixels: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        """pixels [B, 3, S, S] -> projected vision tokens [B, (S/64)^2, hidden]."""
        return self.model.encode_views(pixels.to(self.dtype), trace)

    def embed_prompt(
        self, input_ids: torch.Tensor, views: Sequence[torch.Tensor], rows: torch.Tensor | None
    ) -> torch.Tensor:
        """input_ids [L] -> inputs_embeds [L, hidden]: row i is row `rows[i]` of [the token embeddings; every
        view's tokens in order; image_newline; view_seperator] (common.engine.backend.Backend.embed_prompt);
        rows None: the token embeddings. A family without a layout embedding has a zero row in its place."""
        tokens = self.model.embed_tokens(input_ids)
        if rows is None:
            return tokens
        layout = [getattr(self.model, name, None) for name in ("image_newline", "view_seperator")]
        extra = [tokens.new_zeros(1, tokens.shape[-1]) if e is None else e.to(tokens.dtype).view(1, -1) for e in layout]
        return torch.cat([tokens, *views, *extra]).index_select(0, rows)

    def prefill(
        self, inputs_embeds: torch.Tensor, cache: KVCache, lane: int, start: int, trace: Trace | None = None
    ) -> torch.Tensor:
        """inputs_embeds [1, T, hidden] at positions start.. of `lane` -> final-norm hidden [1, T, hidden]."""
        return self.model.prefill(inputs_embeds, cache, lane, start, trace)

    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decode step: token ids [B] for lanes [0, B) -> float32 logits [B, V]. No host sync."""
        embeds = self.model.embed_tokens(tokens).unsqueeze(1)
        hidden = self.model.decode_batch(embeds, cache)
        return self.logits(hidden[:, 0])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def bind_stacked_experts(self, device: torch.device | str, dtype: torch.dtype) -> None:
        for _, module in self.moe_layers():
            module.bind_stacked_experts(device, dtype)


def record_views(trace: Trace | None, **outputs: torch.Tensor) -> None:
    """Appends one dict per view of the batch to trace["views"] (names: common.engine.backend.Backend)."""
    if trace is None:
        return
    views = trace.setdefault("views", [])
    for i in range(next(iter(outputs.values())).shape[0]):
        views.append({name: value[i : i + 1] for name, value in outputs.items()})
