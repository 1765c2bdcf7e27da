"""DeepSeek-V2 decoder parts as DeepSeek-OCR uses them: Llama-style MHA with RoPE over a KV cache in lanes
(dsocr_torch/cache.py), SwiGLU, RMSNorm (the MoE feed-forward is in dsocr_torch/moe.py, the layer stack in
dsocr_torch/model.py).

Attribute names follow the checkpoint (`self_attn.q_proj`, `mlp.experts.3.up_proj`, ...), so the official
safetensors load without renaming. A decode step reads nothing back to the host: positions live on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.model.config import LanguageConfig
from dsocr_torch import native
from dsocr_torch.cache import CacheWrite, KVCache
from dsocr_torch.weight_only import standalone, weight_only_linear
from dsocr_torch.weights import onednn


class Linear(nn.Linear):
    """nn.Linear with faster CPU paths for one-token (decode) products; same results up to summation order.

    * float32: oneDNN's linear instead of F.linear, which ends in a single-threaded MKL sgemv for one row;
      oneDNN uses every thread and is no slower for prefill-sized inputs.
    * bfloat16, after `pack_weight`: oneDNN's linear on a copy of the weight in oneDNN's blocked layout, which
      it reads faster than the plain layout (bit-identical results).
    * weight-only storage (`use_weight_only`, `--quantize`): a bfloat16 or int8 weight multiplied in float32
      (dsocr_torch/weight_only.py).
    Every other device/dtype keeps F.linear.
    """

    packed: torch.Tensor | None = None  # oneDNN-layout weight set by pack_weight; None: use self.weight
    packed_owner: torch.Tensor | None = None  # the mapped bytes under `packed`, when it does not own them
    stored: torch.Tensor | None = None  # weight-only storage [out, in], bf16 or int8 (use_weight_only)
    stored_scales: torch.Tensor | None = None  # float32 [out] for an int8 `stored`
    stored_owner: tuple[torch.Tensor, ...] = ()  # the memory under `stored` and `stored_scales`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stored is not None:
            return weight_only_linear(x, self.stored, self.stored_scales, self.bias)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return onednn.linear(x, self.weight, self.bias)

    def pack_weight(self) -> bool:
        """Moves a bfloat16 CPU weight into oneDNN's blocked layout; returns whether the layer is packed.

        The plain weight is released (the Parameter becomes a meta tensor of the same shape and dtype) so
        memory does not double: from then on the layer is for inference only and its values live in
        `packed`. float32 is left alone: oneDNN reads the plain float32 layout as fast as the blocked one.
        """
        if self.packed is not None:
            return True
        if self.stored is not None:
            return False
        weight = self.weight
        if not self.packs(weight.dtype, weight.device):
            return False
        self.use_packed(onednn.pack_linear_weight(weight.detach()))
        return True

    @staticmethod
    def packs(dtype: torch.dtype, device: torch.device) -> bool:
        """Whether `pack_weight` packs a weight of this dtype on this device."""
        return onednn.ONEDNN_BF16 and device.type == "cpu" and dtype == torch.bfloat16

    def use_packed(self, packed: torch.Tensor, owner: torch.Tensor | None = None) -> None:
        """Makes `packed` (from `pack_linear_weight`, or over the memory `owner` keeps alive) this layer's
        weight; the plain Parameter becomes meta."""
        self.packed, self.packed_owner = packed, owner
        self.weight = nn.Parameter(torch.empty(packed.shape, dtype=packed.dtype, device="meta"), requires_grad=False)


    def use_weight_only(self, stored: torch.Tensor, scales: torch.Tensor | None) -> None:
        """Makes `stored` (bf16, or int8 with per-output-channel `scales`) this layer's weight; the plain
        Parameter becomes meta."""
        self.stored_owner = (stored,) if scales is None else (stored, scales)
        self.stored = standalone(stored)
        self.stored_scales = None if scales is None else standalone(scales)
        self.weight = nn.Parameter(torch.empty(stored.shape, dtype=torch.float32, device="meta"), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The reference normalises in float32 and casts back before scaling by the weight.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin [max_positions, head_dim] for Llama's rotate_half convention (both halves repeat)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, d]; cos/sin [T, d] already in x's dtype."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LanguageConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        hidden, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, write: CacheWrite
    ) -> torch.Tensor:
        """x [B, T, hidden]; cos/sin broadcast over [B, heads, T, head_dim]. Writes k/v, attends, projects."""
        bsz, length, _ = x.shape
        q = self.q_proj(x).view(bsz, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if write.is_decode:
            out = self._attend_decode(q, k, v, cache, write)
        else:
            out = self._attend_prefill(q, k, v, cache, write)
        out = out.to(x.dtype).transpose(1, 2).reshape(bsz, length, self.num_heads * self.head_dim)
        return self.o_proj(out)

    def _attend_prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, write: CacheWrite
    ) -> torch.Tensor:
        lane, start = write.lane, write.start
        assert lane is not None
        length = q.shape[2]
        end = start + length
        cache.keys[self.layer_idx, lane, :, start:end] = k[0]
        cache.values[self.layer_idx, lane, :, start:end] = v[0]
        gqa = self.num_heads != self.num_kv_heads
        if start == 0:
            # The whole context is this chunk: attend to k, v as computed (the cache holds the same values).
            return F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, enable_gqa=gqa)
        # The cache may be wider than the compute dtype (float32 for bfloat16 on CPU, see
        # `KVCache.dtype_for`): attend in the cache's dtype, which holds the bf16 values exactly.
        keys = cache.keys[self.layer_idx, lane : lane + 1, :, :end]
        values = cache.values[self.layer_idx, lane : lane + 1, :, :end]
        q = q.to(keys.dtype)
        if length == 1:
            return F.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa)
        mask = torch.ones(length, end, dtype=torch.bool, device=q.device).tril(diagonal=start)  # query i sees start+i
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)

    def _attend_decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, write: CacheWrite
    ) -> torch.Tensor:
        """One query per lane of [0, B): write each lane's k/v at its position, attend to its filled keys."""
        assert write.positions is not None
        bsz = q.shape[0]
        keys, values = cache.keys[self.layer_idx], cache.values[self.layer_idx]
        lanes = _lane_index(bsz, q.device)
        keys[lanes, :, write.positions] = k[:, :, 0].to(keys.dtype)
        values[lanes, :, write.positions] = v[:, :, 0].to(values.dtype)
        if native.decode_attention_serves(keys) and values.stride() == keys.stride():
            # On the CPU, a C loop reads each lane's cache once in address order (dsocr_torch/native.py).
            return native.decode_attention(q.to(keys.dtype), keys, values, write.positions + 1, write.kv_length)
        keys = keys[:bsz, :, : write.kv_length]
        values = values[:bsz, :, : write.kv_length]
        q = q.to(keys.dtype)
        if write.mask is not None and q.device.type == "cpu":
            return _masked_decode_attention(q, keys, values, write.mask)
        gqa = self.num_heads != self.num_kv_heads
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=write.mask, enable_gqa=gqa)


def _masked_decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """One query per lane over keys of different lengths, as two batched matmuls: on the CPU this is faster than
    SDPA's masked path for a single query. q [B, H, 1, d], keys/values [B, kv_heads, L, d], mask [B, 1, 1, L]."""
    bsz, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.view(bsz, kv_heads, heads // kv_heads, dim)  # query heads that share a key head, side by side
    scores = torch.matmul(grouped, keys.transpose(-1, -2)) * dim**-0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), values).view(bsz, heads, 1, dim)


_LANE_INDEX: dict[torch.device, torch.Tensor] = {}


def _lane_index(batch: int, device: torch.device) -> torch.Tensor:
    """arange(batch) on `device`, from one cached tensor (a decode step builds no index of its own)."""
    cached = _LANE_INDEX.get(device)
    if cached is None or cached.shape[0] < batch:
        cached = _LANE_INDEX[device] = torch.arange(max(batch, 64), device=device)
    return cached[:batch]


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
