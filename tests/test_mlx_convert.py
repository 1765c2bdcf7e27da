"""`convert` round trip: quantized MLX checkpoints load through `--model DIR` and run.

The public tiny model (hidden 40) cannot be grouped by MLX (group sizes 32/64/128 must divide the input
width), so only its few divisible linears quantize. The error table is measured on a random-weight model
of the same architecture with widths that are multiples of 64 (as the real model's are: 1280, 896, 6848).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mlx.utils import tree_flatten, tree_map  # noqa: E402

from common.documents.images import load_image  # noqa: E402
from common.errors import ConfigError  # noqa: E402
from common.model.config import parse_config  # noqa: E402
from common.model.families import resolve_mode
from common.model.inputs import PreparedInputs
from common.model.tiling import tile_image, to_image_input  # noqa: E402
from dsocr_mlx.cache import LanePool  # noqa: E402
from dsocr_mlx.convert import SIDE_FILES, convert, main  # noqa: E402
from dsocr_mlx.loader import load_model  # noqa: E402
from dsocr_mlx.model import DeepseekOCRForCausalLM  # noqa: E402
from tests.conftest import FIXTURES, MODEL_DIR, case_tensors, model_cases, rel_err  # noqa: E402

CASE = "pm07_gray_tiny"
STEPS = 32


def case_inputs() -> PreparedInputs:
    case = next(c for c in model_cases() if c["id"] == CASE)
    t = case_tensors(CASE)
    mode = resolve_mode(case["mode"], base_size=case["base_size"], image_size=case["image_size"],
                        crop_mode=case["crop_mode"])
    image = to_image_input(tile_image(load_image(FIXTURES / case["image"]), mode))
    return PreparedInputs(input_ids=t["input_ids"], images_seq_mask=t["images_seq_mask"], images=[image])


def step_logits(
    model: DeepseekOCRForCausalLM,
    inputs: PreparedInputs,
    steps: int,
    forced_ids: list[int] | None = None,
    inputs_embeds: mx.array | None = None,
) -> tuple[list[int], list[mx.array]]:
    """Greedy ids and each step's raw logits; with `forced_ids` the model is fed those ids instead (teacher
    forcing), so per-step agreement with another model's path can be measured."""
    if inputs_embeds is None:
        inputs_embeds = model.embed_inputs(inputs.input_ids, inputs.images_seq_mask, inputs.images)
    pool = LanePool(model.config.language, 1, inputs_embeds.shape[1] + steps + 1, model.dtype)
    logits = model.logits(model.prefill_lane(inputs_embeds, pool, 0, 0)[:, -1])
    ids: list[int] = []
    recorded: list[mx.array] = []
    for step in range(steps):
        mx.eval(logits)
        recorded.append(logits[0])
        ids.append(int(mx.argmax(logits, axis=-1).item()))
        fed = forced_ids[step] if forced_ids is not None else ids[-1]
        if step + 1 < steps:
            logits = model.decode_step(mx.array([fed]), pool)
    return ids, recorded


