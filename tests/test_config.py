"""common.model.config: the official schema, defaults for the six extra keys, clear errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from common.errors import ConfigError
from common.model.config import load_config, parse_config
from tests.conftest import FIXTURES, MODEL_DIR


def real_data() -> dict:
    return json.loads((FIXTURES / "real_config.json").read_text())


def test_tiny_config_values() -> None:
    cfg = load_config(MODEL_DIR)
    lm, sam, clip = cfg.language, cfg.sam, cfg.clip
    assert (lm.hidden_size, lm.num_hidden_layers, lm.num_attention_heads, lm.head_dim) == (40, 3, 4, 10)
    assert (lm.n_routed_experts, lm.num_experts_per_tok, lm.n_shared_experts, lm.moe_intermediate_size) == (8, 2, 2, 16)
    assert [lm.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert (sam.width, sam.layers, sam.heads, sam.global_attn_indexes) == (32, 4, 4, (1, 3))
    assert (sam.out_chans, sam.downsample_channels, sam.window_size, sam.pos_grid) == (24, (32, 48), 14, 64)
    assert (clip.width, clip.layers, clip.heads, clip.ffn_hidden_size, clip.pos_grid) == (48, 2, 4, 192, 16)
    assert (cfg.projector.input_dim, cfg.projector.n_embed) == (96, 40)


def test_real_config_defaults_are_the_real_model() -> None:
    cfg = load_config(FIXTURES / "real_config.json")
    lm = cfg.language
    assert (lm.vocab_size, lm.hidden_size, lm.num_hidden_layers, lm.head_dim) == (129280, 1280, 12, 128)
    assert (lm.intermediate_size, lm.moe_intermediate_size, lm.n_routed_experts, lm.num_experts_per_tok) == (
        6848, 896, 64, 6)
    # keys absent from config.json take DeepseekV2Config defaults
    assert (lm.rms_norm_eps, lm.rope_theta, lm.norm_topk_prob, lm.routed_scaling_factor) == (1e-6, 10000.0, False, 1.0)
    assert (lm.scoring_func, lm.topk_method, lm.attention_bias, lm.tie_word_embeddings) == (
        "softmax", "greedy", False, False)
    # the six extra keys default to the authors' hard-coded constants
    assert (cfg.sam.out_chans, cfg.sam.window_size, cfg.sam.mlp_ratio, cfg.sam.patch_size, cfg.sam.image_size) == (
        256, 14, 4.0, 16, 1024)
    assert cfg.clip.ffn_hidden_size == 4096
    assert (cfg.sam.width, cfg.sam.layers, cfg.sam.global_attn_indexes, cfg.sam.downsample_channels) == (
        768, 12, (2, 5, 8, 11), (512, 1024))
    assert (cfg.clip.width, cfg.clip.layers, cfg.clip.heads) == (1024, 24, 16)


def test_unknown_keys_ignored() -> None:
    data = real_data()
    data["something_new"] = {"nested": 1}
    data["vision_config"]["width"]["sam_vit_b"]["future_key"] = 3
    assert parse_config(data).language.hidden_size == 1280


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (("hidden_size",), "'hidden_size' is missing"),
        (("vision_config", "width", "sam_vit_b", "heads"), "'vision_config.width.sam_vit_b.heads' is missing"),
        (("vision_config", "width", "clip-l-14-224"), "'vision_config.width.clip-l-14-224' is missing"),
        (("projector_config", "n_embed"), "'projector_config.n_embed' is missing"),
    ],
)
def test_missing_required_key_names_key_and_file(path: tuple[str, ...], message: str, tmp_path: Path) -> None:
    data = copy.deepcopy(real_data())
    node = data
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    target = tmp_path / "config.json"
    target.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert message in str(err.value) and str(target) in str(err.value)


def test_malformed_values(tmp_path: Path) -> None:
    data = real_data()
    data["num_hidden_layers"] = "twelve"
    with pytest.raises(ConfigError, match="'num_hidden_layers' must be int"):
        parse_config(data, "x/config.json")
    data = real_data()
    data["vision_config"]["width"]["sam_vit_b"]["global_attn_indexes"] = [2, "5"]
    with pytest.raises(ConfigError, match="global_attn_indexes"):
        parse_config(data)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope")


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("vision_config", "width", "sam_vit_b", "layers"), "x",
         "'vision_config.width.sam_vit_b.layers' must be int, got 'x'"),
        (("num_hidden_layers",), True, "'num_hidden_layers' must be int, got True"),
        (("rope_theta",), "big", "'rope_theta' must be float, got 'big'"),
        (("vision_config", "width", "clip-l-14-224", "heads"), -2,
         "'vision_config.width.clip-l-14-224.heads' must not be negative, got -2"),
        (("rms_norm_eps",), -1e-6, "'rms_norm_eps' must not be negative, got -1e-06"),
        (("num_attention_heads",), 0, "'num_attention_heads' must be >= 1, got 0"),
        (("vision_config", "width", "sam_vit_b", "downsample_channels"), [512], "'vision_config.width.sam_vit_b."
         "downsample_channels' must have 2 entries, got [512]"),
        (("vision_config", "width", "sam_vit_b", "global_attn_indexes"), [2, "5"], "'vision_config.width.sam_vit_b."
         "global_attn_indexes[1]' must be int, got '5'"),
        (("vision_config", "width"), [1], "'vision_config.width' must be an object, got [1]"),
        (("projector_config", "n_embed"), None, "'projector_config.n_embed' must not be null"),
        (("norm_topk_prob",), "yes", "'norm_topk_prob' must be bool, got 'yes'"),
        (("hidden_act",), 3, "'hidden_act' must be str, got 3"),
    ],
)
def test_bad_value_names_file_key_and_value(path: tuple[str, ...], value: object, message: str) -> None:
    data = real_data()
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as err:
        parse_config(data, "x/config.json")
    assert str(err.value) == f"x/config.json: key {message}"


def test_null_takes_the_default_and_ints_are_floats() -> None:
    data = real_data()
    # The defaults are the real model's values: its context, and SAM's window (a code constant there, an added
    # key in the tiny config.json).
    context = data["max_position_embeddings"]
    window = json.loads((MODEL_DIR / "config.json").read_text())["vision_config"]["width"]["sam_vit_b"]["window_size"]
    data["rope_theta"] = 500  # an int where a float is expected
    data["max_position_embeddings"] = None  # null: the default, as if absent
    data["vision_config"]["width"]["sam_vit_b"]["window_size"] = None
    data.pop("num_key_value_heads", None)
    cfg = parse_config(data)
    assert cfg.language.rope_theta == 500.0 and isinstance(cfg.language.rope_theta, float)
    assert (cfg.language.max_position_embeddings, cfg.sam.window_size) == (context, window)
    assert cfg.language.num_key_value_heads == cfg.language.num_attention_heads


def test_configs_are_frozen_values() -> None:
    import pickle

    cfg = load_config(MODEL_DIR)
    assert cfg == load_config(MODEL_DIR) and hash(cfg.language) == hash(load_config(MODEL_DIR).language)
    with pytest.raises(AttributeError):
        cfg.sam.width = 3  # type: ignore[misc]
    for part in (cfg.language, cfg.sam, cfg.clip, cfg.projector):
        assert pickle.loads(pickle.dumps(part)) == part
    assert cfg.raw == json.loads((MODEL_DIR / "config.json").read_text())
