"""Decode speed of several configurations, interleaved: round after round, each configuration in a fresh process.

A shared machine's memory bandwidth drifts by tens of percent over minutes, and decode is bandwidth: one
configuration after another measures the drift as much as the configuration. Here every round runs every
configuration once (its own process: load through the engine core, a text prompt of --prompt-tokens, 8 warm-up
tokens, then N timed), and each round's ratio to the first configuration is reported with the median over rounds.

    python benchmarks/bench_decode.py --isa avx2 --configs cpu:float32,cpu:float32:bf16,cpu:float32:int8

With --prefill each worker also times the prompt's prefill under the random weights' routing and under uniform
routing (benchmarks/routing.py), so prompt paths are compared interleaved too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_torch import (  # noqa: E402
    decode_bytes_per_token,
    isa_env,
    measure_bandwidth,
    peak_rss_gib,
    write_random_checkpoint,
)

WARMUP_TOKENS = 8


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration's decode through the engine core (its thread loads and runs everything)."""
    import numpy as np
    import torch

    from common.engine.core import EngineCore
    from common.engine.sampling import SamplingParams
    from common.memory import keep_freed_heap
    from common.model.inputs import PreparedInputs
    from common.model.tokenizer import Tokenizer
    from dsocr_torch.backend import TorchBackend
    from dsocr_torch.weights.loader import load_model

    keep_freed_heap()
    device, dtype, quantize = args.worker
    core = EngineCore(
        lambda: TorchBackend(load_model(args.checkpoint, device=device, dtype=dtype, pack=True, quantize=quantize),
                             max_batch=1),
        Tokenizer.from_dir(ROOT / "tests" / "fixtures" / "deepseek-ocr" / "model"),
    )
    core.start().wait_ready()
    ids = np.random.default_rng(0).integers(3, 128000, size=args.prompt_tokens).astype(np.int64)
    prompt = PreparedInputs(ids, np.zeros(ids.shape[0], dtype=bool), [])

    def decode(tokens: int) -> float:
        params = SamplingParams(max_new_tokens=tokens, no_repeat_ngram_size=0, ignore_eos=True)
        return core.submit(prompt, params).run().timings["decode_tokens_per_s"]

    decode(WARMUP_TOKENS)
    tok_s = decode(args.decode_tokens)
    prefill = core.call(lambda backend: time_prefill(backend, ids)) if args.prefill else {}
    model = core.call(lambda backend: backend.model)
    bytes_per_token = decode_bytes_per_token(model, args.prompt_tokens + args.decode_tokens // 2)
    bandwidth = core.call(lambda backend: measure_bandwidth(backend.model.device))
    core.close()
    return {"tok_s": tok_s, "bytes_per_token": bytes_per_token, "bandwidth_Bps": bandwidth,
            "peak_rss_gib": peak_rss_gib(), "isa": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "prompt_tokens": args.prompt_tokens, **prefill}


def time_prefill(backend: Any, ids: Any) -> dict[str, float]:
    """The prompt's prefill (best of 2) under the random weights' routing and under uniform routing, on the core's
    thread (inside core.call)."""
    import torch

    from benchmarks.routing import uniform_routing

    with torch.inference_mode():
        embeds = backend.model.model.embed_tokens(torch.as_tensor(ids))
        times = {}
        routings = {"prefill_s": contextlib.nullcontext(), "prefill_uniform_s": uniform_routing(backend.model)}
        for name, routing in routings.items():
            with routing:
                best = float("inf")
                for _ in range(2):
                    start = time.perf_counter()
                    backend.prefill(0, embeds, 0, embeds.shape[0])
                    best = min(best, time.perf_counter() - start)
            times[name] = best
    return times


def print_table(configs: list[str], runs: dict[str, list[dict[str, Any]]], isa: str) -> None:
    from rich.console import Console
    from rich.table import Table

    base = configs[0]
    rounds = len(runs[base])
    table = Table(title=f"decode B=1 after {runs[base][0]['prompt_tokens']} tokens, {rounds} interleaved rounds, "
                        f"{runs[base][0]['isa']} ({isa}), "
                        f"{runs[base][0]['threads']} threads; ratios to {base} in the same round")
    for column in ("configuration", "tok/s (median; min-max)", "ratio (median; min-max)", "bytes/token",
                   "floor at the measured bandwidth (tok/s) / reached", "peak RSS (GiB)"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for config in configs:
        speeds = [r["tok_s"] for r in runs[config]]
        ratios = [r["tok_s"] / b["tok_s"] for r, b in zip(runs[config], runs[base], strict=True)]
        floor = statistics.median(r["bandwidth_Bps"] for r in runs[config]) / runs[config][0]["bytes_per_token"]
        table.add_row(
            config,
            f"{statistics.median(speeds):.1f}; {min(speeds):.1f}-{max(speeds):.1f}",
            f"{statistics.median(ratios):.2f}x; {min(ratios):.2f}-{max(ratios):.2f}",
            f"{runs[config][0]['bytes_per_token'] / 2**30:.2f} GiB",
            f"{floor:.1f} / {statistics.median(speeds) / floor:.0%}",
            f"{max(r['peak_rss_gib'] for r in runs[config]):.1f}",
        )
    Console(width=180).print(table)
    if "prefill_s" in runs[base][0]:
        prefill = Table(title=f"prefill of the {runs[base][0]['prompt_tokens']}-token prompt (best of 2), the same "
                              f"rounds; ratios to {base} in the same round")
        for column in ("configuration", "random weights' routing (s)", "ratio", "uniform routing (s)", "ratio"):
            prefill.add_column(column, justify="left" if column == "configuration" else "right")
        for config in configs:
            cells = [config]
            for key in ("prefill_s", "prefill_uniform_s"):
                seconds = [r[key] for r in runs[config]]
                ratios = [r[key] / b[key] for r, b in zip(runs[config], runs[base], strict=True)]
                cells += [f"{statistics.median(seconds):.2f}; {min(seconds):.2f}-{max(seconds):.2f}",
                          f"{statistics.median(ratios):.2f}x; {min(ratios):.2f}-{max(ratios):.2f}"]
            prefill.add_row(*cells)
        Console(width=180).print(prefill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/dsocr-bench-random-ckpt"))
    parser.add_argument("--configs", default="cpu:float32,cpu:float32:bf16,cpu:float32:int8",
                        help="comma list of device:dtype[:quantize]; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=300,
                        help="the context the tokens are decoded after (a Base page's prompt is ~280; a page's "
                             "output adds hundreds to thousands)")
    parser.add_argument("--prefill", action="store_true",
                        help="also time the prompt's prefill, under the random weights' and uniform routing")
    parser.add_argument("--isa", choices=("native", "avx2"), default="native",
                        help="avx2: hold torch, oneDNN and MKL to AVX2 in the workers")
    parser.add_argument("--worker", nargs=3, metavar=("DEVICE", "DTYPE", "QUANTIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    write_random_checkpoint(args.checkpoint)
    configs = [c for c in args.configs.split(",") if c]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    env = isa_env(args.isa)
    for round_ in range(args.rounds):
        for config in configs:
            device, dtype, *quantize = config.split(":")
            command = [sys.executable, __file__, "--worker", device, dtype, quantize[0] if quantize else "none",
                       "--checkpoint", str(args.checkpoint), "--decode-tokens", str(args.decode_tokens),
                       "--prompt-tokens", str(args.prompt_tokens)] + (["--prefill"] if args.prefill else [])
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(f"{config} failed:\n{done.stderr[-3000:]}")
            runs[config].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1}: {config} {runs[config][-1]['tok_s']:.1f} tok/s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    print_table(configs, runs, args.isa)


if __name__ == "__main__":
    main()
