"""SAM ViT-B image encoder (`model.sam_model`) in MLX, channels-last.

Same math as the authors' `ImageEncoderViT` in deepencoder.py: patch conv, absolute position table
(bicubic-antialias resized to the patch grid), windowed / global blocks with decomposed relative
position bias, a conv + LayerNorm2d neck, then two stride-2 convs (`net_2`, `net_3`).
Attribute names are the checkpoint tensor names under `model.sam_model.`.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from common.errors import CheckpointError
from common.model.config import SamConfig

# Conv weights of this module (PyTorch OIHW in the official checkpoint, OHWI in MLX).
CONV_WEIGHTS = ("patch_embed.proj.weight", "neck.0.weight", "neck.2.weight", "net_2.weight", "net_3.weight")


def conv_weight_to_mlx(name: str, weight: mx.array) -> mx.array:
    """OIHW -> OHWI, leaving an already converted weight alone (told apart by shape, so it is idempotent)."""
    if weight.ndim != 4:
        raise CheckpointError(f"conv weight '{name}' has shape {tuple(weight.shape)}, expected 4 dimensions")
    _, d1, d2, d3 = weight.shape
    is_torch = d2 == d3 and d1 != d2  # (O, I, k, k): square kernel last
    is_mlx = d1 == d2 and d3 != d2  # (O, k, k, I): square kernel in the middle
    if is_torch == is_mlx:
        raise CheckpointError(
            f"conv weight '{name}' has ambiguous shape {tuple(weight.shape)} (kernel size equals channel count); "
            "cannot tell PyTorch from MLX layout"
        )
    return weight.transpose(0, 2, 3, 1) if is_torch else weight


def sanitize_conv_weights(weights: dict[str, mx.array], conv_names: tuple[str, ...]) -> dict[str, mx.array]:
    """Converts the named conv weights (matched as a suffix, so prefixed names work too); keeps every key."""
    out: dict[str, mx.array] = {}
    for key, value in weights.items():
        if any(key == name or key.endswith("." + name) for name in conv_names):
            value = conv_weight_to_mlx(key, value)
        out[key] = value
    return out


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """SAM conv weights from PyTorch OIHW to MLX OHWI; sanitising twice equals once; nothing is dropped."""
    return sanitize_conv_weights(weights, CONV_WEIGHTS)


# ---------------------------------------------------------------------------------------------------------
# Resize tables. They depend only on (source, target) sizes, so they are built once in numpy float32 with
# the same arithmetic as PyTorch's CPU kernels, and applied as matrix products.


def _keys_cubic(x: np.ndarray, a: np.float32) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0)).astype(np.float32)


@lru_cache(maxsize=64)
def bicubic_antialias_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] weights of F.interpolate(mode='bicubic', antialias=True, align_corners=False) along one axis.

    PyTorch's antialiased bicubic uses Keys' kernel with a = -0.5 (PIL's choice); when shrinking, the kernel
    is stretched by the scale so every source sample contributes; each row is normalised to sum 1.
    """
    f32 = np.float32
    scale = f32(src) / f32(dst)
    support = f32(2.0) * scale if scale >= 1 else f32(2.0)
    inv_scale = f32(1.0) / scale if scale >= 1 else f32(1.0)
    matrix = np.zeros((dst, src), dtype=np.float32)
    for i in range(dst):
        center = scale * (f32(i) + f32(0.5))
        lo = max(int(center - support + f32(0.5)), 0)
        hi = min(int(center + support + f32(0.5)), src)
        taps = _keys_cubic((np.arange(lo, hi, dtype=np.float32) - center + f32(0.5)) * inv_scale, f32(-0.5))
        total = np.cumsum(taps, dtype=np.float32)[-1]  # sequential sum, as PyTorch accumulates
        matrix[i, lo:hi] = taps / total if total != 0 else taps
    return matrix


