"""Loads DeepSeek-OCR weights into the MLX model: the official Hugging Face checkpoint (bfloat16
safetensors, one file or index + shards) or an MLX checkpoint written by `dsocr_mlx.convert`.

`mx.load` reads safetensors lazily, so casting and evaluating one array at a time never holds two full
copies of the weights (nor of a layer's experts while they are stacked).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from common.engine.backend import ProgressCallback
from common.errors import CheckpointError, ConfigError, ModelNotFoundError
from common.model.config import ModelConfig, load_config
from dsocr_mlx.model import DeepseekOCRForCausalLM

DTYPES: dict[str, mx.Dtype] = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, `model.safetensors`, or all."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"{model_dir}: shards listed in {INDEX_FILE} are missing: {', '.join(missing)}"
            )
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{model_dir}: no *.safetensors weights found")
    return files


def quantization_of(cfg: ModelConfig) -> dict[str, int] | None:
    """The `quantization` block of an MLX checkpoint's config.json ({group_size, bits}), if any."""
    block = cfg.raw.get("quantization")
    if block is None:
        return None
    if not isinstance(block, dict) or not all(isinstance(block.get(k), int) for k in ("group_size", "bits")):
        raise ConfigError(
            f"{cfg.path}: key 'quantization' must be an object with integer group_size and bits"
        )
    return {"group_size": block["group_size"], "bits": block["bits"]}


def read_weights(files: Iterable[Path]) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for file in files:
        try:
            weights.update(mx.load(str(file)))
        except (RuntimeError, ValueError, OSError) as exc:
            raise CheckpointError(f"{file}: cannot read safetensors ({exc})") from None
    return weights


def quantize_like(model: nn.Module, weights: dict[str, Any], quantization: dict[str, int]) -> None:
    """Quantizes exactly the modules whose `.scales` the checkpoint holds (what convert chose)."""
    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        class_predicate=lambda path, module: hasattr(module, "to_quantized") and f"{path}.scales" in weights,
    )


def check_weights(model: nn.Module, weights: dict[str, mx.array], source: str) -> None:
    """Strict name and shape check; CheckpointError names what is missing, unexpected or mis-shaped."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    misshaped = [
        f"{k} {tuple(weights[k].shape)} (model wants {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(weights))
        if tuple(weights[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, names in (("missing", missing), ("unexpected", extra), ("mis-shaped", misshaped)):
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problems.append(f"{len(names)} {label}: {shown}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not match the model: " + "; ".join(problems))


def cast_floating(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Floating tensors to the compute dtype; packed quantized weights and integer buffers stay as is."""
    return {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype else v
        for k, v in weights.items()
    }


def build_model(
    cfg: ModelConfig, quantization: dict[str, int] | None = None, weights: Any = ()
) -> DeepseekOCRForCausalLM:
    model = DeepseekOCRForCausalLM(cfg)
    if quantization is not None:
        quantize_like(model, weights, quantization)
    return model


def load_model(
    model_dir: str | Path,
    dtype: str = "float32",
    progress: ProgressCallback | None = None,
) -> tuple[DeepseekOCRForCausalLM, dict[str, int] | None]:
    """Builds the model from `config.json` and loads the checkpoint; returns (model, quantization block)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"{model_dir}: model directory not found")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported by the mlx backend; choose {', '.join(DTYPES)}")
    cfg = load_config(model_dir)
    quantization = quantization_of(cfg)
    raw = read_weights(checkpoint_files(model_dir))
    model = build_model(cfg, quantization, raw)
    weights = cast_floating(model.sanitize(raw), DTYPES[dtype])
    check_weights(model, weights, str(model_dir))
    model.load_weights(list(weights.items()), strict=False)
    # From here the model's arrays are the only references to the checkpoint's (per-expert, uncast) arrays, so
    # each is freed as soon as the array made from it is evaluated, not kept as a second copy until the end.
    del raw, weights
    materialize(model, progress)
    model.eval()
    return model, quantization


def materialize(model: DeepseekOCRForCausalLM, progress: ProgressCallback | None = None) -> None:
    """Evaluates the (lazy, file-backed) parameters one array at a time, reporting the MiB done.

    One array per evaluation bounds what a load holds besides the finished weights to that array's sources:
    one projection's per-expert tensors while they are stacked (rather than a whole layer's).
    """
    inner = model.model
    groups: list[Any] = [inner.embed_tokens, *inner.layers, inner.norm, model.lm_head, *inner.vision_modules()]
    arrays = [a for g in groups for _, a in tree_flatten(g.parameters() if isinstance(g, nn.Module) else g)]
    total, done = sum(a.nbytes for a in arrays), 0
    for array in arrays:
        mx.eval(array)
        done += array.nbytes
        if progress is not None:
            progress("weights (MiB)", done >> 20, total >> 20)
