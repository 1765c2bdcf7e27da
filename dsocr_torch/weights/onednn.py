"""oneDNN on the CPU: `linear` on plain weights, oneDNN-packed bfloat16 weights, and packed weights that live in
a file mapping.

`linear` is oneDNN's product where it has one for the dtype: F.linear ends a one-row float32 product in a
single-threaded MKL sgemv, and multiplies the few rows one expert gets from a prompt chunk well below oneDNN's
rate (an expert's weight may be a transposed view: oneDNN takes any strides).

A packed weight is an opaque oneDNN tensor (layout torch._mkldnn) holding the weight in the blocked layout
oneDNN's one-row products read fastest. Packing writes a fresh copy, and fresh memory costs more than the
copy itself (every new page is a fault), so the prepared-layout cache keeps the packed bytes on disk and a
later load wraps the mapped bytes as packed tensors without packing anything.

torch has no Python constructor for a oneDNN tensor over existing memory; its AOTInductor C shim does (a
stable C ABI, `aoti_torch_create_tensor_from_blob_v2`, which rebuilds the tensor from oneDNN's serialized
layout description). `MappedPacking` binds it with ctypes and reports itself unavailable where any piece is
missing, in which case weights are packed on every load as before.

The blocked layout depends on the CPU's instruction sets and the oneDNN version, so `packing_fingerprint`
goes into the cache's key, and `MappedPacking.matches` re-packs one weight at load and compares.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from dsocr_torch.weights.checkpoint import bytes_at

log = logging.getLogger(__name__)

ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_BF16 = ONEDNN_LINEAR and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def linear_is_fast(dtype: torch.dtype) -> bool:
    """Whether `linear` runs oneDNN for this dtype on the CPU."""
    return ONEDNN_LINEAR and (dtype == torch.float32 or (dtype == torch.bfloat16 and ONEDNN_BF16))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), by oneDNN for float32 (and bfloat16 where the CPU has it) on the CPU."""
    if (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == weight.dtype
        and linear_is_fast(x.dtype)
        and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] bfloat16 CPU weight in oneDNN's blocked layout for one-row products (a new tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # 1: tuned for one row


def packed_metadata(packed: torch.Tensor) -> bytes:
    """oneDNN's serialized description of a packed tensor's layout (what rebuilds it over other memory)."""
    return bytes(torch.ops.mkldnn._get_mkldnn_serialized_md(packed).numpy())


def packed_memory(packed: torch.Tensor) -> torch.Tensor:
    """The packed tensor's bytes as a uint8 tensor (a view: valid while `packed` lives)."""
    return bytes_at(int(torch.ops.mkldnn.data_ptr(packed)), int(torch.ops.mkldnn._nbytes(packed)))


@functools.cache
def packing_fingerprint() -> str:
    """What decides oneDNN's blocked layout here: torch and oneDNN versions, the CPU and its capabilities."""
    parts = [torch.__version__, platform.machine(), torch.backends.cpu.get_cpu_capability()]
    parts += [line.strip() for line in torch.__config__.show().splitlines() if "DNN" in line]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("vendor_id", "model name", "flags", "Features", "CPU part")):
                parts.append(line)
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        parts.append(platform.processor())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class MappedPacking:
    """Builds packed tensors over existing memory through the AOTInductor C shim."""

    def __init__(self) -> None:
        library = _torch_cpu_library()
        self._create = library.aoti_torch_create_tensor_from_blob_v2
        self._create.restype = ctypes.c_int32
        self._create.argtypes = [
            ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64),
            ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_int32, ctypes.c_char_p, ctypes.c_int64,
        ]
        self._layout = _shim_constant(library, "aoti_torch_layout__mkldnn")
        self._cpu = _shim_constant(library, "aoti_torch_device_type_cpu")
        self._dtypes = {torch.bfloat16: _shim_constant(library, "aoti_torch_dtype_bfloat16")}
        self._steal = torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr
        self._capsule = ctypes.pythonapi.PyCapsule_New
        self._capsule.restype = ctypes.py_object
        self._capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

    def wrap(self, memory: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, metadata: bytes) -> torch.Tensor:
        """A packed tensor whose bytes are `memory` (uint8, not copied: keep it alive as long as the result)."""
        sizes = (ctypes.c_int64 * len(shape))(*shape)
        strides = (ctypes.c_int64 * len(shape))(*torch.empty(shape, device="meta").stride())
        handle = ctypes.c_void_p()
        status = self._create(
            memory.data_ptr(), len(shape), sizes, strides, 0, self._dtypes[dtype], self._cpu, 0,
            ctypes.byref(handle), self._layout, metadata, len(metadata),
        )
        if status != 0 or not handle.value:
            raise RuntimeError(f"oneDNN tensor over mapped memory not created (status {status})")
        packed = self._steal(self._capsule(handle.value, None, None))
        if int(torch.ops.mkldnn._nbytes(packed)) != memory.numel():
            raise RuntimeError("oneDNN tensor over mapped memory has another size than its bytes")
        return packed

    def matches(self, weight: torch.Tensor, memory: torch.Tensor, metadata: bytes) -> bool:
        """Whether packing `weight` now gives the stored layout and bytes (same CPU path, same oneDNN)."""
        fresh = pack_linear_weight(weight)
        return packed_metadata(fresh) == metadata and torch.equal(packed_memory(fresh), memory)


@functools.cache
def mapped_packing() -> MappedPacking | None:
    """The shim binding, tried once on a small weight; None where this torch build lacks a piece of it or
    the rebuilt tensor does not compute what the packed one does."""
    if not sys.platform.startswith("linux"):
        return None  # packing is an x86/Linux oneDNN path; elsewhere weights are not packed at all
    try:
        binding = MappedPacking()
        weight = (torch.arange(48 * 40, dtype=torch.float32).reshape(48, 40) % 7 - 3).to(torch.bfloat16)
        packed = pack_linear_weight(weight)
        memory = packed_memory(packed).clone()
        rebuilt = binding.wrap(memory, (48, 40), torch.bfloat16, packed_metadata(packed))
        x = torch.linspace(-1, 1, 40).to(torch.bfloat16)[None]
        expected = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        if not torch.equal(torch.ops.mkldnn._linear_pointwise(x, rebuilt, None, "none", [], ""), expected):
            raise RuntimeError("a rebuilt packed weight computes something else")
        del rebuilt  # before `memory`, which it does not own
        return binding
    except Exception as exc:  # any missing or changed piece of a private torch API means: pack on every load
        log.info("packed weights cannot be mapped from the cache (%s); they are packed on every load", exc)
        return None


def _torch_cpu_library() -> ctypes.CDLL:
    folder = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        if (folder / name).is_file():
            return ctypes.CDLL(str(folder / name))
    raise OSError(f"no libtorch_cpu in {folder}")


def _shim_constant(library: ctypes.CDLL, name: str) -> int:
    function = getattr(library, name)
    function.restype = ctypes.c_int32
    return int(function())