@lru_cache(maxsize=64)
def linear_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] weights of F.interpolate(mode='linear', align_corners=False) along one axis."""
    f32 = np.float32
    scale = f32(src) / f32(dst)
    matrix = np.zeros((dst, src), dtype=np.float32)
    for i in range(dst):
        pos = max(scale * (f32(i) + f32(0.5)) - f32(0.5), f32(0.0))
        i0 = int(pos)
        i1 = min(i0 + 1, src - 1)
        frac = f32(pos - f32(i0))
        matrix[i, i0] += f32(1.0) - frac
        matrix[i, i1] += frac
    return matrix


def resize_bicubic_antialias(grid: mx.array, height: int, width: int) -> mx.array:
    """Resizes a channels-last table [H, W, C] to [height, width, C] in float32 (separable, two matmuls)."""
    src_h, src_w, channels = grid.shape
    rows = mx.array(bicubic_antialias_matrix(src_h, height))
    cols = mx.array(bicubic_antialias_matrix(src_w, width))
    x = grid.astype(mx.float32).reshape(src_h, src_w * channels)
    x = (rows @ x).reshape(height, src_w, channels)
    return cols[None] @ x  # [1, width, W] @ [height, W, C] -> [height, width, C]


def relative_position_table(rel_pos: mx.array, size: int) -> mx.array:
    """[size (query), size (key), head_dim] embeddings for query/key offsets, as the official get_rel_pos.

    The learned table has 2*S-1 rows for the grid S it was trained on; other grids interpolate it linearly.
    """
    needed = 2 * size - 1
    if rel_pos.shape[0] != needed:
        weights = mx.array(linear_matrix(rel_pos.shape[0], needed))
        rel_pos = (weights @ rel_pos.astype(mx.float32)).astype(rel_pos.dtype)
    offsets = np.arange(size)[:, None] - np.arange(size)[None, :] + (size - 1)
    return rel_pos[mx.array(offsets)]


# ---------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=True)

    def __call__(self, pixels: mx.array) -> mx.array:
        return self.proj(pixels)  # [B, H/p, W/p, width]


class Attention(nn.Module):
    """Multi-head attention with decomposed relative position bias over an (H, W) token grid."""

    def __init__(self, cfg: SamConfig, rel_pos_size: int) -> None:
        super().__init__()
        self.num_heads = cfg.heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=True)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=True)
        self.rel_pos_h = mx.zeros((2 * rel_pos_size - 1, cfg.head_dim))
        self.rel_pos_w = mx.zeros((2 * rel_pos_size - 1, cfg.head_dim))

    def _rel_pos_bias(self, q: mx.array, height: int, width: int) -> mx.array:
        """Additive attention bias [B, heads, H*W, H*W]: bias[(y,x), (ky,kx)] = q.Rh[y,ky] + q.Rw[x,kx]."""
        batch = q.shape[0]
        rel_h = relative_position_table(self.rel_pos_h, height).astype(q.dtype)  # [H, kH, d]
        rel_w = relative_position_table(self.rel_pos_w, width).astype(q.dtype)  # [W, kW, d]
        grid_q = q.reshape(batch * self.num_heads, height, width, self.head_dim)  # unscaled q, as the authors
        bias_h = grid_q @ rel_h.transpose(0, 2, 1)  # [BN, H, W, kH]
        bias_w = (grid_q.transpose(0, 2, 1, 3) @ rel_w.transpose(0, 2, 1)).transpose(0, 2, 1, 3)  # [BN, H, W, kW]
        bias = bias_h[..., :, None] + bias_w[..., None, :]
        return bias.reshape(batch, self.num_heads, height * width, height * width)

    def __call__(self, x: mx.array) -> mx.array:
        batch, height, width, channels = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, heads, N, d]
        bias = self._rel_pos_bias(q, height, width)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=bias)
        out = out.transpose(0, 2, 1, 3).reshape(batch, height, width, channels)
        return self.proj(out)


class MLPBlock(nn.Module):
    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.lin1 = nn.Linear(cfg.width, hidden)
        self.lin2 = nn.Linear(hidden, cfg.width)

    def __call__(self, x: mx.array) -> mx.array:
        return self.lin2(nn.gelu(self.lin1(x)))  # exact erf GELU, as torch.nn.GELU()


def window_partition(x: mx.array, window: int) -> tuple[mx.array, tuple[int, int]]:
    """[B, H, W, C] -> [B * windows, window, window, C], zero-padding H and W up to multiples of window."""
    batch, height, width, channels = x.shape
    pad_h = -height % window
    pad_w = -width % window
    if pad_h or pad_w:
        x = mx.pad(x, [(0, 0), (0, pad_h), (0, pad_w), (0, 0)])
    padded_h, padded_w = height + pad_h, width + pad_w
    x = x.reshape(batch, padded_h // window, window, padded_w // window, window, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window, window, channels), (padded_h, padded_w)


def window_unpartition(windows: mx.array, window: int, padded: tuple[int, int], size: tuple[int, int]) -> mx.array:
    padded_h, padded_w = padded
    height, width = size
    channels = windows.shape[-1]
    batch = windows.shape[0] // ((padded_h // window) * (padded_w // window))
    x = windows.reshape(batch, padded_h // window, padded_w // window, window, window, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, channels)
    return x[:, :height, :width, :] if (padded_h, padded_w) != (height, width) else x


class Block(nn.Module):
    """Pre-norm transformer block; window_size 0 means global attention over the whole grid."""

    def __init__(self, cfg: SamConfig, window_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg, rel_pos_size=window_size if window_size else cfg.pos_grid)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = MLPBlock(cfg)

    def __call__(self, x: mx.array) -> mx.array:
        shortcut = x
        x = self.norm1(x)
        if self.window_size:
            height, width = x.shape[1], x.shape[2]
            # Padded tokens are zeros after the norm and are not masked, exactly as the authors do.
            x, padded = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, padded, (height, width))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class LayerNorm2d(nn.LayerNorm):
    """The authors' LayerNorm2d normalises over channels; channels-last that is a plain LayerNorm."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=1e-6)


