"""`convert` round trip for both families: quantized MLX checkpoints load through `--model DIR` and run close to
float, the decoder quantized and the vision encoders left in float.

The public tiny models (hidden 40) cannot be grouped by MLX (group sizes 32/64/128 must divide the input width),
so only a few of their linears quantize. The error tables are measured on random-weight models of the same
architectures with widths that are multiples of 64 (as the real models' are: 1280, 896, 6848 / 4864), so every
linear could be quantized.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mlx.utils import tree_flatten, tree_map

from common.errors import ConfigError
from common.model.config import load_config, parse_config
from common.model.families import DEEPSEEK_OCR, DEEPSEEK_OCR_2, resolve_mode
from common.model.inputs import PreparedInputs
from common.model.prompt import prepare_inputs
from dsocr_mlx.convert import SIDE_FILES, convert, main
from dsocr_mlx.loader import load_model
from dsocr_mlx.model import DeepseekOCR2Model, DeepseekOCRForCausalLM
from tests.conftest import FIXTURES_V2, MODEL_DIR, rel_err
from tests.helpers_backend import FAMILIES, backend_of, generate, to_host, tokenizer

pytestmark = [pytest.mark.mlx, pytest.mark.slow]

V1_CASE = "pm07_gray_tiny"
V1_STEPS = 32
V2_STEPS = 16
V2_VISION = ("model.sam_model", "model.qwen2_model")
SEEDS = {DEEPSEEK_OCR.name: 1234, DEEPSEEK_OCR_2.name: 2026}


def write_random_model(family: str, out: Path) -> None:
    """The family's tiny architecture with 64-multiple widths and random weights, saved as a bf16 MLX checkpoint."""
    model_dir = FAMILIES[family].model_dir
    data = json.loads((model_dir / "config.json").read_text())
    data.update(hidden_size=64, intermediate_size=128, moe_intermediate_size=64)
    widths = data["vision_config"]["width"]
    if family == DEEPSEEK_OCR.name:
        widths["sam_vit_b"] = dict(widths["sam_vit_b"], downsample_channels=[32, 64])
        widths["clip-l-14-224"] = dict(widths["clip-l-14-224"], width=64, ffn_hidden_size=128)
        data["projector_config"] = dict(data["projector_config"], input_dim=128, n_embed=64)
    else:
        widths["qwen2-0-5b"] = dict(widths["qwen2-0-5b"], dim=64, heads=4, kv_heads=2, intermediate_size=128)
        data["projector_config"] = dict(data["projector_config"], input_dim=64, n_embed=64)
    mx.random.seed(SEEDS[family])
    model = DeepseekOCRForCausalLM(parse_config(data))
    params = dict(tree_flatten(model.parameters()))
    # Give the random model the fixtures' clear greedy margins (log-normal row gains on the LM head) and
    # non-trivial layout embeddings.
    gains = mx.exp(mx.random.normal((data["vocab_size"], 1)))
    params["lm_head.weight"] = params["lm_head.weight"] * gains * 8.0
    for name in ("model.image_newline", "model.view_seperator"):
        if name in params:
            params[name] = mx.random.normal(params[name].shape) * 0.5
    params = tree_map(lambda a: a.astype(mx.bfloat16) if mx.issubdtype(a.dtype, mx.floating) else a, params)
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "model.safetensors"), params)
    (out / "config.json").write_text(json.dumps(data))
    for name in SIDE_FILES:
        shutil.copy2(model_dir / name, out / name)


def run(model: DeepseekOCRForCausalLM, inputs: PreparedInputs, steps: int, forced: list[int] | None = None
        ) -> dict[str, Any]:
    """Greedy ids, each step's raw logits and the image embeddings of one prompt on `model` (EOS included)."""
    trace: dict[str, Any] = {}
    ids, logits = generate(backend_of(model), inputs, steps, forced=forced, trace=trace, until_eos=False)
    image_embeds = to_host(trace["inputs_embeds"])[inputs.images_seq_mask]
    return {"ids": ids, "logits": logits, "image_embeds": image_embeds}