def weights_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def run(model: DeepseekOCRForCausalLM, inputs: PreparedInputs, forced: list[int] | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {}
    embeds = model.embed_inputs(inputs.input_ids, inputs.images_seq_mask, inputs.images, record)
    ids, steps = step_logits(model, inputs, STEPS, forced_ids=forced, inputs_embeds=embeds)
    return {"ids": ids, "logits": [np.array(s) for s in steps], "image_embeds": np.array(record["image_embeds"])}


def compare(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    agree = np.mean([a == b for a, b in zip(reference["ids"], other["ids"], strict=True)])
    return {
        "last_logit_rel": rel_err(other["logits"][0], reference["logits"][0]),
        "image_embeds_rel": rel_err(other["image_embeds"], reference["image_embeds"]),
        "top1_agreement": float(agree),
    }


def write_random_model(out: Path) -> None:
    """The tiny architecture with 64-multiple widths and random weights, saved as a bf16 MLX checkpoint."""
    data = json.loads((MODEL_DIR / "config.json").read_text())
    data.update(hidden_size=64, intermediate_size=128, moe_intermediate_size=64)
    widths = data["vision_config"]["width"]
    widths["sam_vit_b"] = dict(widths["sam_vit_b"], downsample_channels=[32, 64])
    widths["clip-l-14-224"] = dict(widths["clip-l-14-224"], width=64, ffn_hidden_size=128)
    data["projector_config"] = dict(data["projector_config"], input_dim=128, n_embed=64)
    mx.random.seed(1234)
    model = DeepseekOCRForCausalLM(parse_config(data))
    params = dict(tree_flatten(model.parameters()))
    # Give the random model the fixture's clear greedy margins (log-normal row gains on the LM head) and
    # non-trivial norms/newline/separator.
    vocab = data["vocab_size"]
    params["lm_head.weight"] = params["lm_head.weight"] * mx.exp(mx.random.normal((vocab, 1)))
    params["lm_head.weight"] = params["lm_head.weight"] * 8.0
    for name in ("model.image_newline", "model.view_seperator"):
        params[name] = mx.random.normal(params[name].shape) * 0.5
    params = tree_map(lambda a: a.astype(mx.bfloat16) if mx.issubdtype(a.dtype, mx.floating) else a, params)
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "model.safetensors"), params)
    (out / "config.json").write_text(json.dumps(data))
    for name in SIDE_FILES:
        shutil.copy2(MODEL_DIR / name, out / name)


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    mx.set_default_device(mx.cpu)
    root = tmp_path_factory.mktemp("convert")
    source = root / "random64"
    write_random_model(source)
    inputs = case_inputs()
    reference = run(load_model(source, "float32")[0], inputs)
    rows: dict[str, dict[str, Any]] = {
        "float (bf16 on disk)": {"size": weights_size(source), **compare(reference, reference), "quantized": 0}
    }
    for bits in (8, 4):
        for projector in (False, True):
            out = root / f"q{bits}{'p' if projector else ''}"
            chosen = convert(source, out, bits=bits, group_size=64, quantize_projector=projector)
            quantized, block = load_model(out, "float32")
            assert block == {"group_size": 64, "bits": bits}
            row = compare(reference, run(quantized, inputs, forced=reference["ids"]))
            label = f"{bits}-bit" + (" + projector" if projector else "")
            rows[label] = {"size": weights_size(out), **row, "quantized": len(chosen)}
    print(f"\nquantization vs float32 compute ({CASE}, random weights, widths 64; group 64):")
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
    t = case_tensors(CASE)
    for bits in (8, 4):
        out = tmp_path / f"q{bits}"
        assert main(["--model", str(MODEL_DIR), "--out", str(out), "--bits", str(bits), "--group-size", "32"]) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["quantization"] == {"group_size": 32, "bits": bits}
        assert all((out / name).is_file() for name in SIDE_FILES)
        model, _ = load_model(out, "float32")
        assert type(model.model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"
        assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"  # 40 wide: not groupable
        inputs = PreparedInputs(t["input_ids"], t["images_seq_mask"], [])
        ids, _ = step_logits(model, inputs, STEPS, inputs_embeds=mx.array(t["inputs_embeds"])[None])
        agreement = np.mean(np.array(ids) == t["greedy.ids"])
        print(f"public tiny {bits}-bit: {weights_size(out) / 2**20:.1f} MiB, greedy agreement {agreement:.3f}")
        assert agreement >= (0.9 if bits == 8 else 0.3)
    with pytest.raises(ConfigError, match="already quantized"):
        convert(tmp_path / "q8", tmp_path / "again", bits=4, group_size=32)
    with pytest.raises(ConfigError, match="bits"):
        convert(MODEL_DIR, tmp_path / "bad", bits=3)
