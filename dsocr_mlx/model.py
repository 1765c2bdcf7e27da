"""DeepSeek-OCR and DeepSeek-OCR 2 on MLX: vision encoder -> projector -> image-token layout -> DeepSeek-V2
MoE decoder.

Mirrors dsocr_torch/model.py: DeepSeek-OCR encodes views with SAM -> CLIP, DeepSeek-OCR 2 with SAM -> a Qwen2
encoder with learned queries; `MODEL_CLASSES` registers each family's `model.*` class and the token layout
comes from the family's description (common.model.families). MLX convolutions are channels-last, so pixels go in
as NHWC and SAM's output stays [B, g, g, C]; everything after the projector is layout-independent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_causal_mask

from common.model.config import ModelConfig
from common.model.families import DEEPSEEK_OCR, DEEPSEEK_OCR_2
from common.model.inputs import ImageInput
from dsocr_mlx import clip as clip_module
from dsocr_mlx import sam as sam_module
from dsocr_mlx.cache import LanePool
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
    the layout embeddings. Another family's class overrides `build_vision`, `encode_views` and `TOWERS`."""

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

    def encode_views(self, pixels: mx.array, record: dict[str, mx.array] | None = None) -> mx.array:
        """[B, S, S, 3] NHWC pixels -> [B, g*g, hidden] projected features (row-major over the g x g grid)."""
        sam_out = self.sam_model(pixels)
        clip_out = self.vision_model(sam_out)
        projected = self.project(sam_out, clip_out)
        if record is not None:
            record.update(sam_out=sam_out, clip_out=clip_out, projector_out=projected)
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

    def encode_views(self, pixels: mx.array, record: dict[str, mx.array] | None = None) -> mx.array:
        sam_out = self.sam_model(pixels)
        batch, grid_h, grid_w, channels = sam_out.shape
        full = self.qwen2_model(sam_out.reshape(batch, grid_h * grid_w, channels))
        queries = full[:, grid_h * grid_w :]  # only the queries' outputs leave the encoder
        projected = self.project(queries)
        if record is not None:
            record.update(sam_out=sam_out, qwen2_full_out=full, qwen2_out=queries, projector_out=projected)
        return projected


