"""Batched decode throughput at the real DeepSeek-OCR size (random weights): B sequences per decode step.

For each context length and batch size B the backend's lanes [0, B) are filled with a prompt of that length,
then decode steps run through the backend exactly as the generation loop drives them (forward, token choice,
read back), with a different random token per lane and step so that every lane routes to its own experts (as
real sequences do). Printed per (context, B): the step time, aggregate and per-sequence tokens/s, both as
ratios to B=1 in the same run, the KV memory per lane, and the bytes one step must read (weights of the
distinct experts the B tokens chose, plus every lane's keys and values) against the measured copy bandwidth.

A second table measures the engine core's own host work per step (per-sequence n-gram guard, detokenizer,
stop strings, bookkeeping) on a backend that does no tensor work, so the two add up to the full step.

    nice python benchmarks/bench_batch_decode.py                             # torch cpu bfloat16
    python benchmarks/bench_batch_decode.py --device cuda --batches 1,8,32,64   # a GPU (CUDA graphs on)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_torch import measure_bandwidth, write_random_checkpoint  # noqa: E402

GiB = 1024**3
TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "deepseek-ocr" / "model"


def greedy_controls(batch: int) -> Any:
    from common.engine.backend import StepControls

    return StepControls(
        temperature=np.zeros(batch, np.float32),
        top_k=np.zeros(batch, np.int32),
        top_p=np.ones(batch, np.float32),
        uniform=np.zeros(batch, np.float32),
        ban_rows=np.zeros(0, np.int64),
        ban_ids=np.zeros(0, np.int64),
    )


def step_bytes(backend: Any, batch: int, context: int, distinct_experts: float) -> float:
    """Weights one step reads (dense parts once, each distinct routed expert once) plus every lane's K/V."""
    model = backend.model
    lm = model.config.language
    elem = model.dtype.itemsize
    kv_elem = backend.cache.keys.element_size()
    hidden, head_dim = lm.hidden_size, lm.head_dim
    attn = hidden * lm.num_attention_heads * head_dim * 2 + hidden * lm.num_key_value_heads * head_dim * 2
    weights = 0.0
    for i in range(lm.num_hidden_layers):
        weights += attn
        if lm.is_moe_layer(i):
            per_expert = 3 * hidden * lm.moe_intermediate_size
            weights += per_expert * (distinct_experts + lm.n_shared_experts) + lm.n_routed_experts * hidden
        else:
            weights += 3 * hidden * lm.intermediate_size
    weights += lm.vocab_size * hidden
    kv = 2 * lm.num_hidden_layers * lm.num_key_value_heads * head_dim * context * kv_elem * batch
    return weights * elem + kv


def expected_distinct(experts: int, chosen_per_token: int, tokens: int) -> float:
    """Distinct experts chosen by `tokens` tokens routing uniformly at random (random weights route ~uniformly)."""
    return experts * (1 - (1 - chosen_per_token / experts) ** tokens)


