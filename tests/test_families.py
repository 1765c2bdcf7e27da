"""Model families: selection from config.json, each family's presets and rules, one token layout for counts.

Framework-free: these run without torch or mlx.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.engine.engine import Engine
from common.engine.sampling import SamplingParams
from common.errors import ConfigError, InputError
from common.model.config import load_config, parse_config
from common.model.families import (
    DEEPSEEK_OCR,
    DEEPSEEK_OCR_2,
    FAMILIES,
    all_mode_names,
    family_of_model_dir,
    resolve_mode,
)
from common.model.modes import Mode
from common.model.prompt import task_prompt
from tests.conftest import (
    FIXTURES,
    FIXTURES_V2,
    MODEL_DIR,
    MODEL_DIR_V2,
    V2_MODE_NAMES,
    cases_manifest,
    cases_manifest_v2,
)


def test_family_comes_from_architectures() -> None:
    assert load_config(MODEL_DIR).family is DEEPSEEK_OCR
    assert load_config(FIXTURES / "real_config.json").family is DEEPSEEK_OCR
    assert load_config(MODEL_DIR_V2).family is DEEPSEEK_OCR_2
    assert load_config(FIXTURES_V2 / "real_config.json").family is DEEPSEEK_OCR_2
    assert family_of_model_dir(MODEL_DIR_V2) is DEEPSEEK_OCR_2
    # Both families say model_type deepseek_vl_v2: only `architectures` tells them apart.
    assert {json.loads((d / "config.json").read_text())["model_type"] for d in (MODEL_DIR, MODEL_DIR_V2)} == {
        "deepseek_vl_v2"
    }


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["DeepseekOCR3ForCausalLM"], "'architectures' = ['DeepseekOCR3ForCausalLM'] is not a supported model"),
        ("LlamaForCausalLM", "'architectures' = 'LlamaForCausalLM' is not a supported model"),
        (None, "key 'architectures' is missing"),
    ],
)
def test_unknown_architecture_is_named(value: Any, message: str, tmp_path: Path) -> None:
    data = json.loads((MODEL_DIR_V2 / "config.json").read_text())
    if value is None:
        del data["architectures"]
    else:
        data["architectures"] = value
    (tmp_path / "config.json").write_text(json.dumps(data))
    for read in (load_config, family_of_model_dir):
        with pytest.raises(ConfigError) as err:
            read(tmp_path)
        assert message in str(err.value) and str(tmp_path) in str(err.value)
        assert "DeepseekOCRForCausalLM, DeepseekOCR2ForCausalLM" in str(err.value)


def test_v2_config_values() -> None:
    tiny, real = load_config(MODEL_DIR_V2), load_config(FIXTURES_V2 / "real_config.json")
    assert tiny.clip is None and tiny.qwen2 is not None and real.qwen2 is not None
    assert (tiny.qwen2.dim, tiny.qwen2.layers, tiny.qwen2.heads, tiny.qwen2.kv_heads, tiny.qwen2.head_dim) == (
        48, 3, 6, 2, 8)
    # Absent from the real config.json: the authors' Qwen2-0.5B constants.
    assert (real.qwen2.dim, real.qwen2.layers, real.qwen2.heads, real.qwen2.kv_heads) == (896, 24, 14, 2)
    assert (real.qwen2.intermediate_size, real.qwen2.rope_theta, real.qwen2.rms_norm_eps) == (4864, 1e6, 1e-6)
    # net_3 is as wide as the encoder, whatever the stale downsample_channels says (1024 in the real file).
    assert real.sam.downsample_channels == (512, 896) and tiny.sam.downsample_channels == (36, 48)
    assert (real.language.hidden_size, real.language.num_hidden_layers, real.projector.input_dim) == (1280, 12, 896)


def test_v2_projector_width_must_match_the_encoder() -> None:
    data = json.loads((MODEL_DIR_V2 / "config.json").read_text())
    data["projector_config"]["input_dim"] = 96
    with pytest.raises(ConfigError, match=r"'projector_config.input_dim' \(96\) must equal 'qwen2-0-5b.dim' \(48\)"):
        parse_config(data)


def test_presets_per_family() -> None:
    assert resolve_mode() == Mode("gundam", 1024, 640, True, 2, 9)
    official = cases_manifest_v2()["modes"]
    assert {V2_MODE_NAMES[name] for name in official} == set(DEEPSEEK_OCR_2.modes)
    for name, preset in official.items():
        mode = resolve_mode(V2_MODE_NAMES[name], family=DEEPSEEK_OCR_2)
        assert (mode.base_size, mode.image_size, mode.crop_mode) == (
            preset["base_size"], preset["image_size"], preset["crop_mode"])
        assert (mode.min_crops, mode.max_crops, mode.family) == (2, 6, "deepseek-ocr-2")
    assert resolve_mode(family=DEEPSEEK_OCR_2) == DEEPSEEK_OCR_2.modes["gundam"] == DEEPSEEK_OCR_2.default
    assert all_mode_names() == ("tiny", "small", "base", "large", "gundam")


def test_v2_overrides_and_their_limits() -> None:
    assert resolve_mode("gundam", family=DEEPSEEK_OCR_2, max_crops=9) == Mode(
        "gundam-custom", 1024, 768, True, 2, 9, "deepseek-ocr-2")
    assert resolve_mode("gundam", family=DEEPSEEK_OCR_2, base_size=768).base_size == 768
    assert resolve_mode("gundam", family=DEEPSEEK_OCR_2, crop_mode=False) == Mode(
        "gundam-custom", 768, 768, False, 2, 6, "deepseek-ocr-2")
    assert resolve_mode("small", family=DEEPSEEK_OCR_2, image_size=1024) == Mode(
        "small-custom", 1024, 1024, False, 2, 6, "deepseek-ocr-2")
    with pytest.raises(InputError, match="DeepSeek-OCR 2 tiles must be 768 px.*got image_size 640"):
        resolve_mode("gundam", family=DEEPSEEK_OCR_2, image_size=640)
    with pytest.raises(InputError, match="global views must be 768 or 1024 px.*got base_size 1280"):
        resolve_mode("gundam", family=DEEPSEEK_OCR_2, base_size=1280)
    with pytest.raises(InputError, match="views must be 768 or 1024 px.*got image_size 512"):
        resolve_mode("base", family=DEEPSEEK_OCR_2, image_size=512)
    with pytest.raises(InputError, match="unknown mode 'tiny' for DeepSeek-OCR 2; choose one of gundam, base, small"):
        resolve_mode("tiny", family=DEEPSEEK_OCR_2)
    # v1 keeps its free sizes (multiples of 64).
    assert resolve_mode("gundam", image_size=768).image_size == 768


def test_token_counts_come_from_the_layout() -> None:
    v1, v2 = DEEPSEEK_OCR.layout, DEEPSEEK_OCR_2.layout
    gundam_v1, gundam_v2 = DEEPSEEK_OCR.modes["gundam"], DEEPSEEK_OCR_2.modes["gundam"]
    v1_entries = {e["id"]: e for e in cases_manifest()["preprocess"]["entries"]}
    v2_entries = {e["id"]: e for e in cases_manifest_v2()["preprocess"]["entries"]}
    # v1: a newline after every row; tiles stitched into one (rows*10) x (columns*10) grid, so 2 columns x 3 rows
    # and 3 columns x 2 rows of the same six tiles differ by their newlines.
    for entry in (v1_entries["doc_text.gundam"], v1_entries["table.gundam"]):
        grid = tuple(entry["images_spatial_crop"])
        assert v1.image_tokens(gundam_v1, grid, True) == entry["n_image_tokens"]
    assert v1_entries["doc_text.gundam"]["n_image_tokens"] != v1_entries["table.gundam"]["n_image_tokens"]
    # OCR 2: no newlines; the same count per crop, crop after crop, then the global view, then the separator:
    # linear in the number of tiles, whatever the grid's shape (also for grids no fixture has).
    global_tokens = v2_entries["small.default"]["n_image_tokens"]  # small.png fits one tile: the global view alone
    doc = v2_entries["doc_text.default"]
    per_tile, rest = divmod(doc["n_image_tokens"] - global_tokens, doc["n_local_crops"])
    assert rest == 0 and per_tile > 0
    for grid in ((2, 3), (3, 2), (1, 2), (6, 1), (3, 3)):
        assert v2.image_tokens(gundam_v2, grid, True) == global_tokens + grid[0] * grid[1] * per_tile
    assert v2.image_tokens(DEEPSEEK_OCR_2.modes["small"], (1, 1), False) == v2_entries["doc_text.nocrop_768"][
        "n_image_tokens"]
    for manifest, names in ((cases_manifest(), None), (cases_manifest_v2(), V2_MODE_NAMES)):
        family = DEEPSEEK_OCR if names is None else DEEPSEEK_OCR_2
        for entry in manifest["preprocess"]["entries"]:
            mode = resolve_mode(entry["mode"] if names is None else names[entry["mode"]], family=family)
            grid = tuple(entry["images_spatial_crop"])
            assert family.layout.image_tokens(mode, grid, entry["n_local_crops"] > 0) == entry["n_image_tokens"]


def test_ngram_recipe_and_prompts_are_the_authors() -> None:
    for family, manifest in ((DEEPSEEK_OCR, cases_manifest()), (DEEPSEEK_OCR_2, cases_manifest_v2())):
        case = manifest["cases"][0]
        assert family.ngram.size == case["generate_kwargs_infer"]["no_repeat_ngram_size"]
        assert family.ngram.eval_size == case["generate_kwargs_infer_eval_mode"]["no_repeat_ngram_size"]
        assert family.ngram.size == SamplingParams().no_repeat_ngram_size
        assert task_prompt("ocr", family=family) == "<image>\nFree OCR."
        assert case["prompt"].strip() == family.prompts["markdown"]
    assert (DEEPSEEK_OCR.ngram.vllm_size, DEEPSEEK_OCR_2.ngram.vllm_size) == (30, 20)
    assert set(FAMILIES) == {"deepseek-ocr", "deepseek-ocr-2"}


def test_engine_knows_its_family_and_refuses_another_familys_mode() -> None:
    engine = Engine.load(str(MODEL_DIR_V2), weights=False)
    assert engine.family is DEEPSEEK_OCR_2 and engine.describe()["family"] == "deepseek-ocr-2"
    with pytest.raises(InputError, match="'tiny' is a DeepSeek-OCR mode, but this model is DeepSeek-OCR 2"):
        engine.prepare("Hello.", [], resolve_mode("tiny"))
    prepared = engine.prepare("Hello.", [], resolve_mode(family=engine.family))
    assert prepared.prompt_tokens > 1
