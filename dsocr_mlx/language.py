"""DeepSeek-V2 decoder as DeepSeek-OCR uses it (plain MHA + DeepSeek-MoE), on MLX.

mlx-lm's `models.deepseek` already has the authors' attention (Llama RoPE on the full head dim, not
interleaved), the SwiGLU MLP, `SwitchGLU` experts and the KV cache, so those are reused as they are.
Its MoE gate differs from the authors' (no float32 gate logits, no `routed_scaling_factor`, no
`norm_topk_prob`) and its expert attribute is `switch_mlp`, so the gate, the MoE block and the decoder
layer are written here. Attribute names equal the checkpoint's tensor names; the only renaming is the
per-expert tensors `mlp.experts.<e>.<proj>.weight`, stacked by `sanitize` into `mlp.experts.<proj>.weight`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import deepseek as mlx_lm_deepseek
from mlx_lm.models.switch_layers import SwitchGLU
from mlx_lm.models.switch_layers import SwitchLinear as _MlxLmSwitchLinear

from common.engine.backend import Trace
from common.model.config import LanguageConfig

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def mlx_lm_args(cfg: LanguageConfig) -> mlx_lm_deepseek.ModelArgs:
    """The same decoder described with mlx-lm's config type, for the modules reused from it."""
    return mlx_lm_deepseek.ModelArgs(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        n_shared_experts=cfg.n_shared_experts or None,
        n_routed_experts=cfg.n_routed_experts or None,
        num_experts_per_tok=cfg.num_experts_per_tok or None,
        moe_layer_freq=cfg.moe_layer_freq,
        first_k_dense_replace=cfg.first_k_dense_replace,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=None,
        attention_bias=cfg.attention_bias,
    )


# q/k/v/o projections + nn.RoPE(head_dim, traditional=False, base=rope_theta): the authors' LlamaAttention.
Attention = mlx_lm_deepseek.DeepseekAttention
# down(silu(gate(x)) * up(x)) without biases.
MLP = mlx_lm_deepseek.DeepseekMLP


class SwitchLinear(_MlxLmSwitchLinear):
    """mlx-lm's stacked-expert linear, plus a path for half-precision weights on the CPU backend.

    MLX's CPU `gather_mm` only handles float32. On the CPU with bfloat16/float16 weights, a few
    (token, expert) pairs (decode) gather just the selected experts' weights; many pairs (prefill) upcast
    the stacked weights once for the call. Metal and float32 take mlx-lm's `gather_mm` path.
    """

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        weight = self["weight"]
        if weight.dtype == mx.float32 or mx.default_device() != mx.cpu:
            return super().__call__(x, indices, sorted_indices)
        if indices.size < self.num_experts:
            selected = weight[indices]  # [..., out, in], one matrix per (token, expert) pair
            out = x @ selected.swapaxes(-1, -2)
        else:
            out = mx.gather_mm(
                x.astype(mx.float32),
                weight.astype(mx.float32).swapaxes(-1, -2),
                rhs_indices=indices,
                sorted_indices=sorted_indices,
            ).astype(x.dtype)
        if "bias" in self:
            out = out + mx.expand_dims(self["bias"][indices], -2)
        return out


