"""DeepSeek-V2 decoder as DeepSeek-OCR uses it: Llama-style MHA with RoPE, SwiGLU, and a softmax-gated MoE.

Attribute names follow the checkpoint (`self_attn.q_proj`, `mlp.experts.3.up_proj`, ...), so the official
safetensors load without renaming. The routed experts' weights are additionally stacked into [E, ...] tensors
(`bind_stacked_experts`) that the per-expert Linear weights are views of, so there is one copy in memory.
Nothing in a decode step reads a value back to the host: the MoE dispatch uses static-shape index tensors
and either one grouped matmul per projection (prefill) or, for a few tokens on CPU, an embedding-bag gather of
exactly the chosen experts' weights (decode).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from common.config import LanguageConfig


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN_LINEAR = _onednn_linear_available()


class Linear(nn.Linear):
    """nn.Linear with faster CPU paths for one-token (decode) products; same results up to summation order.

    * float32: oneDNN's linear instead of F.linear, which ends in a single-threaded MKL sgemv for one row
      (~14 GB/s on a 2-core machine); oneDNN uses every thread (~25-30 GB/s cold, measured) and is no
      slower for prefill-sized inputs.
    * bfloat16, after `pack_weight`: oneDNN's linear on a copy of the weight in oneDNN's blocked layout
      (~28 GB/s against ~15-20 GB/s from the plain layout, bit-identical results).
    Every other device/dtype keeps F.linear.
    """

    packed: torch.Tensor | None = None  # oneDNN-layout weight set by pack_weight; None: use self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        weight = self.weight
        if (
            _ONEDNN_LINEAR
            and x.dtype == torch.float32
            and weight.dtype == torch.float32
            and x.device.type == "cpu"
            and weight.device.type == "cpu"
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
        ):
            return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")
        return F.linear(x, weight, self.bias)

    def pack_weight(self) -> bool:
        """Moves a bfloat16 CPU weight into oneDNN's blocked layout; returns whether the layer is packed.

        The plain weight is released (the Parameter becomes a meta tensor of the same shape and dtype) so
        memory does not double: from then on the layer is for inference only and its values live in
        `packed`. float32 is left alone: oneDNN reads the plain float32 layout as fast as the blocked one.
        """
        if self.packed is not None:
            return True
        weight = self.weight
        if not (
            _ONEDNN_LINEAR
            and weight.device.type == "cpu"
            and weight.dtype == torch.bfloat16
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        ):
            return False
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)  # 1: tuned for one row
        self.weight = nn.Parameter(torch.empty_like(weight, device="meta"), requires_grad=False)
        return True


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
    """Keys/values for every layer in lanes: [layers, lanes, kv_heads, capacity, head_dim] each.

    Allocated once, written in place; shapes never change. A lane holds one sequence; `lengths[l]` is the
    number of positions filled in lane l (device tensor, so a decode step reads its positions without a host
    sync) and `host_lengths` mirrors it for the host-side choices (how far a decode step has to read).
    """

    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor  # int64 [lanes]
    host_lengths: list[int]

    @classmethod
    def allocate(
        cls, cfg: LanguageConfig, lanes: int, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        shape = (cfg.num_hidden_layers, lanes, cfg.num_key_value_heads, capacity, cfg.head_dim)
        return cls(
            torch.empty(shape, device=device, dtype=dtype),
            torch.empty(shape, device=device, dtype=dtype),
            torch.zeros(lanes, device=device, dtype=torch.int64),
            [0] * lanes,
        )

    @staticmethod
    def bytes_per_position(cfg: LanguageConfig, dtype: torch.dtype) -> int:
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize

    @staticmethod
    def dtype_for(device: torch.device, compute_dtype: torch.dtype) -> torch.dtype:
        """The cache dtype for a compute dtype: float32 for bfloat16 on CPU, else the compute dtype.

        torch's CPU attention for one query is several times slower per byte in bfloat16 than in float32,
        so a float32 cache costs twice the cache memory but makes decode attention faster; it also stores
        the bf16 k/v exactly.
        """
        if device.type == "cpu" and compute_dtype == torch.bfloat16:
            return torch.float32
        return compute_dtype

    @property
    def lanes(self) -> int:
        return int(self.keys.shape[1])

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[3])

    def set_length(self, lane: int, length: int) -> None:
        self.host_lengths[lane] = length
        self.lengths[lane] = length

    def move_lane(self, src: int, dst: int) -> None:
        """Copies lane `src`'s filled positions (every layer) into lane `dst`."""
        length = self.host_lengths[src]
        self.keys[:, dst, :, :length] = self.keys[:, src, :, :length]
        self.values[:, dst, :, :length] = self.values[:, src, :, :length]
        self.set_length(dst, length)


