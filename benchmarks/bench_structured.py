"""Cost of JSON-schema constrained decoding: per-token mask computation and grammar compilation on the host, and
(--decode) whole decode steps of the real-size model with and without the constraint, in the same run.

    python benchmarks/bench_structured.py                        # fixture model: real tokenizer and vocab size
    python benchmarks/bench_structured.py --batch 1,8,32 --steps 128 --threads 4
    python benchmarks/bench_structured.py --decode               # full-size random checkpoint, torch CPU bfloat16

By default no model runs: B sequences advance in lockstep through `GrammarCompiler.fill_masks` and
`GrammarMatcher.consume`, each picking a random allowed token with a preference for JSON delimiters (so strings
end and every part of the grammar is visited). A sequence that completes its JSON restarts with a fresh matcher,
so every step has B masks to compute. Steps are timed as a decode loop would run them: all B masks, then all B
consumes. Batches of at least two run both on llguidance's thread pool and one by one, for comparison.

--decode drives the generation loop on the full-size random checkpoint (written by bench_torch's
`write_random_checkpoint` when missing): B sequences decode unconstrained (EOS ignored), then constrained to a
schema, with the masks filled inline or on the loop's helper thread while the forward pass runs (a sequence
whose JSON completes starts the next document, so the batch stays full); the modes alternate over several
rounds. Printed: step times and the constrained step as a ratio of the unconstrained one, and the parts the
constraint adds to a step, measured directly: the grammar's work (masks, consumes) and the backend's masking
(bitmask to -inf logits), as a fraction of the unconstrained step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.engine.structured import GrammarCompiler, GrammarMatcher, JsonSpec, allowed_ids, json_schema_spec  # noqa: E402
from common.model.tokenizer import Tokenizer  # noqa: E402

MODEL_DIR = ROOT / "tests" / "fixtures" / "deepseek-ocr" / "model"

INVOICE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string"},
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "currency": {"enum": ["EUR", "USD", "GBP", "JPY"]},
        "total": {"type": "number", "minimum": 0},
        "lines": {
            "type": "array",
            "minItems": 1,
            "maxItems": 5,
            "items": {
                "type": "object",
                "properties": {
                    "description": {"type": "string", "maxLength": 40},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 999},
                    "amount": {"type": "number"},
                },
                "required": ["description", "quantity", "amount"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["vendor", "date", "currency", "total", "lines"],
    "additionalProperties": False,
}
ADDRESS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "street": {"type": "string"},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "country": {"type": "string", "enum": ["DE", "FR", "US", "JP"]},
        "phones": {"type": "array", "items": {"type": "string", "pattern": "^\\+[0-9]{6,12}$"}, "maxItems": 3},
    },
    "required": ["name", "street", "zip", "country", "phones"],
    "additionalProperties": False,
}


def delimiter_bias(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    bias = np.zeros(vocab_size, dtype=np.float64)
    for token_id in range(tokenizer.vocab_size):
        if any(ch in (tokenizer.id_to_token(token_id) or "") for ch in '"}],'):
            bias[token_id] = 6.0
    return bias


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def run_batch(
    compiler: GrammarCompiler,
    specs: list[JsonSpec],
    batch: int,
    steps: int,
    bias: np.ndarray,
    seed: int,
    parallel: bool,
) -> tuple[list[float], list[float], int]:
    """Per-step seconds of fill_masks (whole batch) and of the consumes; number of completed JSON documents."""
    rng = np.random.default_rng(seed)
    matchers: list[GrammarMatcher] = [compiler.matcher(specs[i % len(specs)]) for i in range(batch)]
    masks = compiler.allocate_masks(batch)
    fill_s: list[float] = []
    consume_s: list[float] = []
    completed = 0
    for _ in range(steps):
        _, seconds = timed(lambda: compiler.fill_masks(matchers, masks, parallel=parallel))
        fill_s.append(seconds)
        picks = []
        for row in masks:  # a random allowed token, delimiters preferred (Gumbel-max sampling of the bias)
            ids = allowed_ids(row, compiler.vocab_size)
            picks.append(int(ids[np.argmax(bias[ids] + rng.gumbel(size=ids.size))]))
        start = time.perf_counter()
        for matcher, token in zip(matchers, picks, strict=True):
            if not matcher.consume(token):
                raise RuntimeError(f"grammar refused an allowed token: {matcher.error}")
        consume_s.append(time.perf_counter() - start)
        for i, matcher in enumerate(matchers):
            if matcher.finished:
                completed += 1
                matchers[i] = compiler.matcher(matcher.spec)
    return fill_s, consume_s, completed


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f}"


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MODEL_DIR), help="a model directory (tokenizer.json, config.json)")
    parser.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=64, help="decode steps per batch size")
    parser.add_argument("--threads", type=int, default=None, help="llguidance pool threads (default: its own)")
    parser.add_argument("--seed", type=int, default=0)
    decode = parser.add_argument_group("--decode: whole decode steps at the real model size")
    decode.add_argument("--decode", action="store_true", help="measure decode steps instead of masks alone")
    decode.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help=f"default {CHECKPOINT}")
    decode.add_argument("--decode-batch", default="1,4", help="comma-separated decode batch sizes")
    decode.add_argument("--decode-steps", type=int, default=12, help="timed steps per mode and round")
    decode.add_argument("--rounds", type=int, default=3, help="rounds over the modes (they alternate)")
    decode.add_argument("--torch-threads", default="1",
                        help="comma-separated torch thread counts (1 keeps a shared machine's timings sane)")
    args = parser.parse_args()
    if args.decode:
        decode_main(args)
        return
    batches = [int(b) for b in args.batch.split(",")]

    from rich.console import Console
    from rich.table import Table

    console = Console()
    compiler, load_s = timed(lambda: GrammarCompiler.from_model_dir(args.model, threads=args.threads))
    tokenizer = Tokenizer.from_dir(args.model)
    bias = delimiter_bias(tokenizer, compiler.vocab_size)

    setup = Table(title=f"grammar setup (vocab {compiler.vocab_size}, mask {compiler.mask_width} int32 words)")
    setup.add_column("what")
    setup.add_column("ms", justify="right")
    setup.add_row("GrammarCompiler.from_model_dir (tokenizer for llguidance, once per model)", f"{load_s * 1e3:.1f}")
    for name, schema in (("invoice", INVOICE), ("address", ADDRESS)):
        spec, check_s = timed(lambda schema=schema: json_schema_spec(schema))
        _, compile_s = timed(lambda spec=spec: compiler.matcher(spec))
        copies = [timed(lambda spec=spec: compiler.matcher(spec))[1] for _ in range(50)]
        setup.add_row(f"{name}: json_schema_spec (request validation)", f"{check_s * 1e3:.2f}")
        setup.add_row(f"{name}: first matcher (compile, then cached)", f"{compile_s * 1e3:.2f}")
        setup.add_row(
            f"{name}: next matcher (copy of the cached grammar), median", f"{statistics.median(copies) * 1e3:.3f}"
        )
    console.print(setup)

    specs = [json_schema_spec(INVOICE), json_schema_spec(ADDRESS)]
    table = Table(title=f"mask cost per decode step ({args.steps} steps, invoice/address schemas alternating)")
    for column in ("B", "fill", "step mean µs", "step p95 µs", "per seq µs", "consume µs", "JSON done"):
        table.add_column(column, justify="right")
    for batch in batches:
        modes = [("thread pool", True), ("one by one", False)] if batch > 1 else [("one by one", False)]
        for mode, parallel in modes:
            run_batch(compiler, specs, batch, 4, bias, args.seed, parallel)  # warm-up: lexer states, thread pool
            fill_s, consume_s, done = run_batch(compiler, specs, batch, args.steps, bias, args.seed, parallel)
            table.add_row(
                str(batch),
                mode,
                us(statistics.mean(fill_s)),
                us(p95(fill_s)),
                us(statistics.mean(fill_s) / batch),
                us(statistics.mean(consume_s)),
                str(done),
            )
    console.print(table)
    console.print(
        "step = the B masks of one decode step (fill_masks); per seq = step / B; consume = the B consume calls; "
        "JSON done = documents completed (each restarts with a fresh matcher)."
    )


# ------------------------------------------------------------------------------------------------ --decode

CHECKPOINT = Path("/tmp/dsocr-bench-random-ckpt")
# The random model writes inside a string without end: the mask of every step is a string's (most ids allowed).
OPEN_STRING: dict[str, Any] = {
    "type": "object",
    "properties": {"text": {"type": "string"}},
    "required": ["text"],
    "additionalProperties": False,
}
MODES = (("free", None, False), ("json", "spec", False), ("json, helper thread", "spec", True))


class BenchMatcher:
    """A sequence's grammar state for the benchmark: adds up the seconds its mask fills take (on whichever thread)
    and, when a JSON document completes, starts the next one, so the sequence stays in the batch and every step
    is constrained (the random model may close a document after a few tokens)."""

    def __init__(self, compiler: GrammarCompiler, spec: JsonSpec, counters: dict[str, float]) -> None:
        self.compiler, self.spec, self.counters = compiler, spec, counters
        self.inner = compiler.matcher(spec)

    def fill_mask(self, row: np.ndarray) -> None:
        start = time.perf_counter()
        self.inner.fill_mask(row)
        self.counters["fill_s"] += time.perf_counter() - start

    def consume(self, token_id: int) -> bool:
        start = time.perf_counter()
        accepted = self.inner.consume(token_id)
        self.counters["consume_s"] += time.perf_counter() - start
        if accepted and self.inner.finished:
            self.counters["documents"] += 1
            self.inner = self.compiler.matcher(self.spec)
        return accepted

    @property
    def finished(self) -> bool:
        return False

    @property
    def error(self) -> str | None:
        return self.inner.error


def decode_run(backend: Any, tokenizer: Tokenizer, compiler: GrammarCompiler, batch: int, spec: JsonSpec | None,
               threaded: bool, steps: int) -> tuple[list[float], list[float], int]:
    """Seconds of each decode step holding all `batch` sequences, the grammar's seconds (mask fills and token
    consumes) in each, and the JSON documents completed."""
    from common.engine.core import EngineCore
    from common.engine.sampling import SamplingParams
    from common.model.inputs import PreparedInputs
    from tests.fakes import Lent  # the core's close() leaves the benchmark's backend loaded

    counters = {"fill_s": 0.0, "consume_s": 0.0, "documents": 0.0}
    core = EngineCore(lambda: Lent(backend), tokenizer, max_batch=batch, mask_thread=threaded,
                      constraints=lambda s: BenchMatcher(compiler, s, counters)).start()
    core.wait_ready()
    stamps: list[tuple[float, int, float]] = []  # (time, batch size, grammar seconds so far) at each decode step
    core.on_step = lambda size: stamps.append((time.perf_counter(), size, counters["fill_s"] + counters["consume_s"]))
    warmup = 2
    # The n-gram guard stays on (the default rule), as in a real request; EOS only ends free text when allowed.
    params = SamplingParams(max_new_tokens=warmup + steps + 2, ignore_eos=spec is None, json_spec=spec)
    with core.paused():  # every prompt queued before the first step
        handles = []
        for i in range(batch):
            ids = np.asarray([tokenizer.bos_id, *tokenizer.encode(f"Invoice {i}: extract the fields as JSON.")])
            handles.append(core.submit(PreparedInputs(ids, np.zeros(ids.shape, bool), []), params))
    for handle in handles:
        handle.wait()
    core.close()
    assert all(h.error is None for h in handles), [h.error for h in handles]
    full = [(t, g) for t, size, g in stamps if size == batch]
    step_s = [b[0] - a[0] for a, b in zip(full, full[1:], strict=False)][warmup:steps + warmup]
    fill_s = [b[1] - a[1] for a, b in zip(full, full[1:], strict=False)][warmup:steps + warmup]
    return step_s, fill_s, int(counters["documents"])


def masking_cost(backend: Any, compiler: GrammarCompiler, batch: int, spec: JsonSpec, repeat: int = 40) -> float:
    """Seconds the backend's token choice spends on the allowed-token masks for `batch` rows (fastest of
    `repeat` tries each way: on a shared machine the minimum is the least disturbed)."""
    import torch

    from common.engine.backend import StepControls

    matchers = [compiler.matcher(spec) for _ in range(batch)]
    masks = compiler.allocate_masks(batch)
    compiler.fill_masks(matchers, masks)

    def controls(allowed: np.ndarray | None) -> StepControls:
        return StepControls(np.zeros(batch, np.float32), np.zeros(batch, np.int32), np.ones(batch, np.float32),
                            np.zeros(batch, np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64), allowed)

    logits = torch.randn(batch, backend.vocab_size)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeat):
        for masked in (False, True):
            start = time.perf_counter()
            backend.read(backend.sample(logits.clone(), controls(masks if masked else None)))
            times[masked].append(time.perf_counter() - start)
    return max(0.0, min(times[True]) - min(times[False]))


def decode_main(args: argparse.Namespace) -> None:
    import os

    import torch
    from rich.console import Console
    from rich.table import Table

    from benchmarks.bench_torch import write_random_checkpoint
    from common.engine.backend import load_backend

    console = Console(width=160)
    if not (args.checkpoint / "config.json").is_file():
        console.print(f"writing a random full-size checkpoint to {args.checkpoint} ...")
        write_random_checkpoint(args.checkpoint)
    batches = [int(b) for b in args.decode_batch.split(",")]
    tokenizer = Tokenizer.from_dir(args.model)  # the checkpoint holds weights only; the tokenizer is the same
    # Short prompts and few tokens: small lanes, so every batch size fits the KV cache.
    backend = load_backend("torch", args.checkpoint, "cpu", "bfloat16", max_batch=max(batches), kv_cache_gib=1.0,
                   max_context=512, cuda_graphs=False)
    if backend.lanes < max(batches):
        raise SystemExit(f"the KV cache holds {backend.lanes} sequences; --decode-batch asks for {max(batches)}")
    compiler = GrammarCompiler.from_model_dir(args.model, vocab_size=backend.vocab_size)
    specs = {"open string": json_schema_spec(OPEN_STRING), "invoice": json_schema_spec(INVOICE)}
    decode_run(backend, tokenizer, compiler, max(batches), None, False, 2)  # warm-up: allocator, oneDNN kernels
    load_before = os.getloadavg()[0]
    table = Table(title=f"constrained decode steps, full-size random checkpoint, torch CPU bfloat16 "
                        f"({args.rounds} rounds x {args.decode_steps} steps per mode)")
    for column in ("torch threads", "B", "schema", "free ms/step", "json ms/step", "ratio", "json + helper thread "
                   "ms/step", "ratio", "grammar µs/step", "masking µs/step", "(grammar + masking) / free step",
                   "JSON docs"):
        table.add_column(column, justify="right")
    for threads in (int(t) for t in args.torch_threads.split(",")):
        torch.set_num_threads(threads)
        for batch in batches:
            for name, spec in specs.items():
                steps: dict[str, list[float]] = {mode: [] for mode, _, _ in MODES}
                fills: list[float] = []
                done = 0
                for _ in range(args.rounds):
                    for mode, constrained, threaded in MODES:
                        step_s, fill_s, finished = decode_run(backend, tokenizer, compiler, batch,
                                                              spec if constrained else None, threaded,
                                                              args.decode_steps)
                        steps[mode] += step_s
                        if constrained:
                            fills += fill_s
                            done += finished
                free, inline, helper = (statistics.median(steps[m]) for m, _, _ in MODES)
                fill, masking = statistics.median(fills), masking_cost(backend, compiler, batch, spec)
                table.add_row(str(threads), str(batch), name, f"{free * 1e3:.1f}", f"{inline * 1e3:.1f}",
                              f"{inline / free:.3f}", f"{helper * 1e3:.1f}", f"{helper / free:.3f}", us(fill),
                              us(masking), f"{(fill + masking) / free:.2%}", str(done))
    console.print(table)
    console.print(f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} CPUs). "
                  "ratio = constrained step / unconstrained step (median step times, same run; on a loaded machine "
                  "the step-to-step noise is larger than the masking); grammar = llguidance's mask computation and "
                  "token consumption for the B rows (median per step); masking = the backend turning the bitmasks "
                  "into -inf logits (fastest of 40); JSON docs = documents the constrained runs completed (each "
                  "restarts).")


if __name__ == "__main__":
    main()