# Each family's `model.*` class; the decoder and everything after `embed_inputs` are shared.
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

    # ---- vision -------------------------------------------------------------------------------------

    def project(self, *features: mx.array) -> mx.array:
        """The family's projector step from its encoder outputs (v1: SAM and CLIP outputs; OCR 2: queries)."""
        return self.model.project(*features)

    def encode_views(self, pixels: mx.array, record: dict[str, mx.array] | None = None) -> mx.array:
        """[B, S, S, 3] NHWC pixels -> [B, g*g, hidden] projected features (row-major over the g x g grid)."""
        return self.model.encode_views(pixels.astype(self.dtype), record)

    def _rows(self, grid: mx.array) -> mx.array:
        """[rows, cols, H] -> its tokens row by row; `image_newline` closes each row if the layout says so."""
        rows, _, hidden = grid.shape
        if not self.config.family.layout.row_newlines:
            return grid.reshape(-1, hidden)
        newline = mx.broadcast_to(self.model.image_newline.astype(grid.dtype), (rows, 1, hidden))
        return mx.concatenate([grid, newline], axis=1).reshape(-1, hidden)

    def layout_image_tokens(
        self, global_features: mx.array, local_features: mx.array | None, crop_grid: tuple[int, int]
    ) -> mx.array:
        """Projected views -> the image's token embeddings in the family's order (common.model.families.TokenLayout).

        `global_features` [g*g, H]; `local_features` [tiles, t*t, H] (row-major tiles of a crop grid of
        (width tiles, height tiles)) or None. Order: [local tiles, global view, view separator]; the tiles
        form one (h_tiles*t) x (w_tiles*t) grid when the layout stitches them, else follow tile by tile.
        """
        layout = self.config.family.layout
        hidden = global_features.shape[-1]
        parts = []
        if local_features is not None:
            width_tiles, height_tiles = crop_grid
            n_tiles = local_features.shape[0]
            if n_tiles != width_tiles * height_tiles:
                raise ValueError(f"{n_tiles} local views do not fill a {width_tiles}x{height_tiles} crop grid")
            tile = _square_side(local_features.shape[1])
            if layout.stitch_tiles:
                tiles = local_features.reshape(height_tiles, width_tiles, tile, tile, hidden)
                tiles = tiles.transpose(0, 2, 1, 3, 4).reshape(height_tiles * tile, width_tiles * tile, hidden)
            else:
                tiles = local_features.reshape(n_tiles * tile, tile, hidden)
            parts.append(self._rows(tiles))
        grid = _square_side(global_features.shape[0])
        parts.append(self._rows(global_features.reshape(grid, grid, hidden)))
        if layout.separator:
            parts.append(self.model.view_seperator.astype(global_features.dtype)[None])
        return mx.concatenate(parts, axis=0)

    def image_embeddings(self, image: ImageInput, record: dict[str, Any] | None = None) -> mx.array:
        """One preprocessed image -> its token embeddings (see `layout_image_tokens`)."""
        global_record: dict[str, mx.array] | None = {} if record is not None else None
        global_pixels = mx.array(np.ascontiguousarray(image.global_view.transpose(1, 2, 0)))[None]
        global_features = self.encode_views(global_pixels, global_record)[0]
        local_features = None
        if image.has_crops:
            assert image.local_views is not None
            local_record: dict[str, mx.array] | None = {} if record is not None else None
            local_pixels = mx.array(np.ascontiguousarray(image.local_views.transpose(0, 2, 3, 1)))
            local_features = self.encode_views(local_pixels, local_record)
            if record is not None:
                record["local"] = local_record
        if record is not None:
            record["global"] = global_record
        return self.layout_image_tokens(global_features, local_features, image.crop_grid)

    def embed_inputs(
        self,
        input_ids: np.ndarray | Sequence[int],
        images_seq_mask: np.ndarray | None = None,
        images: Sequence[ImageInput] = (),
        record: dict[str, Any] | None = None,
    ) -> mx.array:
        """[L] ids -> [1, L, hidden]: text embeddings, image embeddings scattered at the masked positions."""
        ids = mx.array(np.asarray(input_ids, dtype=np.int64).astype(np.int32))
        embeds = self.model.embed_tokens(ids)
        if images and images_seq_mask is not None and bool(np.any(images_seq_mask)):
            per_image = []
            for image in images:
                image_record: dict[str, Any] | None = {} if record is not None else None
                per_image.append(self.image_embeddings(image, image_record))
                if record is not None:
                    record.setdefault("images", []).append(image_record)
            image_embeds = mx.concatenate(per_image, axis=0)
            embeds = scatter_image_embeds(embeds, images_seq_mask, image_embeds)
            if record is not None:
                record["image_embeds"] = image_embeds
        if record is not None:
            record["inputs_embeds"] = embeds
        return embeds[None]

    # ---- language -----------------------------------------------------------------------------------

    def hidden_states(self, inputs_embeds: mx.array, layer_outputs: list[mx.array] | None = None) -> mx.array:
        """A whole prompt [B, L, hidden] -> final-normed hidden states, keeping no keys/values."""
        return decoder_forward(self.model.layers, self.model.norm, inputs_embeds, None, "causal", layer_outputs)

    def logits(self, hidden: mx.array) -> mx.array:
        return self.lm_head(hidden).astype(mx.float32)

    def __call__(self, inputs_embeds: mx.array) -> mx.array:
        """A whole prompt -> the logits of its last position, float32 [B, vocab]."""
        return self.logits(self.hidden_states(inputs_embeds)[:, -1, :])

    def prefill_lane(self, inputs_embeds: mx.array, pool: LanePool, lane: int, start: int) -> mx.array:
        """inputs_embeds [1, T, hidden] at positions start.. of `lane` -> final-normed hidden [1, T, hidden]."""
        length = inputs_embeds.shape[1]
        views = pool.prefill_views(lane, start, length)
        mask: Any = "causal" if start == 0 else create_causal_mask(length, offset=start)
        hidden = decoder_forward(self.model.layers, self.model.norm, inputs_embeds, views, mask)
        pool.host_lengths[lane] = start + length
        return hidden

    def decode_step(self, tokens: mx.array, pool: LanePool) -> mx.array:
        """Token ids [B] for lanes [0, B), one position each at the lane's own offset -> logits [B, vocab]."""
        batch = tokens.shape[0]
        views, positions, kv_length = pool.decode_views(batch)
        lengths = pool.host_lengths[:batch]
        mask = None
        if min(lengths) + 1 != kv_length:  # a lane shorter than the longest must not see past its end
            mask = (mx.arange(kv_length)[None, :] <= positions[:, None]).reshape(batch, 1, 1, kv_length)
        embeds = self.model.embed_tokens(tokens)[:, None]
        hidden = decoder_forward(self.model.layers, self.model.norm, embeds, views, mask)
        for lane in range(batch):
            pool.host_lengths[lane] += 1
        return self.logits(hidden[:, 0])

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


def _square_side(count: int) -> int:
    side = int(round(count**0.5))
    if side * side != count:
        raise ValueError(f"{count} image features do not form a square grid")
    return side


def scatter_image_embeds(embeds: mx.array, images_seq_mask: np.ndarray, image_embeds: mx.array) -> mx.array:
    """[L, H] text embeddings with `image_embeds` written, in order, at the True positions of the mask."""
    positions = np.flatnonzero(np.asarray(images_seq_mask))
    if positions.size != image_embeds.shape[0]:
        raise ValueError(
            f"images_seq_mask marks {positions.size} positions but the images give "
            f"{image_embeds.shape[0]} embeddings"
        )
    embeds[mx.array(positions.astype(np.int32))] = image_embeds.astype(embeds.dtype)
    return embeds
