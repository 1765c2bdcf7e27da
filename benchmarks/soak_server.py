"""Server soak: a mixed bad-input corpus replayed alongside normal traffic, on loopback, for a bounded time.

    python benchmarks/soak_server.py                  # tiny fixture model, 120 s
    python benchmarks/soak_server.py --seconds 30 --clients 4

Starts `server.py` in a subprocess on a free loopback port (the tiny random-weight fixture model by default;
the private-URL refusals are part of the corpus, so no request leaves the machine). Half the clients send the
hostile corpus of tests/hostile.py in a loop, the other half send normal OCR requests. Prints a table: requests
by kind, 5xx count (must be 0), p50/p95 latency of the normal requests, and the server's RSS at start, peak
and end. Exits 1 when any 5xx was seen.
"""

from __future__ import annotations

import argparse
import itertools
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.hostile import corpus, data_url, image_chat, png_bytes, text_chat  # noqa: E402

MODEL_DIR = ROOT / "tests" / "fixtures" / "deepseek-ocr" / "model"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def memory_of(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {"hostile": 0, "normal": 0, "5xx": 0, "normal failed": 0}
        self.normal_s: list[float] = []

    def add(self, kind: str, status: int, seconds: float) -> None:
        with self.lock:
            self.counts[kind] += 1
            if status >= 500:
                self.counts["5xx"] += 1
            if kind == "normal":
                self.normal_s.append(seconds)
                if status != 200:
                    self.counts["normal failed"] += 1


def hostile_client(base: str, stop_at: float, tally: Tally) -> None:
    cases = itertools.cycle(corpus())
    with httpx.Client(base_url=base, timeout=120) as client:
        while time.monotonic() < stop_at:
            case = next(cases)
            t0 = time.perf_counter()
            if case.raw is not None:
                response = client.post("/v1/chat/completions", content=case.raw,
                                       headers={"Content-Type": "application/json"})
            else:
                response = client.post("/v1/chat/completions", json=case.body)
            tally.add("hostile", response.status_code, time.perf_counter() - t0)


def normal_client(base: str, stop_at: float, tally: Tally, max_tokens: int) -> None:
    bodies = itertools.cycle([image_chat(data_url(png_bytes((900, 1200))), max_tokens=max_tokens, mode="tiny"),
                              text_chat("Write a title for this chat.", max_tokens=max_tokens)])
    with httpx.Client(base_url=base, timeout=120) as client:
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            response = client.post("/v1/chat/completions", json=next(bodies))
            tally.add("normal", response.status_code, time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MODEL_DIR))
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--clients", type=int, default=4, help="half hostile, half normal (at least 2)")
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()

    console = Console()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, str(ROOT / "server.py"), "--model", args.model, "--port", str(port), "--device", "cpu",
               "--dtype", "float32", "--mode", "tiny", "--max-queue", "64"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        start_rss, _ = memory_of(process.pid)
        tally = Tally()
        stop_at = time.monotonic() + args.seconds
        hostile = max(1, args.clients // 2)
        threads = [threading.Thread(target=hostile_client, args=(base, stop_at, tally)) for _ in range(hostile)]
        threads += [threading.Thread(target=normal_client, args=(base, stop_at, tally, args.max_tokens))
                    for _ in range(max(1, args.clients - hostile))]
        with console.status(f"{len(threads)} clients for {args.seconds:.0f} s"):
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        time.sleep(1.0)
        end_rss, peak_rss = memory_of(process.pid)
        alive = process.poll() is None and httpx.get(f"{base}/health", timeout=5).status_code == 200
    finally:
        process.terminate()
        process.wait(30)

    latencies = sorted(tally.normal_s)
    p95 = latencies[max(0, int(len(latencies) * 0.95) - 1)] if latencies else float("nan")
    table = Table(title=f"dsocr server soak: {args.seconds:.0f} s, {args.clients} clients, tiny mode")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in (
        ("requests (hostile)", tally.counts["hostile"]),
        ("requests (normal)", tally.counts["normal"]),
        ("normal requests not 200", tally.counts["normal failed"]),
        ("5xx responses", tally.counts["5xx"]),
        ("normal latency p50", f"{statistics.median(latencies):.2f} s" if latencies else "-"),
        ("normal latency p95", f"{p95:.2f} s"),
        ("RSS start", f"{start_rss / 2**20:.0f} MB"),
        ("RSS peak", f"{peak_rss / 2**20:.0f} MB"),
        ("RSS end", f"{end_rss / 2**20:.0f} MB"),
        ("server healthy at the end", "yes" if alive else "NO"),
    ):
        table.add_row(name, str(value))
    console.print(table)
    return 0 if tally.counts["5xx"] == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
