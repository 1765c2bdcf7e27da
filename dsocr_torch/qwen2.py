"""DeepSeek-OCR 2's second vision encoder (`model.qwen2_model`): Qwen2 decoder layers run as an encoder.

SAM's n = h*w features (row-major) are followed by n learned queries (`query_768` for a 768 px view,
`query_1024` for 1024 px; the count n picks the table). RoPE positions run over the whole
[features, queries] sequence. Attention is bidirectional among the features, which never see the queries;
query i sees every feature and queries 0..i. The output is the final-normed sequence [B, 2n, dim]; the
model keeps its query half. Attribute names are the checkpoint's (`qwen2_model.model.model.layers.<i>...`,
`qwen2_model.query_768.weight`): the authors wrap a transformers `Qwen2Model` twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.model.config import Qwen2EncoderConfig
from common.model.families import view_token_side
from dsocr_torch.language import MLP, Linear, RMSNorm, apply_rope, rope_tables

EncoderTrace = dict[str, Tensor]  # "input", "attn_mask_allowed", "layer<i>" (before the final norm)


def encoder_attention_mask(n_features: int, device: torch.device | str = "cpu") -> Tensor:
    """bool [2n, 2n], True = may attend: features see all features; query i sees all features and queries <= i."""
    size = 2 * n_features
    rows = torch.arange(size, device=device)[:, None]
    cols = torch.arange(size, device=device)[None, :]
    return (cols < n_features) | ((rows >= n_features) & (cols <= rows))


class Qwen2Attention(nn.Module):
    """Grouped-query attention with biased q/k/v projections (Qwen2), under an explicit mask."""

    def __init__(self, cfg: Qwen2EncoderConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.dim, cfg.heads * cfg.head_dim, bias=True)
        self.k_proj = Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=True)
        self.v_proj = Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=True)
        self.o_proj = Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2EncoderConfig) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(cfg)
        self.mlp = MLP(cfg.dim, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Model(nn.Module):
    """`qwen2_model.model.model`: the layers and the final norm (no token embedding: inputs are features)."""

    def __init__(self, cfg: Qwen2EncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)


class Qwen2Decoder(nn.Module):
    """`qwen2_model.model`: the authors' wrapper around transformers' Qwen2Model."""

    def __init__(self, cfg: Qwen2EncoderConfig) -> None:
        super().__init__()
        self.model = Qwen2Model(cfg)


class Qwen2Decoder2Encoder(nn.Module):
    """`model.qwen2_model`: SAM features [B, n, dim] -> final-normed [B, 2n, dim] for [features, queries]."""

    def __init__(self, cfg: Qwen2EncoderConfig, view_sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2Decoder(cfg)
        # One learned query table per view size the model takes, with one query per vision token of that view.
        self.queries_by_count: dict[int, str] = {}
        for size in view_sizes:
            count = view_token_side(size) ** 2
            self.add_module(f"query_{size}", nn.Embedding(count, cfg.dim))
            self.queries_by_count[count] = f"query_{size}"
        self._rope: dict[tuple[int, torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def queries(self, n_features: int) -> Tensor:
        name = self.queries_by_count.get(n_features)
        if name is None:
            known = ", ".join(str(count) for count in sorted(self.queries_by_count))
            raise ValueError(f"no learned queries for {n_features} vision tokens per view (tables for {known})")
        table: nn.Embedding = getattr(self, name)
        return table.weight

    def rope(self, length: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (length, dtype, device)
        if key not in self._rope:
            cos, sin = rope_tables(self.cfg.head_dim, length, self.cfg.rope_theta)  # float32, as the reference
            self._rope[key] = (cos.to(device, dtype), sin.to(device, dtype))
        return self._rope[key]

    def forward(self, features: Tensor, trace: EncoderTrace | None = None) -> Tensor:
        batch, n_features, dim = features.shape
        queries = self.queries(n_features).to(features.dtype)
        x = torch.cat((features, queries.unsqueeze(0).expand(batch, n_features, dim)), dim=1)
        cos, sin = self.rope(2 * n_features, x.dtype, x.device)
        mask = encoder_attention_mask(n_features, x.device)
        if trace is not None:
            trace.update(input=x, attn_mask_allowed=mask)
        for i, layer in enumerate(self.model.model.layers):
            x = layer(x, cos, sin, mask)
            if trace is not None:
                trace[f"layer{i}"] = x
        return self.model.model.norm(x)
