"""SAM ViT-B image encoder (`model.sam_model`) as DeepSeek-OCR uses it.

A plain ViT over 16x16 patches with an absolute position table, windowed attention in most blocks and
global attention in `global_attn_indexes`, every attention biased by decomposed relative positions; then a
conv neck and two stride-2 convs (`net_2`, `net_3`) that turn a 1024 px view into a 16x16 grid.
Activations stay channels-last ([B, H, W, C]) from the patch embedding to the neck, which also lets the
convolutions run in the channels-last memory format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.model.config import SamConfig

# Upper bound on the relative-position bias materialised for one SDPA call. The bias for a global
# block at 64x64 is heads * 4096 * 4096 values (805 MB in float32); building and reading it in
# cache-sized slices is what keeps global attention near the cost of unbiased attention on CPU.
_CPU_BIAS_CHUNK_BYTES = 16 << 20
_CUDA_BIAS_CHUNK_BYTES = 1 << 30


def resize_rel_pos(rel_pos: Tensor, length: int) -> Tensor:
    """Linearly resamples a (rows, head_dim) relative-position table to `length` rows, in float32."""
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(rel_pos.float().t().unsqueeze(0), size=length, mode="linear", align_corners=False)
    return resized[0].t().to(rel_pos.dtype)


def rel_pos_embeddings(size: int, rel_pos: Tensor) -> Tensor:
    """(size, size, head_dim) table R[i, j] = rel_pos[i - j + size - 1] for query index i and key index j."""
    table = resize_rel_pos(rel_pos, 2 * size - 1)
    coords = torch.arange(size, device=rel_pos.device)
    return table[coords[:, None] - coords[None, :] + (size - 1)]


def resize_pos_grid(table: Tensor, height: int, width: int) -> Tensor:
    """Resizes a channels-last (1, h, w, C) position table like the reference: bicubic, antialiased, float32."""
    if table.shape[1] == height and table.shape[2] == width:
        return table
    grid = table.permute(0, 3, 1, 2).float()
    resized = F.interpolate(grid, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return resized.to(table.dtype).permute(0, 2, 3, 1)


def _chunk_steps(batch: int, heads: int, rows: int, row_bytes: int, budget: int) -> tuple[int, int, int]:
    """How many (batch items, heads, query grid rows) one bias slice covers so that it fits in `budget`."""
    head_bytes = rows * row_bytes
    if heads * head_bytes <= budget:
        return max(1, budget // (heads * head_bytes)), heads, rows
    if head_bytes <= budget:
        return 1, budget // head_bytes, rows
    return 1, 1, max(1, budget // row_bytes)


def attention_with_rel_pos(
    q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, out: Tensor
) -> Tensor:
    """SDPA with the decomposed bias rel_h[..., kh] + rel_w[..., kw] added to the scores.

    q, k, v: [B, heads, H*W, head_dim]; rel_h: [B, heads, H, W, H]; rel_w: [B, heads, H, W, W];
    out: [B, heads, H*W, head_dim] (any strides) receives the result. The bias is built slice by slice
    into one reused buffer, never whole.
    """
    batch, heads, grid_h, grid_w, _ = rel_h.shape
    keys = k.shape[2]
    budget = _CUDA_BIAS_CHUNK_BYTES if q.is_cuda else _CPU_BIAS_CHUNK_BYTES
    row_bytes = grid_w * keys * q.element_size()
    batch_step, head_step, row_step = _chunk_steps(batch, heads, grid_h, row_bytes, budget)
    buffer = q.new_empty(min(batch, batch_step) * min(heads, head_step) * min(grid_h, row_step) * grid_w * keys)
    for b0 in range(0, batch, batch_step):
        b1 = min(b0 + batch_step, batch)
        for n0 in range(0, heads, head_step):
            n1 = min(n0 + head_step, heads)
            for r0 in range(0, grid_h, row_step):
                r1 = min(r0 + row_step, grid_h)
                h_part = rel_h[b0:b1, n0:n1, r0:r1].unsqueeze(-1)
                w_part = rel_w[b0:b1, n0:n1, r0:r1].unsqueeze(-2)
                shape = (b1 - b0, n1 - n0, r1 - r0, grid_w, grid_h, grid_w)
                bias = buffer[: h_part.numel() // grid_h * keys].view(shape)
                torch.add(h_part, w_part, out=bias)
                queries = slice(r0 * grid_w, r1 * grid_w)
                out[b0:b1, n0:n1, queries] = F.scaled_dot_product_attention(
                    q[b0:b1, n0:n1, queries],
                    k[b0:b1, n0:n1],
                    v[b0:b1, n0:n1],
                    attn_mask=bias.view(b1 - b0, n1 - n0, (r1 - r0) * grid_w, keys),
                )
    return out


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixels: Tensor) -> Tensor:
        """[B, 3, H, W] -> channels-last [B, H/p, W/p, width]: the stride-p conv as one matmul over patches."""
        batch, chans, height, width = pixels.shape
        p = self.patch_size
        grid_h, grid_w = height // p, width // p
        pixels = pixels[:, :, : grid_h * p, : grid_w * p]
        patches = pixels.reshape(batch, chans, grid_h, p, grid_w, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch, grid_h, grid_w, chans * p * p)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class Attention(nn.Module):
    """Multi-head attention with decomposed relative-position bias over an (H, W) token grid."""

    def __init__(self, width: int, heads: int, rel_pos_size: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, self.head_dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: normalised tokens [B, H, W, width] -> [B, H, W, width]."""
        batch, grid_h, grid_w, width = x.shape
        tokens = grid_h * grid_w
        qkv = self.qkv(x).view(batch, tokens, 3, self.heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, heads, tokens, head_dim] views
        # The bias uses the unscaled queries; SDPA applies 1/sqrt(head_dim) to q.k only.
        q_grid = q.view(batch, self.heads, grid_h, grid_w, self.head_dim)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, rel_pos_embeddings(grid_h, self.rel_pos_h))
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, rel_pos_embeddings(grid_w, self.rel_pos_w))
        out = x.new_empty(batch, tokens, self.heads, self.head_dim)
        attention_with_rel_pos(q, k, v, rel_h, rel_w, out.transpose(1, 2))
        return self.proj(out.view(batch, grid_h, grid_w, width))


