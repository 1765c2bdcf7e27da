"""Server soak: hostile traffic of every known class beside normal OCR traffic, with /health, the event loop's lag
and the memory watched throughout.

    python benchmarks/soak_server.py                      # tiny fixture model, 30 s warm-up, 600 s soak
    python benchmarks/soak_server.py --seconds 60         # a shorter look

Starts `server.py` in a subprocess on a free loopback port (the tiny random-weight fixture model by default; the
private-URL refusals are part of the corpus, so no request leaves the machine). After a warm-up of normal traffic
the memory baseline is taken (the warm-up also sends every hostile case once); then, for `--seconds`:
- normal clients send image and text chats (some streamed, some with log-probabilities) and must get 200s;
- a hostile client replays tests/hostile.py's corpus and the classes of "Hardening, round 2" (JSON schemas of
  2,500 chained $refs and explosive regex patterns, unsatisfiable schemas, PDF content-stream bombs, lying page
  counts, TIFFs of 40,000 pages, malformed TIFFs, top_k 2^31, empty prompts, tool_choice "required", NaN and BOM
  bodies, bodies of too many values, wrong content types, foreign Host and Origin headers);
- a big-body client sends bursts of 8 concurrent 40 MB requests;
- a slow-loris client keeps opening batches of 200 connections that never finish their request;
- a prober GETs /health 10 times a second.
Prints a table and exits 1 unless: no 5xx, the server alive, /health p99 under 100 ms, every normal request
answered, and the resident memory back within 10% of the baseline at the end. The event loop's lag comes from the
server's own sampler (dsocr_event_loop_lag_seconds in /metrics).
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.hostile import (  # noqa: E402
    corpus,
    data_url,
    file_chat,
    image_chat,
    pdf_claiming_pages,
    pdf_content_bomb,
    png_bytes,
    text_chat,
    tiff_pages,
    tiff_without_dimensions,
)

MODEL_DIR = ROOT / "tests" / "fixtures" / "deepseek-ocr" / "model"
JSON = {"Content-Type": "application/json"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_rss(pid: int) -> int:
    """Resident memory of a process and its children (the PDF render workers), in bytes."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1)) * 1024  # type: ignore[union-attr]
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, AttributeError):
            continue
    return total


def own_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1)) * 1024  # type: ignore[union-attr]


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status: dict[str, Counter[str]] = {}
        self.normal_s: list[float] = []
        self.spans: list[tuple[str, float, float]] = []  # (what, wall-clock start, end) of hostile requests

    def add(self, kind: str, status: int | str, seconds: float = 0.0) -> None:
        with self.lock:
            self.status.setdefault(kind, Counter())[str(status)] += 1
            if kind.startswith("normal"):
                self.normal_s.append(seconds)

    def count(self, predicate: Any) -> int:
        return sum(n for counts in self.status.values() for status, n in counts.items() if predicate(status))


def ref_chain(links: int) -> dict[str, Any]:
    defs: dict[str, Any] = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(links)}
    defs[f"d{links}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def schema_chat(schema: dict[str, Any]) -> dict[str, Any]:
    return text_chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
                     max_tokens=8)