def weights_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def agreement(reference: dict[str, Any], other: dict[str, Any]) -> float:
    return float(np.mean([a == b for a, b in zip(reference["ids"], other["ids"], strict=True)]))


# ---- DeepSeek-OCR ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    mx.set_default_device(mx.cpu)
    root = tmp_path_factory.mktemp("convert")
    source = root / "random64"
    write_random_model(DEEPSEEK_OCR.name, source)
    inputs = FAMILIES[DEEPSEEK_OCR.name].prepared(V1_CASE)
    reference = run(load_model(source, "float32")[0], inputs, V1_STEPS)

    def row(other: dict[str, Any]) -> dict[str, float]:
        return {"last_logit_rel": rel_err(other["logits"][0], reference["logits"][0]),
                "image_embeds_rel": rel_err(other["image_embeds"], reference["image_embeds"]),
                "top1_agreement": agreement(reference, other)}

    rows = {"float (bf16 on disk)": {"size": weights_size(source), **row(reference), "quantized": 0}}
    for bits in (8, 4):
        for projector in (False, True):
            out = root / f"q{bits}{'p' if projector else ''}"
            chosen = convert(source, out, bits=bits, group_size=64, quantize_projector=projector)
            quantized, block = load_model(out, "float32")
            assert block == {"group_size": 64, "bits": bits}
            label = f"{bits}-bit" + (" + projector" if projector else "")
            quantized_run = run(quantized, inputs, V1_STEPS, forced=reference["ids"])
            rows[label] = {"size": weights_size(out), **row(quantized_run), "quantized": len(chosen)}
    print(f"\nquantization vs float32 compute ({V1_CASE}, random weights, widths 64; group 64):")
    print(f"{'weights':<22}{'size MiB':>9}{'modules':>8}{'last-logit rel':>16}{'image-emb rel':>15}{'top-1 agree':>12}")
    for label, r in rows.items():
        print(f"{label:<22}{r['size'] / 2**20:>9.2f}{r['quantized']:>8}{r['last_logit_rel']:>16.2e}"
              f"{r['image_embeds_rel']:>15.2e}{r['top1_agreement']:>12.3f}")
    return rows


def test_quantized_checkpoints_are_smaller_and_close(table: dict[str, dict[str, Any]]) -> None:
    float_size = table["float (bf16 on disk)"]["size"]
    assert table["8-bit"]["size"] < 0.7 * float_size
    assert table["4-bit"]["size"] < table["8-bit"]["size"]
    assert table["8-bit"]["top1_agreement"] >= 0.9
    assert table["8-bit"]["last_logit_rel"] < 0.05
    assert table["4-bit"]["top1_agreement"] >= 0.5
    assert all(np.isfinite(r["last_logit_rel"]) for r in table.values())
    # The projector stays float by default: only then are the image embeddings untouched.
    assert table["8-bit"]["image_embeds_rel"] == 0.0
    assert table["8-bit + projector"]["image_embeds_rel"] > 0.0


