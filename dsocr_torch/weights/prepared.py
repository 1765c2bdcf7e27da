"""The prepared-layout cache: the tensors whose in-memory layout is not the checkpoint's, kept on disk once.

On the CPU most weights are used as stored and are memory-mapped from the checkpoint itself. The rest (the
routed experts, stacked and transposed for the MoE kernels, every tensor converted to another dtype, the
decoder's dense weights packed for oneDNN, and weight-only int8 weights with their scales) must be computed,
and writing gigabytes of fresh memory costs more than reading the file. So the first load writes them, in
their final layout, to `<model>/.dsocr-prepared/<dtype>.bin` (`<dtype>-int8.bin` with `--quantize int8`, ...),
and later loads memory-map that file like the checkpoint: no copy, no fresh memory, pages shared with the page
cache.

The file starts with a header naming the checkpoint's fingerprint (each shard's resolved name, size,
modification time and safetensors header; a Hub blob's name is its sha256; with packed weights, also what
decides oneDNN's layout) and the tensors' names, dtypes, shapes and offsets (and packed layouts); anything
that differs makes the loader rebuild it. It is written under a temporary name, flushed to disk and renamed,
so a crash never leaves a half-written cache behind the real name.
Set DSOCR_PREPARED_CACHE=0 to never read or write it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from dsocr_torch.weights.checkpoint import Checkpoint, file_fingerprint

log = logging.getLogger(__name__)

ENV = "DSOCR_PREPARED_CACHE"
CACHE_DIR = ".dsocr-prepared"
MAGIC = b"DSOCR-PREPARED-2"
_ALIGN = 4096  # each tensor starts on a page: views are aligned and unrelated tensors share no page
_SPARE_BYTES = 1 << 30  # free disk left after writing the cache, at least
MIN_BYTES = 256 << 20  # smaller prepared layouts are computed on every load (a tiny model gets no cache file)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def cache_enabled(flag: bool | None, nbytes: int) -> bool:
    """`flag` if given, else on unless DSOCR_PREPARED_CACHE=0; never for less than MIN_BYTES."""
    if nbytes < MIN_BYTES:
        return False
    if flag is not None:
        return flag
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class Slot:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the data section

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def describe(self) -> list[object]:
        return [self.name, str(self.dtype).removeprefix("torch."), list(self.shape), self.offset]


@dataclass(frozen=True)
class PackedSlot:
    """A oneDNN-packed weight: its bytes (an opaque blocked layout) and the description that rebuilds it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    metadata: bytes

    def describe(self) -> list[object]:
        dtype = str(self.dtype).removeprefix("torch.")
        return [self.name, dtype, list(self.shape), self.offset, self.nbytes, self.metadata.hex()]


