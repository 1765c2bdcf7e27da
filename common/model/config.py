"""Typed model configuration parsed from the official DeepSeek-OCR / DeepSeek-OCR 2 `config.json`.

The Hugging Face code reads the top-level language-model keys (`language_config` is a duplicate that
vLLM reads); vision sizes live under `vision_config.width`. Keys the official schema lacks (the authors
hard-code them) are read when present and otherwise default to the real model's values. `architectures`
selects the model family (common.model.families), which decides the vision encoder: CLIP-L for DeepSeek-OCR,
a Qwen2 decoder used as an encoder for DeepSeek-OCR 2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.model.families import DEEPSEEK_OCR, DEEPSEEK_OCR_2, ModelFamily, family_for_config

_MISSING = object()


class _Reader:
    """Reads typed keys from one JSON object, naming the key and the file in every error."""

    def __init__(self, data: dict[str, Any], where: str, path: Path | str) -> None:
        self.data, self.where, self.path = data, where, path

    def _fail(self, key: str, why: str) -> ConfigError:
        prefix = f"{self.where}." if self.where else ""
        return ConfigError(f"{self.path}: key '{prefix}{key}' {why}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        if key not in self.data or self.data[key] is None and default is not _MISSING:
            if default is _MISSING:
                raise self._fail(key, "is missing")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = "/".join(k.__name__ for k in kinds)
            raise self._fail(key, f"must be {names}, got {value!r}")
        if kinds[0] in (int, float) and not isinstance(value, bool) and value < 0:
            raise self._fail(key, f"must not be negative, got {value!r}")
        return value

    def get_int_list(self, key: str, default: Any = _MISSING) -> tuple[int, ...]:
        value = self.get(key, list, default)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise self._fail(key, f"must be a list of integers, got {value!r}")
        return tuple(value)

    def child(self, key: str) -> _Reader:
        value = self.get(key, dict)
        prefix = f"{self.where}." if self.where else ""
        return _Reader(value, f"{prefix}{key}", self.path)


@dataclass(frozen=True)
class SamConfig:
    """SAM ViT-B image encoder (`model.sam_model`)."""

    width: int
    layers: int
    heads: int
    global_attn_indexes: tuple[int, ...]
    downsample_channels: tuple[int, int]  # net_2, net_3 output channels
    out_chans: int = 256  # neck channels
    window_size: int = 14
    mlp_ratio: float = 4.0
    patch_size: int = 16
    image_size: int = 1024  # size the absolute position table was trained for

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def pos_grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class ClipConfig:
    """CLIP-L encoder (`model.vision_model`) fed with SAM's features as patch embeddings."""

    width: int
    layers: int
    heads: int
    image_size: int = 224
    patch_size: int = 14
    ffn_hidden_size: int = 4096

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def pos_grid(self) -> int:
        return self.image_size // self.patch_size  # 16: the table has 1 + 16*16 rows


@dataclass(frozen=True)
class Qwen2EncoderConfig:
    """DeepSeek-OCR 2's `model.qwen2_model`: Qwen2 decoder layers run as an encoder with learned queries.

    Only `dim` is in the official config.json (`vision_config.width.qwen2-0-5b.dim`); the rest are the
    authors' constants (Qwen2-0.5B) unless the config names them.
    """

    dim: int
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    intermediate_size: int = 4864
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


@dataclass(frozen=True)
class ProjectorConfig:
    input_dim: int
    n_embed: int
    projector_type: str = "linear"