class MLPBlock(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(width, hidden)
        self.lin2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(F.gelu(self.lin1(x)))  # exact (erf) GELU


def window_partition(x: Tensor, window: int) -> Tensor:
    """[B, H, W, C] -> [B * windows, window, window, C], zero-padding H and W up to multiples of `window`."""
    batch, height, width, chans = x.shape
    pad_h, pad_w = -height % window, -width % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    rows, cols = (height + pad_h) // window, (width + pad_w) // window
    x = x.view(batch, rows, window, cols, window, chans).transpose(2, 3)
    return x.reshape(batch * rows * cols, window, window, chans)


def window_unpartition(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """Inverse of window_partition; returns a (possibly strided) [B, H, W, C] view without the padding."""
    rows, cols = -(-height // window), -(-width // window)
    chans = windows.shape[-1]
    batch = windows.shape[0] // (rows * cols)
    x = windows.view(batch, rows, cols, window, window, chans).transpose(2, 3)
    x = x.reshape(batch, rows * window, cols * window, chans)
    return x[:, :height, :width]


class Block(nn.Module):
    """Pre-norm transformer block; attention inside `window`x`window` windows, or global when window is 0."""

    def __init__(self, cfg: SamConfig, window: int) -> None:
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg.width, cfg.heads, window if window else cfg.pos_grid)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = MLPBlock(cfg.width, int(cfg.width * cfg.mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        if self.window:
            # Padded tokens are zeros after the norm and take part in attention unmasked, as in the reference.
            h = window_unpartition(self.attn(window_partition(h, self.window)), self.window, x.shape[1], x.shape[2])
        else:
            h = self.attn(h)
        x = x + h
        return x + self.mlp(self.norm2(x))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW tensor (normalised in the channels-last layout)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class Neck(nn.Sequential):
    """conv1x1 -> LayerNorm2d -> conv3x3 -> LayerNorm2d, fed channels-last tokens [B, H, W, width]."""

    def __init__(self, width: int, out_chans: int) -> None:
        super().__init__(
            nn.Conv2d(width, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        reduce, norm_a, conv, norm_b = self
        # The 1x1 conv on channels-last tokens is a matmul; the result viewed as NCHW is channels_last.
        y = F.linear(x, reduce.weight.flatten(1)).permute(0, 3, 1, 2)
        return norm_b(conv(norm_a(y)))


class ImageEncoderViT(nn.Module):
    """`model.sam_model`: pixels [B, 3, S, S] -> [B, downsample_channels[1], S/64, S/64] (channels_last memory)."""

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_grid, cfg.pos_grid, cfg.width))
        global_blocks = set(cfg.global_attn_indexes)
        self.blocks = nn.ModuleList(
            Block(cfg, 0 if i in global_blocks else cfg.window_size) for i in range(cfg.layers)
        )
        self.neck = Neck(cfg.width, cfg.out_chans)
        mid, out = cfg.downsample_channels
        self.net_2 = nn.Conv2d(cfg.out_chans, mid, kernel_size=3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(mid, out, kernel_size=3, stride=2, padding=1, bias=False)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embed(pixels.to(self.pos_embed.dtype))
        x = x + resize_pos_grid(self.pos_embed, x.shape[1], x.shape[2])
        for block in self.blocks:
            x = block(x)
        return self.net_3(self.net_2(self.neck(x)))