@dataclass
class CacheWrite:
    """Where a forward pass writes and what it reads in the KV cache.

    Prefill (`lane` set): T new positions of one lane from `start`. Decode (`positions` set): one new position
    per lane of [0, B), at the lane's own position; keys are read up to `kv_length` with `mask` hiding what
    lies past a lane's end (None when every lane ends at `kv_length`).
    """

    start: int = 0
    lane: int | None = 0
    positions: torch.Tensor | None = None  # int64 [B]
    kv_length: int = 0
    mask: torch.Tensor | None = None  # bool [B, 1, 1, kv_length]

    @property
    def is_decode(self) -> bool:
        return self.positions is not None


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
        keys = keys[:bsz, :, : write.kv_length]
        values = values[:bsz, :, : write.kv_length]
        gqa = self.num_heads != self.num_kv_heads
        return F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=write.mask, enable_gqa=gqa)


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
        probe_x = torch.zeros(2, weight.shape[1], device=x.device, dtype=x.dtype)
        offs = torch.full((weight.shape[0],), 2, device=x.device, dtype=torch.int32)
        offs[0] = 1
        F.grouped_mm(probe_x, weight, offs=offs)
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
        # Stacked expert weights, set by bind_stacked_experts. Memory is input-major: gate_up_by_input
        # [E, hidden, 2I] (gate | up columns) and down_by_input [E, I, hidden], i.e. each expert's Linear weight
        # transposed: input-major rows are what the decode path's embedding bag gathers and what grouped_mm
        # takes as its [K, N] operand. gate_up_stacked [E, 2I, hidden] and down_stacked [E, hidden, I] are the
        # same memory in the checkpoint's (output, input) orientation.
        self.gate_up_by_input: torch.Tensor | None = None
        self.down_by_input: torch.Tensor | None = None
        self.gate_up_stacked: torch.Tensor | None = None
        self.down_stacked: torch.Tensor | None = None
        self._use_grouped_mm: bool | None = None
        self._expert_range: torch.Tensor | None = None
        self._bag_ranges: dict[tuple[torch.device, int, int], torch.Tensor] = {}

    def bind_stacked_experts(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Allocates the stacked expert tensors and rebinds every expert Linear weight to a view of them.

        Called on a meta-built model before loading: the loader then copies each checkpoint tensor
        straight into its (transposed) slice, so the weights exist once and are stacked without a copy.
        """
        n, inter = self.num_experts, self.intermediate
        hidden = self.experts[0].gate_proj.in_features
        self.gate_up_by_input = torch.empty(n, hidden, 2 * inter, device=device, dtype=dtype)
        self.down_by_input = torch.empty(n, inter, hidden, device=device, dtype=dtype)
        self.gate_up_stacked = self.gate_up_by_input.transpose(1, 2)
        self.down_stacked = self.down_by_input.transpose(1, 2)
        for i, expert in enumerate(self.experts):
            expert.gate_proj.weight = nn.Parameter(self.gate_up_stacked[i, :inter], requires_grad=False)
            expert.up_proj.weight = nn.Parameter(self.gate_up_stacked[i, inter:], requires_grad=False)
            expert.down_proj.weight = nn.Parameter(self.down_stacked[i], requires_grad=False)
        self._use_grouped_mm = None
        self._bag_ranges = {}

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
        if self.gate_up_by_input is None or self.down_by_input is None:
            raise RuntimeError("MoE experts are not stacked: call bind_stacked_experts (the loader does)")
        n_tokens, hidden = flat.shape
        if flat.device.type == "cpu" and n_tokens * self.top_k <= self.num_experts:
            # Decode on CPU: fewer (token, expert) rows than experts, so read exactly those experts' weights.
            # Measured on one real-size layer: 1.5x (float32) / 1.3x (bfloat16) faster than grouped_mm,
            # whose CPU fallback is a loop of per-expert single-threaded mm calls over all experts.
            out = self._routed_embedding_bag(flat, ids)
            return self._combine(out.view(n_tokens, self.top_k, hidden), weights, flat.dtype)
        if self._use_grouped_mm is None:
            # Both products: grouped_mm needs 16-byte row strides, which an odd expert width can break in one only.
            self._use_grouped_mm = _grouped_mm_works(flat, self.gate_up_by_input) and _grouped_mm_works(
                flat, self.down_by_input
            )
        flat_ids = ids.reshape(-1)
        # Sort the (token, slot) pairs by expert; all shapes are static (n_tokens * k rows).
        order = torch.argsort(flat_ids, stable=True)
        sorted_ids = flat_ids[order]
        token_of_row = order // self.top_k
        rows = flat[token_of_row]
        if self._use_grouped_mm:
            # offs[e] = rows routed to experts <= e (sorted_ids is sorted, so a searchsorted gives it).
            offs = torch.searchsorted(sorted_ids, self._expert_ids(flat.device), right=True, out_int32=True)
            gate_up = F.grouped_mm(rows, self.gate_up_by_input, offs=offs)
            gate, up = gate_up.split(self.intermediate, dim=-1)
            out = F.grouped_mm(F.silu(gate) * up, self.down_by_input, offs=offs)
        elif rows.shape[0] <= 4 * self.top_k:
            # Fallback for a decode step (e.g. float32 on CUDA): gather each row's expert weights, batch-multiply.
            gate_up = torch.bmm(rows.unsqueeze(1), self.gate_up_by_input[sorted_ids]).squeeze(1)
            gate, up = gate_up.split(self.intermediate, dim=-1)
            out = torch.bmm((F.silu(gate) * up).unsqueeze(1), self.down_by_input[sorted_ids]).squeeze(1)
        else:
            # Fallback for a prefill: one host read of the per-expert row counts, then a matmul per expert.
            ends = torch.searchsorted(sorted_ids, self._expert_ids(flat.device), right=True).tolist()
            out = torch.empty(rows.shape[0], hidden, device=flat.device, dtype=flat.dtype)
            begin = 0
            for expert, end in enumerate(ends):
                if end > begin:
                    gate, up = (rows[begin:end] @ self.gate_up_by_input[expert]).split(self.intermediate, -1)
                    out[begin:end] = (F.silu(gate) * up) @ self.down_by_input[expert]
                begin = end
        # Back to (token, slot) order for the weighted sum over the k slots.
        unsorted = torch.empty_like(out).index_copy_(0, order, out).view(n_tokens, self.top_k, hidden)
        return self._combine(unsorted, weights, flat.dtype)

    @staticmethod
    def _combine(per_slot: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[N, k, hidden] expert outputs -> [N, hidden]: the weighted sum in float32, as the reference does."""
        return (per_slot.float() * weights.unsqueeze(-1)).sum(dim=1).to(dtype)

    def _routed_embedding_bag(self, flat: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Per-(token, slot) expert outputs [N * k, hidden] in (token, slot) order, static shapes only.

        A matrix-vector product y = W x equals a weighted sum of the rows of W^T with weights x: an embedding
        bag over the input-major stacked table whose bag r holds rows expert_r * in + (0..in-1). The bags read
        only the chosen experts' weights; no host read, no sort.
        """
        assert self.gate_up_by_input is not None and self.down_by_input is not None
        n_experts, hidden, width = self.gate_up_by_input.shape
        inter = self.intermediate
        n_rows = ids.numel()
        flat_ids = ids.reshape(-1, 1)
        x_rows = flat.unsqueeze(1).expand(flat.shape[0], self.top_k, hidden).reshape(-1)
        gate_up = F.embedding_bag(
            (flat_ids * hidden + self._arange(flat.device, hidden)).view(-1),
            self.gate_up_by_input.view(n_experts * hidden, width),
            self._arange(flat.device, n_rows, hidden),
            mode="sum",
            per_sample_weights=x_rows,
        )
        gate, up = gate_up.split(inter, dim=-1)
        act = F.silu(gate) * up
        return F.embedding_bag(
            (flat_ids * inter + self._arange(flat.device, inter)).view(-1),
            self.down_by_input.view(n_experts * inter, hidden),
            self._arange(flat.device, n_rows, inter),
            mode="sum",
            per_sample_weights=act.reshape(-1),
        )

    def _arange(self, device: torch.device, size: int, step: int = 1) -> torch.Tensor:
        """arange(0, size * step, step) on `device`, cached: a decode step rebuilds none of its constant indices."""
        key = (device, size, step)
        cached = self._bag_ranges.get(key)
        if cached is None:
            cached = self._bag_ranges[key] = torch.arange(0, size * step, step, device=device)
        return cached

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
        write: CacheWrite,
        trace: Trace | None = None,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, write)
        normed = self.post_attention_layernorm(h)
        if isinstance(self.mlp, MoEFeedForward):
            return h + self.mlp(normed, trace, self.layer_idx)
        return h + self.mlp(normed)
