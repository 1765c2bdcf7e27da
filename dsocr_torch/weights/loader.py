"""Builds DeepseekOCRForCausalLM from a model directory: config.json + one or many safetensors files.

The model is built on the meta device and its names and shapes are checked against the whole checkpoint
before any weight is touched. Then, on the CPU:

* a tensor used as stored (same dtype) is a view of the memory-mapped checkpoint: no copy and no memory of
  its own (the page cache's pages, shared with every reader of the file);
* the routed experts (stacked and transposed for the MoE kernels), tensors converted to another dtype and the
  decoder's dense weights packed for oneDNN (bfloat16, `pack=True`) come from the prepared-layout cache next
  to the model (`prepared`), which the first load writes; packed weights are oneDNN tensors over the mapped
  bytes (`onednn`). Without the cache they are computed into memory of their own.
* every mapped page a request will read is mapped in at load, so the first request takes no page faults.

The copying and packing run on a thread per core (each copy single-threaded, so no thread waits on another)
and the progress callback counts the bytes that need that work. On CUDA each tensor goes from the map straight
to the device, so no host copy of the model is ever made.
"""

from __future__ import annotations

import contextlib
import logging
import platform
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from common.errors import BackendUnavailableError, CheckpointError, ModelNotFoundError
from common.model.config import ModelConfig, load_config
from dsocr_torch.language import Linear
from dsocr_torch.model import DeepseekOCRForCausalLM
from dsocr_torch.weight_only import QUANTIZE_CHOICES, STORAGE_DTYPES
from dsocr_torch.weights.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    MappedFiles,
    TensorEntry,
    aligned,
    checkpoint_index,
)
from dsocr_torch.weights.jobs import PROGRESS_LABEL, Jobs, Progress, ProgressCallback, pack_from_checkpoint
from dsocr_torch.weights.onednn import (
    MappedPacking,
    mapped_packing,
    packed_metadata,
    packing_fingerprint,
)
from dsocr_torch.weights.prepared import (
    PreparedCache,
    PreparedTensors,
    cache_enabled,
    fingerprint,
    plan_slots,
    slot_views,
)
from dsocr_torch.weights.stored import SCALES, prepare_kernels, stored_expert_specs, stored_experts
from dsocr_torch.weights.upcast import upcast_while_running

__all__ = ["INDEX_FILE", "SINGLE_FILE", "TensorEntry", "checkpoint_index", "load_model"]

log = logging.getLogger(__name__)


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

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


def build_meta_model(cfg: ModelConfig) -> DeepseekOCRForCausalLM:
    with torch.device("meta"), _without_init():
        return DeepseekOCRForCausalLM(cfg)


_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
    "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)


