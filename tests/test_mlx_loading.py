"""MLX cold start: importing the backend skips mlx-lm's heavy package init; loading holds one array's sources."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from tests.conftest import MODEL_DIR, ROOT  # noqa: E402


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
    from dsocr_torch.loader import build_meta_model, expected_tensors

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

    from dsocr_mlx.loader import load_model

    folder = _wide_expert_model(tmp_path / "model")
    mx.reset_peak_memory()
    model, _ = load_model(folder, "float32")
    arrays = [a for _, a in tree_flatten(model.parameters())]
    weights, largest = sum(a.nbytes for a in arrays), max(a.nbytes for a in arrays)
    assert largest == 8 * 4096 * 40 * 4  # one projection of one layer's stacked experts, float32
    # A layer's three projections evaluated together would hold three stacks' sources at once.
    assert mx.get_peak_memory() - weights <= 1.5 * largest