@dataclass
class PreparedTensors:
    tensors: dict[str, torch.Tensor]  # name -> tensor in its final layout
    packed: dict[str, tuple[torch.Tensor, bytes]]  # name -> (its packed bytes, oneDNN's layout description)

    def buffers(self, skip: frozenset[str] = frozenset()) -> list[torch.Tensor]:
        """Every tensor and packed weight's bytes but those named in `skip`: what a load maps in."""
        tensors = [tensor for name, tensor in self.tensors.items() if name not in skip]
        return [*tensors, *(memory for memory, _ in self.packed.values())]


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def plan_slots(specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[list[Slot], int]:
    """Page-aligned places for `specs` (name, dtype, shape), in order; returns them and the data size."""
    slots, offset = [], 0
    for name, dtype, shape in specs:
        slots.append(Slot(name, dtype, tuple(shape), offset))
        offset += _aligned(slots[-1].nbytes)
    return slots, offset


def fingerprint(checkpoint: Checkpoint, dtype: torch.dtype, packing: str = "") -> str:
    """The cache's key: the checkpoint's files and headers, the dtype and (`packing`) what decides packed layouts."""
    parts: list[object] = [MAGIC.decode(), _DTYPE_NAMES.get(dtype, str(dtype)), packing]
    for file, header in sorted(checkpoint.headers.items()):
        parts.append([*file_fingerprint(file), hashlib.sha256(header).hexdigest()])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def slot_views(buffer: torch.Tensor, slots: list[Slot], base: int = 0) -> dict[str, torch.Tensor]:
    """name -> the slot's tensor, viewing the uint8 `buffer` from `base` on."""
    return {
        s.name: buffer[base + s.offset : base + s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in slots
    }


def _prepared_views(buffer: torch.Tensor, slots: list[Slot], packed: list[PackedSlot], base: int) -> PreparedTensors:
    """The slots' tensors and the packed weights' bytes, viewing the uint8 `buffer` from `base` on."""
    packed_views = {s.name: (buffer[base + s.offset : base + s.offset + s.nbytes], s.metadata) for s in packed}
    return PreparedTensors(slot_views(buffer, slots, base), packed_views)


def _header(key: str, slots: list[Slot], packed: list[PackedSlot], data_size: int) -> bytes:
    described = {"key": key, "slots": [s.describe() for s in slots], "packed": [s.describe() for s in packed]}
    meta = json.dumps({**described, "data_size": data_size}).encode()
    head = MAGIC + struct.pack("<Q", len(meta)) + meta
    return head + b"\0" * (-len(head) % _ALIGN)


def _read_header(handle: BinaryIO) -> tuple[dict[str, Any], int]:
    """The header's fields and its length (where the data starts); ValueError when it is not one."""
    head = handle.read(len(MAGIC) + 8)
    if len(head) != len(MAGIC) + 8 or not head.startswith(MAGIC):
        raise ValueError("not a prepared-layout file of this version")
    (length,) = struct.unpack("<Q", head[len(MAGIC) :])
    if length > 1 << 26:
        raise ValueError("header too long")
    fields = json.loads(handle.read(length))
    if not isinstance(fields, dict):
        raise ValueError("header is not an object")
    return fields, _aligned(len(head) + length)


def _packed_slots(described: list[list[Any]]) -> list[PackedSlot]:
    slots = []
    for name, dtype, shape, offset, nbytes, metadata in described:
        slots.append(PackedSlot(name, getattr(torch, dtype), tuple(shape), offset, nbytes, bytes.fromhex(metadata)))
    return slots


class PreparedCache:
    """One dtype's prepared tensors for one model folder.

    `slots` are the tensors whose layout is known before loading; `packed` names the (name, dtype, shape) of
    oneDNN-packed weights, whose sizes and layouts only packing tells: they are placed after the slots when
    the file is written, and read back from its header.
    """

    def __init__(
        self,
        model_dir: Path,
        dtype: torch.dtype,
        key: str,
        slots: list[Slot],
        data_size: int,
        packed: list[tuple[str, torch.dtype, tuple[int, ...]]] | None = None,
        variant: str = "",
    ) -> None:
        name = _DTYPE_NAMES.get(dtype, "other") + (f"-{variant}" if variant else "")  # variant: e.g. "int8"
        self.path = model_dir / CACHE_DIR / f"{name}.bin"
        self.key, self.slots, self.data_size = key, slots, data_size
        self.packed = [(name, dtype, tuple(shape)) for name, dtype, shape in packed or []]

    def open(self) -> PreparedTensors | None:
        """The cached tensors as private maps of the file, or None when it is missing or stale."""
        try:
            with self.path.open("rb") as handle:
                fields, data_start = _read_header(handle)
                packed = _packed_slots(fields.get("packed", []))
                data_size = fields.get("data_size")
                if (
                    fields.get("key") != self.key
                    or fields.get("slots") != [s.describe() for s in self.slots]
                    or [(s.name, s.dtype, s.shape) for s in packed] != self.packed
                    or not isinstance(data_size, int)
                    or any(s.offset < self.data_size or s.offset + s.nbytes > data_size for s in packed)
                    or os.fstat(handle.fileno()).st_size != data_start + data_size
                ):
                    log.info("prepared-layout cache %s is stale; rebuilding it", self.path)
                    return None
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            log.info("prepared-layout cache %s is unreadable (%s); rebuilding it", self.path, exc)
            return None
        return _prepared_views(torch.frombuffer(mapped, dtype=torch.uint8), self.slots, packed, data_start)

    def create(self, packed_layouts: dict[str, tuple[int, bytes]] | None = None) -> CacheWriter | None:
        """A writer whose tensors are the new file's pages, or None where the folder cannot take the file.

        `packed_layouts`: name -> (bytes, oneDNN layout description) of every weight in `packed`.
        """
        packed_layouts = packed_layouts or {}
        packed, offset = [], self.data_size
        for name, dtype, shape in self.packed:
            nbytes, metadata = packed_layouts[name]
            packed.append(PackedSlot(name, dtype, shape, offset, nbytes, metadata))
            offset += _aligned(nbytes)
        header = _header(self.key, self.slots, packed, offset)
        size = len(header) + offset
        folder = self.path.parent
        try:
            folder.mkdir(exist_ok=True)
            _remove_stale_temporaries(folder)
            free = shutil.disk_usage(folder).free
            if free < size + _SPARE_BYTES:
                log.warning(
                    "not writing the prepared-layout cache: it needs %.1f GB and %s has %.1f GB free",
                    size / 1e9, folder, free / 1e9,
                )
                return None
            temporary = folder / f"{self.path.name}.tmp-{os.getpid()}"
            with temporary.open("w+b") as handle:
                handle.truncate(size)  # sparse until written
                handle.write(header)
                mapped = mmap.mmap(handle.fileno(), size)  # shared: writes go to the file
        except (OSError, ValueError) as exc:
            log.info("not writing the prepared-layout cache in %s (%s)", folder, exc)
            return None
        log.info("writing the prepared-layout cache %s (%.1f GB, once)", self.path, size / 1e9)
        written = _prepared_views(torch.frombuffer(mapped, dtype=torch.uint8), self.slots, packed, len(header))
        return CacheWriter(self, temporary, written)


class CacheWriter:
    def __init__(self, cache: PreparedCache, temporary: Path, written: PreparedTensors) -> None:
        self.cache, self.temporary = cache, temporary
        self.tensors, self.packed = written.tensors, written.packed

    def commit(self) -> PreparedTensors | None:
        """Flushes the file to disk, gives it its real name and returns read maps of it (None on failure).

        The writable shared map is dropped: a stray in-place write to a weight must not reach the cache.
        """
        self.tensors, self.packed = {}, {}
        try:
            with self.temporary.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(self.temporary, self.cache.path)
        except OSError as exc:
            log.warning("could not finish the prepared-layout cache %s (%s)", self.cache.path, exc)
            self.abort()
            return None
        return self.cache.open()

    def abort(self) -> None:
        self.tensors, self.packed = {}, {}
        self.temporary.unlink(missing_ok=True)


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporary files of writers that died (their process is gone) are removed."""
    for path in folder.glob("*.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