def round_two_cases() -> list[tuple[str, bytes, dict[str, str]]]:
    """(name, body, headers) of the classes found by the second bad-input run."""
    def js(body: Any) -> bytes:
        return json.dumps(body).encode()

    png = png_bytes()
    cases = [
        ("$ref chain", js(schema_chat(ref_chain(2500))), JSON),
        ("explosive regex", js(schema_chat({"type": "object", "properties": {
            "a": {"type": "string", "pattern": "^((a{100}){100}){100}$"}}, "required": ["a"]})), JSON),
        ("self-referring schema", js(schema_chat({"$defs": {"s": {"$ref": "#/$defs/s"}}, "$ref": "#/$defs/s"})),
         JSON),
        ("top_k 2^31", js(text_chat(temperature=1, top_k=2**31)), JSON),
        ("pdf content bomb", js(file_chat(pdf_content_bomb(2_000_000))), JSON),
        ("pdf claiming 10^6 pages", js(file_chat(pdf_claiming_pages(1_000_000))), JSON),
        ("tiff of 40,000 pages", js(image_chat(data_url(tiff_pages(40_000), "image/tiff"))), JSON),
        ("tiff without dimensions", js(image_chat(data_url(tiff_without_dimensions(), "image/tiff"))), JSON),
        ("empty prompt", js({"model": "deepseek-ocr", "messages": [{"role": "user", "content": ""}]}), JSON),
        ("audio only", js({"model": "deepseek-ocr", "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}), JSON),
        ("tool_choice required", js(text_chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                              tool_choice="required")), JSON),
        ("logit_bias", js(text_chat(logit_bias={"1": 5})), JSON),
        ("NaN", b'{"model": "deepseek-ocr", "temperature": NaN, "messages": []}', JSON),
        ("1e400", b'{"model": "deepseek-ocr", "temperature": 1e400, "messages": []}', JSON),
        ("BOM", b"\xef\xbb\xbf" + js(text_chat()), JSON),
        ("UTF-16", json.dumps(text_chat()).encode("utf-16"), JSON),
        ("too many values", js({"model": "deepseek-ocr", "messages": [{"role": "user", "content": "a"}] * 40_000}),
         JSON),
        ("16 MB shallow body", js(text_chat(user="u" * 16_000_000)), JSON),
        ("text/plain", js(text_chat()), {"Content-Type": "text/plain"}),
        ("form", js(text_chat()), {"Content-Type": "application/x-www-form-urlencoded"}),
        ("foreign Host", js(text_chat()), {**JSON, "Host": "attacker.example"}),
        ("foreign Origin", js(text_chat()), {**JSON, "Origin": "http://attacker.example"}),
        ("17 images", js({"model": "deepseek-ocr", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png)}}] * 17}]}), JSON),
    ]
    return cases


def hostile_cases() -> list[tuple[str, bytes, dict[str, str]]]:
    old = [(f"corpus: {c.name}", c.raw if c.raw is not None else json.dumps(c.body).encode(), JSON) for c in corpus()]
    return round_two_cases() + old


def hostile_client(base: str, stop_at: float, tally: Tally, once: bool = False) -> None:
    cases = hostile_cases() if once else itertools.cycle(hostile_cases())
    with httpx.Client(base_url=base, timeout=300) as client:
        for name, body, headers in cases:
            if time.monotonic() >= stop_at:
                break
            start = time.time()
            try:
                response = client.post("/v1/chat/completions", content=body, headers=headers)
                tally.add("hostile", response.status_code)
            except httpx.TransportError as exc:
                tally.add("hostile", f"dropped ({type(exc).__name__})")
            with tally.lock:
                tally.spans.append((name, start, time.time()))


def normal_client(base: str, stop_at: float, tally: Tally, max_tokens: int) -> None:
    image = data_url(png_bytes((900, 1200)))
    bodies = itertools.cycle([
        ("normal", image_chat(image, max_tokens=max_tokens, mode="tiny")),
        ("normal", text_chat("Write a title for this chat.", max_tokens=max_tokens)),
        ("normal (logprobs)", image_chat(image, max_tokens=max_tokens, mode="tiny", logprobs=True, top_logprobs=3)),
        ("normal (stream)", image_chat(image, max_tokens=max_tokens, mode="tiny", stream=True)),
    ])
    with httpx.Client(base_url=base, timeout=300) as client:
        while time.monotonic() < stop_at:
            kind, body = next(bodies)
            t0 = time.perf_counter()
            try:
                response = client.post("/v1/chat/completions", json=body)
                status: int | str = response.status_code
            except httpx.TransportError as exc:
                status = f"dropped ({type(exc).__name__})"
            tally.add(kind, status, time.perf_counter() - t0)
            if status == 429:
                time.sleep(0.5)