def test_public_tiny_model_round_trip(tmp_path: Path) -> None:
    """The fixture model converts (group 32: its 96/32-wide down projections), loads via its directory
    and reproduces the fixture's greedy ids on the reference embeddings."""
    fixtures = FAMILIES[DEEPSEEK_OCR.name]
    for bits in (8, 4):
        out = tmp_path / f"q{bits}"
        assert main(["--model", str(MODEL_DIR), "--out", str(out), "--bits", str(bits), "--group-size", "32"]) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["quantization"] == {"group_size": 32, "bits": bits}
        assert all((out / name).is_file() for name in SIDE_FILES)
        model, _ = load_model(out, "float32")
        assert type(model.model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"
        assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"  # 40 wide: not groupable
        greedy = fixtures.tensors(V1_CASE)["greedy.ids"]
        ids = run(model, fixtures.from_embeds(V1_CASE), V1_STEPS)["ids"]
        agreement = np.mean(np.array(ids) == greedy)
        print(f"public tiny {bits}-bit: {weights_size(out) / 2**20:.1f} MiB, greedy agreement {agreement:.3f}")
        assert agreement >= (0.9 if bits == 8 else 0.3)
    with pytest.raises(ConfigError, match="already quantized"):
        convert(tmp_path / "q8", tmp_path / "again", bits=4, group_size=32)
    with pytest.raises(ConfigError, match="bits"):
        convert(MODEL_DIR, tmp_path / "bad", bits=3)


# ---- DeepSeek-OCR 2 --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[Any, Any]:
    mx.set_default_device(mx.cpu)
    root = tmp_path_factory.mktemp("convert_v2")
    source = root / "random64"
    write_random_model(DEEPSEEK_OCR_2.name, source)
    # One 768 view: the encoders' outputs are compared exactly, so a small view proves as much as a tiled page.
    from common.documents.images import load_image

    mode = resolve_mode("small", family=DEEPSEEK_OCR_2)
    image = load_image(FIXTURES_V2 / "images" / "rgba_card.png")
    inputs = prepare_inputs(tokenizer(FAMILIES[DEEPSEEK_OCR_2.name].model_dir), "<image>\nFree OCR.", [image], mode)
    reference = run(load_model(source, "float32")[0], inputs, V2_STEPS)
    result: dict[Any, Any] = {"source": source, "reference": reference}
    for bits in (8, 4):
        out = root / f"q{bits}"
        chosen = convert(source, out, bits=bits, group_size=64)
        model, block = load_model(out, "float32")
        result[bits] = {"chosen": chosen, "model": model, "block": block, "out": out,
                        "run": run(model, inputs, V2_STEPS, forced=reference["ids"])}
    return result


def test_v2_vision_encoders_stay_float_and_the_decoder_quantizes(converted: dict[Any, Any]) -> None:
    for bits in (8, 4):
        entry = converted[bits]
        assert entry["block"] == {"group_size": 64, "bits": bits}
        assert not [path for path in entry["chosen"] if path.startswith(V2_VISION)]
        assert any(path.startswith("model.layers.") for path in entry["chosen"]) and "lm_head" in entry["chosen"]
        model = entry["model"]
        assert isinstance(model.model, DeepseekOCR2Model)
        encoder_linear = model.model.qwen2_model.model.model.layers[0].self_attn.q_proj
        assert type(encoder_linear).__name__ == "Linear"  # 64 wide: groupable, kept in float on purpose
        assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
        # Vision and projector untouched: the image embeddings are exactly the float model's.
        assert rel_err(entry["run"]["image_embeds"], converted["reference"]["image_embeds"]) == 0.0
        config = json.loads((entry["out"] / "config.json").read_text())
        assert load_config(entry["out"]).family is DEEPSEEK_OCR_2 and config["quantization"]["bits"] == bits


def test_v2_quantized_logits_are_close_and_smaller(converted: dict[Any, Any]) -> None:
    reference = converted["reference"]
    size = {k: weights_size(converted[k]["out"]) for k in (8, 4)}
    float_size = weights_size(converted["source"])
    rows = []
    for bits in (8, 4):
        ours = converted[bits]["run"]
        error = rel_err(ours["logits"][0], reference["logits"][0])
        rows.append(f"{bits}-bit: {size[bits] / 2**20:.2f} MiB (float {float_size / 2**20:.2f}), "
                    f"last-logit rel {error:.2e}, top-1 agreement {agreement(reference, ours):.3f}")
        # Random weights at width 64 are a harsh case for 4 bits; the bars catch a broken conversion (~0 agreement).
        assert error < (0.05 if bits == 8 else 0.3)
        assert agreement(reference, ours) >= (0.9 if bits == 8 else 0.3)
    print("\n" + "\n".join(rows))
    assert size[4] < size[8] < float_size
