"""The loader's side of weight-only storage (`--quantize`, dsocr_torch/weight_only.py): the prepared-layout slots
of stored experts and int8 scales, and the kernels compiled and checked once the weights are in place."""

from __future__ import annotations

import torch

from dsocr_torch import weight_only
from dsocr_torch.model import DeepseekOCRForCausalLM
from dsocr_torch.moe import StoredExperts

SCALES = "#scales"  # the slot of an int8 weight's per-channel scales: its name + this


def stored_expert_specs(
    name: str, shapes: tuple[tuple[int, ...], ...], storage: torch.dtype
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Prepared slots of one MoE layer's weight-only experts (see moe.StoredExperts)."""
    gate_up, gate_up_scales, down, down_scales = shapes
    specs = [(f"{name}.gate_up_stored", storage, gate_up), (f"{name}.down_stored", storage, down)]
    if storage == torch.int8:
        specs += [(f"{name}.gate_up_stored{SCALES}", torch.float32, gate_up_scales),
                  (f"{name}.down_stored{SCALES}", torch.float32, down_scales)]
    return specs


def stored_experts(tensors: dict[str, torch.Tensor], name: str) -> StoredExperts:
    return StoredExperts(
        tensors[f"{name}.gate_up_stored"], tensors.get(f"{name}.gate_up_stored{SCALES}"),
        tensors[f"{name}.down_stored"], tensors.get(f"{name}.down_stored{SCALES}"),
    )


def prepare_kernels(model: DeepseekOCRForCausalLM) -> None:
    """Compiles and checks the row products of every weight-only shape, and a token's fused experts, now: not in
    a first request."""
    weights: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for linear in model.decode_linears().values():
        if linear.stored is not None:
            weights.setdefault((tuple(linear.stored.shape), linear.stored_scales is None),
                               (linear.stored, linear.stored_scales))
    for _, moe in model.moe_layers():
        if moe.stored is not None:
            gate_up, gate_up_scales, down, down_scales = moe.stored.expert(0)
            for weight, scales in ((gate_up, gate_up_scales), (down, down_scales)):
                weights.setdefault((tuple(weight.shape), scales is None), (weight, scales))
    # A token's experts run in one fused call where that is faster: compiled for the first MoE layer's shapes.
    first = next((moe for _, moe in model.moe_layers() if moe.stored is not None), None)
    experts, inter, stacks = [], 0, None
    if first is not None and first.stored is not None:
        experts = [first.stored.expert(e) for e in range(min(first.top_k, first.stored.gate_up.shape[0]))]
        inter, stacks = first.intermediate, first.stored.stacks()
    weight_only.prepare_kernels(list(weights.values()), experts, inter, stacks)
