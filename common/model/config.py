"""Typed model configuration parsed from the official DeepSeek-OCR / DeepSeek-OCR 2 `config.json`.

The Hugging Face code reads the top-level language-model keys (`language_config` is a duplicate that
vLLM reads); vision sizes live under `vision_config.width`. Keys the official schema lacks (the authors
hard-code them) are read when present and otherwise default to the real model's values. `architectures`
selects the model family (common.model.families), which decides the vision encoder: CLIP-L for DeepSeek-OCR,
a Qwen2 decoder used as an encoder for DeepSeek-OCR 2.

msgspec validates the file (`msgspec.convert` into the frozen Structs below: types, no negative numbers, required
keys and defaults; a null value counts as absent), and its errors are reworded to name the file and the key path
(`config.json: key 'vision_config.width.sam_vit_b.layers' must be int, got 'x'`). The checks across keys follow.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

import msgspec
from msgspec import Meta, Struct

from common.errors import ConfigError
from common.model.families import DEEPSEEK_OCR, DEEPSEEK_OCR_2, ModelFamily, family_for_config

# Every number in config.json is a size, a count, an id or a positive constant: none may be negative.
Count = Annotated[int, Meta(ge=0)]
Positive = Annotated[int, Meta(ge=1)]  # a divisor
Number = Annotated[float, Meta(ge=0)]  # an int is taken too (`"rope_theta": 10000`)


class SamConfig(Struct, frozen=True):
    """SAM ViT-B image encoder (`model.sam_model`)."""

    width: Count
    layers: Count
    heads: Count
    global_attn_indexes: tuple[int, ...]
    downsample_channels: tuple[int, int]  # net_2, net_3 output channels
    out_chans: Count = 256  # neck channels
    window_size: Count = 14
    mlp_ratio: Number = 4.0
    patch_size: Count = 16
    image_size: Count = 1024  # size the absolute position table was trained for

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def pos_grid(self) -> int:
        return self.image_size // self.patch_size


class ClipConfig(Struct, frozen=True):
    """CLIP-L encoder (`model.vision_model`) fed with SAM's features as patch embeddings."""

    width: Count
    layers: Count
    heads: Count
    image_size: Count = 224
    patch_size: Count = 14
    ffn_hidden_size: Count = 4096

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def pos_grid(self) -> int:
        return self.image_size // self.patch_size  # 16: the table has 1 + 16*16 rows


class Qwen2EncoderConfig(Struct, frozen=True):
    """DeepSeek-OCR 2's `model.qwen2_model`: Qwen2 decoder layers run as an encoder with learned queries.

    Only `dim` is in the official config.json (`vision_config.width.qwen2-0-5b.dim`); the rest are the
    authors' constants (Qwen2-0.5B) unless the config names them.
    """

    dim: Count
    layers: Count = 24
    heads: Count = 14
    kv_heads: Count = 2
    intermediate_size: Count = 4864
    rope_theta: Number = 1000000.0
    rms_norm_eps: Number = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


class ProjectorConfig(Struct, frozen=True):
    input_dim: Count
    n_embed: Count
    projector_type: str = "linear"


class LanguageConfig(Struct, frozen=True):
    """DeepSeek-V2 decoder as DeepSeek-OCR uses it: plain MHA (no MLA), MoE with shared experts.

    Read from config.json's top level; `num_key_value_heads` defaults to `num_attention_heads`.
    """

    vocab_size: Count
    hidden_size: Count
    intermediate_size: Count
    moe_intermediate_size: Count
    num_hidden_layers: Count
    num_attention_heads: Positive
    num_key_value_heads: Count
    n_routed_experts: Count = 0
    n_shared_experts: Count = 0
    num_experts_per_tok: Count = 0
    first_k_dense_replace: Count = 0
    max_position_embeddings: Count = 8192
    moe_layer_freq: Count = 1
    rms_norm_eps: Number = 1e-6
    rope_theta: Number = 10000.0
    bos_token_id: Count = 0
    eos_token_id: Count = 1
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    norm_topk_prob: bool = False
    routed_scaling_factor: Number = 1.0
    n_group: Count = 1
    topk_group: Count = 1
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


# Where the vision encoders and the projector sit in config.json; the second encoder depends on the family.
class _WidthsV1(Struct):
    sam: SamConfig = msgspec.field(name="sam_vit_b")
    clip: ClipConfig = msgspec.field(name="clip-l-14-224")


class _WidthsV2(Struct):
    sam: SamConfig = msgspec.field(name="sam_vit_b")
    qwen2: Qwen2EncoderConfig = msgspec.field(name="qwen2-0-5b")


_W = TypeVar("_W", _WidthsV1, _WidthsV2)


class _Vision(Struct, Generic[_W]):
    width: _W


