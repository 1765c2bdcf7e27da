"""Safetensors checkpoints as memory maps: the index of a one-file or sharded checkpoint, zero-copy tensor views.

A view of a mapped file costs no memory of its own: its pages are the page cache's, shared with every other
process that reads the file, and are mapped in on first touch. Tensors that are only a source (copied,
converted or packed elsewhere) are released after use, so their pages stop counting in this process's
resident memory.

Written here rather than with safetensors' own loader: loading needs zero-copy views into one shared mapping per
file that it can prefetch and release tensor by tensor (madvise), which safetensors does not expose; the format
is a JSON header and raw little-endian buffers, so the index is a few lines.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import mmap
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import CheckpointError, ModelNotFoundError
from common.memory import glibc

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
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
_PAGE = mmap.PAGESIZE



def bytes_at(address: int, nbytes: int) -> torch.Tensor:
    """A uint8 tensor over `nbytes` of existing memory at `address`: not owned, valid while its owner lives."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8)

@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _read_header(path: Path) -> tuple[dict[str, TensorEntry], bytes]:
    """The file's tensors and its raw header bytes (part of the checkpoint's fingerprint)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file")
            raw = f.read(header_len)
            header = json.loads(raw)
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (the header is not an object)")
    base = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
        dtype = SAFETENSORS_DTYPES[dtype_name]
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)}")
        if base + end > size:
            raise CheckpointError(
                f"{path}: file is truncated (tensor {name!r} lies past its end; a download was interrupted?)"
            )
        entries[name] = TensorEntry(path, dtype, shape, base + begin, base + end)
    return entries, raw


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of `model.safetensors` or an index + shards, in a stable order."""
    index = model_dir / INDEX_FILE
    single = model_dir / SINGLE_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        for shard in shards:
            if not (model_dir / shard).is_file():
                raise CheckpointError(f"{index}: shard {shard} is missing from {model_dir}")
        return [model_dir / shard for shard in shards]
    if single.is_file():
        return [single]
    raise ModelNotFoundError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}; is this a DeepSeek-OCR model folder?")


@dataclass
class Checkpoint:
    """name -> where the tensor lives, plus each file's header (for fingerprints)."""

    entries: dict[str, TensorEntry]
    headers: dict[Path, bytes]

    @classmethod
    def open(cls, model_dir: Path) -> Checkpoint:
        entries: dict[str, TensorEntry] = {}
        headers: dict[Path, bytes] = {}
        for file in checkpoint_files(model_dir):
            found, headers[file] = _read_header(file)
            for name, entry in found.items():
                if name in entries:
                    raise CheckpointError(f"{model_dir}: tensor {name!r} appears in more than one shard")
                entries[name] = entry
        return cls(entries, headers)


def checkpoint_index(model_dir: Path) -> dict[str, TensorEntry]:
    """name -> where the tensor lives, for `model.safetensors` or an index + shards."""
    return Checkpoint.open(model_dir).entries


class MappedFiles:
    """Private (copy-on-write) read maps of checkpoint files, opened on first use.

    The maps live as long as a tensor viewing them does; dropping this object only drops its references.
    """

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()  # the loader's worker threads map files too

    def _map(self, file: Path) -> mmap.mmap:
        with self._lock:
            mapped = self._maps.get(file)
            if mapped is None:
                try:
                    with file.open("rb") as handle:
                        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
                except (OSError, ValueError) as exc:
                    raise CheckpointError(f"{file}: cannot map the file ({exc})") from None
                self._maps[file] = mapped
            return mapped

    def view(self, entry: TensorEntry) -> torch.Tensor:
        """The tensor as stored in the file, without a copy."""
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        raw = torch.frombuffer(self._map(entry.file), dtype=torch.uint8, count=entry.nbytes, offset=entry.begin)
        return raw.view(entry.dtype).view(entry.shape)

    def _advise(self, entry: TensorEntry, advice: int, whole_pages_only: bool) -> None:
        if not hasattr(mmap.mmap, "madvise") or entry.nbytes == 0:
            return
        if whole_pages_only:  # never touch a page shared with a neighbouring tensor
            start, stop = -(-entry.begin // _PAGE) * _PAGE, entry.end // _PAGE * _PAGE
        else:
            start, stop = entry.begin // _PAGE * _PAGE, entry.end
        if stop > start:
            with contextlib.suppress(OSError):  # advice only
                self._map(entry.file).madvise(advice, start, stop - start)

    def prefetch(self, entry: TensorEntry) -> None:
        """Starts reading the tensor's pages from disk in the background (no-op when they are cached)."""
        if hasattr(mmap, "MADV_WILLNEED"):
            self._advise(entry, mmap.MADV_WILLNEED, whole_pages_only=False)

    def release(self, entry: TensorEntry) -> None:
        """Unmaps the pages of a tensor that was only a source; the file's page cache keeps them."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._advise(entry, mmap.MADV_DONTNEED, whole_pages_only=True)


def aligned(entry: TensorEntry) -> bool:
    """Whether a view of the tensor is aligned to its element size (safetensors only promises 8-byte headers)."""
    return entry.begin % entry.dtype.itemsize == 0


def file_fingerprint(file: Path) -> list[object]:
    """What identifies a file's contents cheaply: its resolved name (a Hub blob is named by its sha256), size
    and modification time."""
    stat = file.stat()
    return [os.path.realpath(file).rsplit(os.sep, 1)[-1], file.name, stat.st_size, stat.st_mtime_ns]


_MADV_POPULATE_READ = 22  # Linux 5.14+: fill the page tables of a range from the page cache in one call


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    libc = glibc()  # by address, and without holding the GIL (mmap.madvise holds it and takes a map object)
    if libc is None:
        return None
    function = libc.madvise
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return function


def map_in(tensor: torch.Tensor) -> None:
    """Maps the pages under a memory-mapped tensor into this process now, so a request does not take a page
    fault per page later: the kernel fills the page tables in one call where it can, else a read per page."""
    if tensor.numel() == 0:
        return
    madvise = _madvise()
    start = tensor.data_ptr() // _PAGE * _PAGE
    stop = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    if madvise is not None and madvise(start, stop - start, _MADV_POPULATE_READ) == 0:
        return
    tensor.reshape(-1).view(torch.uint8)[::_PAGE].sum()  # older kernels, other systems