def run_backend(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from common.engine.backend import load_backend
    from common.engine.prefill import PrefillJob
    from common.model.inputs import PreparedInputs

    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    backend = load_backend(
        "torch", args.checkpoint, args.device, args.dtype, max_batch=max(batches), kv_cache_gib=args.kv_cache_gib,
        max_context=args.max_context, cuda_graphs=None if args.device == "cuda" else False,
    )
    model = backend.model
    lm = model.config.language
    rng = np.random.default_rng(0)
    rows = []
    for context in contexts:
        # One prompt prefilled, then copied into every lane (prefill cost is not what is measured here).
        embeds = (rng.standard_normal((context, lm.hidden_size)) * 0.02).astype(np.float32)
        prompt = PreparedInputs(np.zeros(context, np.int64), np.zeros(context, bool), [], inputs_embeds=embeds)
        job = PrefillJob(backend, 0, prompt, chunk=context)
        while not job.advance():
            pass
        for lane in range(1, max(batches)):
            backend.move_lane(0, lane)
        base_lengths = list(backend.cache.host_lengths)
        for batch in batches:
            times = []
            for step in range(args.warmup + args.steps):
                tokens = rng.integers(3, 120000, batch)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                logits = backend.forward(batch, tokens)
                ids = backend.read(backend.sample(logits, greedy_controls(batch)))
                elapsed = time.perf_counter() - start
                assert ids.shape == (batch,)
                if step >= args.warmup:
                    times.append(elapsed)
            # back to the prompt for the next batch size (the cache's contents past it are never read)
            for lane, length in enumerate(base_lengths):
                backend.cache.set_length(lane, length)
            step_s = statistics.median(times)
            distinct = expected_distinct(lm.n_routed_experts, lm.num_experts_per_tok, batch)
            rows.append({
                "context": context,
                "batch": batch,
                "step_ms": step_s * 1e3,
                "aggregate_tok_s": batch / step_s,
                "per_seq_tok_s": 1 / step_s,
                "bytes_per_step": step_bytes(backend, batch, context + args.warmup + args.steps, distinct),
            })
            print(json.dumps(rows[-1]), file=sys.stderr)
    per_position = 2 * lm.num_hidden_layers * lm.num_key_value_heads * lm.head_dim * backend.cache.keys.element_size()
    for row in rows:
        row["kv_per_lane_gib"] = per_position * backend.lane_capacity / GiB
        row["kv_per_lane_used_gib"] = per_position * (row["context"] + args.warmup + args.steps) / GiB
    bandwidth = measure_bandwidth(model.device)
    for row in rows:
        row["bandwidth"] = bandwidth
    return rows


def run_host_overhead(batches: list[int], steps: int) -> list[dict[str, Any]]:
    """The engine core's per-step host work with a backend that does no tensor work (tests.fakes.ScriptedBackend)."""
    from common.engine.core import EngineCore
    from common.engine.sampling import SamplingParams
    from common.model.inputs import PreparedInputs
    from common.model.tokenizer import Tokenizer
    from tests.fakes import ScriptedBackend

    tokenizer = Tokenizer.from_dir(TOKENIZER_DIR)
    script = [int(t) for t in np.random.default_rng(1).integers(1000, 100000, steps + 8)]
    rows = []
    for batch in batches:
        core = EngineCore(lambda batch=batch: ScriptedBackend(script, tokenizer.eos_id, lanes=batch), tokenizer,
                          max_batch=batch).start()
        core.wait_ready()
        params = SamplingParams(max_new_tokens=steps, no_repeat_ngram_size=20, stop=("</table>",))
        prompt_ids = np.arange(300, dtype=np.int64)
        prompt = PreparedInputs(prompt_ids, np.zeros(300, bool), [])
        stamps: list[float] = []
        core.on_step = lambda _size, stamps=stamps: stamps.append(time.perf_counter())
        with core.paused():
            handles = [core.submit(prompt, params) for _ in range(batch)]
        for handle in handles:
            handle.run()
        core.close()
        full = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][batch:]
        rows.append({"batch": batch, "host_ms": statistics.median(full) * 1e3 if full else float("nan")})
    return rows


def print_tables(rows: list[dict[str, Any]], host: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("context", "B", "step (ms)", "aggregate tok/s", "x B=1", "per-seq tok/s", "x B=1",
                   "GiB read/step", "floor (ms)", "reached", "KV/lane used / full (GiB)"):
        table.add_column(column, justify="right")
    for row in rows:
        base = next(r for r in rows if r["context"] == row["context"] and r["batch"] == min(
            r2["batch"] for r2 in rows if r2["context"] == row["context"]))
        floor_s = row["bytes_per_step"] / row["bandwidth"]
        table.add_row(
            str(row["context"]), str(row["batch"]), f"{row['step_ms']:.1f}",
            f"{row['aggregate_tok_s']:.1f}", f"{row['aggregate_tok_s'] / base['aggregate_tok_s']:.2f}",
            f"{row['per_seq_tok_s']:.1f}", f"{row['per_seq_tok_s'] / base['per_seq_tok_s']:.2f}",
            f"{row['bytes_per_step'] / GiB:.2f}", f"{floor_s * 1e3:.1f}", f"{floor_s * 1e3 / row['step_ms']:.0%}",
            f"{row['kv_per_lane_used_gib']:.3f} / {row['kv_per_lane_gib']:.2f}",
        )
    console = Console(width=200)
    console.print(table)
    overhead = Table(title="engine core host work per step (no tensor work; n-gram 20, one stop string)")
    overhead.add_column("B", justify="right")
    overhead.add_column("host ms / step", justify="right")
    overhead.add_column("µs per sequence", justify="right")
    for row in host:
        overhead.add_row(str(row["batch"]), f"{row['host_ms']:.2f}", f"{row['host_ms'] * 1e3 / row['batch']:.0f}")
    console.print(overhead)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/dsocr-bench-random-ckpt"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", default="1,2,4,8,16,32")
    parser.add_argument("--contexts", default="256,2000")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--kv-cache-gib", type=float, default=None)
    parser.add_argument("--max-context", type=int, default=2304, help="positions per lane (fits 32 lanes in RAM)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    write_random_checkpoint(args.checkpoint)
    rows = run_backend(args)
    host = run_host_overhead([int(b) for b in args.batches.split(",")], 64)
    if args.json:
        args.json.write_text(json.dumps({"backend": rows, "host": host}, indent=1))
    print_tables(rows, host, f"batched decode, torch {args.device} {args.dtype}, {torch.get_num_threads()} threads, "
                             "real size, random weights")


if __name__ == "__main__":
    main()
