"""CLIP-L encoder (`model.vision_model`) in MLX, fed with SAM's output as its patch embeddings.

Same math as the authors' `VitModel` in deepencoder.py: class token + position table (grid part
bicubic-antialias resized, CLS row kept), pre-LayerNorm, pre-norm blocks with fused qkv and quick-GELU,
non-causal attention, no final norm. Attribute names are the checkpoint names under `model.vision_model.`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from common.model.config import ClipConfig
from dsocr_mlx.sam import resize_bicubic_antialias, sanitize_conv_weights

LAYER_NORM_EPS = 1e-5
CONV_WEIGHTS = ("embeddings.patch_embedding.weight",)


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """CLIP's (unused) patch conv from PyTorch OIHW to MLX OHWI; sanitising twice equals once; nothing dropped."""
    return sanitize_conv_weights(weights, CONV_WEIGHTS)


def quick_gelu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(1.702 * x)


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        num_positions = cfg.pos_grid**2 + 1
        self.class_embedding = mx.zeros((cfg.width,))
        # Kept so the checkpoint loads; DeepSeek-OCR feeds SAM features instead of running this conv.
        self.patch_embedding = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(num_positions, cfg.width)
        self.position_ids = mx.arange(num_positions, dtype=mx.int64)[None]

    def position_table(self, grid: int) -> mx.array:
        """[1 + grid*grid, C]: the CLS row as stored, the square grid part resized in float32 when it differs."""
        table = self.position_embedding(self.position_ids)[0]
        cls_row, grid_rows = table[:1], table[1:]
        source = round((grid_rows.shape[0]) ** 0.5)
        if source != grid:
            resized = resize_bicubic_antialias(grid_rows.reshape(source, source, -1), grid, grid)
            grid_rows = resized.astype(table.dtype).reshape(grid * grid, -1)
        return mx.concatenate([cls_row, grid_rows], axis=0)

    def __call__(self, patch_embeds: mx.array) -> mx.array:
        batch, height, width, channels = patch_embeds.shape
        if height != width:
            raise ValueError(f"CLIP expects a square patch grid, got {height}x{width}")
        patches = patch_embeds.reshape(batch, height * width, channels)
        cls_tokens = mx.broadcast_to(self.class_embedding.astype(patches.dtype), (batch, 1, channels))
        embeddings = mx.concatenate([cls_tokens, patches], axis=1)
        return embeddings + self.position_table(height)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.num_heads = cfg.heads
        self.head_dim = cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.width, 3 * cfg.width, bias=True)
        self.out_proj = nn.Linear(cfg.width, cfg.width, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        batch, tokens, channels = x.shape
        qkv = self.qkv_proj(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        out = mx.fast.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, tokens, channels))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.ffn_hidden_size, bias=True)
        self.fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.width, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.mlp = CLIPMLP(cfg)

    def __call__(self, x: mx.array) -> mx.array:
        h = x + self.self_attn(self.layer_norm1(x))
        return h + self.mlp(self.layer_norm2(h))


class CLIPTransformer(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.layers = [CLIPEncoderLayer(cfg) for _ in range(cfg.layers)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class VitModel(nn.Module):
    """patch_embeds [B, g, g, C] (SAM output, NHWC) -> [B, 1 + g*g, C] (CLS first)."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.transformer = CLIPTransformer(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)

    def __call__(self, patch_embeds: mx.array) -> mx.array:
        return self.transformer(self.pre_layrnorm(self.embeddings(patch_embeds)))
