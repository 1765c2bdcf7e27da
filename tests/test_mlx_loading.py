"""Loading checkpoints of both families on MLX: names and layouts mapped from the official checkpoints, clear
errors, sharded checkpoints, and a cold start that skips mlx-lm's heavy package init and holds one array's
sources at a time."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")
if importlib.util.find_spec("mlx_lm") is None:  # looked up, not imported: its package init is what dsocr avoids
    pytest.skip("mlx-lm is not installed", allow_module_level=True)

from common.errors import CheckpointError
from common.model.config import load_config, parse_config
from dsocr_mlx.cache import KVCache
from dsocr_mlx.convert import save_weights
from dsocr_mlx.loader import check_weights, load_model, read_weights
from dsocr_mlx.model import DeepseekOCRForCausalLM
from tests.conftest import MODEL_DIR, ROOT
from tests.helpers_backend import FAMILIES, backend_of, prefill, real_checkpoint

pytestmark = pytest.mark.mlx


@pytest.fixture(scope="module", params=FAMILIES)
def model(request: pytest.FixtureRequest) -> DeepseekOCRForCausalLM:
    mx.set_default_device(mx.cpu)
    loaded, quantization = load_model(FAMILIES[request.param].model_dir, "float32")
    assert quantization is None
    return loaded


def test_sanitize_is_idempotent(model: DeepseekOCRForCausalLM) -> None:
    """Per-expert tensors are stacked, conv weights go channels-last, once: sanitising twice equals once."""
    raw = read_weights([FAMILIES[model.config.family.name].model_dir / "model.safetensors"])
    once = model.sanitize(raw)
    twice = model.sanitize(dict(once))
    assert sorted(once) == sorted(twice)
    for name, value in once.items():
        assert value.shape == twice[name].shape, name
        assert bool(mx.array_equal(value, twice[name])), name
    check_weights(model, once, "fixture")
    assert "model.layers.1.mlp.experts.gate_proj.weight" in once
    assert not any(".experts.0." in name for name in once)
    if model.config.family.name == "deepseek-ocr-2":
        assert "model.qwen2_model.query_1024.weight" in once and "model.vision_model.pre_layrnorm.weight" not in once


def test_checkpoint_errors_name_the_tensors(model: DeepseekOCRForCausalLM) -> None:
    weights = model.sanitize(read_weights([FAMILIES[model.config.family.name].model_dir / "model.safetensors"]))
    missing = dict(weights)
    del missing["model.norm.weight"]
    with pytest.raises(CheckpointError, match=r"missing: model\.norm\.weight"):
        check_weights(model, missing, "x")
    extra = dict(weights, **{"model.bogus.weight": mx.zeros((2,))})
    with pytest.raises(CheckpointError, match=r"unexpected: model\.bogus\.weight"):
        check_weights(model, extra, "x")
    misshaped = dict(weights, **{"lm_head.weight": mx.zeros((3, 3))})
    with pytest.raises(CheckpointError, match=r"mis-shaped: lm_head\.weight"):
        check_weights(model, misshaped, "x")


def test_sharded_checkpoint_loads(model: DeepseekOCRForCausalLM, tmp_path: Path) -> None:
    """Official layout (per-expert names, OIHW convs) split into shards + index loads like the single file."""
    fixtures = FAMILIES[model.config.family.name]
    raw = read_weights([fixtures.model_dir / "model.safetensors"])
    paths = save_weights(raw, tmp_path, max_shard_bytes=8 << 20)
    assert len(paths) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    (tmp_path / "config.json").write_bytes((fixtures.model_dir / "config.json").read_bytes())
    sharded, _ = load_model(tmp_path, "float32")
    inputs = fixtures.from_embeds("pm12_text_only")
    assert bool(mx.array_equal(prefill(backend_of(sharded), inputs), prefill(backend_of(model), inputs)))


@pytest.mark.parametrize("family", FAMILIES)
def test_real_checkpoint_maps_onto_real_model(family: str) -> None:
    """Every real tensor name goes through sanitize onto the model built from real_config.json with the
    right shape; nothing missing or left over. MLX is lazy: nothing full-size is allocated."""
    config, shapes, n_tensors, _ = real_checkpoint(family)
    assert len(shapes) == n_tensors
    real = DeepseekOCRForCausalLM(load_config(config))
    fake = {name: mx.zeros(shape, dtype=mx.bfloat16) for name, shape in shapes.items()}
    check_weights(real, real.sanitize(fake), "real_checkpoint_shapes.json")


def test_dimensions_come_from_config() -> None:
    """A differently sized config builds a model with those sizes (no tiny-fixture constants)."""
    data = json.loads((MODEL_DIR / "config.json").read_text())
    data.update(hidden_size=64, num_hidden_layers=4, n_routed_experts=6, num_experts_per_tok=3)
    data["projector_config"] = dict(data["projector_config"], n_embed=64)
    config = parse_config(data)
    model = DeepseekOCRForCausalLM(config)
    assert len(model.layers) == 4
    assert model.layers[2].mlp.experts.gate_proj.weight.shape == (6, 16, 64)
    hidden = model.prefill(mx.zeros((1, 5, 64)), KVCache(config.language, 1, 16, model.dtype), 0, 0)
    assert model.logits(hidden[:, -1]).shape == (1, data["vocab_size"])


@pytest.mark.slow
def test_backend_import_does_not_run_mlx_lm_init_until_needed() -> None:
    code = (
        "import sys\n"
        "import dsocr_mlx.backend\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
        "import mlx_lm\n"
        "print(callable(mlx_lm.load), mlx_lm.models.deepseek.__name__, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "True", "mlx_lm.models.deepseek", "True"]


def _wide_expert_model(folder: Path) -> Path:
    """The fixture's architecture with a small vocabulary and wide experts, random weights: stacking the experts
    is then what costs memory during a load."""
    torch = pytest.importorskip("torch")  # the checkpoint's names and shapes come from the torch model
    from safetensors.torch import save_file

    from common.model.config import load_config
    from dsocr_torch.weights.loader import build_meta_model, expected_tensors

    config = json.loads((MODEL_DIR / "config.json").read_text())
    for block in (config, config["language_config"]):
        block.update(vocab_size=1000, moe_intermediate_size=4096)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(MODEL_DIR / name, folder / name)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in expected_tensors(build_meta_model(load_config(folder))).items():
        if name.endswith("position_ids"):
            tensors[name] = torch.arange(shape[-1]).view(shape)
        else:
            tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_loading_holds_at_most_one_array_besides_the_weights(tmp_path: Path) -> None:
    from mlx.utils import tree_flatten

    folder = _wide_expert_model(tmp_path / "model")
    mx.reset_peak_memory()
    resident = mx.get_active_memory()  # what other tests' models hold
    model, _ = load_model(folder, "float32")
    arrays = [a for _, a in tree_flatten(model.parameters())]
    weights, largest = sum(a.nbytes for a in arrays), max(a.nbytes for a in arrays)
    assert largest == 8 * 4096 * 40 * 4  # one projection of one layer's stacked experts, float32
    # A layer's three projections evaluated together would hold three stacks' sources at once.
    assert mx.get_peak_memory() - resident - weights <= 1.5 * largest
