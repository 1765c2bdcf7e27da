"""A decode step's kernels in C (dsocr_torch/csrc/decode_step.c), for x86-64 CPUs with AVX2: the weight-only
products and the attention of one query per sequence over its KV cache.

Inductor's code for the products (dsocr_torch/aot.py) reads weights well below the rate memory delivers them on
AVX2; a hand-written loop that widens eight weights at a time and walks each thread's rows in address order
keeps up with memory, and one call can run a token's routed experts, which saves a call per expert and
projection. torch's attention for a single query reads a cold cache at a fraction of that rate. The file is
compiled once per machine with the system's C compiler into the kernel folder (aot.kernel_folder) and loaded
with ctypes, which releases the GIL during a call. Where there is no AVX2, no compiler or no OpenMP, `library()`
is None: Inductor's kernels and torch's attention serve.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

from dsocr_torch.aot import kernel_folder, writable_folder

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "decode_step.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 120  # a load waits for it: a compiler that hangs must not hang the load

_lock = threading.Lock()
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "dsocr_row_product_int8": [_P, _P, _P, _P, _I64, _I64, _INT],
    "dsocr_row_product_bf16": [_P, _P, _P, _I64, _I64, _INT],
    "dsocr_experts_int8": [_P, _P, _P, _I64, _P, _P, _P, _P, _I64, _I64, _P, _P, _INT],
    "dsocr_experts_bf16": [_P, _P, _P, _I64, _P, _P, _P, _P, _I64, _I64, _P, _P, _INT],
    "dsocr_decode_attention": [_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, _P, _P,
                               _INT],
}


def _cpu_has_avx2_fma() -> bool:
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    # torch's own dispatch level too: ATEN_CPU_CAPABILITY=default asks for no vector code.
    return {"avx2", "fma"} <= set(flags) and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _build(path: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc; set CC)")
    partial = path.with_name(f".partial-{os.getpid()}-{path.name}")
    try:
        try:
            done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial)], capture_output=True,
                                  text=True, timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{compiler} took over {COMPILE_TIMEOUT_S} s") from exc
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None where they cannot serve (a warning says why once)."""
    if not _cpu_has_avx2_fma():
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + repr(FLAGS).encode()).hexdigest()[:16]
    with _lock:
        try:
            path = writable_folder(kernel_folder()) / f"decode_step-{digest}.so"
            if not path.exists():
                log.info("compiling %s", SOURCE.name)
                _build(path)
            lib = ctypes.CDLL(str(path))
        except (OSError, RuntimeError) as exc:
            log.warning("the C decode kernels cannot be built (%s); torch's attention and Inductor's products "
                        "serve, a slower decode", exc)
            return None
    for name, argtypes in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, None
    return lib


def row_product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """x [in] float32 (contiguous), weight [out, in] int8 (with scales [out]) or bfloat16, contiguous -> [out]."""
    lib = library()
    assert lib is not None
    rows, width = weight.shape
    out = torch.empty(rows, dtype=torch.float32)
    threads = torch.get_num_threads()
    if scales is None:
        lib.dsocr_row_product_bf16(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, width, threads)
    else:
        lib.dsocr_row_product_int8(x.data_ptr(), weight.data_ptr(), scales.data_ptr(), out.data_ptr(), rows, width,
                                   threads)
    return out


def experts(x: torch.Tensor, ids: torch.Tensor, routing: torch.Tensor, gate_up: torch.Tensor,
            gate_up_scales: torch.Tensor | None, down: torch.Tensor, down_scales: torch.Tensor | None) -> torch.Tensor:
    """One token x [hidden] float32 through its routed experts ids [k] (int64), weighted by routing [k] float32:
    gate_up [E, 2I, hidden] and down [E, hidden, I] contiguous stacks, int8 with their scales or bfloat16."""
    lib = library()
    assert lib is not None
    ids = ids.to(torch.int64)  # the C side reads int64
    k, (_, hidden, inter) = ids.shape[0], down.shape
    scratch = torch.empty(3 * k * inter, dtype=torch.float32)
    out = torch.empty(hidden, dtype=torch.float32)
    function = lib.dsocr_experts_bf16 if gate_up_scales is None else lib.dsocr_experts_int8
    function(x.data_ptr(), ids.data_ptr(), routing.data_ptr(), k, gate_up.data_ptr(),
             None if gate_up_scales is None else gate_up_scales.data_ptr(), down.data_ptr(),
             None if down_scales is None else down_scales.data_ptr(), hidden, inter, scratch.data_ptr(),
             out.data_ptr(), torch.get_num_threads())
    return out


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                     kv_length: int) -> torch.Tensor:
    """softmax(q k / sqrt(d)) v for one query per lane: q [B, heads, 1, d] float32; keys and values a layer's
    float32 cache [lanes, kv_heads, capacity, d] (positions contiguous); lane b attends to its first lengths[b]
    positions, none past kv_length. -> [B, heads, 1, d]."""
    lib = library()
    assert lib is not None
    bsz, heads, _, dim = q.shape
    q = q.contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    scratch = torch.empty(bsz * heads * kv_length, dtype=torch.float32)
    lib.dsocr_decode_attention(q.data_ptr(), keys.data_ptr(), values.data_ptr(), lengths.data_ptr(), bsz, heads,
                               keys.shape[1], dim, keys.stride(0), keys.stride(1), kv_length, dim**-0.5,
                               scratch.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


def decode_attention_serves(keys: torch.Tensor) -> bool:
    """Whether decode_attention can read this cache layer: float32 on the CPU, positions and features contiguous."""
    return (keys.device.type == "cpu" and keys.dtype == torch.float32 and keys.dim() == 4
            and keys.stride(3) == 1 and keys.stride(2) == keys.shape[3] and library() is not None)
