"""Weight-only storage for the decoder (`--quantize bf16|int8`): weights kept as bfloat16, or as int8 with one
float32 scale per output channel, and multiplied in float32.

A decode step reads every active weight once per token, so its time is the weights' bytes: half (bf16) or a
quarter (int8) of float32's. On a CPU without native bfloat16 (AVX2) torch has no product of float32
activations with such weights that runs at memory speed (its bf16 GEMV and its int8 weight-only kernel are
bound by arithmetic there), so a one-row product is a kernel of our own that widens the weights inside its
vectorised dot products: in C where the CPU has AVX2 (dsocr_torch/native.py, which also runs a token's routed
experts in one call), else a reduction compiled by Inductor's C++ backend (ahead of time, dsocr_torch/aot.py).
A product of many rows (a prompt chunk, a large decode batch) upcasts the weight and uses oneDNN's float32
product, whose arithmetic then dominates.

Inductor's kernel is compiled once per machine for each weight width (the reduction's length is static; the
number of rows is not: a model has a handful of widths). Every kernel is checked against the eager reference on
every weight shape at every load; where none can be compiled (no C or C++ compiler) or a check fails, the eager
reference is used and a warning says so. Inductor (torch 2.13) miscompiled other forms of this product: a
broadcast over several activation rows at once (hence one call per row), weights at a large offset into a
mapped file (hence `standalone`), and torch.compile's automatic dynamic shapes (wrong sums on AVX2,
out-of-bounds writes).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from common.engine.backend import QUANTIZE_CHOICES
from dsocr_torch import native
from dsocr_torch.aot import aot_kernel, compile_kernels, remember, remembered, signature
from dsocr_torch.weights import onednn
from dsocr_torch.weights.checkpoint import bytes_at

__all__ = ["QUANTIZE_CHOICES", "ROW_KERNELS", "dequantize", "quantize_int8", "weight_only_linear"]

log = logging.getLogger(__name__)

STORAGE_DTYPES = {"bf16": torch.bfloat16, "int8": torch.int8}
# Up to this many rows a product is one compiled row product per row; past it the weight is upcast once.
ROW_KERNEL_MAX_ROWS = 4
# A weight with more output rows (an LM head) is upcast this many rows at a time: a float32 copy of a whole LM
# head would be hundreds of MB.
UPCAST_BLOCK_ROWS = 4096


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] -> (int8 weight, float32 scales [..., out]): symmetric, one scale per output channel."""
    w = weight.float()
    scales = w.abs().amax(dim=-1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    quantized = torch.round(w / scales.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return quantized, scales


def dequantize(weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """The float32 weight a stored one stands for."""
    if scales is None:
        return weight.float()
    return weight.float() * scales.unsqueeze(-1)


def standalone(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory as a tensor whose storage starts at its first byte (the caller keeps `tensor` alive)."""
    if tensor.storage_offset() == 0 or tensor.numel() == 0:
        return tensor
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        return tensor.contiguous().clone()
    return bytes_at(tensor.data_ptr(), tensor.nbytes).view(tensor.dtype).view(tensor.shape)


def row_product_reference(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None, block: int = 4096
) -> torch.Tensor:
    """x [in] float32, weight [out, in] -> [out] float32: the eager reference, upcasting `block` rows at a time."""
    out = torch.cat([weight[i : i + block].float() @ x for i in range(0, weight.shape[0], block)])
    return out if scales is None else out * scales


def _row_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x.unsqueeze(0) * weight.float()).sum(-1)


def _row_product_scaled(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return (x.unsqueeze(0) * weight.float()).sum(-1) * scales


def _row_product_words(x_by_byte: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The int8 product read as int32 words: byte j of word k is input 4k + j, its value sign-extended by two
    shifts, so the kernel loads whole vectors (on AVX2 Inductor loads int8 a partial vector at a time).
    x_by_byte [4, in / 4] is x regrouped by byte position."""
    words = weight.view(torch.int32)
    total = ((words << 24) >> 24).float() * x_by_byte[0] + ((words << 16) >> 24).float() * x_by_byte[1]
    total = total + ((words << 8) >> 24).float() * x_by_byte[2] + (words >> 24).float() * x_by_byte[3]
    return total.sum(-1) * scales


def _product(form: str, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    if form == "plain":
        return _row_product(x, weight)
    if form == "plain_scaled":
        return _row_product_scaled(x, weight, scales)  # type: ignore[arg-type]
    return _row_product_words(x.view(-1, 4).t(), weight, scales)  # type: ignore[arg-type]


Expert = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]  # gate_up, scales, down, scales
# A MoE layer's stored stacks: gate_up [E, 2I, hidden], its scales [E, 2I], down [E, hidden, I], its scales [E, hidden]
Stacks = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]


def _experts(form: str, inter: int, x: torch.Tensor, routing: torch.Tensor, experts: list[Expert]) -> torch.Tensor:
    """One token through its k routed experts (SwiGLU each), summed with the router's weights: one call, so a
    decode step pays the call overhead once per layer instead of twice per expert."""
    total = torch.zeros_like(x)
    for j, (gate_up, gate_up_scales, down, down_scales) in enumerate(experts):
        both = _product(form, x, gate_up, gate_up_scales)
        act = F.silu(both[:inter]) * both[inter:]
        total = total + routing[j] * _product(form, act, down, down_scales)
    return total


def _flat_experts(experts: list[Expert]) -> list[torch.Tensor]:
    return [t for expert in experts for t in expert if t is not None]


def _experts_flat(form: str, inter: int, scaled: bool, x: torch.Tensor, routing: torch.Tensor,
                  *flat: torch.Tensor) -> torch.Tensor:
    """`_experts` with the experts' tensors as one flat list (what a compiled kernel takes)."""
    per = 4 if scaled else 2
    groups = [flat[i : i + per] for i in range(0, len(flat), per)]
    experts = [(g[0], g[1], g[2], g[3]) if scaled else (g[0], None, g[1], None) for g in groups]
    return _experts(form, inter, x, routing, experts)


_ROWS = (1, 2)  # a row product's weight and scales: any number of rows (output channels)
_KERNELS = {"plain": _row_product, "plain_scaled": _row_product_scaled, "words": _row_product_words}


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether a kernel's result is the reference's up to float32 summation order."""
    tolerance = 1e-4 * float(want.abs().max()) + 1e-5
    return got.shape == want.shape and float((got - want).abs().max()) <= tolerance


def _seconds(run: Any, repeat: int = 5) -> float:
    """The best of `repeat` timed calls of `run`."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


class RowKernels:
    """The row products, checked per weight shape: the C kernels (dsocr_torch/native.py) where the CPU has AVX2,
    else Inductor's, compiled ahead of time (dsocr_torch/aot.py). Of Inductor's, bfloat16 has one form; int8 has
    two (bytes, or int32 words), and the first int8 weight checked times both and keeps the faster for all (the
    choice is kept in the kernel folder: near-equal timings would otherwise flip it from one load to the next)."""

    def __init__(self) -> None:
        self._kernels: dict[tuple[str, torch.dtype, int], Callable[..., torch.Tensor]] = {}
        self._fused: dict[tuple[str, torch.dtype, tuple[int, ...], bool], Callable[..., torch.Tensor]] = {}
        # Whether the compiled kernel serves a weight shape: row products, a token's experts.
        self._checked: dict[tuple[torch.dtype, tuple[int, int], bool], bool] = {}
        self._experts_checked: dict[tuple[str, torch.dtype, tuple[int, ...], bool], bool] = {}
        self._native_experts_checked: dict[tuple[torch.dtype, tuple[int, ...], int], bool] = {}
        self._lock = threading.RLock()
        self.native: bool | None = None  # whether the C kernels serve; None: not asked yet
        self.int8_form: str | None = None  # Inductor's: "plain_scaled" or "words", chosen by measurement
        self.disabled_reason: str | None = None

    def _disable(self, reason: str) -> None:
        if self.disabled_reason is None:
            self.disabled_reason = reason
            log.warning("weight-only products use the eager upcast, which is slower: %s", reason)

    def uses_native(self) -> bool:
        """Whether the C kernels serve (built on first use, dsocr_torch/native.py)."""
        if self.native is None:
            self.native = native.library() is not None
        return self.native

    def _form(self, weight: torch.Tensor, scales: torch.Tensor | None) -> str:
        if self.uses_native() and weight.is_contiguous():
            return "native"
        if scales is None:
            return "plain"
        if weight.shape[-1] % 4 or self.int8_form is None:
            return "plain_scaled"
        return self.int8_form

    @staticmethod
    def _inputs(form: str, x: torch.Tensor, weight: torch.Tensor,
                scales: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        # A compiled kernel reads its inputs as contiguous (it is not told their strides): weights and scales are
        # (`standalone`), an activation row is made so.
        if form == "plain":
            return x.contiguous(), weight
        x = x.view(-1, 4).t().contiguous() if form == "words" else x.contiguous()
        return x, weight, scales  # type: ignore[return-value]

    @staticmethod
    def _row_spec(form: str, inputs: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
        """The row product's package (aot_kernel's arguments): one per form, dtype and width."""
        return _KERNELS[form], (), signature(inputs, _ROWS)

    @staticmethod
    def _fused_spec(form: str, inter: int, x: torch.Tensor, routing: torch.Tensor,
                    experts: list[Expert]) -> tuple[Any, ...]:
        """The package of a token's fused experts (aot_kernel's arguments)."""
        scaled = experts[0][1] is not None
        return _experts_flat, (form, inter, scaled), signature((x, routing, *_flat_experts(experts)))

    def _call(self, form: str, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        if form == "native":
            return native.row_product(x.contiguous(), weight, scales)
        inputs = self._inputs(form, x, weight, scales)
        key = (form, weight.dtype, weight.shape[-1])  # one kernel per width: its rows are dynamic
        kernel = self._kernels.get(key)
        if kernel is None:
            with self._lock:
                kernel = self._kernels[key] = aot_kernel(*self._row_spec(form, inputs))
        return kernel(*inputs)

    def _agrees(self, form: str, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None) -> bool:
        got = self._call(form, x, weight, scales)
        want = row_product_reference(x, weight, scales)
        return _close(got, want)

    def _choose_int8_form(self, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> None:
        """Takes the int8 form chosen on this CPU before, where it still agrees; else times both forms on this
        weight (each checked first), keeps the faster and remembers it."""
        chosen = remembered(_INT8_FORM_CHOICE)
        if chosen in ("plain_scaled", "words") and self._agrees(chosen, x, weight, scales):
            self.int8_form = chosen
            return
        seconds = {}
        for form in ("plain_scaled", "words"):
            try:
                if not self._agrees(form, x, weight, scales):
                    continue
            except Exception as exc:  # the other form may still compile
                log.warning("int8 row product %s could not be compiled (%s: %s)", form, type(exc).__name__, exc)
                continue
            seconds[form] = _seconds(functools.partial(self._call, form, x, weight, scales))
        self.int8_form = min(seconds, key=seconds.__getitem__) if seconds else "plain_scaled"
        if seconds:
            remember(_INT8_FORM_CHOICE, self.int8_form)
        log.info("int8 row product: %s (%s)", self.int8_form,
                 ", ".join(f"{form} {t * 1e3:.2f} ms" for form, t in seconds.items()))

    def compile_ahead(self, weights: list[tuple[torch.Tensor, torch.Tensor | None]],
                      expert_sets: list[tuple[list[Expert], int]]) -> None:
        """Compiles the kernels of `weights` and of a token's experts (each set: a layer's first k experts, their
        intermediate size) that are not compiled yet, several at a time (aot.compile_kernels); int8's two forms
        first, on its first weight, so the faster is chosen before the rest are compiled in it."""
        if self.disabled_reason is not None or self.uses_native():
            return  # the C kernels are one file, built on first use

        def spec(form: str, weight: torch.Tensor, scales: torch.Tensor | None) -> Any:
            return self._row_spec(form, self._inputs(form, torch.zeros(weight.shape[-1]), weight, scales))

        int8 = [(weight, scales) for weight, scales in weights if scales is not None and weight.shape[-1] % 4 == 0]
        if int8 and self.int8_form is None:
            chosen = remembered(_INT8_FORM_CHOICE)
            forms = (chosen,) if chosen in ("plain_scaled", "words") else ("plain_scaled", "words")
            compile_kernels([spec(form, *int8[0]) for form in forms])
            self.check(*int8[0])  # times both forms and keeps the faster
        specs = [spec(self._form(weight, scales), weight, scales) for weight, scales in weights]
        for experts, inter in expert_sets:
            x, routing = torch.zeros(experts[0][0].shape[-1]), torch.zeros(len(experts))
            specs.append(self._fused_spec(self._form(experts[0][0], experts[0][1]), inter, x, routing, experts))
        compile_kernels(specs)

    def check(self, weight: torch.Tensor, scales: torch.Tensor | None) -> bool:
        """Compiles the kernel for this weight's shape and compares it with the reference; False: the reference
        serves."""
        key = (weight.dtype, (int(weight.shape[-2]), int(weight.shape[-1])), scales is not None)
        checked = self._checked.get(key)
        if checked is not None:
            return checked
        with self._lock:
            if key in self._checked:
                return self._checked[key]
            ok = False
            if self.disabled_reason is None:
                x = torch.linspace(-1.0, 1.0, weight.shape[-1])
                try:
                    if self._form(weight, scales) == "native" and not self._agrees("native", x, weight, scales):
                        self.native = False
                        log.warning("the C row product disagrees with the reference on %s; Inductor's kernels "
                                    "serve", list(weight.shape))
                    if scales is not None and self.int8_form is None and weight.shape[-1] % 4 == 0 \
                            and self._form(weight, scales) != "native":
                        self._choose_int8_form(x, weight, scales)
                    ok = self._agrees(self._form(weight, scales), x, weight, scales)
                    if not ok:
                        self._disable(f"the compiled kernel disagrees with the reference on {list(weight.shape)}")
                except Exception as exc:  # e.g. no C++ compiler for Inductor
                    self._disable(f"the kernel could not be compiled ({type(exc).__name__}: {exc})")
            self._checked[key] = ok and self.disabled_reason is None
            return self._checked[key]

    def row_product(self, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        """x [in] float32, weight [out, in] (bf16 or int8), scales [out] or None -> [out] float32."""
        if self.disabled_reason is None and self.check(weight, scales):
            return self._call(self._form(weight, scales), x, weight, scales)
        return row_product_reference(x, weight, scales)

    def experts_reference(self, x: torch.Tensor, routing: torch.Tensor, experts: list[Expert],
                          inter: int) -> torch.Tensor:
        """`_experts` as row products, one call per expert and projection."""
        total = torch.zeros_like(x)
        for j, (gate_up, gate_up_scales, down, down_scales) in enumerate(experts):
            both = self.row_product(x, gate_up, gate_up_scales)
            act = F.silu(both[:inter]) * both[inter:]
            total = total + routing[j] * self.row_product(act, down, down_scales)
        return total

    def token_experts(self, x: torch.Tensor, ids: torch.Tensor, routing: torch.Tensor, stacks: Stacks,
                      expert: Callable[[int], Expert], inter: int) -> torch.Tensor:
        """x [hidden] float32 through the experts `ids` [k] of one MoE layer (its `stacks`; `expert(e)`: expert
        e's own tensors), weighted by routing [k]: one C call where the C kernels serve."""
        if self.uses_native() and self._native_experts(stacks, ids.shape[0]):
            return native.experts(x.contiguous(), ids.contiguous(), routing.contiguous(), *stacks)
        return self.experts(x, routing, [expert(e) for e in ids.tolist()], inter)

    def _native_experts(self, stacks: Stacks, k: int) -> bool:
        """Whether native.experts serves these stacks: checked against the reference once per shape."""
        gate_up, gate_up_scales, down, down_scales = stacks
        key = (gate_up.dtype, (*gate_up.shape, *down.shape), k)
        checked = self._native_experts_checked.get(key)
        if checked is None:
            with self._lock:
                contiguous = all(t is None or t.is_contiguous() for t in stacks)
                checked = contiguous and self.uses_native() and self.disabled_reason is None
                if checked:
                    x = torch.linspace(-1.0, 1.0, gate_up.shape[-1])
                    ids = torch.arange(gate_up.shape[0] - 1, gate_up.shape[0] - 1 - k, -1)  # the far end too
                    routing = torch.full((k,), 1.0 / k)
                    experts = [(gate_up[e], _row(gate_up_scales, e), down[e], _row(down_scales, e))
                               for e in ids.tolist()]
                    got = native.experts(x, ids, routing, *stacks)
                    want = _experts("plain" if gate_up_scales is None else "plain_scaled", down.shape[-1], x, routing,
                                    experts)  # the eager reference
                    checked = _close(got, want)
                    if not checked:
                        log.warning("the C expert kernel disagrees with the reference; a call per expert")
                self._native_experts_checked[key] = checked
        return checked

    def experts(self, x: torch.Tensor, routing: torch.Tensor, experts: list[Expert], inter: int) -> torch.Tensor:
        """x [hidden] float32 through `experts` (each `Expert` of one MoE layer), weighted by routing [k]."""
        gate_up, gate_up_scales, down, down_scales = experts[0]
        form = self._form(gate_up, gate_up_scales)
        key = (form, gate_up.dtype, (*gate_up.shape, *down.shape, len(experts)), gate_up_scales is not None)
        if form == "native" or form != self._form(down, down_scales):
            return self.experts_reference(x, routing, experts, inter)
        if key not in self._experts_checked and self.check(gate_up, gate_up_scales) and self.check(down, down_scales):
            with self._lock:
                try:
                    self._fused[key] = aot_kernel(*self._fused_spec(form, inter, x, routing, experts))
                    fused = functools.partial(self._fused[key], x, routing, *_flat_experts(experts))
                    got, want = fused(), self.experts_reference(x, routing, experts, inter)
                    agrees = _close(got, want)
                    if not agrees:
                        log.warning("the fused expert kernel disagrees with the reference; one call per expert")
                    # Kept where it is the faster (Inductor's code for the fused form is not, on every ISA).
                    reference = functools.partial(self.experts_reference, x, routing, experts, inter)
                    self._experts_checked[key] = agrees and _seconds(fused) < _seconds(reference)
                    log.info("routed experts of a token: %s", "one fused call" if self._experts_checked[key] else
                             "a call per expert and projection")
                except Exception as exc:  # the row products serve
                    log.warning("the fused expert kernel could not be compiled (%s); one call per expert", exc)
                    self._experts_checked[key] = False
        if self._experts_checked.get(key):
            return self._fused[key](x, routing, *_flat_experts(experts))
        return self.experts_reference(x, routing, experts, inter)


def _row(stack: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if stack is None else stack[e]


_INT8_FORM_CHOICE = ("int8-form", __name__)  # remembered per CPU and source of this module
ROW_KERNELS = RowKernels()


def prepare_row_kernels(weights: list[tuple[torch.Tensor, torch.Tensor | None]]) -> bool:
    """Compiles and checks the row product for every distinct weight shape (at load, not in a first request);
    returns whether the compiled kernel serves them all."""
    with torch.inference_mode():  # as a decode step calls them
        return all([ROW_KERNELS.check(weight, scales) for weight, scales in weights])


def _blocks(weight: torch.Tensor, scales: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """`weight` (and its scales) in blocks of UPCAST_BLOCK_ROWS rows, the last one shorter."""
    if weight.shape[0] <= UPCAST_BLOCK_ROWS:
        return [(weight, scales)]
    return [
        (standalone(weight[i : i + UPCAST_BLOCK_ROWS]),
         None if scales is None else standalone(scales[i : i + UPCAST_BLOCK_ROWS]))
        for i in range(0, weight.shape[0], UPCAST_BLOCK_ROWS)
    ]


def prepare_kernels(weights: list[tuple[torch.Tensor, torch.Tensor | None]], experts: list[Expert],
                    inter: int, stacks: Stacks | None = None) -> None:
    """At load, not in a first request: compiles the kernels not yet compiled (several at a time), checks the row
    product on every weight shape, and checks (and times) the kernel of a token's `experts` (a MoE layer's
    first k, of intermediate size `inter`, from its `stacks`; none without a MoE)."""
    ROW_KERNELS.compile_ahead(weights, [(experts, inter)] if experts else [])
    prepare_row_kernels(weights)
    if experts:
        with torch.inference_mode():  # as a decode step calls it
            x = torch.linspace(-1.0, 1.0, experts[0][0].shape[-1])
            routing = torch.full((len(experts),), 1.0 / len(experts))
            if stacks is None or not ROW_KERNELS._native_experts(stacks, len(experts)):
                ROW_KERNELS.experts(x, routing, experts, inter)


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """x [rows, in] float32 times a stored weight [out, in] upcast to float32 (its int8 scales applied to the
    product, [rows, out], instead of to the weight: one pass over the weight fewer)."""
    out = onednn.linear(x, weight.float())
    return out if scales is None else out * scales


def weight_only_linear(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear(x, dequantize(weight, scales), bias), computed in float32 and returned in x's dtype."""
    flat = x.reshape(-1, x.shape[-1]).float()
    if flat.shape[0] <= ROW_KERNEL_MAX_ROWS:  # decode steps: a row product per sequence
        rows = [ROW_KERNELS.row_product(row, weight, scales) for row in flat]
        out = rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)
    else:
        parts = [upcast_linear(flat, block, block_scales) for block, block_scales in _blocks(weight, scales)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    out = out if bias is None else out + bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
