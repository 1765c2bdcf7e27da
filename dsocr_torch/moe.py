"""DeepSeek-MoE feed-forward: softmax-gated top-k routed experts plus shared experts.

The routed experts' weights are stacked into [E, ...] tensors (`bind_stacked_experts`) that the per-expert Linear
weights are views of, so there is one copy in memory. Nothing in a decode step reads a value back to the host: the
dispatch uses static-shape index tensors and either one grouped matmul per projection (prompt chunks, and every
step on CUDA) or, for a decode batch on the CPU, embedding bags over exactly the chosen experts' weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from common.engine.backend import Trace
from common.model.config import LanguageConfig
from dsocr_torch.language import MLP
from dsocr_torch.weight_only import ROW_KERNEL_MAX_ROWS, ROW_KERNELS, standalone, upcast_linear
from dsocr_torch.weights import onednn


class MoEGate(nn.Module):
    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (expert ids [N, k] int64, float32 weights [N, k])."""
        scores = F.linear(x.float(), self.weight.float()).softmax(dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.routed_scaling_factor


def _grouped_mm_works(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped matmul runs for this device/dtype/shape (CPU: any dtype; CUDA: bf16, sm80+)."""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        probe_x = torch.zeros(2, weight.shape[1], device=x.device, dtype=x.dtype)
        offs = torch.full((weight.shape[0],), 2, device=x.device, dtype=torch.int32)
        offs[0] = 1
        F.grouped_mm(probe_x, weight, offs=offs)
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


class StoredExperts:
    """Weight-only routed experts (`--quantize`), output-major as in the checkpoint: gate_up [E, 2I, hidden]
    (gate rows, then up rows), down [E, hidden, I], bf16 or int8; the scales of int8 ([E, 2I], [E, hidden]).
    `expert(e)` gives expert e's four tensors each over memory of its own (weight_only.standalone)."""

    def __init__(self, gate_up: torch.Tensor, gate_up_scales: torch.Tensor | None, down: torch.Tensor,
                 down_scales: torch.Tensor | None) -> None:
        self.gate_up, self.gate_up_scales, self.down, self.down_scales = gate_up, gate_up_scales, down, down_scales
        self._experts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]] = []

    def stacks(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        return self.gate_up, self.gate_up_scales, self.down, self.down_scales

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(gate_up [2I, hidden], its scales, down [hidden, I], its scales) of expert `e`."""
        if not self._experts:
            def own(stack: torch.Tensor | None, i: int) -> torch.Tensor | None:
                return None if stack is None else standalone(stack[i])

            self._experts = [
                (own(self.gate_up, i), own(self.gate_up_scales, i), own(self.down, i), own(self.down_scales, i))
                for i in range(self.gate_up.shape[0])
            ]
        return self._experts[e]  # type: ignore[return-value]


# Up to this many tokens (a decode batch) the CPU MoE uses embedding bags; a prompt chunk uses grouped matmuls.
EMBEDDING_BAG_MAX_TOKENS = 64


class MoEFeedForward(nn.Module):
    """Softmax-gated top-k routed experts plus the shared experts (one MLP of n_shared * moe_intermediate)."""

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.num_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.intermediate = cfg.moe_intermediate_size
        self.gate = MoEGate(cfg)
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts)
        )
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )
        # Stacked expert weights, set by bind_stacked_experts. Memory is input-major: gate_up_by_input
        # [E, hidden, 2I] (gate | up columns) and down_by_input [E, I, hidden], i.e. each expert's Linear weight
        # transposed: input-major rows are what the decode path's embedding bag gathers and what grouped_mm
        # takes as its [K, N] operand. gate_up_stacked [E, 2I, hidden] and down_stacked [E, hidden, I] are the
        # same memory in the checkpoint's (output, input) orientation.
        self.gate_up_by_input: torch.Tensor | None = None
        self.down_by_input: torch.Tensor | None = None
        self.gate_up_stacked: torch.Tensor | None = None
        self.down_stacked: torch.Tensor | None = None
        self.stored: StoredExperts | None = None  # set by bind_stored_experts instead of the stacks
        self._use_grouped_mm: bool | None = None
        self._expert_range: torch.Tensor | None = None
        self._bag_ranges: dict[tuple[torch.device, int, int], torch.Tensor] = {}

    def stack_shapes(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Shapes of gate_up_by_input [E, hidden, 2I] and down_by_input [E, I, hidden]."""
        n, inter, hidden = self.num_experts, self.intermediate, self.experts[0].gate_proj.in_features
        return (n, hidden, 2 * inter), (n, inter, hidden)

    def expert_weight_views(self, gate_up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        """'<e>.<gate|up|down>_proj' -> expert e's weight, (output, input) as in the checkpoint, viewing the stacks
        `gate_up` (a gate_up_by_input) and `down` (a down_by_input)."""
        gate_up, down, inter = gate_up.transpose(1, 2), down.transpose(1, 2), self.intermediate
        views = {}
        parts = (gate_up[:, :inter].unbind(0), gate_up[:, inter:].unbind(0), down.unbind(0))
        for i, (gate, up, down_i) in enumerate(zip(*parts, strict=True)):
            views[f"{i}.gate_proj"], views[f"{i}.up_proj"], views[f"{i}.down_proj"] = gate, up, down_i
        return views

    def stored_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Shapes of StoredExperts' gate_up, gate_up_scales, down and down_scales."""
        n, inter, hidden = self.num_experts, self.intermediate, self.experts[0].gate_proj.in_features
        return (n, 2 * inter, hidden), (n, 2 * inter), (n, hidden, inter), (n, hidden)

    def stored_expert_views(self, stored: StoredExperts) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """'<e>.<gate|up|down>_proj' -> (expert e's weight [out, in], its scales [out] or None) in `stored`."""
        inter, views = self.intermediate, {}
        gate_up_scales, down_scales = stored.gate_up_scales, stored.down_scales
        for i in range(self.num_experts):
            parts = {
                "gate_proj": (stored.gate_up[i, :inter], None if gate_up_scales is None else gate_up_scales[i, :inter]),
                "up_proj": (stored.gate_up[i, inter:], None if gate_up_scales is None else gate_up_scales[i, inter:]),
                "down_proj": (stored.down[i], None if down_scales is None else down_scales[i]),
            }
            views.update((f"{i}.{proj}", value) for proj, value in parts.items())
        return views

    def bind_stored_experts(self, stored: StoredExperts) -> None:
        """Routes through weight-only experts (see StoredExperts); the per-expert Linear weights stay meta."""
        shapes = self.stored_shapes()
        found = (stored.gate_up, stored.gate_up_scales, stored.down, stored.down_scales)
        for tensor, shape in zip(found, shapes, strict=True):
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ValueError(f"stored experts {list(tensor.shape)}; this layer needs {list(shape)}")
        self.stored = stored

    def bind_stacked_experts(
        self, device: torch.device | str, dtype: torch.dtype, storage: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        """Binds the stacked expert tensors and rebinds every expert Linear weight to a view of them.

        `storage` is (gate_up_by_input, down_by_input), e.g. the loader's filled stacks; without it they are
        allocated here, uninitialised, for a loader to copy each checkpoint tensor into its (transposed) slice.
        Either way the weights exist once and are stacked without a copy.
        """
        shapes = self.stack_shapes()
        if storage is None:
            storage = (torch.empty(shapes[0], device=device, dtype=dtype), torch.empty(shapes[1], device=device,
                                                                                      dtype=dtype))
        if (tuple(storage[0].shape), tuple(storage[1].shape)) != shapes:
            raise ValueError(f"expert stacks {[list(t.shape) for t in storage]}; this layer needs {shapes}")
        self.gate_up_by_input, self.down_by_input = storage
        self.gate_up_stacked = self.gate_up_by_input.transpose(1, 2)
        self.down_stacked = self.down_by_input.transpose(1, 2)
        for name, view in self.expert_weight_views(*storage).items():
            index, proj = name.split(".")
            # Straight into _parameters: Module.__setattr__ costs more than the view, thousands of times a load.
            getattr(self.experts[int(index)], proj)._parameters["weight"] = nn.Parameter(view, requires_grad=False)
        self._use_grouped_mm = None
        self._bag_ranges = {}

    def forward(self, x: torch.Tensor, trace: Trace | None = None, layer_idx: int = -1) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        ids, weights = self.gate(flat)
        if trace is not None:  # the router's choice per token, [tokens, k], by layer
            trace.setdefault("topk_idx", {})[layer_idx] = ids
            trace.setdefault("topk_weight", {})[layer_idx] = weights
        routed = self._routed(flat, ids, weights)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(flat)
        return routed.view(shape)

    def _routed(self, flat: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.stored is not None:
            return self._routed_stored(self.stored, flat, ids, weights)
        if self.gate_up_by_input is None or self.down_by_input is None:
            raise RuntimeError("MoE experts are not stacked: call bind_stacked_experts (the loader does)")
        n_tokens, hidden = flat.shape
        if flat.device.type == "cpu" and n_tokens <= EMBEDDING_BAG_MAX_TOKENS:
            # Decode on CPU (one token per sequence of the batch): read exactly the chosen experts' weights with
            # an embedding bag per (token, expert) pair, faster than grouped_mm, whose CPU fallback is a loop of
            # per-expert mm calls over all experts that reorders each bf16 weight on every call.
            out = self._routed_embedding_bag(flat, ids)
            return self._combine(out.view(n_tokens, self.top_k, hidden), weights, flat.dtype)
        gate_up_by_input, down_by_input = self.gate_up_by_input, self.down_by_input
        if flat.device.type == "cpu" and onednn.linear_is_fast(flat.dtype):
            # A prompt chunk on the CPU: oneDNN per used expert on its slice of the stacks (a transposed view), well
            # over the rate of the grouped matmul's CPU fallback on the few rows each expert gets.
            return self._routed_by_expert(
                flat, ids, weights,
                lambda e, rows: onednn.linear(rows, gate_up_by_input[e].t()),
                lambda e, rows: onednn.linear(rows, down_by_input[e].t()),
            )
        if self._use_grouped_mm is None:
            # Both products: grouped_mm needs 16-byte row strides, which an odd expert width can break in one only.
            self._use_grouped_mm = _grouped_mm_works(flat, gate_up_by_input) and _grouped_mm_works(flat, down_by_input)
        if not self._use_grouped_mm and n_tokens > 4:
            # Fallback for a prefill (e.g. float32 on CUDA): a matmul per used expert.
            return self._routed_by_expert(
                flat, ids, weights, lambda e, rows: rows @ gate_up_by_input[e], lambda e, rows: rows @ down_by_input[e]
            )
        flat_ids = ids.reshape(-1)
        # Sort the (token, slot) pairs by expert; all shapes are static (n_tokens * k rows).
        order = torch.argsort(flat_ids, stable=True)
        sorted_ids = flat_ids[order]
        rows = flat[order // self.top_k]
        if self._use_grouped_mm:
            # offs[e] = rows routed to experts <= e (sorted_ids is sorted, so a searchsorted gives it).
            offs = torch.searchsorted(sorted_ids, self._expert_ids(flat.device), right=True, out_int32=True)
            gate_up = F.grouped_mm(rows, gate_up_by_input, offs=offs)
            gate, up = gate_up.split(self.intermediate, dim=-1)
            out = F.grouped_mm(F.silu(gate) * up, down_by_input, offs=offs)
        else:
            # Fallback for a decode step (e.g. float32 on CUDA): gather each row's expert weights, batch-multiply.
            gate_up = torch.bmm(rows.unsqueeze(1), gate_up_by_input[sorted_ids]).squeeze(1)
            gate, up = gate_up.split(self.intermediate, dim=-1)
            out = torch.bmm((F.silu(gate) * up).unsqueeze(1), down_by_input[sorted_ids]).squeeze(1)
        # Back to (token, slot) order for the weighted sum over the k slots.
        unsorted = torch.empty_like(out).index_copy_(0, order, out).view(n_tokens, self.top_k, hidden)
        return self._combine(unsorted, weights, flat.dtype)

    def _routed_stored(
        self, stored: StoredExperts, flat: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Weight-only experts, in float32: a row product per (token, expert) for a decode step; for a prompt
        chunk the (token, slot) pairs sorted by expert and each used expert's weights upcast once."""
        n_tokens, hidden = flat.shape
        inter, rows32 = self.intermediate, flat.float()
        if n_tokens <= ROW_KERNEL_MAX_ROWS:
            routing, stacks = weights.float(), stored.stacks()
            out = torch.stack([
                ROW_KERNELS.token_experts(rows32[token], ids[token], routing[token], stacks, stored.expert, inter)
                for token in range(n_tokens)
            ])
            return out.to(flat.dtype)
        return self._routed_by_expert(
            rows32, ids, weights,
            lambda e, rows: upcast_linear(rows, *stored.expert(e)[:2]),  # gate_up and its scales
            lambda e, rows: upcast_linear(rows, *stored.expert(e)[2:]),  # down and its scales
        ).to(flat.dtype)

    def _routed_by_expert(
        self, flat: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
        gate_up: Callable[[int, torch.Tensor], torch.Tensor], down: Callable[[int, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The (token, slot) pairs sorted by expert, each used expert's rows through gate_up(e, rows) and
        down(e, rows) (one host read of the per-expert row counts: a CPU prompt chunk's)."""
        n_tokens, hidden = flat.shape
        flat_ids = ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        rows = flat[order // self.top_k]
        ends = torch.searchsorted(flat_ids[order], self._expert_ids(flat.device), right=True).tolist()
        out = torch.empty(rows.shape[0], hidden, device=flat.device, dtype=flat.dtype)
        begin = 0
        for e, end in enumerate(ends):
            if end > begin:
                gate, up = gate_up(e, rows[begin:end]).split(self.intermediate, -1)
                out[begin:end] = down(e, F.silu(gate) * up)
            begin = end
        unsorted = torch.empty_like(out).index_copy_(0, order, out).view(n_tokens, self.top_k, hidden)
        return self._combine(unsorted, weights, flat.dtype)

    @staticmethod
    def _combine(per_slot: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[N, k, hidden] expert outputs -> [N, hidden]: the weighted sum in float32, as the reference does."""
        return (per_slot.float() * weights.unsqueeze(-1)).sum(dim=1).to(dtype)

    def _routed_embedding_bag(self, flat: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Per-(token, slot) expert outputs [N * k, hidden] in (token, slot) order, static shapes only.

        A matrix-vector product y = W x equals a weighted sum of the rows of W^T with weights x: an embedding
        bag over the input-major stacked table whose bag r holds rows expert_r * in + (0..in-1). The bags read
        only the chosen experts' weights; no host read. With several tokens the pairs go in expert order, so
        the tokens that chose the same expert read its weights back to back (the second read comes from cache).
        """
        assert self.gate_up_by_input is not None and self.down_by_input is not None
        n_experts, hidden, width = self.gate_up_by_input.shape
        inter = self.intermediate
        n_rows = ids.numel()
        flat_ids = ids.reshape(-1)
        x_rows = flat.unsqueeze(1).expand(flat.shape[0], self.top_k, hidden).reshape(n_rows, hidden)
        order = None
        if flat.shape[0] > 1:
            order = torch.argsort(flat_ids, stable=True)
            flat_ids, x_rows = flat_ids[order], x_rows[order]
        flat_ids = flat_ids.view(-1, 1)
        gate_up = F.embedding_bag(
            (flat_ids * hidden + self._arange(flat.device, hidden)).view(-1),
            self.gate_up_by_input.view(n_experts * hidden, width),
            self._arange(flat.device, n_rows, hidden),
            mode="sum",
            per_sample_weights=x_rows.reshape(-1),
        )
        gate, up = gate_up.split(inter, dim=-1)
        act = F.silu(gate) * up
        out = F.embedding_bag(
            (flat_ids * inter + self._arange(flat.device, inter)).view(-1),
            self.down_by_input.view(n_experts * inter, hidden),
            self._arange(flat.device, n_rows, inter),
            mode="sum",
            per_sample_weights=act.reshape(-1),
        )
        if order is None:
            return out
        return torch.empty_like(out).index_copy_(0, order, out)

    def _arange(self, device: torch.device, size: int, step: int = 1) -> torch.Tensor:
        """arange(0, size * step, step) on `device`, cached: a decode step rebuilds none of its constant indices."""
        key = (device, size, step)
        cached = self._bag_ranges.get(key)
        if cached is None:
            cached = self._bag_ranges[key] = torch.arange(0, size * step, step, device=device)
        return cached

    def _expert_ids(self, device: torch.device) -> torch.Tensor:
        if self._expert_range is None or self._expert_range.device != device:
            self._expert_range = torch.arange(self.num_experts, device=device)
        return self._expert_range
