"""`dsocr convert`: writes an MLX checkpoint with quantized decoder weights that `--model DIR` loads.

Quantized (MLX affine, per group of `group_size` input values): the decoder's attention and MLP linears,
the stacked routed experts, the shared experts, the token embedding and the LM head. Kept in float: the
vision encoders (SAM, and CLIP or DeepSeek-OCR 2's Qwen2 encoder: every image token goes through them and
their quantization error has not been measured on real weights), the MoE router (`mlp.gate`), the norms,
`image_newline`/`view_seperator`, and by default the projector: it is 0.08% of the real model's bytes
(2048x1280) but feeds every image token, so quantizing it saves ~4 MB for a measurable error on all image
embeddings (tests/test_mlx_convert.py prints both). A linear whose input width is not a multiple of
`group_size` stays in float (MLX cannot group it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from common.errors import ConfigError, DsocrError
from dsocr_mlx.loader import INDEX_FILE, load_model

GROUP_SIZES = (32, 64, 128)
BITS = (4, 8)
# Copied next to the weights so the output directory is a complete model directory.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json")
MAX_SHARD_BYTES = 4 << 30

FLOAT_PREFIXES = ("model.sam_model", "model.vision_model", "model.qwen2_model")


def should_quantize(path: str, module: nn.Module, group_size: int, quantize_projector: bool) -> bool:
    """Which modules convert quantizes (see the module docstring)."""
    if not hasattr(module, "to_quantized") or path.startswith(FLOAT_PREFIXES):
        return False
    if path.startswith("model.projector") and not quantize_projector:
        return False
    weight = getattr(module, "weight", None)
    if weight is None or weight.shape[-1] % group_size:
        return False
    return path.startswith(("model.layers.", "model.embed_tokens", "lm_head", "model.projector"))


def quantize_model(
    model: nn.Module, bits: int, group_size: int, quantize_projector: bool = False
) -> list[str]:
    """Quantizes `model` in place; returns the paths of the quantized modules."""
    chosen: list[str] = []

    def predicate(path: str, module: nn.Module) -> bool:
        if should_quantize(path, module, group_size, quantize_projector):
            chosen.append(path)
            return True
        return False

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    return chosen


def save_weights(
    weights: dict[str, mx.array], out: Path, max_shard_bytes: int = MAX_SHARD_BYTES
) -> list[Path]:
    """One `model.safetensors`, or shards + `model.safetensors.index.json` above `max_shard_bytes`."""
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(weights):
        array = weights[name]
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    if len(shards) == 1:
        path = out / "model.safetensors"
        mx.save_safetensors(str(path), shards[0], metadata={"format": "mlx"})
        return [path]
    paths: list[Path] = []
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        path = out / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(path), shard, metadata={"format": "mlx"})
        weight_map.update({name: path.name for name in shard})
        paths.append(path)
    total = sum(a.nbytes for a in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return paths


def convert(
    src: str | Path,
    out: str | Path,
    bits: int = 4,
    group_size: int = 64,
    *,
    dtype: str = "bfloat16",
    quantize_projector: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[str]:
    """Reads the checkpoint in `src` (official or MLX), quantizes it and writes an MLX checkpoint to `out`.

    Returns the quantized module paths. `dtype` is the storage dtype of the float parts and the scales.
    """
    if bits not in BITS:
        raise ConfigError(f"--bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise ConfigError(f"--out {out} is the source directory; choose a new directory")
    model, existing = load_model(src, dtype)
    if existing is not None:
        raise ConfigError(
            f"{src} is already quantized ({existing['bits']}-bit); convert the original checkpoint"
        )
    chosen = quantize_model(model, bits, group_size, quantize_projector)
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    save_weights(weights, out, max_shard_bytes)

    config = dict(model.config.raw)
    config["quantization"] = {"group_size": group_size, "bits": bits}
    config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dsocr convert", description="Write a quantized MLX checkpoint of DeepSeek-OCR."
    )
    parser.add_argument("--model", required=True, help="source model directory (official or MLX checkpoint)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--bits", type=int, choices=BITS, default=4)
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64)
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="storage dtype of the float parts and the quantization scales",
    )
    parser.add_argument(
        "--quantize-projector",
        action="store_true",
        help="also quantize the vision projector (off: measured error for ~4 MB)",
    )
    args = parser.parse_args(argv)
    try:
        import mlx.core as mx_core

        mx_core.set_default_device(mx_core.cpu if not mx_core.metal.is_available() else mx_core.gpu)
        chosen = convert(
            args.model,
            args.out,
            args.bits,
            args.group_size,
            dtype=args.dtype,
            quantize_projector=args.quantize_projector,
        )
    except DsocrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in Path(args.out).glob("*.safetensors"))
    print(
        f"wrote {args.out}: {args.bits}-bit, group {args.group_size}, {len(chosen)} modules quantized, "
        f"{size / 2**20:.1f} MiB of weights"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
