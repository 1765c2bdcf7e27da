"""DeepSeek-OCR 2's second vision encoder (`model.qwen2_model`) in MLX: Qwen2 layers run as an encoder.

Mirrors dsocr_torch/qwen2.py. SAM's n features (row-major) are followed by n learned queries (the table whose
row count is n: `query_768` or `query_1024`); RoPE positions run over the whole [features, queries]
sequence; features attend to all features and never to the queries, query i to every feature and to
queries 0..i. The output is the final-normed [B, 2n, dim]; the model keeps the query half. The layers are
mlx-lm's Qwen2 blocks (biased q/k/v, GQA, SwiGLU, RMSNorm, RoPE), whose attribute names are the checkpoint's.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import qwen2 as mlx_lm_qwen2

from common.model.config import Qwen2EncoderConfig
from common.model.families import view_token_side

EncoderTrace = dict[str, mx.array]  # "input", "attn_mask_allowed", "layer<i>" (before the final norm)


def encoder_attention_mask(n_features: int) -> mx.array:
    """bool [2n, 2n], True = may attend: features see all features; query i sees all features and queries <= i."""
    rows = np.arange(2 * n_features)[:, None]
    cols = np.arange(2 * n_features)[None, :]
    return mx.array((cols < n_features) | ((rows >= n_features) & (cols <= rows)))


def mlx_lm_args(cfg: Qwen2EncoderConfig) -> mlx_lm_qwen2.ModelArgs:
    return mlx_lm_qwen2.ModelArgs(
        model_type="qwen2",
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.layers,
        intermediate_size=cfg.intermediate_size,
        num_attention_heads=cfg.heads,
        rms_norm_eps=cfg.rms_norm_eps,
        vocab_size=0,  # no token embedding: the inputs are SAM features and queries
        num_key_value_heads=cfg.kv_heads,
        rope_theta=cfg.rope_theta,
    )


class Qwen2Model(nn.Module):
    """`qwen2_model.model.model`: the layers and the final norm."""

    def __init__(self, cfg: Qwen2EncoderConfig) -> None:
        super().__init__()
        args = mlx_lm_args(cfg)
        self.layers = [mlx_lm_qwen2.TransformerBlock(args) for _ in range(cfg.layers)]
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.rms_norm_eps)


class Qwen2Decoder(nn.Module):
    """`qwen2_model.model`: the authors' wrapper around transformers' Qwen2Model."""

    def __init__(self, cfg: Qwen2EncoderConfig) -> None:
        super().__init__()
        self.model = Qwen2Model(cfg)


class Qwen2Decoder2Encoder(nn.Module):
    """`model.qwen2_model`: SAM features [B, n, dim] -> final-normed [B, 2n, dim] for [features, queries]."""

    def __init__(self, cfg: Qwen2EncoderConfig, view_sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.model = Qwen2Decoder(cfg)
        for size in view_sizes:  # one query per vision token of a view of that size
            setattr(self, f"query_{size}", nn.Embedding(view_token_side(size) ** 2, cfg.dim))

    def queries(self, n_features: int) -> mx.array:
        tables = {name: table for name, table in self.items() if name.startswith("query_")}
        for table in tables.values():
            if table.weight.shape[0] == n_features:
                return table.weight
        known = ", ".join(str(t.weight.shape[0]) for t in tables.values())
        raise ValueError(f"no learned queries for {n_features} vision tokens per view (tables for {known})")

    def __call__(self, features: mx.array, trace: EncoderTrace | None = None) -> mx.array:
        batch, n_features, dim = features.shape
        queries = mx.broadcast_to(self.queries(n_features).astype(features.dtype)[None], (batch, n_features, dim))
        x = mx.concatenate([features, queries], axis=1)
        mask = encoder_attention_mask(n_features)
        if trace is not None:
            trace.update(input=x, attn_mask_allowed=mask)
        for i, layer in enumerate(self.model.model.layers):
            x = layer(x, mask)
            if trace is not None:
                trace[f"layer{i}"] = x
        return self.model.model.norm(x)