class ImageEncoderViT(nn.Module):
    """pixels [B, S, S, 3] (NHWC) -> features [B, S/64, S/64, downsample_channels[1]] (NHWC)."""

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = mx.zeros((1, cfg.pos_grid, cfg.pos_grid, cfg.width))
        global_blocks = set(cfg.global_attn_indexes)
        self.blocks = [Block(cfg, 0 if i in global_blocks else cfg.window_size) for i in range(cfg.layers)]
        self.neck = [
            nn.Conv2d(cfg.width, cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        ]
        mid, out = cfg.downsample_channels
        self.net_2 = nn.Conv2d(cfg.out_chans, mid, kernel_size=3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(mid, out, kernel_size=3, stride=2, padding=1, bias=False)

    def position_embedding(self, height: int, width: int) -> mx.array:
        """The absolute table for a (height, width) patch grid: resized in float32 unless it already fits."""
        table = self.pos_embed
        if table.shape[1:3] == (height, width):
            return table
        return resize_bicubic_antialias(table[0], height, width)[None].astype(table.dtype)

    def __call__(self, pixels: mx.array, intermediates: dict[str, mx.array] | None = None) -> mx.array:
        """`intermediates`, when given, receives the outputs of patch_embed, block<i>, neck and net_2."""
        x = self.patch_embed(pixels.astype(self.patch_embed.proj.weight.dtype))
        if intermediates is not None:
            intermediates["patch_embed"] = x
        x = x + self.position_embedding(x.shape[1], x.shape[2])
        for i, block in enumerate(self.blocks):
            x = block(x)
            if intermediates is not None:
                intermediates[f"block{i}"] = x
        for layer in self.neck:
            x = layer(x)
        if intermediates is not None:
            intermediates["neck"] = x
        x = self.net_2(x)
        if intermediates is not None:
            intermediates["net_2"] = x
        return self.net_3(x)