@dataclass(frozen=True)
class LanguageConfig:
    """DeepSeek-V2 decoder as DeepSeek-OCR uses it: plain MHA (no MLA), MoE with shared experts."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    max_position_embeddings: int = 8192
    moe_layer_freq: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    bos_token_id: int = 0
    eos_token_id: int = 1
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    use_mla: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, index: int) -> bool:
        return (
            self.n_routed_experts > 0
            and index >= self.first_k_dense_replace
            and index % self.moe_layer_freq == 0
        )


@dataclass(frozen=True)
class ModelConfig:
    language: LanguageConfig
    sam: SamConfig
    clip: ClipConfig | None  # DeepSeek-OCR's second vision encoder
    projector: ProjectorConfig
    path: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    family: ModelFamily = DEEPSEEK_OCR
    qwen2: Qwen2EncoderConfig | None = None  # DeepSeek-OCR 2's second vision encoder


def parse_config(data: dict[str, Any], path: Path | str = "config.json") -> ModelConfig:
    """Builds a ModelConfig from a parsed config.json object."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    top = _Reader(data, "", path)

    lm = LanguageConfig(
        vocab_size=top.get("vocab_size", int),
        hidden_size=top.get("hidden_size", int),
        intermediate_size=top.get("intermediate_size", int),
        moe_intermediate_size=top.get("moe_intermediate_size", int),
        num_hidden_layers=top.get("num_hidden_layers", int),
        num_attention_heads=top.get("num_attention_heads", int),
        num_key_value_heads=top.get("num_key_value_heads", int, top.data.get("num_attention_heads")),
        n_routed_experts=top.get("n_routed_experts", int, 0),
        n_shared_experts=top.get("n_shared_experts", int, 0),
        num_experts_per_tok=top.get("num_experts_per_tok", int, 0),
        first_k_dense_replace=top.get("first_k_dense_replace", int, 0),
        max_position_embeddings=top.get("max_position_embeddings", int, 8192),
        moe_layer_freq=top.get("moe_layer_freq", int, 1),
        rms_norm_eps=top.get("rms_norm_eps", float, 1e-6),
        rope_theta=top.get("rope_theta", float, 10000.0),
        bos_token_id=top.get("bos_token_id", int, 0),
        eos_token_id=top.get("eos_token_id", int, 1),
        scoring_func=top.get("scoring_func", str, "softmax"),
        topk_method=top.get("topk_method", str, "greedy"),
        norm_topk_prob=top.get("norm_topk_prob", bool, False),
        routed_scaling_factor=top.get("routed_scaling_factor", float, 1.0),
        n_group=top.get("n_group", int, 1),
        topk_group=top.get("topk_group", int, 1),
        attention_bias=top.get("attention_bias", bool, False),
        tie_word_embeddings=top.get("tie_word_embeddings", bool, False),
        hidden_act=top.get("hidden_act", str, "silu"),
        use_mla=top.get("use_mla", bool, False),
    )
    if lm.use_mla:
        raise ConfigError(f"{path}: key 'use_mla' is true; DeepSeek-OCR uses plain multi-head attention")
    if lm.hidden_size % lm.num_attention_heads:
        raise ConfigError(f"{path}: key 'hidden_size' must be a multiple of 'num_attention_heads'")
    if lm.scoring_func != "softmax" or lm.topk_method != "greedy":
        raise ConfigError(
            f"{path}: keys 'scoring_func'/'topk_method' = {lm.scoring_func!r}/{lm.topk_method!r} "
            "are not supported (DeepSeek-OCR uses softmax/greedy)"
        )
    if lm.hidden_act != "silu":
        raise ConfigError(f"{path}: key 'hidden_act' = {lm.hidden_act!r} is not supported (expected 'silu')")

    family = family_for_config(data, path)
    widths = top.child("vision_config").child("width")
    proj_r = top.child("projector_config")
    projector = ProjectorConfig(
        input_dim=proj_r.get("input_dim", int),
        n_embed=proj_r.get("n_embed", int),
        projector_type=proj_r.get("projector_type", str, "linear"),
    )
    if projector.projector_type != "linear":
        raise ConfigError(
            f"{path}: key 'projector_config.projector_type' = {projector.projector_type!r} is not supported"
        )
    if projector.n_embed != lm.hidden_size:
        raise ConfigError(f"{path}: 'projector_config.n_embed' must equal 'hidden_size' ({lm.hidden_size})")
    if family is DEEPSEEK_OCR_2:
        qwen2 = _qwen2_config(widths.child("qwen2-0-5b"), path)
        # net_3 feeds the Qwen2 encoder, so its width is the encoder's; the official config.json still says
        # v1's `downsample_channels: [512, 1024]`, which the code never reads.
        sam = _sam_config(widths.child("sam_vit_b"), path, net_3=qwen2.dim)
        if projector.input_dim != qwen2.dim:
            raise ConfigError(
                f"{path}: 'projector_config.input_dim' ({projector.input_dim}) must equal "
                f"'qwen2-0-5b.dim' ({qwen2.dim})"
            )
        return ModelConfig(lm, sam, None, projector, str(path), data, family, qwen2)
    sam = _sam_config(widths.child("sam_vit_b"), path)
    clip_r = widths.child("clip-l-14-224")
    clip = ClipConfig(
        width=clip_r.get("width", int),
        layers=clip_r.get("layers", int),
        heads=clip_r.get("heads", int),
        image_size=clip_r.get("image_size", int, 224),
        patch_size=clip_r.get("patch_size", int, 14),
        ffn_hidden_size=clip_r.get("ffn_hidden_size", int, 4096),
    )
    if sam.downsample_channels[1] != clip.width:
        raise ConfigError(
            f"{path}: 'sam_vit_b.downsample_channels[1]' ({sam.downsample_channels[1]}) must equal "
            f"'clip-l-14-224.width' ({clip.width}): SAM's output is CLIP's patch embedding"
        )
    if projector.input_dim != clip.width + sam.downsample_channels[1]:
        raise ConfigError(
            f"{path}: 'projector_config.input_dim' ({projector.input_dim}) must equal CLIP width + SAM channels"
        )
    return ModelConfig(lm, sam, clip, projector, str(path), data, family)


