"""Vision towers stored in bfloat16 and computed in float32 (`--quantize` on a CPU without native bfloat16):
each block's float32 copies exist only while it runs.

The copies are made into a buffer kept per thread (a stack: a unit may run inside its parent's), not into fresh
allocations: a new block of tens of MB is new pages to the kernel, and faulting them in on every view cost more
than the copies themselves.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import torch
from torch import nn

_UNIT_BYTES = 64 << 20  # the most float32 copies one hook makes at a time
_ARENA_BYTES = _UNIT_BYTES + (16 << 20)  # a unit, and its parents' own small parameters
_ALIGN = 64

_arenas = threading.local()


def _arena() -> torch.Tensor:
    arena = getattr(_arenas, "buffer", None)
    if arena is None:
        arena = _arenas.buffer = torch.empty(_ARENA_BYTES, dtype=torch.uint8)
        _arenas.top = 0
    return arena


def _copy_in_arena(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`param` as `dtype`, in this thread's buffer where it fits (else a fresh copy)."""
    arena = _arena()
    start = _arenas.top
    size = param.numel() * dtype.itemsize
    if start + size > arena.numel():
        return param.to(dtype)
    _arenas.top = start + (size + _ALIGN - 1) // _ALIGN * _ALIGN
    return arena[start : start + size].view(dtype).view(param.shape).copy_(param)


def upcast_while_running(module: nn.Module, dtype: torch.dtype) -> int:
    """Leaves `module`'s parameters stored as they are (bf16 of a bf16 checkpoint, mapped) and gives its forward
    `dtype` copies, made on entry and dropped on exit of units of at most ~64 MB: a transformer block, or a
    small module with its parent's own parameters. Returns how many modules were hooked."""
    hooked = 0
    for unit, owners in _units(module):
        unit.register_forward_pre_hook(functools.partial(_upcast, owners, dtype))
        unit.register_forward_hook(functools.partial(_restore, owners), always_call=True)
        hooked += 1
    return hooked


def _float_bytes(module: nn.Module) -> int:
    return sum(p.numel() * 4 for p in module.parameters())


def _units(module: nn.Module) -> list[tuple[nn.Module, list[nn.Module]]]:
    """(the module whose call is hooked, the modules whose own parameters it upcasts) for `module`'s subtree."""
    containers = (nn.ModuleList, nn.ModuleDict)  # never called: their members are hooked one by one
    if not isinstance(module, containers) and _float_bytes(module) <= _UNIT_BYTES:
        return [(module, list(module.modules()))]
    units: list[tuple[nn.Module, list[nn.Module]]] = []
    owners = [module]
    for child in module.children():
        if isinstance(module, containers) or isinstance(child, containers) or _float_bytes(child) > _UNIT_BYTES:
            units += _units(child)
        else:  # small: upcast with its parent, which may read its weights without calling it
            owners += list(child.modules())
    if not isinstance(module, containers):
        units.append((module, owners))
    return units


def _upcast(owners: list[nn.Module], dtype: torch.dtype, module: nn.Module, args: Any) -> None:
    _arena()
    module.__dict__.setdefault("_arena_marks", []).append(_arenas.top)  # where this unit's copies start
    for owner in owners:
        saved = owner.__dict__.setdefault("_stored_parameters", {})
        for name, param in owner._parameters.items():
            if param is not None and param.is_floating_point() and param.dtype != dtype and name not in saved:
                saved[name] = param
                owner._parameters[name] = _copy_in_arena(param, dtype)


def _restore(owners: list[nn.Module], module: nn.Module, args: Any, output: Any) -> Any:
    for owner in owners:
        saved = owner.__dict__.get("_stored_parameters", {})
        owner._parameters.update(saved)
        saved.clear()
    marks = module.__dict__.get("_arena_marks")
    if marks:  # the buffer from here on is free for the next unit
        _arenas.top = marks.pop()
    # An output that is (a view of) a copy would be overwritten by the next unit: it leaves as its own tensor.
    storage = _arena().untyped_storage().data_ptr()

    def own(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() == storage:
            return value.clone()
        if isinstance(value, tuple | list):
            items = [own(item) for item in value]
            if all(new is old for new, old in zip(items, value, strict=True)):
                return value
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        return value

    return own(output)