def big_body_client(base: str, stop_at: float, tally: Tally) -> None:
    blob = base64.b64encode(os.urandom(30_000_000)).decode()
    body = json.dumps(image_chat("data:image/png;base64," + blob)).encode()  # 40 MB, not an image

    def one() -> None:
        start = time.time()
        try:
            response = httpx.post(f"{base}/v1/chat/completions", content=body, headers=JSON, timeout=300)
            tally.add("big bodies", response.status_code)
        except httpx.TransportError as exc:
            tally.add("big bodies", f"dropped ({type(exc).__name__})")
        with tally.lock:
            tally.spans.append(("40 MB body", start, time.time()))

    while time.monotonic() < stop_at:
        burst = [threading.Thread(target=one) for _ in range(8)]
        for thread in burst:
            thread.start()
        for thread in burst:
            thread.join()
        time.sleep(min(20.0, max(0.0, stop_at - time.monotonic())))


def slow_loris(port: int, stop_at: float, tally: Tally) -> None:
    while time.monotonic() < stop_at:
        socks = []
        for _ in range(200):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99\r\n")
                socks.append(sock)
            except OSError:
                tally.add("slow loris", "connect failed")
        tally.add("slow loris", "held", 0.0)
        time.sleep(12.0)  # past the server's 10 s head deadline: it closes them first
        for sock in socks:
            sock.close()


def prober(base: str, seconds: float, out: str) -> None:
    """GET /health 10 times a second; runs in its own process so the soak's client threads do not delay it."""
    stop_at = time.monotonic() + seconds
    probes = []
    with httpx.Client(base_url=base, timeout=5) as client:
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                ok = client.get("/health").status_code == 200
            except httpx.TransportError:
                ok = False
            elapsed = time.perf_counter() - t0
            probes.append((time.time(), elapsed, ok))
            time.sleep(max(0.0, 0.1 - elapsed))
    Path(out).write_text(json.dumps(probes))


