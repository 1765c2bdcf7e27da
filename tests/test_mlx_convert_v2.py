"""`convert` on a DeepSeek-OCR 2 checkpoint: the decoder quantizes, the vision encoders (SAM, Qwen2) stay in
float, and the quantized checkpoint loads as DeepSeek-OCR 2 through its directory and runs close to float.

Measured on a random-weight model of the OCR 2 architecture with widths that are multiples of 64 (as the real
model's are: 1280, 896, 4864), so every linear, the Qwen2 encoder's included, could be quantized.
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
from common.model.config import load_config, parse_config  # noqa: E402
from common.model.families import (
    DEEPSEEK_OCR_2,  # noqa: E402
    resolve_mode,
)
from common.model.inputs import PreparedInputs
from common.model.prompt import prepare_inputs  # noqa: E402
from common.model.tokenizer import Tokenizer  # noqa: E402
from dsocr_mlx.convert import SIDE_FILES, convert  # noqa: E402
from dsocr_mlx.loader import load_model  # noqa: E402
from dsocr_mlx.model import DeepseekOCR2Model, DeepseekOCRForCausalLM  # noqa: E402
from tests.conftest import FIXTURES_V2, MODEL_DIR_V2, rel_err  # noqa: E402
from tests.test_mlx_convert import step_logits  # noqa: E402

STEPS = 16
VISION_PREFIXES = ("model.sam_model", "model.qwen2_model")


def write_random_model(out: Path) -> None:
    data = json.loads((MODEL_DIR_V2 / "config.json").read_text())
    data.update(hidden_size=64, intermediate_size=128, moe_intermediate_size=64)
    widths = data["vision_config"]["width"]
    widths["qwen2-0-5b"] = dict(widths["qwen2-0-5b"], dim=64, heads=4, kv_heads=2, intermediate_size=128)
    data["projector_config"] = dict(data["projector_config"], input_dim=64, n_embed=64)
    mx.random.seed(2026)
    model = DeepseekOCRForCausalLM(parse_config(data))
    params = dict(tree_flatten(model.parameters()))
    # Clear greedy margins (log-normal row gains on the LM head) and a non-trivial separator, as the fixtures.
    gains = mx.exp(mx.random.normal((data["vocab_size"], 1)))
    params["lm_head.weight"] = params["lm_head.weight"] * gains * 8.0
    params["model.view_seperator"] = mx.random.normal(params["model.view_seperator"].shape) * 0.5
    params = tree_map(lambda a: a.astype(mx.bfloat16) if mx.issubdtype(a.dtype, mx.floating) else a, params)
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "model.safetensors"), params)
    (out / "config.json").write_text(json.dumps(data))
    for name in SIDE_FILES:
        shutil.copy2(MODEL_DIR_V2 / name, out / name)


def run(model: DeepseekOCRForCausalLM, inputs: PreparedInputs, forced: list[int] | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {}
    embeds = model.embed_inputs(inputs.input_ids, inputs.images_seq_mask, inputs.images, record)
    ids, steps = step_logits(model, inputs, STEPS, forced_ids=forced, inputs_embeds=embeds)
    return {"ids": ids, "logits": np.array(steps[0]), "image_embeds": np.array(record["image_embeds"])}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    mx.set_default_device(mx.cpu)
    root = tmp_path_factory.mktemp("convert_v2")
    source = root / "random64"
    write_random_model(source)
    # One 768 view: the encoders' outputs are compared exactly, so a small view proves as much as a tiled page.
    mode = resolve_mode("small", family=DEEPSEEK_OCR_2)
    image = load_image(FIXTURES_V2 / "images" / "rgba_card.png")
    inputs = prepare_inputs(Tokenizer.from_dir(MODEL_DIR_V2), "<image>\nFree OCR.", [image], mode)
    reference = run(load_model(source, "float32")[0], inputs)
    result: dict[str, Any] = {"source": source, "reference": reference}
    for bits in (8, 4):
        out = root / f"q{bits}"
        chosen = convert(source, out, bits=bits, group_size=64)
        model, block = load_model(out, "float32")
        result[bits] = {"chosen": chosen, "model": model, "block": block, "out": out,
                        "run": run(model, inputs, forced=reference["ids"])}
    return result


def test_vision_encoders_stay_float_and_the_decoder_quantizes(converted: dict[str, Any]) -> None:
    for bits in (8, 4):
        entry = converted[bits]
        assert entry["block"] == {"group_size": 64, "bits": bits}
        assert not [path for path in entry["chosen"] if path.startswith(VISION_PREFIXES)]
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


def test_quantized_logits_are_close_and_smaller(converted: dict[str, Any]) -> None:
    reference = converted["reference"]
    size = {k: sum(p.stat().st_size for p in converted[k]["out"].glob("*.safetensors")) for k in (8, 4)}
    float_size = sum(p.stat().st_size for p in converted["source"].glob("*.safetensors"))
    rows = []
    for bits in (8, 4):
        ours = converted[bits]["run"]
        agreement = float(np.mean([a == b for a, b in zip(ours["ids"], reference["ids"], strict=True)]))
        error = rel_err(ours["logits"], reference["logits"])
        rows.append(f"{bits}-bit: {size[bits] / 2**20:.2f} MiB (float {float_size / 2**20:.2f}), "
                    f"last-logit rel {error:.2e}, top-1 agreement {agreement:.3f}")
        # Random weights at width 64 are a harsh case for 4 bits; the bars catch a broken conversion (~0 agreement).
        assert error < (0.05 if bits == 8 else 0.3)
        assert agreement >= (0.9 if bits == 8 else 0.3)
    print("\n" + "\n".join(rows))
    assert size[4] < size[8] < float_size
