"""DeepSeek-OCR and DeepSeek-OCR 2: a vision encoder, a linear projector and the DeepSeek-V2 MoE decoder.

DeepSeek-OCR encodes each view with SAM ViT-B + CLIP-L, DeepSeek-OCR 2 with SAM ViT-B + a Qwen2 encoder
with learned queries; the decoder is the same. `MODEL_CLASSES` registers each family's `model.*` class; the
token layout of both comes from the family's description (common.model.families). Attribute paths equal the
checkpoint's tensor names (`model.layers.3.mlp.experts.7.up_proj.weight`, `model.sam_model.neck.0.weight`,
`model.qwen2_model.query_768.weight`, `lm_head.weight`, ...).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from common.model.config import LanguageConfig, ModelConfig
from common.model.families import DEEPSEEK_OCR, DEEPSEEK_OCR_2
from dsocr_torch.clip import VitModel
from dsocr_torch.language import MLP, Attention, CacheWrite, KVCache, Linear, RMSNorm, Trace, rope_tables
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


@dataclass
class ImageTensors:
    """One image's views as compute-dtype tensors on the model's device."""

    global_view: torch.Tensor  # [1, 3, S, S]
    local_views: torch.Tensor | None  # [n_tiles, 3, s, s]
    crop_grid: tuple[int, int]  # (width tiles, height tiles)


@dataclass
class VisionTrace:
    """Per-view intermediates for parity tests ('global'/'local' -> what `encode_views` returns)."""

    views: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    image_embeds: torch.Tensor | None = None


class DeepseekOCRModel(nn.Module):
    """`model.*` of DeepSeek-OCR: the decoder, SAM + CLIP-L, the projector and the layout embeddings.

    Another family's class overrides `build_vision` and `encode_views`; the rest is shared.
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

    def encode_views(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixels [B, 3, S, S] -> SAM features, CLIP features and projected tokens [B, (S/64)^2, hidden]."""
        sam_out = self.sam_model(pixels)
        clip_out = self.vision_model(sam_out)
        features = torch.cat((clip_out[:, 1:], sam_out.flatten(2).transpose(1, 2)), dim=-1)
        return {"sam_out": sam_out, "clip_out": clip_out, "projector_out": self.projector(features)}

    def _rows(self, grid: torch.Tensor) -> torch.Tensor:
        """grid [rows, cols, hidden] -> its tokens row by row; image_newline closes each row if the layout says so."""
        rows, _, hidden = grid.shape
        if not self.config.family.layout.row_newlines:
            return grid.reshape(-1, hidden)
        newline = self.image_newline.to(grid.dtype).view(1, 1, hidden).expand(rows, 1, hidden)
        return torch.cat((grid, newline), dim=1).reshape(-1, hidden)

    def image_embeddings(self, image: ImageTensors, trace: VisionTrace | None = None) -> torch.Tensor:
        """The image's token embeddings in sequence order: [local rows..., global rows..., view_seperator]."""
        global_out = self.encode_views(image.global_view)
        local_out = None
        if image.local_views is not None and image.local_views.shape[0] > 0:
            local_out = self.encode_views(image.local_views)
        if trace is not None:
            trace.views["global"] = global_out
            if local_out is not None:
                trace.views["local"] = local_out
        local_tokens = None if local_out is None else local_out["projector_out"]
        return self.layout_image_tokens(global_out["projector_out"][0], local_tokens, image.crop_grid)

    def layout_image_tokens(
        self, global_tokens: torch.Tensor, local_tokens: torch.Tensor | None, crop_grid: tuple[int, int]
    ) -> torch.Tensor:
        """global [g*g, hidden], local [n_tiles, t*t, hidden] -> the image's tokens in the family's layout:
        local tiles, global view, separator (common.model.families.TokenLayout)."""
        layout = self.config.family.layout
        side = _square_side(global_tokens.shape[0])
        parts = []
        if local_tokens is not None:
            width_tiles, height_tiles = crop_grid
            n_tiles, per_tile, hidden = local_tokens.shape
            if n_tiles != width_tiles * height_tiles:
                raise ValueError(f"{n_tiles} local views do not fill a {width_tiles}x{height_tiles} crop grid")
            tile_side = _square_side(per_tile)
            if layout.stitch_tiles:
                # Tile t sits at row t // width_tiles, column t % width_tiles of the crop grid.
                grid = (
                    local_tokens.view(height_tiles, width_tiles, tile_side, tile_side, hidden)
                    .permute(0, 2, 1, 3, 4)
                    .reshape(height_tiles * tile_side, width_tiles * tile_side, hidden)
                )
            else:  # tile after tile, each row-major
                grid = local_tokens.reshape(n_tiles * tile_side, tile_side, hidden)
            parts.append(self._rows(grid))
        parts.append(self._rows(global_tokens.view(side, side, -1)))
        if layout.separator:
            parts.append(self.view_seperator.to(global_tokens.dtype).view(1, -1))
        return torch.cat(parts, dim=0)

    def embed(
        self,
        input_ids: torch.Tensor,
        images_seq_mask: torch.Tensor | None,
        images: list[ImageTensors],
        trace: VisionTrace | None = None,
    ) -> torch.Tensor:
        """input_ids [L] -> inputs_embeds [1, L, hidden] with the image embeddings scattered in order."""
        embeds = self.embed_tokens(input_ids)
        if images and images_seq_mask is not None:
            image_embeds = torch.cat([self.image_embeddings(img, trace) for img in images], dim=0)
            if trace is not None:
                trace.image_embeds = image_embeds
            embeds = self.scatter_image_embeds(embeds, images_seq_mask, image_embeds)
        return embeds.unsqueeze(0)

    @staticmethod
    def scatter_image_embeds(
        embeds: torch.Tensor, images_seq_mask: torch.Tensor, image_embeds: torch.Tensor
    ) -> torch.Tensor:
        """[L, hidden] text embeddings with `image_embeds` written, in order, at the mask's True positions."""
        positions = images_seq_mask.nonzero().squeeze(-1)  # prefill only: one sync per request
        if positions.shape[0] != image_embeds.shape[0]:
            raise ValueError(
                f"the prompt has {positions.shape[0]} image positions but the images give "
                f"{image_embeds.shape[0]} embeddings"
            )
        return embeds.index_copy(0, positions, image_embeds.to(embeds.dtype))

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

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        cache: KVCache,
        start: int,
        trace: Trace | None = None,
        lane: int = 0,
    ) -> torch.Tensor:
        """Prefill: inputs_embeds [1, T, hidden] at positions start.. of `lane` -> final-norm hidden [1, T, hidden]."""
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
                trace.layer_outputs.append(h)
        h = self.norm(h)
        if trace is not None:
            trace.final_norm = h
        return h