def lag_buckets(base: str) -> dict[float, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {float(m.group(1)): float(m.group(2)) for m in
            re.finditer(r'^dsocr_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)', text, re.M)}


def quantile_bound(buckets: dict[float, float], q: float) -> float:
    """The upper bound of the bucket holding the q-quantile."""
    total = max(buckets.values())
    return next(bound for bound, count in sorted(buckets.items()) if count >= q * total)


def run_phase(threads: list[threading.Thread], console: Console, what: str) -> None:
    with console.status(what):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MODEL_DIR))
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--warmup", type=float, default=30.0)
    parser.add_argument("--normal-clients", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--classes", default="hostile,big,loris",
                        help="which hostile clients run beside the normal ones (comma-separated; default all)")
    parser.add_argument("--probe", nargs=3, metavar=("BASE", "SECONDS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        prober(args.probe[0], float(args.probe[1]), args.probe[2])
        return 0
    classes = set(args.classes.split(",")) if args.classes else set()

    console = Console()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, str(ROOT / "server.py"), "--model", args.model, "--port", str(port), "--device", "cpu",
               "--dtype", "float32", "--mode", "tiny", "--max-connections", "256"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tally = Tally()
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                console.print("the server did not start")
                return 1
            time.sleep(0.2)
        warm = Tally()
        stop_at = time.monotonic() + args.warmup
        warming = [threading.Thread(target=normal_client, args=(base, stop_at, warm, args.max_tokens))
                   for _ in range(args.normal_clients)]
        # every class once, so the baseline holds what a first request of each loads for good (modules, pools,
        # caches within their bounds); what stays beyond that at the end would be a leak
        warming.append(threading.Thread(target=hostile_client, args=(base, stop_at + 600, warm, True)))
        run_phase(warming, console, f"warm-up, {args.warmup:.0f} s and one pass of the hostile classes")
        time.sleep(2.0)
        baseline = tree_rss(process.pid)
        lag_before = lag_buckets(base)
        peak = [baseline]
        stop_at = time.monotonic() + args.seconds

        own_at: list[tuple[float, int]] = []  # (seconds into the soak, the server's own RSS) once a minute

        def watch_memory() -> None:
            started = time.monotonic()
            while time.monotonic() < stop_at:
                peak[0] = max(peak[0], tree_rss(process.pid))
                if not own_at or time.monotonic() - started >= own_at[-1][0] + 60:
                    own_at.append((time.monotonic() - started, own_rss(process.pid)))
                time.sleep(1.0)

        threads = [threading.Thread(target=normal_client, args=(base, stop_at, tally, args.max_tokens))
                   for _ in range(args.normal_clients)]
        clients = {"hostile": (hostile_client, (base, stop_at, tally)),
                   "big": (big_body_client, (base, stop_at, tally)),
                   "loris": (slow_loris, (port, stop_at, tally))}
        threads += [threading.Thread(target=target, args=a) for name, (target, a) in clients.items() if name in classes]
        threads.append(threading.Thread(target=watch_memory))
        probes_file = Path(tempfile.mkdtemp()) / "probes.json"
        probing = subprocess.Popen([sys.executable, __file__, "--probe", base, str(args.seconds), str(probes_file)])
        run_phase(threads, console, f"soak, {args.seconds:.0f} s")
        probing.wait(60)
        probes = json.loads(probes_file.read_text()) if probes_file.exists() else []
        time.sleep(10.0)  # the last requests end, freed memory goes back
        end, end_own = tree_rss(process.pid), own_rss(process.pid)
        lag_after = lag_buckets(base)
        alive = process.poll() is None and httpx.get(f"{base}/health", timeout=5).status_code == 200
    finally:
        process.terminate()
        process.wait(30)

    lag = {bound: lag_after[bound] - lag_before.get(bound, 0.0) for bound in lag_after}
    health = sorted(elapsed for _, elapsed, _ in probes)
    health_failed = sum(not ok for _, _, ok in probes)
    p99 = health[int(len(health) * 0.99) - 1] if health else float("nan")
    five_xx = tally.count(lambda s: s.isdigit() and int(s) >= 500)
    normal_failed = sum(n for kind, counts in tally.status.items() if kind.startswith("normal")
                        for status, n in counts.items() if status not in ("200", "429"))
    memory_ok = end <= baseline * 1.10
    checks = {"no 5xx": five_xx == 0, "alive": alive, "/health answered": bool(health) and not health_failed,
              "/health p99 < 100 ms": p99 < 0.1,
              "normal requests answered": normal_failed == 0, "memory back within 10%": memory_ok}

    table = Table(title=f"dsocr server soak: {args.seconds:.0f} s after {args.warmup:.0f} s of warm-up, tiny model")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for kind, counts in sorted(tally.status.items()):
        table.add_row(f"{kind}: requests", ", ".join(f"{s} x{n}" for s, n in sorted(counts.items())))
    latencies = sorted(tally.normal_s)
    rows = [
        ("5xx responses", five_xx),
        ("normal requests not 200 (429 excepted)", normal_failed),
        ("normal latency p50", f"{statistics.median(latencies):.2f} s" if latencies else "-"),
        ("/health probes (failed)", f"{len(health)} ({health_failed})"),
        ("/health p50 / p99 / max", f"{statistics.median(health) * 1e3:.1f} / {p99 * 1e3:.1f} / "
                                    f"{health[-1] * 1e3:.1f} ms" if health else "-"),
        ("event-loop lag samples", f"{max(lag.values()):.0f}" if lag else "-"),
        ("event-loop lag p99 (bucket bound)", f"<= {quantile_bound(lag, 0.99) * 1e3:.0f} ms" if lag else "-"),
        ("event-loop lag samples > 100 ms", f"{max(lag.values()) - lag.get(0.1, 0.0):.0f}" if lag else "-"),
        ("RSS after warm-up (server + workers)", f"{baseline / 2**20:.0f} MB"),
        ("RSS peak", f"{peak[0] / 2**20:.0f} MB"),
        ("server's own RSS each minute", " ".join(f"{rss / 2**20:.0f}" for _, rss in own_at) + " MB"),
        ("RSS at the end (server alone)", f"{end / 2**20:.0f} MB ({end_own / 2**20:.0f} MB)"),
        ("RSS end / after warm-up", f"{end / baseline:.3f}"),
    ] + [(f"check: {name}", "pass" if ok else "FAIL") for name, ok in checks.items()]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
    slowest = sorted(probes, key=lambda probe: -probe[1])[:8]
    for at, elapsed, _ in slowest:  # which hostile requests were in flight when /health was slowest
        during = sorted({name for name, start, end in tally.spans if start <= at + elapsed and end >= at})
        console.print(f"/health {elapsed * 1e3:.0f} ms, during: {', '.join(during) or 'normal traffic only'}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
