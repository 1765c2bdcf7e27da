"""Cost of JSON-schema constrained decoding on the host: per-token mask computation and grammar compilation.

    python benchmarks/bench_structured.py                        # fixture model: real tokenizer and vocab size
    python benchmarks/bench_structured.py --batch 1,8,32 --steps 128 --threads 4

No model runs: B sequences advance in lockstep through `GrammarCompiler.fill_masks` and
`GrammarMatcher.consume`, each picking a random allowed token with a preference for JSON delimiters (so strings
end and every part of the grammar is visited). A sequence that completes its JSON restarts with a fresh matcher,
so every step has B masks to compute. Steps are timed as a decode loop would run them: all B masks, then all B
consumes. Batches of at least two run both on llguidance's thread pool and one by one, for comparison.
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

from common.structured import GrammarCompiler, GrammarMatcher, JsonSpec, allowed_ids, json_schema_spec  # noqa: E402
from common.tokenizer import Tokenizer  # noqa: E402

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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