class DeepseekOCR2Model(DeepseekOCRModel):
    """`model.*` of DeepSeek-OCR 2: SAM ViT-B (net_3 as wide as the encoder) + the Qwen2 encoder, whose
    query outputs (one per vision token) go through the projector."""

    def build_vision(self, cfg: ModelConfig) -> None:
        assert cfg.qwen2 is not None
        self.sam_model = ImageEncoderViT(cfg.sam)
        self.qwen2_model = Qwen2Decoder2Encoder(cfg.qwen2, cfg.family.view_sizes)
        self.projector = Projector(cfg)

    def encode_views(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixels [B, 3, S, S] -> SAM features, encoder outputs and projected tokens [B, (S/64)^2, hidden]."""
        sam_out = self.sam_model(pixels)
        features = sam_out.flatten(2).transpose(1, 2)  # [B, n, dim], row-major over SAM's grid
        full = self.qwen2_model(features)
        queries = full[:, features.shape[1] :]  # only the queries' outputs leave the encoder
        projected = self.projector(queries)
        return {"sam_out": sam_out, "qwen2_full_out": full, "qwen2_out": queries, "projector_out": projected}


def _dense_linears(module: nn.Module, prefix: str) -> Iterator[tuple[str, Linear]]:
    """(name, Linear) under `module` in module order, leaving out routed experts."""
    for name, child in module.named_children():
        if isinstance(child, Linear):
            yield f"{prefix}.{name}", child
        elif not (isinstance(module, MoEFeedForward) and child is module.experts):
            yield from _dense_linears(child, f"{prefix}.{name}")


# Each family's `model.*` class; the decoder and everything after `embed` are shared.
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
        Measured on the full-size model, 2 threads: bf16 decode step 80-86 ms -> 62-65 ms.
        """
        return sum(int(linear.pack_weight()) for linear in self.decode_linears().values())

    def decode_linears(self) -> dict[str, Linear]:
        """The Linear layers `pack_for_cpu_decode` packs, by module name: the decoder's, without routed experts."""
        return dict(_dense_linears(self.model.layers, "model.layers")) | {"lm_head": self.lm_head}

    def moe_layers(self) -> list[tuple[str, MoEFeedForward]]:
        # Only a decoder layer's `mlp` is ever one: no walk over the thousands of expert modules.
        layers = enumerate(self.model.layers)
        return [(f"model.layers.{i}.mlp", layer.mlp) for i, layer in layers if isinstance(layer.mlp, MoEFeedForward)]

    def new_cache(self, capacity: int, lanes: int = 1) -> KVCache:
        return KVCache.allocate(self.config.language, lanes, capacity, self.device, self.cache_dtype)

    @property
    def cache_dtype(self) -> torch.dtype:
        return KVCache.dtype_for(self.device, self.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def prefill(
        self,
        input_ids: torch.Tensor,
        images_seq_mask: torch.Tensor | None,
        images: list[ImageTensors],
        cache: KVCache,
        trace: Trace | None = None,
        vision_trace: VisionTrace | None = None,
    ) -> torch.Tensor:
        """Runs the prompt (vision included) into the cache; returns the last position's float32 logits [V]."""
        embeds = self.model.embed(input_ids, images_seq_mask, images, vision_trace)
        hidden = self.model.decode(embeds, cache, 0, trace)
        return self.logits(hidden[0, -1])

    def prefill_embeds(
        self, inputs_embeds: torch.Tensor, cache: KVCache, trace: Trace | None = None, lane: int = 0, start: int = 0
    ) -> torch.Tensor:
        """inputs_embeds [1, T, hidden] into `lane` from `start` -> the last position's float32 logits [V]."""
        hidden = self.model.decode(inputs_embeds, cache, start, trace, lane)
        return self.logits(hidden[0, -1])

    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decode step: token ids [B] for lanes [0, B) -> float32 logits [B, V]. No host sync."""
        embeds = self.model.embed_tokens(tokens).unsqueeze(1)
        hidden = self.model.decode_batch(embeds, cache)
        return self.logits(hidden[:, 0])

    def bind_stacked_experts(self, device: torch.device | str, dtype: torch.dtype) -> None:
        for _, module in self.moe_layers():
            module.bind_stacked_experts(device, dtype)


def _square_side(count: int) -> int:
    side = int(round(count**0.5))
    if side * side != count:
        raise ValueError(f"{count} vision tokens do not form a square grid")
    return side
