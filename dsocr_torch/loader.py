"""Builds DeepseekOCRForCausalLM from a model directory: config.json + one or many safetensors files.

The model is built on the meta device (no memory), each tensor is then allocated once on the target device
in the target dtype, and the checkpoint is read tensor by tensor with plain file reads (no mmap, so the file
pages never count as a second resident copy). Names and shapes are checked against the whole checkpoint
before anything is allocated.
"""

from __future__ import annotations

import json
import platform
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from common.config import ModelConfig, load_config
from common.errors import BackendUnavailableError, CheckpointError, ModelNotFoundError
from dsocr_torch.model import DeepseekOCRForCausalLM

ProgressCallback = Callable[[str, int, int], None]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bfloat16 natively (x86 AVX512-BF16 / AMX-BF16, Arm BF16 extension)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        # macOS: Apple M2 and later have BF16; torch picks fast kernels on arm64 either way.
        return platform.system() == "Darwin" and platform.machine() == "arm64"
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_device(device: str) -> torch.device:
    if device in ("auto", ""):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = device.split(":", 1)[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                "device 'cuda' requested but this torch build sees no CUDA GPU; use --device cpu"
            )
        return torch.device(device)
    if kind == "cpu":
        return torch.device("cpu")
    raise BackendUnavailableError(f"unsupported device {device!r} for the torch backend; choose cpu or cuda")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto': bfloat16 on CUDA; on CPU bfloat16 only with native bf16 support, else float32."""
    if dtype == "auto":
        if device.type == "cuda" or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise BackendUnavailableError(
            f"unsupported dtype {dtype!r} for the torch backend; choose auto, {', '.join(DTYPES)}"
        )
    return DTYPES[dtype]


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def _read_header(path: Path) -> dict[str, TensorEntry]:
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    base = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        entries[name] = TensorEntry(path, dtype, tuple(info["shape"]), base + begin, base + end)
    return entries


def checkpoint_index(model_dir: Path) -> dict[str, TensorEntry]:
    """name -> where the tensor lives, for `model.safetensors` or an index + shards."""
    index = model_dir / INDEX_FILE
    single = model_dir / SINGLE_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        entries: dict[str, TensorEntry] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = model_dir / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{index}: shard {shard} is missing from {model_dir}")
            for name, entry in _read_header(shard_path).items():
                if name in entries:
                    raise CheckpointError(f"{model_dir}: tensor {name!r} appears in more than one shard")
                entries[name] = entry
        return entries
    if single.is_file():
        return _read_header(single)
    raise ModelNotFoundError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}; is this a DeepSeek-OCR model folder?")


def build_meta_model(cfg: ModelConfig) -> DeepseekOCRForCausalLM:
    with torch.device("meta"):
        return DeepseekOCRForCausalLM(cfg)


def expected_tensors(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint names and shapes the model expects (parameters and persistent buffers)."""
    return {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}


def _list(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_checkpoint(expected: dict[str, tuple[int, ...]], found: dict[str, TensorEntry], where: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(n for n in set(expected) & set(found) if expected[n] != found[n].shape)
    if not (missing or unexpected or misshaped):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_list(unexpected)}")
    if misshaped:
        shapes = [f"{n} (checkpoint {list(found[n].shape)}, model {list(expected[n])})" for n in misshaped]
        problems.append(f"{len(misshaped)} mis-shaped tensor(s): {_list(shapes)}")
    raise CheckpointError(
        f"{where}: checkpoint does not match config.json: "
        + "; ".join(problems)
        + " (wrong model folder or a config.json from another model?)"
    )


def materialize(model: DeepseekOCRForCausalLM, device: torch.device, dtype: torch.dtype) -> None:
    """Replaces every meta tensor with uninitialised storage: floating tensors in `dtype`, others as built."""
    model.bind_stacked_experts(device, dtype)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                target = dtype if param.is_floating_point() else param.dtype
                module._parameters[name] = nn.Parameter(
                    torch.empty(param.shape, device=device, dtype=target), requires_grad=False
                )
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                if name in module._non_persistent_buffers_set:
                    # Not in the checkpoint, so nothing would ever fill it: a bug in the module, not the input.
                    raise RuntimeError(f"{type(module).__name__}.{name}: non-persistent buffer built on meta")
                target = dtype if buf.is_floating_point() else buf.dtype
                module._buffers[name] = torch.empty(buf.shape, device=device, dtype=target)


def _read_tensor(handle: BinaryIO, entry: TensorEntry) -> torch.Tensor:
    nbytes = entry.end - entry.begin
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    handle.seek(entry.begin)
    view = memoryview(buffer.numpy())
    read = 0
    while read < nbytes:
        got = handle.readinto(view[read:])
        if not got:
            raise CheckpointError(f"{entry.file}: file is truncated (a download was interrupted?)")
        read += got
    return buffer.view(entry.dtype).view(entry.shape)


def load_model(
    model_dir: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    progress: ProgressCallback | None = None,
) -> DeepseekOCRForCausalLM:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"{model_dir}: model folder not found")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    cfg = load_config(model_dir)
    found = checkpoint_index(model_dir)
    model = build_meta_model(cfg)
    expected = expected_tensors(model)
    check_checkpoint(expected, found, model_dir)
    materialize(model, torch_device, torch_dtype)
    targets = model.state_dict(keep_vars=True)
    names = sorted(found, key=lambda n: (str(found[n].file), found[n].begin))
    total = len(names)
    handles: dict[Path, BinaryIO] = {}
    try:
        with torch.no_grad():
            for done, name in enumerate(names, 1):
                entry = found[name]
                if entry.file not in handles:
                    for old in handles.values():
                        old.close()
                    handles = {entry.file: entry.file.open("rb")}
                targets[name].copy_(_read_tensor(handles[entry.file], entry))
                if progress is not None:
                    progress("weights", done, total)
    finally:
        for handle in handles.values():
            handle.close()
    model.eval()
    model.requires_grad_(False)
    return model
