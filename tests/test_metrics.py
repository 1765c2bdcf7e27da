"""common.serve.metrics: each series with its name, type, help and buckets; a registry per Metrics; the middleware."""

from __future__ import annotations

import asyncio
import math
import time
import types
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from common.serve.metrics import Metrics, MetricsMiddleware

# name -> (type, help) as /metrics has always shown them
SERIES = {
    "dsocr_requests": ("counter", "HTTP requests by path and status code."),
    "dsocr_prompt_tokens": ("counter", "Prompt tokens processed."),
    "dsocr_generated_tokens": ("counter", "Completion tokens generated."),
    "dsocr_generations": ("counter", "Generations run (finished or cancelled)."),
    "dsocr_generations_cancelled": ("counter", "Generations cancelled by client disconnect."),
    "dsocr_generations_failed": ("counter", "Generations that raised an error."),
    "dsocr_requests_rejected": ("counter", "Requests refused with 429 (queue full)."),
    "dsocr_queue_depth": ("gauge", "Requests waiting for the inference worker."),
    "dsocr_requests_running": ("gauge", "Requests being generated."),
    "dsocr_running_sequences": ("gauge", "Sequences in the generation loop (decoding or taking in their prompt)."),
    "dsocr_model_ready": ("gauge", "1 once the model is loaded."),
    "dsocr_resident_memory_bytes": ("gauge", "Resident memory of the server process."),
    "dsocr_time_to_first_token_seconds": ("histogram", "Time from dequeue to the first generated token."),
    "dsocr_batch_size": ("histogram", "Sequences decoded together per decode step."),
    "dsocr_event_loop_lag_seconds": ("histogram",
                                     "How late the event loop ran a callback due after 0.1 s (sampled continuously)."),
    "dsocr_event_loop_lag_max_seconds": ("gauge", "The largest event-loop lag seen."),
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_every_series_with_its_type_and_help() -> None:
    text = Metrics().render(0, 0, False)
    families = {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(text)}
    assert families == SERIES
    assert "_created" not in text  # the client's extra series are left out, as before
    # Counters keep their `_total` names (what dashboards and the tests read).
    for name, (kind, help_text) in SERIES.items():
        exposed = f"{name}_total" if kind == "counter" else name
        assert f"# HELP {exposed} {help_text}\n# TYPE {exposed} {kind}\n" in text


def test_values_and_buckets() -> None:
    metrics = Metrics()
    metrics.record_request("/v1/chat/completions", 200)
    metrics.record_request("/v1/chat/completions", 200)
    metrics.record_request("/health", 503)
    metrics.record_generation(10, 5, cancelled=False)
    metrics.record_generation(3, 2, cancelled=True)
    metrics.record_failed()
    metrics.record_rejected()
    for seconds in (0.05, 0.3, 100.0):
        metrics.record_ttft(seconds)
    for size in (1, 3, 500):
        metrics.record_batch(size)
    metrics.running_sequences = 2
    got = samples(metrics.render(4, 1, True))
    assert got[("dsocr_requests_total", (("path", "/v1/chat/completions"), ("status", "200")))] == 2
    assert got[("dsocr_requests_total", (("path", "/health"), ("status", "503")))] == 1
    scalars = {name: value for (name, labels), value in got.items() if not labels}
    assert {k: v for k, v in scalars.items() if not k.endswith(("_sum", "_count", "memory_bytes"))} == {
        "dsocr_prompt_tokens_total": 13, "dsocr_generated_tokens_total": 7, "dsocr_generations_total": 2,
        "dsocr_generations_cancelled_total": 1, "dsocr_generations_failed_total": 1,
        "dsocr_requests_rejected_total": 1, "dsocr_queue_depth": 4, "dsocr_requests_running": 1,
        "dsocr_running_sequences": 2, "dsocr_model_ready": 1, "dsocr_event_loop_lag_max_seconds": 0,
    }
    assert scalars["dsocr_resident_memory_bytes"] > 1 << 20
    ttft = {float(dict(labels)["le"]): v for (name, labels), v in got.items()
            if name == "dsocr_time_to_first_token_seconds_bucket"}
    assert ttft == {0.05: 1, 0.1: 1, 0.25: 1, 0.5: 2, 1.0: 2, 2.5: 2, 5.0: 2, 10.0: 2, 30.0: 2, 60.0: 2, math.inf: 3}
    assert math.isclose(scalars["dsocr_time_to_first_token_seconds_sum"], 100.35)
    assert scalars["dsocr_time_to_first_token_seconds_count"] == 3
    batch = {float(dict(labels)["le"]): v for (name, labels), v in got.items() if name == "dsocr_batch_size_bucket"}
    assert batch == {1: 1, 2: 1, 4: 2, 8: 2, 16: 2, 32: 2, 64: 2, 128: 2, math.inf: 3}
    assert (scalars["dsocr_batch_size_sum"], scalars["dsocr_batch_size_count"]) == (504, 3)


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.record_failed()
    assert "dsocr_generations_failed_total 1.0" in first.render(0, 0, True)
    assert "dsocr_generations_failed_total 0.0" in second.render(0, 0, True)


def test_middleware_counts_responses_by_route_path() -> None:
    metrics = Metrics()
    app_state = types.SimpleNamespace(state=types.SimpleNamespace(metrics=metrics))

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": scope["status"]})
        await send({"type": "http.response.body", "body": b""})

    async def run(scope: dict[str, Any]) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await MetricsMiddleware(app)(scope, None, send)
        return sent

    handler = types.SimpleNamespace(paths={"/v1/chat/completions"})
    sent = asyncio.run(run({"type": "http", "route_handler": handler, "app": app_state, "status": 400}))
    asyncio.run(run({"type": "http", "app": app_state, "status": 404}))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    got = samples(metrics.render(0, 0, True))
    assert got[("dsocr_requests_total", (("path", "/v1/chat/completions"), ("status", "400")))] == 1
    assert got[("dsocr_requests_total", (("path", "other"), ("status", "404")))] == 1


def test_event_loop_lag_is_sampled() -> None:
    """A callback that blocks the loop for 0.3 s shows as a lag of about 0.3 s."""
    metrics = Metrics()

    async def scenario() -> None:
        sampler = asyncio.create_task(metrics.sample_loop_lag())
        await asyncio.sleep(0.15)
        time.sleep(0.3)  # the loop is blocked: the sampler's wake-up is late
        await asyncio.sleep(0.25)
        sampler.cancel()

    asyncio.run(scenario())
    got = samples(metrics.render(0, 0, True))
    assert 0.2 <= got[("dsocr_event_loop_lag_max_seconds", ())] < 1.0
    assert got[("dsocr_event_loop_lag_seconds_count", ())] >= 2
    assert got[("dsocr_event_loop_lag_seconds_bucket", (("le", "0.1"),))] < got[
        ("dsocr_event_loop_lag_seconds_count", ())]