class RoutedExperts(SwitchGLU):
    """The routed experts stacked on a leading axis: `gate_proj/up_proj/down_proj.weight` [E, out, in]."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int) -> None:
        super().__init__(hidden_size, intermediate_size, num_experts, bias=False)
        self.gate_proj = SwitchLinear(hidden_size, intermediate_size, num_experts, bias=False)
        self.up_proj = SwitchLinear(hidden_size, intermediate_size, num_experts, bias=False)
        self.down_proj = SwitchLinear(intermediate_size, hidden_size, num_experts, bias=False)


class MoEGate(nn.Module):
    """Softmax router with plain (greedy) top-k, in float32 as the authors compute it.

    The k weights are the raw softmax probabilities (renormalised only when `norm_topk_prob`) times
    `routed_scaling_factor`.
    """

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = mx.zeros((cfg.n_routed_experts, cfg.hidden_size))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T
        scores = mx.softmax(logits, axis=-1)
        k = self.top_k
        indices = mx.stop_gradient(mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k])
        weights = mx.take_along_axis(scores, indices, axis=-1)
        if self.norm_topk_prob and k > 1:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        return indices, weights * self.routed_scaling_factor


class MoEFeedForward(nn.Module):
    """sum_k w_k * expert_k(x) + shared_experts(x); the shared experts are one MLP of n_shared x width."""

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.gate = MoEGate(cfg)
        self.experts = RoutedExperts(cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts)
        self.shared_experts = (
            MLP(mlx_lm_args(cfg), intermediate_size=cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.n_shared_experts
            else None
        )

    def __call__(self, x: mx.array, trace: Trace | None = None, layer_idx: int = -1) -> mx.array:
        indices, weights = self.gate(x)
        if trace is not None:  # the router's choice per token, [tokens, k], by layer
            trace.setdefault("topk_idx", {})[layer_idx] = indices.reshape(-1, indices.shape[-1])
            trace.setdefault("topk_weight", {})[layer_idx] = weights.reshape(-1, weights.shape[-1])
        routed = self.experts(x, indices)  # [..., k, hidden]
        # The authors weight and sum the expert outputs in float32 (the gate's dtype), then cast back.
        y = (routed.astype(mx.float32) * weights[..., None]).sum(axis=-2).astype(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y


class DeepseekV2DecoderLayer(nn.Module):
    """h = x + attn(norm(x)); out = h + mlp(norm(h)). Dense MLP before `first_k_dense_replace`, then MoE."""

    def __init__(self, cfg: LanguageConfig, index: int) -> None:
        super().__init__()
        args = mlx_lm_args(cfg)
        self.layer_idx = index
        self.self_attn = Attention(args)
        self.mlp = MoEFeedForward(cfg) if cfg.is_moe_layer(index) else MLP(args)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any, cache: Any, trace: Trace | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        normed = self.post_attention_layernorm(h)
        if isinstance(self.mlp, MoEFeedForward):
            return h + self.mlp(normed, trace, self.layer_idx)
        return h + self.mlp(normed)


def decoder_forward(
    layers: list[DeepseekV2DecoderLayer],
    norm: nn.RMSNorm,
    inputs_embeds: mx.array,
    views: Sequence[Any],
    mask: Any,
    trace: Trace | None = None,
) -> mx.array:
    """Runs the decoder stack on [B, T, H] embeddings -> final-normed hidden states; `views` (one per layer, see
    dsocr_mlx.cache) give positions and hold keys/values. `mask` is "causal", None (one query per row that may
    see every key) or a boolean array."""
    h = inputs_embeds
    if inputs_embeds.shape[1] == 1 and isinstance(mask, str):
        mask = None
    for layer, view in zip(layers, views, strict=True):
        h = layer(h, mask, view, trace)
        if trace is not None:
            trace.setdefault("layer_outputs", []).append(h)
    h = norm(h)
    if trace is not None:
        trace["final_norm"] = h
    return h


def stack_experts(weights: dict[str, mx.array], cfg: LanguageConfig) -> dict[str, mx.array]:
    """`mlp.experts.<e>.<proj>.<w|scales|biases>` -> `mlp.experts.<proj>.<...>` [E, ...]; idempotent."""
    for layer in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        for proj in EXPERT_PROJECTIONS:
            for kind in ("weight", "scales", "biases"):
                first = f"{prefix}.0.{proj}.{kind}"
                if first not in weights:
                    continue
                names = [f"{prefix}.{e}.{proj}.{kind}" for e in range(cfg.n_routed_experts)]
                present = [n for n in names if n in weights]
                if len(present) != len(names):
                    continue  # leave them for the strict check to name as missing
                weights[f"{prefix}.{proj}.{kind}"] = mx.stack([weights.pop(n) for n in names])
    return weights