def _sam_config(sam_r: _Reader, path: Path | str, net_3: int | None = None) -> SamConfig:
    channels = sam_r.get_int_list("downsample_channels")
    if len(channels) != 2:
        raise ConfigError(f"{path}: key 'vision_config.width.sam_vit_b.downsample_channels' must have 2 entries")
    return SamConfig(
        width=sam_r.get("width", int),
        layers=sam_r.get("layers", int),
        heads=sam_r.get("heads", int),
        global_attn_indexes=sam_r.get_int_list("global_attn_indexes"),
        downsample_channels=(channels[0], channels[1] if net_3 is None else net_3),
        out_chans=sam_r.get("out_chans", int, 256),
        window_size=sam_r.get("window_size", int, 14),
        mlp_ratio=sam_r.get("mlp_ratio", float, 4.0),
        patch_size=sam_r.get("patch_size", int, 16),
        image_size=sam_r.get("image_size", int, 1024),
    )


def _qwen2_config(qwen_r: _Reader, path: Path | str) -> Qwen2EncoderConfig:
    cfg = Qwen2EncoderConfig(
        dim=qwen_r.get("dim", int),
        layers=qwen_r.get("layers", int, 24),
        heads=qwen_r.get("heads", int, 14),
        kv_heads=qwen_r.get("kv_heads", int, 2),
        intermediate_size=qwen_r.get("intermediate_size", int, 4864),
        rope_theta=qwen_r.get("rope_theta", float, 1000000.0),
        rms_norm_eps=qwen_r.get("rms_norm_eps", float, 1e-6),
    )
    if not cfg.heads or cfg.dim % cfg.heads or not cfg.kv_heads or cfg.heads % cfg.kv_heads:
        raise ConfigError(
            f"{path}: 'qwen2-0-5b' dim {cfg.dim}, heads {cfg.heads}, kv_heads {cfg.kv_heads}: dim must be a "
            "multiple of heads and heads a multiple of kv_heads"
        )
    return cfg


def load_config(path: str | Path) -> ModelConfig:
    """Reads `config.json` (or the `config.json` inside a model directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config.json not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config.json ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    return parse_config(data, path)
