"""Server metrics in the Prometheus text format (hand-written: a handful of series), and the ASGI middleware
that counts responses. Thread-safe."""

from __future__ import annotations

import collections
import threading
from typing import Any

from common.memory import rss_bytes

_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Counters for the Prometheus text exposition (hand-written: a handful of series)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.generations = 0
        self.cancelled = 0
        self.failed = 0
        self.rejected_queue_full = 0
        self.ttft_counts = [0] * (len(_TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.batch_counts = [0] * (len(_BATCH_BUCKETS) + 1)
        self.batch_sum = 0
        self.running_sequences = 0

    def record_request(self, path: str, status: int) -> None:
        with self._lock:
            self.requests[(path, status)] += 1

    def record_generation(self, prompt_tokens: int, completion_tokens: int, cancelled: bool) -> None:
        with self._lock:
            self.generations += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.cancelled += int(cancelled)

    def record_rejected(self) -> None:
        with self._lock:
            self.rejected_queue_full += 1

    def record_failed(self) -> None:
        with self._lock:
            self.failed += 1

    def record_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft_sum += seconds
            index = next((i for i, b in enumerate(_TTFT_BUCKETS) if seconds <= b), len(_TTFT_BUCKETS))
            self.ttft_counts[index] += 1

    def record_batch(self, size: int) -> None:
        """One decode step of `size` sequences (the generation loop's on_step hook)."""
        with self._lock:
            self.batch_sum += size
            index = next((i for i, b in enumerate(_BATCH_BUCKETS) if size <= b), len(_BATCH_BUCKETS))
            self.batch_counts[index] += 1

    def render(self, queue_depth: int, running: int, ready: bool) -> str:
        with self._lock:
            lines = [
                "# HELP dsocr_requests_total HTTP requests by path and status code.",
                "# TYPE dsocr_requests_total counter",
            ]
            for (path, status), count in sorted(self.requests.items()):
                lines.append(f'dsocr_requests_total{{path="{path}",status="{status}"}} {count}')
            scalars = [
                ("dsocr_prompt_tokens_total", "counter", "Prompt tokens processed.", self.prompt_tokens),
                (
                    "dsocr_generated_tokens_total",
                    "counter",
                    "Completion tokens generated.",
                    self.completion_tokens,
                ),
                (
                    "dsocr_generations_total",
                    "counter",
                    "Generations run (finished or cancelled).",
                    self.generations,
                ),
                (
                    "dsocr_generations_cancelled_total",
                    "counter",
                    "Generations cancelled by client disconnect.",
                    self.cancelled,
                ),
                (
                    "dsocr_generations_failed_total",
                    "counter",
                    "Generations that raised an error.",
                    self.failed,
                ),
                (
                    "dsocr_requests_rejected_total",
                    "counter",
                    "Requests refused with 429 (queue full).",
                    self.rejected_queue_full,
                ),
                ("dsocr_queue_depth", "gauge", "Requests waiting for the inference worker.", queue_depth),
                ("dsocr_requests_running", "gauge", "Requests being generated.", running),
                (
                    "dsocr_running_sequences",
                    "gauge",
                    "Sequences in the generation loop (decoding or taking in their prompt).",
                    self.running_sequences,
                ),
                ("dsocr_model_ready", "gauge", "1 once the model is loaded.", int(ready)),
                ("dsocr_resident_memory_bytes", "gauge", "Resident memory of the server process.", rss_bytes()),
            ]
            for name, kind, help_text, value in scalars:
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
            lines += [
                "# HELP dsocr_time_to_first_token_seconds Time from dequeue to the first generated token.",
                "# TYPE dsocr_time_to_first_token_seconds histogram",
            ]
            cumulative = 0
            for bound, count in zip((*_TTFT_BUCKETS, float("inf")), self.ttft_counts, strict=True):
                cumulative += count
                label = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f'dsocr_time_to_first_token_seconds_bucket{{le="{label}"}} {cumulative}')
            lines.append(f"dsocr_time_to_first_token_seconds_sum {self.ttft_sum:.6f}")
            lines.append(f"dsocr_time_to_first_token_seconds_count {cumulative}")
            lines += [
                "# HELP dsocr_batch_size Sequences decoded together per decode step.",
                "# TYPE dsocr_batch_size histogram",
            ]
            cumulative = 0
            for bound, count in zip((*_BATCH_BUCKETS, float("inf")), self.batch_counts, strict=True):
                cumulative += count
                label = "+Inf" if bound == float("inf") else str(bound)
                lines.append(f'dsocr_batch_size_bucket{{le="{label}"}} {cumulative}')
            lines.append(f"dsocr_batch_size_sum {self.batch_sum}")
            lines.append(f"dsocr_batch_size_count {cumulative}")
        return "\n".join(lines) + "\n"


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
