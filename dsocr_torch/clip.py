"""CLIP-L encoder (`model.vision_model`) as DeepSeek-OCR uses it: SAM's output grid is the patch embedding.

Its own patch conv is never run (kept so the checkpoint loads); the class token is prepended, the position
table (class row + pos_grid x pos_grid) is resized to the actual grid, then pre-LayerNorm and pre-norm
transformer layers with quick-GELU MLPs. There is no final norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.model.config import ClipConfig

_LAYER_NORM_EPS = 1e-5


def resize_position_table(table: Tensor, height: int, width: int) -> Tensor:
    """(1 + g*g, C) table -> (1 + height*width, C): class row kept, grid part bicubic-antialias resized in f32."""
    grid = round((table.shape[0] - 1) ** 0.5)
    if grid == height and grid == width:
        return table
    chans = table.shape[1]
    square = table[1:].view(1, grid, grid, chans).permute(0, 3, 1, 2).float()
    resized = F.interpolate(square, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    resized = resized.to(table.dtype).permute(0, 2, 3, 1).reshape(height * width, chans)
    return torch.cat([table[:1], resized])


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        positions = 1 + cfg.pos_grid * cfg.pos_grid
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(positions, cfg.width)
        # Built on the CPU then moved: arange on the meta device runs a Python reference kernel that imports sympy.
        ids = torch.arange(positions, device="cpu").unsqueeze(0).to(torch.get_default_device())
        self.register_buffer("position_ids", ids, persistent=True)

    def forward(self, patch_embeds: Tensor) -> Tensor:
        """[B, C, h, w] -> [B, 1 + h*w, C]."""
        batch, chans, height, width = patch_embeds.shape
        positions = resize_position_table(self.position_embedding(self.position_ids[0]), height, width)
        out = patch_embeds.new_empty(batch, 1 + height * width, chans)
        out[:, 0] = self.class_embedding + positions[0]
        torch.add(patch_embeds.flatten(2).transpose(1, 2), positions[1:], out=out[:, 1:])
        return out


class Attention(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.width, 3 * cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv_proj(x).view(batch, tokens, 3, self.heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        out = F.scaled_dot_product_attention(q, k, v)  # non-causal, scale 1/sqrt(head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class FeedForward(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.ffn_hidden_size)
        self.fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick GELU


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=_LAYER_NORM_EPS)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=_LAYER_NORM_EPS)
        self.mlp = FeedForward(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class VitModel(nn.Module):
    """`model.vision_model`: SAM features [B, C, g, g] -> [B, 1 + g*g, C] (class token first)."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=_LAYER_NORM_EPS)
        self.transformer = Transformer(cfg)

    def forward(self, patch_embeds: Tensor) -> Tensor:
        return self.transformer(self.pre_layrnorm(self.embeddings(patch_embeds)))
