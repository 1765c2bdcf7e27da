"""Load test for the OpenAI-compatible server: N concurrent streaming clients for a fixed time.

    python benchmarks/bench_server.py                       # tiny fixture model: measures server overhead
    python benchmarks/bench_server.py --clients 8 --seconds 30 --max-tokens 32
    python benchmarks/bench_server.py --clients 1,4,8,16    # concurrency sweep: ratios to 1 client
    python benchmarks/bench_server.py --make-random-full /tmp/dsocr-random   # full-size random weights (~6.7 GB)
    python benchmarks/bench_server.py --model /tmp/dsocr-random --max-tokens 8

Starts `server.py` in a subprocess on a free loopback port (so client and server do not share a GIL), then each
client loops streamed chat completions with an image for `--seconds`. Reports requests/s, output tokens/s, and
p50/p95 of latency and time to first token (first content delta), plus the server's own /metrics counters. With a
list of client counts it runs one load per count against the same server and prints each as a ratio to the first
count (aggregate tokens/s, latency, TTFT) with the mean number of sequences per decode step.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "deepseek-ocr"


@dataclass
class Sample:
    latency_s: float
    ttft_s: float
    completion_tokens: int


@dataclass
class Totals:
    samples: list[Sample] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def make_random_full(target: Path) -> None:
    """A full-size checkpoint with random bfloat16 weights (real config and tensor shapes, fixture tokenizer)."""
    import numpy as np
    from safetensors.numpy import save_file

    target.mkdir(parents=True, exist_ok=True)
    shapes: dict[str, list[int]] = json.loads((FIXTURES / "real_checkpoint_shapes.json").read_text())["tensors"]
    (target / "config.json").write_text((FIXTURES / "real_config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json"):
        source = FIXTURES / "model" / name
        if source.exists():
            (target / name).write_bytes(source.read_bytes())
    rng = np.random.default_rng(0)
    shard: dict[str, np.ndarray] = {}
    shard_bytes, index, weight_map = 0, 0, {}

    def flush() -> None:
        nonlocal shard, shard_bytes, index
        if shard:
            file_name = f"model-{index:05d}.safetensors"
            save_file(shard, str(target / file_name))
            weight_map.update({name: file_name for name in shard})
            shard, shard_bytes, index = {}, 0, index + 1

    for name, shape in shapes.items():
        if name.endswith("position_ids"):
            array = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
        else:
            # bfloat16 bits: the top half of float32 values with a small spread
            values = (rng.standard_normal(int(np.prod(shape)), dtype=np.float32) * 0.02).reshape(shape)
            if name.endswith(("norm.weight", "layernorm.weight", "norm1.weight", "norm2.weight")):
                values = np.ones(shape, dtype=np.float32)
            array = (values.view(np.uint32) >> 16).astype(np.uint16)
        shard[name] = array
        shard_bytes += array.nbytes
        if shard_bytes > 2 * 1024**3:
            flush()
    flush()
    # safetensors.numpy cannot write bf16 directly: rewrite the uint16 headers' dtype to BF16.
    for file_name in sorted(set(weight_map.values())):
        _retag_bf16(target / file_name)
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _retag_bf16(path: Path) -> None:
    with path.open("r+b") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
        for entry in header.values():
            if isinstance(entry, dict) and entry.get("dtype") == "U16":
                entry["dtype"] = "BF16"
        encoded = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
        assert len(encoded) == header_len
        handle.seek(8)
        handle.write(encoded)


async def client_loop(client: httpx.AsyncClient, body: dict, stop_at: float, totals: Totals) -> None:
    while time.perf_counter() < stop_at:
        start = time.perf_counter()
        ttft = None
        tokens = 0
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    key = str(response.status_code)
                    totals.errors[key] = totals.errors.get(key, 0) + 1
                    await asyncio.sleep(0.05)
                    continue
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk.get("choices", []):
                        if ttft is None and choice["delta"].get("content"):
                            ttft = time.perf_counter() - start
        except httpx.HTTPError as exc:
            key = type(exc).__name__
            totals.errors[key] = totals.errors.get(key, 0) + 1
            continue
        latency = time.perf_counter() - start
        totals.samples.append(Sample(latency, ttft if ttft is not None else latency, tokens))


async def run_load(
    base: str, clients: int, seconds: float, body: dict, headers: dict[str, str]
) -> tuple[Totals, float]:
    totals = Totals()
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits, headers=headers) as client:
        start = time.perf_counter()
        stop_at = start + seconds
        await asyncio.gather(*(client_loop(client, body, stop_at, totals) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return totals, elapsed


def wait_ready(base: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with code {process.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become ready in time")


def engine_baseline(args: argparse.Namespace, seconds: float) -> tuple[float, float]:
    """The same request through the Engine in this process, back to back: (requests/s, output tokens/s)."""
    sys.path.insert(0, str(ROOT))
    from common.documents.images import load_image
    from common.engine.engine import Engine
    from common.engine.sampling import SamplingParams
    from common.model.families import resolve_mode

    engine = Engine.load(args.model, backend=args.backend, device=args.device, dtype=args.dtype)
    image = load_image(args.image)
    params = SamplingParams(max_new_tokens=args.max_tokens)
    mode = resolve_mode(args.mode, family=engine.family)
    engine.generate(engine.prepare("<image>\nFree OCR.", [image], mode), params)  # warm-up
    done = tokens = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        prepared = engine.prepare("<image>\nFree OCR.", [image], mode)
        tokens += engine.generate(prepared, params).completion_tokens
        done += 1
    elapsed = time.perf_counter() - start
    engine.close()
    return done / elapsed, tokens / elapsed


def batch_counts(metrics: str) -> tuple[float, float]:
    """(sum, count) of the server's dsocr_batch_size histogram: sequences per decode step."""
    values = dict(line.split(" ", 1) for line in metrics.splitlines() if line.startswith("dsocr_batch_size_s")
                  or line.startswith("dsocr_batch_size_c"))
    return float(values.get("dsocr_batch_size_sum", 0)), float(values.get("dsocr_batch_size_count", 0))


