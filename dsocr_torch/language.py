"""DeepSeek-V2 decoder as DeepSeek-OCR uses it: Llama-style MHA with RoPE, SwiGLU, and a softmax-gated MoE.

Attribute names follow the checkpoint (`self_attn.q_proj`, `mlp.experts.3.up_proj`, ...), so the official
safetensors load without renaming. The routed experts' weights are additionally stacked into [E, ...] tensors
(`bind_stacked_experts`) whose rows the per-expert Linear weights are views of, so there is one copy in memory.
Nothing in a decode step reads a value back to the host: the MoE dispatch uses sorted static-shape index
tensors and one grouped matmul per projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from common.config import LanguageConfig


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


@dataclass
class KVCache:
    """Preallocated keys/values for every layer: [layers, B, kv_heads, capacity, head_dim] each.

    Allocated once per request (prompt length + max new tokens), written in place; shapes never change.
    """

    keys: torch.Tensor
    values: torch.Tensor

    @classmethod
    def allocate(
        cls, cfg: LanguageConfig, batch: int, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
        return cls(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[3])


@dataclass
class Trace:
    """Intermediates collected by a traced forward (parity tests); absent from the normal path."""

    layer_outputs: list[torch.Tensor] = field(default_factory=list)
    topk_idx: dict[int, torch.Tensor] = field(default_factory=dict)
    topk_weight: dict[int, torch.Tensor] = field(default_factory=dict)
    final_norm: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, cfg: LanguageConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        hidden, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, start: int
    ) -> torch.Tensor:
        """x [B, T, hidden] at positions start..start+T-1; attends to the cache's first start+T entries."""
        bsz, length, _ = x.shape
        q = self.q_proj(x).view(bsz, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        end = start + length
        cache.keys[self.layer_idx, :, :, start:end] = k
        cache.values[self.layer_idx, :, :, start:end] = v
        keys = cache.keys[self.layer_idx, :, :, :end]
        values = cache.values[self.layer_idx, :, :, :end]
        gqa = self.num_heads != self.num_kv_heads
        if start == 0:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=length > 1, enable_gqa=gqa)
        elif length == 1:
            out = F.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa)
        else:  # a chunk after cached tokens: query i sees keys up to start + i
            mask = torch.ones(length, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(bsz, length, self.num_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (expert ids [N, k] int64, float32 weights [N, k])."""
        scores = F.linear(x.float(), self.weight.float()).softmax(dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.routed_scaling_factor


def _grouped_mm_works(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped matmul runs for this device/dtype/shape (CPU: any dtype; CUDA: bf16, sm80+)."""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        probe_x = torch.zeros(2, weight.shape[2], device=x.device, dtype=x.dtype)
        offs = torch.full((weight.shape[0],), 2, device=x.device, dtype=torch.int32)
        offs[0] = 1
        F.grouped_mm(probe_x, weight.transpose(1, 2), offs=offs)
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


class MoEFeedForward(nn.Module):
    """Softmax-gated top-k routed experts plus the shared experts (one MLP of n_shared * moe_intermediate)."""

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.num_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.intermediate = cfg.moe_intermediate_size
        self.gate = MoEGate(cfg)
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts)
        )
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )
        # Stacked expert weights ([E, 2I, hidden] gate|up and [E, hidden, I] down); set by bind_stacked_experts.
        self.gate_up_stacked: torch.Tensor | None = None
        self.down_stacked: torch.Tensor | None = None
        self._use_grouped_mm: bool | None = None
        self._expert_range: torch.Tensor | None = None

    def bind_stacked_experts(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Allocates the stacked expert tensors and rebinds every expert Linear weight to a view of them.

        Called on a meta-built model before loading: the loader then copies each checkpoint tensor
        straight into its slice, so the weights exist once and are stacked without a copy.
        """
        n, inter = self.num_experts, self.intermediate
        hidden = self.experts[0].gate_proj.in_features
        self.gate_up_stacked = torch.empty(n, 2 * inter, hidden, device=device, dtype=dtype)
        self.down_stacked = torch.empty(n, hidden, inter, device=device, dtype=dtype)
        for i, expert in enumerate(self.experts):
            expert.gate_proj.weight = nn.Parameter(self.gate_up_stacked[i, :inter], requires_grad=False)
            expert.up_proj.weight = nn.Parameter(self.gate_up_stacked[i, inter:], requires_grad=False)
            expert.down_proj.weight = nn.Parameter(self.down_stacked[i], requires_grad=False)
        self._use_grouped_mm = None

    def forward(self, x: torch.Tensor, trace: Trace | None = None, layer_idx: int = -1) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        ids, weights = self.gate(flat)
        if trace is not None:
            trace.topk_idx[layer_idx] = ids
            trace.topk_weight[layer_idx] = weights
        routed = self._routed(flat, ids, weights)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(flat)
        return routed.view(shape)

    def _routed(self, flat: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.gate_up_stacked is None:
            raise RuntimeError("MoE experts are not stacked: call bind_stacked_experts (the loader does)")
        n_tokens, hidden = flat.shape
        if self._use_grouped_mm is None:
            self._use_grouped_mm = _grouped_mm_works(flat, self.gate_up_stacked)
        flat_ids = ids.reshape(-1)
        # Sort the (token, slot) pairs by expert; all shapes are static (n_tokens * k rows).
        order = torch.argsort(flat_ids, stable=True)
        sorted_ids = flat_ids[order]
        token_of_row = order // self.top_k
        rows = flat[token_of_row]
        if self._use_grouped_mm:
            # offs[e] = rows routed to experts <= e (sorted_ids is sorted, so a searchsorted gives it).
            offs = torch.searchsorted(sorted_ids, self._expert_ids(flat.device), right=True, out_int32=True)
            gate_up = F.grouped_mm(rows, self.gate_up_stacked.transpose(1, 2), offs=offs)
            gate, up = gate_up.split(self.intermediate, dim=-1)
            out = F.grouped_mm(F.silu(gate) * up, self.down_stacked.transpose(1, 2), offs=offs)
        elif rows.shape[0] <= 4 * self.top_k:
            # Fallback for a decode step (e.g. float32 on CUDA): gather each row's expert weights, batch-multiply.
            gate_up = torch.bmm(self.gate_up_stacked[sorted_ids], rows.unsqueeze(-1)).squeeze(-1)
            gate, up = gate_up.split(self.intermediate, dim=-1)
            out = torch.bmm(self.down_stacked[sorted_ids], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        else:
            # Fallback for a prefill: one host read of the per-expert row counts, then a matmul per expert.
            ends = torch.searchsorted(sorted_ids, self._expert_ids(flat.device), right=True).tolist()
            out = torch.empty(rows.shape[0], hidden, device=flat.device, dtype=flat.dtype)
            begin = 0
            for expert, end in enumerate(ends):
                if end > begin:
                    gate, up = F.linear(rows[begin:end], self.gate_up_stacked[expert]).split(self.intermediate, -1)
                    out[begin:end] = F.linear(F.silu(gate) * up, self.down_stacked[expert])
                begin = end
        # Back to (token, slot) order, then the weighted sum over the k slots in float32 as the reference does.
        unsorted = torch.empty_like(out).index_copy_(0, order, out).view(n_tokens, self.top_k, hidden)
        return (unsorted.float() * weights.unsqueeze(-1)).sum(dim=1).to(flat.dtype)

    def _expert_ids(self, device: torch.device) -> torch.Tensor:
        if self._expert_range is None or self._expert_range.device != device:
            self._expert_range = torch.arange(self.num_experts, device=device)
        return self._expert_range


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
        start: int,
        trace: Trace | None = None,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start)
        normed = self.post_attention_layernorm(h)
        if isinstance(self.mlp, MoEFeedForward):
            return h + self.mlp(normed, trace, self.layer_idx)
        return h + self.mlp(normed)