class _Layout(Struct, Generic[_W]):
    vision_config: _Vision[_W]
    projector_config: ProjectorConfig


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
    given = _without_nulls(data)  # a null value is an absent key: its default, or "is missing"
    if "num_attention_heads" in given:
        given.setdefault("num_key_value_heads", given["num_attention_heads"])
    lm = _convert(given, LanguageConfig, data, path)
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
    layout = _convert(given, _Layout[_WidthsV2 if family is DEEPSEEK_OCR_2 else _WidthsV1], data, path)
    projector, widths = layout.projector_config, layout.vision_config.width
    if projector.projector_type != "linear":
        raise ConfigError(
            f"{path}: key 'projector_config.projector_type' = {projector.projector_type!r} is not supported"
        )
    if projector.n_embed != lm.hidden_size:
        raise ConfigError(f"{path}: 'projector_config.n_embed' must equal 'hidden_size' ({lm.hidden_size})")
    if isinstance(widths, _WidthsV2):
        qwen2 = widths.qwen2
        if not qwen2.heads or qwen2.dim % qwen2.heads or not qwen2.kv_heads or qwen2.heads % qwen2.kv_heads:
            raise ConfigError(
                f"{path}: 'qwen2-0-5b' dim {qwen2.dim}, heads {qwen2.heads}, kv_heads {qwen2.kv_heads}: dim must be "
                "a multiple of heads and heads a multiple of kv_heads"
            )
        # net_3 feeds the Qwen2 encoder, so its width is the encoder's; the official config.json still says
        # v1's `downsample_channels: [512, 1024]`, which the code never reads.
        sam = msgspec.structs.replace(widths.sam, downsample_channels=(widths.sam.downsample_channels[0], qwen2.dim))
        if projector.input_dim != qwen2.dim:
            raise ConfigError(
                f"{path}: 'projector_config.input_dim' ({projector.input_dim}) must equal "
                f"'qwen2-0-5b.dim' ({qwen2.dim})"
            )
        return ModelConfig(lm, sam, None, projector, str(path), data, family, qwen2)
    sam, clip = widths.sam, widths.clip
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


def _without_nulls(value: Any) -> Any:
    """`value` with null-valued object keys left out, at every depth (list items are kept as they are)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


_T = TypeVar("_T")
_MISSING = object()
_MSGSPEC_ERROR = re.compile(r"(?P<what>.*?)(?: - at `\$(?P<at>.*)`)?", re.DOTALL)
_TYPE_NAMES = {"object": "an object", "array": "a list", "null": "null"}


def _convert(given: dict[str, Any], kind: type[_T], data: dict[str, Any], path: Path | str) -> _T:
    """msgspec's validation of `given` as `kind`; its errors reworded to name the file and the key path."""
    try:
        return msgspec.convert(given, kind)
    except msgspec.ValidationError as exc:
        match = _MSGSPEC_ERROR.fullmatch(str(exc))
        assert match is not None  # the pattern matches any text
        key, why = _reworded((match["at"] or "").lstrip("."), match["what"], data)
        raise ConfigError(f"{path}: key '{key}' {why}") from None


def _reworded(key: str, what: str, data: dict[str, Any]) -> tuple[str, str]:
    """The key path and why it is wrong, from msgspec's message (`what`) at `key` (`a.b[1]`, "" for the top)."""
    if missing := re.fullmatch(r"Object missing required field `(.+)`", what):
        key = f"{key}.{missing[1]}" if key else missing[1]
        return key, "must not be null" if _lookup(data, key) is None else "is missing"
    value = _lookup(data, key)
    if expected := re.fullmatch(r"Expected `(.+?)`, got `.+`", what):
        kinds = [_TYPE_NAMES.get(k, k) for k in expected[1].split(" | ")]
        return key, f"must be {'/'.join(kinds)}, got {value!r}"
    if re.fullmatch(r"Expected `.+` >= 0(\.0)?", what):
        return key, f"must not be negative, got {value!r}"
    if bound := re.fullmatch(r"Expected `.+` ([<>]=?) (\S+)", what):
        return key, f"must be {bound[1]} {bound[2]}, got {value!r}"
    if length := re.fullmatch(r"Expected `array` of length (\d+), got \d+", what):
        return key, f"must have {length[1]} entries, got {value!r}"
    return key, f"is invalid ({what[:1].lower()}{what[1:]}), got {value!r}"


def _lookup(data: Any, key: str) -> Any:
    """The value at a msgspec key path (`a.b-c.d[2]`) in the file's data; `_MISSING` if there is none."""
    for name, index in re.findall(r"\.?([^.\[\]]+)|\[(\d+)\]", key):
        if name and isinstance(data, dict) and name in data:
            data = data[name]
        elif index and isinstance(data, list) and int(index) < len(data):
            data = data[int(index)]
        else:
            return _MISSING
    return data


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
