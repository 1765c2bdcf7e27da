"""Server metrics on prometheus_client, and the ASGI middleware that counts responses. Thread-safe.

Each `Metrics` has its own registry, so several apps can live in one process (the tests make many). The text
is prometheus_client's exposition (format 0.0.4) with one difference: the `<name>_created` series the client adds
to counters and histograms are left out, as they were before (the process-wide switch that turns them off,
`disable_created_metrics()`, would change every other user of the client). Values are printed as floats
(`dsocr_generations_total 3.0`, bucket bound `le="1.0"`), which Prometheus reads as the same numbers.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from common.memory import rss_bytes

_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LAG_SAMPLE_S = 0.1


class _WithoutCreated(Collector):
    """A registry's metrics less the `_created` samples (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():  # fresh Metric objects on every collect
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class Metrics:
    """The server's series; `render` gives the Prometheus text exposition."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # render sets the gauges it is given, then collects: one at a time
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "dsocr_requests_total", "HTTP requests by path and status code.", ["path", "status"], registry=registry
        )
        self._prompt_tokens = Counter("dsocr_prompt_tokens_total", "Prompt tokens processed.", registry=registry)
        self._completion_tokens = Counter(
            "dsocr_generated_tokens_total", "Completion tokens generated.", registry=registry
        )
        self._generations = Counter(
            "dsocr_generations_total", "Generations run (finished or cancelled).", registry=registry
        )
        self._cancelled = Counter(
            "dsocr_generations_cancelled_total", "Generations cancelled by client disconnect.", registry=registry
        )
        self._failed = Counter("dsocr_generations_failed_total", "Generations that raised an error.", registry=registry)
        self._rejected = Counter(
            "dsocr_requests_rejected_total", "Requests refused with 429 (queue full).", registry=registry
        )
        self._queue_depth = Gauge("dsocr_queue_depth", "Requests waiting for the inference worker.", registry=registry)
        self._running = Gauge("dsocr_requests_running", "Requests being generated.", registry=registry)
        self._running_sequences = Gauge(
            "dsocr_running_sequences",
            "Sequences in the generation loop (decoding or taking in their prompt).",
            registry=registry,
        )
        self._ready = Gauge("dsocr_model_ready", "1 once the model is loaded.", registry=registry)
        memory = Gauge("dsocr_resident_memory_bytes", "Resident memory of the server process.", registry=registry)
        memory.set_function(rss_bytes)
        self._ttft = Histogram(
            "dsocr_time_to_first_token_seconds",
            "Time from dequeue to the first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self._batch = Histogram(
            "dsocr_batch_size", "Sequences decoded together per decode step.", buckets=_BATCH_BUCKETS, registry=registry
        )
        self._loop_lag = Histogram(
            "dsocr_event_loop_lag_seconds",
            f"How late the event loop ran a callback due after {LAG_SAMPLE_S:g} s (sampled continuously).",
            buckets=_LAG_BUCKETS,
            registry=registry,
        )
        self._loop_lag_max = Gauge("dsocr_event_loop_lag_max_seconds", "The largest event-loop lag seen.",
                                   registry=registry)
        self._exposed = _WithoutCreated(registry)
        self.running_sequences = 0  # set by the admission loop; read when rendering

    def record_request(self, path: str, status: int) -> None:
        self._requests.labels(path=path, status=str(status)).inc()

    def record_generation(self, prompt_tokens: int, completion_tokens: int, cancelled: bool) -> None:
        self._generations.inc()
        self._prompt_tokens.inc(prompt_tokens)
        self._completion_tokens.inc(completion_tokens)
        if cancelled:
            self._cancelled.inc()

    def record_rejected(self) -> None:
        self._rejected.inc()

    def record_failed(self) -> None:
        self._failed.inc()

    def record_ttft(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def record_batch(self, size: int) -> None:
        """One decode step of `size` sequences (the generation loop's on_step hook)."""
        self._batch.observe(size)

    async def sample_loop_lag(self) -> None:
        """Runs until cancelled: how late the loop wakes a sleeper is how long every request waits to be served."""
        loop, largest = asyncio.get_running_loop(), 0.0
        while True:
            due = loop.time() + LAG_SAMPLE_S
            await asyncio.sleep(LAG_SAMPLE_S)
            lag = max(0.0, loop.time() - due)
            self._loop_lag.observe(lag)
            if lag > largest:
                largest = lag
                self._loop_lag_max.set(lag)

    def render(self, queue_depth: int, running: int, ready: bool) -> str:
        with self._lock:
            self._queue_depth.set(queue_depth)
            self._running.set(running)
            self._running_sequences.set(self.running_sequences)
            self._ready.set(int(ready))
            return generate_latest(self._exposed).decode("utf-8")


class MetricsMiddleware:
    """Counts responses by route path and status code."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        handler = scope.get("route_handler")
        path = next(iter(sorted(handler.paths)), "other") if handler is not None else "other"

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                scope["app"].state.metrics.record_request(path, int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)