def print_sweep(console: Console, sweep: list[tuple[int, Totals, float, float]], args: argparse.Namespace) -> None:
    table = Table(title=f"dsocr server concurrency sweep: {args.seconds:.0f} s each, max_tokens {args.max_tokens}, "
                        f"mode {args.mode}, model {Path(args.model).name}, {args.backend} {args.device} {args.dtype}")
    for column in ("clients", "requests", "errors", "output tok/s", "x 1st", "seq/step", "latency p50 (s)", "x 1st",
                   "latency p95 (s)", "TTFT p50 (s)", "x 1st", "TTFT p95 (s)"):
        table.add_column(column, justify="right")
    base = None
    for clients, totals, elapsed, per_step in sweep:
        samples = totals.samples
        tokens = sum(s.completion_tokens for s in samples) / elapsed
        lat = [s.latency_s for s in samples]
        ttft = [s.ttft_s for s in samples]
        row = (tokens, percentile(lat, 0.5), percentile(ttft, 0.5))
        base = base or row
        table.add_row(
            str(clients), str(len(samples)), str(sum(totals.errors.values())), f"{tokens:.1f}",
            f"{tokens / base[0]:.2f}", f"{per_step:.2f}", f"{row[1]:.3f}", f"{row[1] / base[1]:.2f}",
            f"{percentile(lat, 0.95):.3f}", f"{row[2]:.3f}", f"{row[2] / base[2]:.2f}", f"{percentile(ttft, 0.95):.3f}",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(FIXTURES / "model"), help="model directory (default: tiny fixture)")
    parser.add_argument("--make-random-full", type=Path, default=None, metavar="DIR",
                        help="write a full-size random-weight checkpoint to DIR and exit")
    parser.add_argument("--clients", default="4", help="concurrent clients, or a comma list for a sweep")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--mode", default="tiny")
    parser.add_argument("--image", type=Path, default=FIXTURES / "images" / "doc_text.png")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=None, help="the server's --max-batch (default: its own)")
    parser.add_argument("--url", default=None, help="benchmark an already running server instead of starting one")
    args = parser.parse_args(argv)
    console = Console(width=200)

    if args.make_random_full is not None:
        make_random_full(args.make_random_full)
        console.print(f"wrote a full-size random checkpoint to {args.make_random_full}")
        return 0

    baseline = None
    if not args.url and "," not in str(args.clients):  # before the server starts, so the two never share the CPU
        with console.status("in-process baseline (Engine, no server)"):
            baseline = engine_baseline(args, min(args.seconds, 15.0))

    process = None
    headers: dict[str, str] = {}
    if args.url:
        base = args.url.rstrip("/")
        if os.environ.get("DSOCR_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['DSOCR_API_KEY']}"
    else:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        command = [sys.executable, str(ROOT / "server.py"), "--model", args.model, "--port", str(port),
                   "--device", args.device, "--backend", args.backend, "--dtype", args.dtype,
                   "--mode", args.mode, "--max-queue", str(args.max_queue)]
        if args.max_batch:
            command += ["--max-batch", str(args.max_batch)]
        env = {k: v for k, v in os.environ.items() if k != "DSOCR_API_KEY"}
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if process is not None:
            with console.status("starting the server and loading the model"):
                wait_ready(base, process, timeout_s=1800)
        image_url = "data:image/png;base64," + base64.b64encode(args.image.read_bytes()).decode()
        body = {
            "model": "deepseek-ocr",
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": args.max_tokens,
            "mode": args.mode,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": "Free OCR."},
            ]}],
        }
        asyncio.run(run_load(base, 1, 0.0, body, headers))  # warm-up request
        counts = [int(c) for c in str(args.clients).split(",")]
        sweep = []
        for clients in counts:
            before = batch_counts(httpx.get(f"{base}/metrics", headers=headers, timeout=10).text)
            with console.status(f"{clients} clients for {args.seconds:.0f} s"):
                totals, elapsed = asyncio.run(run_load(base, clients, args.seconds, body, headers))
            metrics = httpx.get(f"{base}/metrics", headers=headers, timeout=10).text
            after = batch_counts(metrics)
            steps = after[1] - before[1]
            sweep.append((clients, totals, elapsed, (after[0] - before[0]) / steps if steps else float("nan")))
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    if len(sweep) > 1:
        print_sweep(console, sweep, args)
        return 0
    _, totals, elapsed, _ = sweep[0]
    args.clients = counts[0]

    samples = totals.samples
    latencies = [s.latency_s for s in samples]
    ttfts = [s.ttft_s for s in samples]
    tokens = sum(s.completion_tokens for s in samples)
    table = Table(title=f"dsocr server: {args.clients} clients, {elapsed:.1f} s, max_tokens {args.max_tokens}, "
                        f"mode {args.mode}, model {Path(args.model).name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("requests completed", f"{len(samples)}"),
        ("errors", ", ".join(f"{k}: {v}" for k, v in totals.errors.items()) or "0"),
        ("requests/s", f"{len(samples) / elapsed:.2f}"),
        ("output tokens/s", f"{tokens / elapsed:.1f}"),
        ("mean output tokens/request", f"{tokens / max(len(samples), 1):.1f}"),
        ("latency p50 (s)", f"{percentile(latencies, 0.5):.3f}"),
        ("latency p95 (s)", f"{percentile(latencies, 0.95):.3f}"),
        ("TTFT p50 (s)", f"{percentile(ttfts, 0.5):.3f}"),
        ("TTFT p95 (s)", f"{percentile(ttfts, 0.95):.3f}"),
        ("latency mean (s)", f"{statistics.fmean(latencies):.3f}" if latencies else "nan"),
    ]
    if baseline is not None:
        rows += [
            ("baseline: Engine in-process requests/s", f"{baseline[0]:.2f}"),
            ("server requests/s ÷ in-process", f"{len(samples) / elapsed / baseline[0]:.2f}x"),
            ("server output tokens/s ÷ in-process", f"{tokens / elapsed / baseline[1]:.2f}x"),
        ]
    for line in metrics.splitlines():
        if line.startswith(("dsocr_generated_tokens_total", "dsocr_generations_total", "dsocr_requests_rejected")):
            name, value = line.split(" ", 1)
            rows.append((f"server {name}", value))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