@contextlib.contextmanager
def _without_init() -> Iterator[None]:
    """torch.nn.init's functions as no-ops while a model is built on the meta device.

    A meta tensor has no values to initialise, and initialising one runs torch's Python reference kernels,
    whose first use imports torch._dynamo and sympy: seconds of a load spent on nothing.
    """
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS if hasattr(nn.init, name)}

    def unchanged(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return tensor

    try:
        for name in saved:
            setattr(nn.init, name, unchanged)
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


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




def load_model(
    model_dir: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    progress: ProgressCallback | None = None,
    pack: bool = False,
    prepared_cache: bool | None = None,
    quantize: str = "none",
) -> DeepseekOCRForCausalLM:
    """The model, ready for inference.

    `pack`: pack the decoder's dense weights for oneDNN while loading (what `pack_for_cpu_decode` does, without
    ever holding the plain copy); `prepared_cache`: read and write the prepared-layout cache (default: on unless
    DSOCR_PREPARED_CACHE=0; CPU only); `quantize`: "bf16" or "int8" stores the decoder's linear and expert
    weights so (dsocr_torch/weight_only.py), computed in `dtype` (CPU only).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"{model_dir}: model folder not found")
    if quantize not in QUANTIZE_CHOICES:
        raise BackendUnavailableError(f"unsupported --quantize {quantize!r}; choose {', '.join(QUANTIZE_CHOICES)}")
    torch_device = resolve_device(device)
    if quantize != "none" and torch_device.type != "cpu":
        raise BackendUnavailableError(
            f"--quantize {quantize} is for the CPU; on {torch_device.type} use --quantize none (bfloat16 weights)"
        )
    torch_dtype = resolve_dtype(dtype, torch_device)
    cfg = load_config(model_dir)
    checkpoint = Checkpoint.open(model_dir)
    model = build_meta_model(cfg)
    meta = model.state_dict(keep_vars=True)
    check_checkpoint({name: tuple(t.shape) for name, t in meta.items()}, checkpoint.entries, model_dir)
    files = MappedFiles()
    with torch.no_grad():
        if torch_device.type == "cpu":
            _load_on_cpu(
                model, meta, model_dir, checkpoint, files, torch_dtype, pack=pack, cache=prepared_cache,
                progress=progress, storage=STORAGE_DTYPES.get(quantize),
            )
        else:
            _load_on_device(model, checkpoint, files, torch_device, torch_dtype, progress)
    model.eval()
    model.requires_grad_(False)
    model.weight_storage = quantize
    return model


# Read a row at a time as tokens need them, so their pages are left to fault in on use.
_LOOKUP_TABLES = frozenset({"model.embed_tokens.weight"})


def _load_on_cpu(
    model: DeepseekOCRForCausalLM,
    meta: dict[str, torch.Tensor],
    model_dir: Path,
    checkpoint: Checkpoint,
    files: MappedFiles,
    dtype: torch.dtype,
    *,
    pack: bool,
    cache: bool | None,
    progress: ProgressCallback | None,
    storage: torch.dtype | None = None,
) -> None:
    """`meta`: the model's state dict, still on the meta device; `storage`: the weight-only dtype of the
    decoder's linear and expert weights (None: `dtype`, as every other tensor)."""
    entries = checkpoint.entries
    moe_layers = model.moe_layers()
    packed: dict[str, Linear] = {}
    stored: dict[str, Linear] = {}  # weight-only linears (--quantize), by weight name
    if storage is not None:
        stored = {f"{name}.weight": linear for name, linear in model.decode_linears().items()}
    elif pack and Linear.packs(dtype, torch.device("cpu")):
        packed = {f"{name}.weight": linear for name, linear in model.decode_linears().items()}
    mapping = mapped_packing() if packed else None
    # The prepared layout: the expert stacks, then every tensor stored in another dtype (or misaligned), then
    # (where they can be mapped back) the packed weights.
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    sources: dict[str, str] = {}  # checkpoint name -> the prepared slot it goes into ("" for an expert)
    for name, moe in moe_layers:
        if storage is not None:
            specs += stored_expert_specs(name, moe.stored_shapes(), storage)
            keys = [f"{e}.{proj}" for e in range(moe.num_experts) for proj in ("gate_proj", "up_proj", "down_proj")]
            sources.update((f"{name}.experts.{key}.weight", "") for key in keys)
            continue
        shapes = moe.stack_shapes()
        specs += [(f"{name}.gate_up_by_input", dtype, shapes[0]), (f"{name}.down_by_input", dtype, shapes[1])]
        metas = (torch.empty(shapes[0], device="meta"), torch.empty(shapes[1], device="meta"))
        sources.update((f"{name}.experts.{key}.weight", "") for key in moe.expert_weight_views(*metas))
    direct: dict[str, TensorEntry] = {}
    # With weight-only storage, a bf16 checkpoint's vision weights stay bf16 too (the same values; the towers
    # compute in `dtype` from copies made a block at a time, see weights/upcast.upcast_while_running).
    vision = tuple(f"{name}." for name in model.vision_towers()) if storage is not None else ()
    for name, entry in entries.items():
        if name in sources or name in packed:
            continue
        target = dtype if meta[name].is_floating_point() else meta[name].dtype
        if vision and name.startswith(vision) and entry.dtype == torch.bfloat16 and meta[name].is_floating_point():
            target = torch.bfloat16
        if name in stored:
            target = storage  # type: ignore[assignment]
            if storage == torch.int8:
                sources[name] = name
                specs += [(name, torch.int8, tuple(meta[name].shape)), (name + SCALES, torch.float32,
                                                                         tuple(meta[name].shape[:1]))]
                continue
        if entry.dtype == target and aligned(entry):
            direct[name] = entry
        else:
            sources[name] = name
            specs.append((name, target, tuple(meta[name].shape)))
    slots, size = plan_slots(specs)
    packed_specs = [(name, dtype, tuple(meta[name].shape)) for name in packed] if mapping is not None else []
    prepared_cache = None
    if cache_enabled(cache, size + sum(entries[name].nbytes for name, _, _ in packed_specs)):
        variant = next((name for name, stored in STORAGE_DTYPES.items() if stored == storage), "")
        key = fingerprint(checkpoint, dtype, (packing_fingerprint() if packed_specs else "") + variant)
        prepared_cache = PreparedCache(model_dir, dtype, key, slots, size, packed_specs, variant)
    prepared = prepared_cache.open() if prepared_cache is not None else None
    if prepared is not None and mapping is not None and not _packing_holds(mapping, prepared, files, entries, dtype):
        log.info("packed weights in %s were packed for another CPU or oneDNN; rebuilding", prepared_cache.path)
        prepared = None
    touched = [files.view(entry) for name, entry in direct.items() if name not in _LOOKUP_TABLES]
    for entry in direct.values():
        files.prefetch(entry)
    if prepared is not None:  # what was computed is in the cache: map it in (and pack what it cannot hold)
        unpacked = [name for name in packed if name not in prepared.packed]
        work = sum(t.nbytes for t in (*prepared.buffers(), *touched))
        jobs = Jobs(Progress(progress, work + sum(entries[name].nbytes for name in unpacked)))
        for name in unpacked:
            jobs.pack(files, entries[name], packed[name], dtype)
        jobs.map_in(prepared.buffers(skip=_LOOKUP_TABLES))
    else:
        writing = prepared_cache is not None
        work = sum(entries[n].nbytes for n in (*packed, *sources)) + sum(t.nbytes for t in touched)
        work += (size + sum(entries[name].nbytes for name, _, _ in packed_specs)) if writing else 0
        jobs = Jobs(Progress(progress, work))
        for name, linear in packed.items():
            jobs.pack(files, entries[name], linear, dtype)
        writer = None
        if writing:
            if packed_specs:  # their sizes and layouts are known once they are packed
                jobs.run()
            layouts = {name: _packed_layout(packed[name].packed) for name, _, _ in packed_specs}
            writer = prepared_cache.create(layouts)
        computed = writer.tensors if writer is not None else slot_views(torch.empty(size, dtype=torch.uint8), slots)
        for name, moe in moe_layers:
            if storage is not None:
                views = moe.stored_expert_views(stored_experts(computed, name))
                for key, (view, scales) in views.items():
                    jobs.copy(files, entries[f"{name}.experts.{key}.weight"], view, scales)
                continue
            stacks = computed[f"{name}.gate_up_by_input"], computed[f"{name}.down_by_input"]
            for key, view in moe.expert_weight_views(*stacks).items():
                jobs.copy(files, entries[f"{name}.experts.{key}.weight"], view)
        for name, slot in sources.items():
            if slot:
                jobs.copy(files, entries[name], computed[slot], computed.get(slot + SCALES))
        if writer is not None:
            for name, (memory, _) in writer.packed.items():
                jobs.copy_packed(packed[name], memory, entries[name].nbytes)
        try:
            jobs.run()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        prepared = writer.commit() if writer is not None else None
        if prepared is not None:  # the same values, now read from the finished file
            jobs.map_in(prepared.buffers(skip=_LOOKUP_TABLES))
        else:
            prepared = PreparedTensors(computed, {})
    jobs.map_in(touched)
    jobs.run()
    jobs.progress.finish()
    for name, moe in moe_layers:
        if storage is not None:
            moe.bind_stored_experts(stored_experts(prepared.tensors, name))
            continue
        stacks = prepared.tensors[f"{name}.gate_up_by_input"], prepared.tensors[f"{name}.down_by_input"]
        moe.bind_stacked_experts("cpu", dtype, stacks)
    for name, slot in sources.items():
        if slot and name in stored:
            stored[name].use_weight_only(prepared.tensors[slot], prepared.tensors.get(slot + SCALES))
        elif slot:
            _set_tensor(model, name, prepared.tensors[slot])
    for name, (memory, metadata) in prepared.packed.items():
        assert mapping is not None
        try:
            packed[name].use_packed(mapping.wrap(memory, tuple(meta[name].shape), dtype, metadata), owner=memory)
        except RuntimeError as exc:  # a cache written by other code: pack this one from the checkpoint
            log.warning("packed weight %s not usable from the cache (%s); packing it", name, exc)
            pack_from_checkpoint(files, entries[name], packed[name], dtype)
    for name, entry in direct.items():
        if name in stored:
            stored[name].use_weight_only(files.view(entry), None)
        else:
            _set_tensor(model, name, files.view(entry))
    if storage is not None:
        prepare_kernels(model)
        for tower in model.vision_towers().values():
            if any(p.dtype != dtype for p in tower.parameters() if p.is_floating_point()):
                upcast_while_running(tower, dtype)


def _packed_layout(packed: torch.Tensor | None) -> tuple[int, bytes]:
    assert packed is not None
    return int(torch.ops.mkldnn._nbytes(packed)), packed_metadata(packed)


def _packing_holds(
    mapping: MappedPacking,
    prepared: PreparedTensors,
    files: MappedFiles,
    entries: dict[str, TensorEntry],
    dtype: torch.dtype,
) -> bool:
    """Whether this machine packs like the one that wrote the cache: the smallest packed weight, packed again."""
    if not prepared.packed:
        return True
    name = min(prepared.packed, key=lambda n: entries[n].nbytes)
    memory, metadata = prepared.packed[name]
    try:
        return mapping.matches(files.view(entries[name]).to(dtype), memory, metadata)
    finally:
        files.release(entries[name])


def _load_on_device(
    model: DeepseekOCRForCausalLM,
    checkpoint: Checkpoint,
    files: MappedFiles,
    device: torch.device,
    dtype: torch.dtype,
    progress: ProgressCallback | None,
) -> None:
    """Each tensor from the map straight into its place on the device; the map's pages are released as it goes."""
    materialize(model, device, dtype)
    targets = model.state_dict(keep_vars=True)
    ordered = sorted(checkpoint.entries.items(), key=lambda item: (str(item[1].file), item[1].begin))
    for _, entry in ordered:
        files.prefetch(entry)
    total, done = sum(entry.nbytes for _, entry in ordered), 0
    for name, entry in ordered:
        targets[name].copy_(files.view(entry))
        files.release(entry)
        done += entry.nbytes
        if progress is not None:
            progress(PROGRESS_LABEL, done >> 20, total >> 20)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replaces the (meta) parameter or persistent buffer `name` with `value`."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value
