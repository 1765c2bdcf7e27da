"""OpenAI-compatible HTTP server for DeepSeek-OCR (Litestar + uvicorn).

    python server.py --model deepseek-ai/DeepSeek-OCR --port 8000
    # Open WebUI / openai client: base URL http://localhost:8000/v1, model "deepseek-ocr"

One inference worker thread owns the engine (MLX streams are thread-local and CUDA likes one owner); HTTP handlers
parse and preprocess requests, then hand `InferenceRequest` objects to the `Scheduler`, whose bounded queue turns
overload into 429s. Results come back to the event loop as events (text deltas, then the final result), so the
scheduler can later decode several requests in one batch without changing the HTTP side.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import contextlib
import hmac
import ipaddress
import logging
import os
import sys
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

from litestar import Litestar, Request, Response, Router, get, post
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.enums import RequestEncodingType
from litestar.exceptions import HTTPException, NotAuthorizedException, ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.params import Body, Parameter
from litestar.response import Stream
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from PIL import Image

from common.errors import DsocrError, ImageError, InputError
from common.families import DEEPSEEK_OCR, ModelFamily, check_mode_name, family_of_model_dir
from common.images import DEFAULT_MAX_PIXELS, load_image
from common.modes import Mode, resolve_mode
from common.openai_schema import (
    MODEL_ID,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    CompletionUsage,
    ContentPart,
    GenerationOptions,
    IncompleteDetails,
    ModelCard,
    ModelList,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    encode,
    error_body,
    new_id,
    now,
    stop_strings,
)
from common.postprocess import GroundingStripper
from common.prompt import IMAGE_TOKEN, TASKS, ChatMessage, ImagePart, TextPart, fold_conversation
from common.remote import fetch_url
from common.sampling import DEFAULT_MAX_NEW_TOKENS, SamplingParams

log = logging.getLogger("dsocr.server")

ProgressCallback = Callable[[str, int, int], None]
# When a request has images but no instruction, OCR the page to Markdown (the authors' document prompt).
DEFAULT_IMAGE_INSTRUCTION = TASKS["markdown"].replace(f"{IMAGE_TOKEN}\n", "")
PDF_RENDER_DPI = 144  # the authors' pdf_to_images default


# ------------------------------------------------------------------------------------------------ engine interface


class GenerationLike(Protocol):
    result: Any

    def __iter__(self) -> Iterator[str]: ...

    def cancel(self) -> None: ...


class EngineLike(Protocol):
    """What the server needs from `common.engine.Engine` (tests may pass a stand-in)."""

    model_dir: Path

    def prepare(self, prompt: str, images: list[Image.Image], mode: Mode) -> Any: ...

    def generate(self, prepared: Any, params: SamplingParams) -> GenerationLike: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


EngineLoader = Callable[[ProgressCallback], EngineLike]


@dataclass
class ServerSettings:
    model_ids: tuple[str, ...] = (MODEL_ID,)  # first is advertised; all are accepted (case-insensitive)
    mode: str | None = None  # None: the model family's default preset
    family: ModelFamily = DEEPSEEK_OCR  # set from the engine once it is loaded
    max_queue: int = 16
    max_body_mb: float = 64.0
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    allow_private_urls: bool = False
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # default and upper bound for a request
    keepalive_s: float = 5.0
    max_images: int = 16
    max_pdf_pages: int = 8
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    fetch_timeout_s: float = 15.0
    fetch_max_bytes: int = 32 * 1024 * 1024
    on_load_error: Callable[[BaseException], None] | None = None


# ------------------------------------------------------------------------------------------------ errors


class APIError(Exception):
    """An error answered in OpenAI's JSON format."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}


def _error_response(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response[bytes]:
    return Response(
        encode(error_body(message, type_, code=code, param=param)),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def _handle_api_error(_: Request, exc: APIError) -> Response[bytes]:
    return _error_response(exc.status, exc.message, exc.type, exc.code, exc.param, exc.headers)


def _handle_http_exception(request: Request, exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    message = exc.detail or "error"
    if isinstance(exc, ValidationException) and exc.extra:
        problems = exc.extra if isinstance(exc.extra, list) else [exc.extra]
        details = "; ".join(str(p.get("message", p)) if isinstance(p, dict) else str(p) for p in problems)
        message = f"invalid request body: {details}"
    code = {401: "invalid_api_key", 404: "not_found", 413: "request_too_large"}.get(status)
    kind = _STATUS_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return _error_response(status, message, kind, code, headers=getattr(exc, "headers", None))


def _handle_dsocr_error(_: Request, exc: DsocrError) -> Response[bytes]:
    return _error_response(400, str(exc), "invalid_request_error", type(exc).__name__)


def _handle_unexpected(request: Request, exc: Exception) -> Response[bytes]:
    log.exception("unexpected error handling %s %s", request.method, request.url.path)
    return _error_response(500, f"internal error: {type(exc).__name__}", "server_error")


# ------------------------------------------------------------------------------------------------ metrics

_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


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

    def record_request(self, path: str, status: int) -> None:
        with self._lock:
            self.requests[(path, status)] += 1

    def record_generation(self, prompt_tokens: int, completion_tokens: int, cancelled: bool) -> None:
        with self._lock:
            self.generations += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.cancelled += int(cancelled)

    def record_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft_sum += seconds
            index = next((i for i, b in enumerate(_TTFT_BUCKETS) if seconds <= b), len(_TTFT_BUCKETS))
            self.ttft_counts[index] += 1

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
                ("dsocr_model_ready", "gauge", "1 once the model is loaded.", int(ready)),
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
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """Counts responses by route path and status code."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        handler = scope.get("route_handler")
        path = next(iter(sorted(handler.paths)), "other") if handler is not None else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                scope["app"].state.metrics.record_request(path, int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


# ------------------------------------------------------------------------------------------------ scheduler


class QueueFullError(Exception):
    pass


class ShuttingDownError(Exception):
    pass


@dataclass
class InferenceRequest:
    """One generation job. Events go back to the event loop: ("delta", str), ("done", result), ("error", exc)."""

    prepared: Any
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    id: str = field(default_factory=lambda: new_id("req"))
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    enqueued_at: float = field(default_factory=time.perf_counter)
    generation: GenerationLike | None = None
    strip_grounding: bool = True
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Thread-safe; the generation stops before its next decode step."""
        self._cancelled.set()
        generation = self.generation
        if generation is not None:
            generation.cancel()

    def emit(self, kind: str, payload: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class Scheduler:
    """Owns the engine on one worker thread and serves queued requests.

    Today it runs one request at a time; `_next_batch` is where a batching policy would gather several compatible
    requests for one batched decode loop. The HTTP side only sees submit / cancel / events.
    """

    def __init__(
        self,
        engine_or_loader: EngineLike | EngineLoader,
        max_queue: int,
        metrics: Metrics,
        on_load_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._source = engine_or_loader
        self.engine: EngineLike | None = None
        self.max_queue = max_queue
        self.metrics = metrics
        self.state = "loading"
        self.load_error: str | None = None
        self.progress: dict[str, Any] = {}
        self._on_load_error = on_load_error
        self._queue: collections.deque[InferenceRequest] = collections.deque()
        self._cond = threading.Condition()
        self._running: list[InferenceRequest] = []
        self._stopping = False
        self._service_s = 1.0  # moving average of a request's service time, for Retry-After
        self._thread = threading.Thread(target=self._run, name="dsocr-inference", daemon=True)
        self._ready_listeners: list[Callable[[EngineLike], None]] = []

    # --- public (event-loop side)
    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    def on_ready(self, listener: Callable[[EngineLike], None]) -> None:
        self._ready_listeners.append(listener)

    def start(self) -> None:
        self._thread.start()

    def full(self) -> bool:
        return len(self._queue) >= self.max_queue

    def retry_after_s(self) -> int:
        return max(1, round(self._service_s * (len(self._queue) + 1) / max(self.max_queue, 1)))

    def submit(self, request: InferenceRequest) -> None:
        with self._cond:
            if self._stopping:
                raise ShuttingDownError()
            if len(self._queue) >= self.max_queue:
                self.metrics.rejected_queue_full += 1
                raise QueueFullError()
            self._queue.append(request)
            self._cond.notify()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuses queued requests, cancels running ones and waits for the worker to finish."""
        with self._cond:
            already_stopping, self._stopping = self._stopping, True
            queued = list(self._queue)
            self._queue.clear()
            running = list(self._running)
            self._cond.notify_all()
        for request in queued:
            request.cancel()
            request.emit("error", APIError(503, "the server is shutting down", "service_unavailable"))
        for request in running:
            request.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if already_stopping or self._thread.is_alive():
            return  # closed by the first caller, or the worker is stuck: leave the engine to process exit
        if self.engine is not None:
            try:
                self.engine.close()
            except Exception:  # closing is best effort at exit
                log.exception("error closing the engine")

    # --- worker thread
    def _progress(self, what: str, done: int, total: int) -> None:
        self.progress = {"what": what, "done": done, "total": total}
        if total and (done == total or done % max(1, total // 10) == 0):
            log.info("loading %s: %d/%d", what, done, total)

    def _run(self) -> None:
        if callable(self._source) and not hasattr(self._source, "generate"):
            try:
                self.engine = self._source(self._progress)
            except BaseException as exc:  # report, never crash silently
                self.state, self.load_error = "error", str(exc) or type(exc).__name__
                log.error("model failed to load: %s", self.load_error)
                if self._on_load_error is not None:
                    self._on_load_error(exc)
                return
        else:
            self.engine = self._source  # type: ignore[assignment]
        assert self.engine is not None
        for listener in self._ready_listeners:
            listener(self.engine)
        self.state = "ready"
        log.info("model ready: %s", self.engine.describe())
        while True:
            batch = self._next_batch()
            if not batch:
                return
            for request in batch:
                self._serve(request)

    def _next_batch(self) -> list[InferenceRequest]:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return []
            request = self._queue.popleft()
            self._running.append(request)
            return [request]

    def _serve(self, request: InferenceRequest) -> None:
        assert self.engine is not None
        started = time.perf_counter()
        try:
            if request.cancelled:
                request.emit("error", APIError(499, "cancelled before it started"))
                return
            generation = self.engine.generate(request.prepared, request.params)
            request.generation = generation
            if request.cancelled:  # cancel() raced with generate(): make sure the generation sees it
                generation.cancel()
            deltas = iter(generation)
            stripper = GroundingStripper() if request.strip_grounding else None
            first = True
            try:
                for delta in deltas:
                    if first:
                        self.metrics.record_ttft(time.perf_counter() - started)
                        first = False
                    if stripper is not None:
                        delta = stripper.feed(delta)
                    if delta:
                        request.emit("delta", delta)
                    if request.cancelled:
                        break
                if stripper is not None and (tail := stripper.flush()):
                    request.emit("delta", tail)
            finally:
                close = getattr(deltas, "close", None)
                if close is not None:
                    close()  # runs the generation's cleanup, which sets its result
            result = generation.result
            if result is not None:
                if first and result.completion_tokens:
                    self.metrics.record_ttft(time.perf_counter() - started)
                self.metrics.record_generation(result.prompt_tokens, result.completion_tokens, request.cancelled)
            request.emit("done", result)
        except DsocrError as exc:
            self.metrics.failed += 1
            request.emit("error", APIError(400, str(exc), code=type(exc).__name__))
        except Exception as exc:  # no request may take the worker down
            self.metrics.failed += 1
            log.exception("generation failed")
            request.emit("error", APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error"))
        finally:
            elapsed = time.perf_counter() - started
            self._service_s = 0.8 * self._service_s + 0.2 * elapsed
            with self._cond:
                if request in self._running:
                    self._running.remove(request)


# ------------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class MediaRef:
    """An image or PDF named by a request, resolved only if its turn survives folding."""

    url: str
    kind: str = "image"  # "image" or "file"


def _decode_data_url(url: str) -> tuple[str, bytes]:
    header, sep, payload = url[len("data:") :].partition(",")
    if not sep:
        raise ImageError("malformed data URL: expected data:<type>;base64,<data>")
    media_type, *params = header.split(";")
    if "base64" in (p.strip().lower() for p in params):
        compact = "".join(payload.split())
        try:
            data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            try:  # some clients send URL-safe base64
                data = base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
            except (binascii.Error, ValueError):
                raise ImageError("image data URL is not valid base64") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if not data:
        raise ImageError("image data URL is empty")
    return media_type.strip().lower(), data


def _is_pdf(media_type: str, data: bytes) -> bool:
    return media_type == "application/pdf" or data[:5] == b"%PDF-"


def render_pdf(data: bytes, max_pages: int, max_pixels: int) -> list[Image.Image]:
    """Renders each page of a PDF to an RGB image at the authors' 144 dpi."""
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        raise ImageError(f"cannot read the PDF: {exc}") from None
    try:
        pages = len(pdf)
        if pages == 0:
            raise ImageError("the PDF has no pages")
        if pages > max_pages:
            raise ImageError(f"the PDF has {pages} pages; this server accepts at most {max_pages} per request")
        images = []
        for index in range(pages):
            page = pdf[index]
            width, height = page.get_size()
            scale = PDF_RENDER_DPI / 72
            if width * height * scale * scale > max_pixels:
                raise ImageError(f"PDF page {index + 1} is too large to render")
            images.append(page.render(scale=scale).to_pil().convert("RGB"))
            page.close()
        return images
    finally:
        pdf.close()


def resolve_media(ref: MediaRef, settings: ServerSettings) -> list[Image.Image]:
    """Decodes a data URL or fetches an http(s) URL; a PDF becomes one image per page."""
    url = ref.url.strip()
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        media_type, data = _decode_data_url(url)
    elif scheme in ("http", "https"):
        fetched = fetch_url(
            url,
            allow_private=settings.allow_private_urls,
            timeout_s=settings.fetch_timeout_s,
            max_bytes=settings.fetch_max_bytes,
            allow_pdf=True,
        )
        media_type, data = fetched.content_type, fetched.data
    else:
        raise ImageError("image URLs must be data: URLs (base64) or http(s) URLs")
    if _is_pdf(media_type, data):
        return render_pdf(data, settings.max_pdf_pages, settings.max_image_pixels)
    return [load_image(data, max_pixels=settings.max_image_pixels)]


def _clean_text(text: str) -> str:
    # The literal placeholder in user text would be taken for an image slot.
    return text.replace(IMAGE_TOKEN, "")


def _parts_of(content: str | list[ContentPart] | None) -> list[TextPart | ImagePart]:
    if content is None:
        return []
    if isinstance(content, str):
        return [TextPart(_clean_text(content))]
    parts: list[TextPart | ImagePart] = []
    for part in content:
        kind = part.type
        if kind in ("text", "input_text", "output_text") and part.text is not None:
            parts.append(TextPart(_clean_text(part.text)))
        elif kind in ("image_url", "input_image"):
            image_url = part.image_url
            url = image_url if isinstance(image_url, str) else image_url.url if image_url is not None else None
            if not url:
                raise APIError(400, f"a {kind} part needs an image_url", param="image_url")
            parts.append(ImagePart(MediaRef(url)))
        elif kind in ("file", "input_file"):
            url = None
            if part.file is not None:
                url = part.file.file_data or part.file.url
            url = url or part.file_data
            if not url:
                raise APIError(400, "a file part needs file_data (a data: URL)", param="file")
            parts.append(ImagePart(MediaRef(url, kind="file")))
        # other part types (audio, refusal, ...) carry nothing the model can read: skipped
    return parts


@dataclass
class Job:
    prompt: str
    refs: list[MediaRef]
    mode: Mode
    params: SamplingParams
    strip_grounding: bool = True


def _mode_for(options: GenerationOptions, settings: ServerSettings) -> Mode:
    return resolve_mode(
        options.mode or settings.mode,
        family=settings.family,
        base_size=options.base_size,
        image_size=options.image_size,
        crop_mode=options.crop_mode,
        min_crops=options.min_crops,
        max_crops=options.max_crops,
    )


def _params_for(
    options: GenerationOptions,
    settings: ServerSettings,
    *,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: str | list[str] | None,
) -> SamplingParams:
    extra: dict[str, Any] = {}
    if options.no_repeat_ngram_size is not None:
        extra["no_repeat_ngram_size"] = options.no_repeat_ngram_size
    if options.ngram_window is not None:
        extra["ngram_window"] = options.ngram_window
    return SamplingParams(
        max_new_tokens=min(max_tokens or settings.max_new_tokens, settings.max_new_tokens),
        temperature=0.0 if temperature is None else temperature,  # OCR wants greedy unless asked otherwise
        top_p=1.0 if top_p is None else top_p,
        top_k=top_k or 0,
        seed=seed,
        stop=stop_strings(stop),
        **extra,
    )


def _fold(messages: list[ChatMessage]) -> tuple[str, list[MediaRef]]:
    prompt, payloads = fold_conversation(messages)
    refs = [p for p in payloads if isinstance(p, MediaRef)]
    if refs and not prompt.replace(IMAGE_TOKEN, "").strip():
        prompt = prompt + DEFAULT_IMAGE_INSTRUCTION
    return prompt, refs


def _job(
    body: ChatCompletionRequest | ResponsesRequest, messages: list[ChatMessage], max_tokens: int | None,
    settings: ServerSettings,
) -> Job:
    """Both APIs share the sampling and DeepSeek-OCR fields; only the messages and the token limit differ."""
    prompt, refs = _fold(messages)
    params = _params_for(
        body,
        settings,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop,
    )
    return Job(prompt, refs, _mode_for(body, settings), params, body.grounding != "keep")


def chat_job(body: ChatCompletionRequest, settings: ServerSettings) -> Job:
    messages = [ChatMessage(role=m.role, parts=_parts_of(m.content)) for m in body.messages]
    return _job(body, messages, body.max_completion_tokens or body.max_tokens, settings)


def responses_job(body: ResponsesRequest, settings: ServerSettings) -> Job:
    if isinstance(body.input, str):
        messages = [ChatMessage(role="user", parts=[TextPart(_clean_text(body.input))])]
    else:
        messages = [ChatMessage(role=item.role, parts=_parts_of(item.content)) for item in body.input]
    return _job(body, messages, body.max_output_tokens, settings)


def prepare_job(engine: EngineLike, job: Job, settings: ServerSettings) -> Any:
    """Resolves the images (each PDF to its pages) and builds the model inputs. Runs off the event loop."""
    if len(job.refs) > settings.max_images:
        raise APIError(400, f"at most {settings.max_images} images per request, got {len(job.refs)}")
    resolved = [resolve_media(ref, settings) for ref in job.refs]
    images = [image for group in resolved for image in group]
    if len(images) > settings.max_images:
        raise APIError(400, f"at most {settings.max_images} images (PDF pages included) per request")
    prompt = job.prompt
    if any(len(group) != 1 for group in resolved):
        # A PDF stands for several images: widen its single placeholder to one per page.
        pieces = prompt.split(IMAGE_TOKEN)
        prompt = pieces[0]
        for group, piece in zip(resolved, pieces[1:], strict=True):
            prompt += f"{IMAGE_TOKEN}\n" * (len(group) - 1) + IMAGE_TOKEN + piece
    return engine.prepare(prompt, images, job.mode)


# ------------------------------------------------------------------------------------------------ handlers


def _state(request: Request) -> tuple[Scheduler, ServerSettings]:
    return request.app.state.scheduler, request.app.state.settings


def _check_model(name: str, settings: ServerSettings) -> None:
    if name.strip().lower() not in {m.lower() for m in settings.model_ids}:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {settings.model_ids[0]!r}",
            code="model_not_found",
            param="model",
        )


def _check_ready(scheduler: Scheduler) -> EngineLike:
    if scheduler.state == "error":
        raise APIError(503, f"the model failed to load: {scheduler.load_error}", "service_unavailable")
    if not scheduler.ready or scheduler.engine is None:
        raise APIError(
            503,
            "the model is still loading; try again shortly",
            "service_unavailable",
            headers={"Retry-After": "5"},
        )
    return scheduler.engine


def _queue_full(scheduler: Scheduler) -> APIError:
    return APIError(
        429,
        "the server is busy (request queue full); retry later",
        "rate_limit_error",
        code="queue_full",
        headers={"Retry-After": str(scheduler.retry_after_s())},
    )


async def _submit(request: Request, job: Job) -> InferenceRequest:
    scheduler, settings = _state(request)
    engine = _check_ready(scheduler)
    if scheduler.full():  # refuse before spending time on images
        scheduler.metrics.rejected_queue_full += 1
        raise _queue_full(scheduler)
    prepared = await asyncio.to_thread(prepare_job, engine, job, settings)
    inference = InferenceRequest(
        prepared=prepared, params=job.params, loop=asyncio.get_running_loop(), strip_grounding=job.strip_grounding
    )
    try:
        scheduler.submit(inference)
    except QueueFullError:
        raise _queue_full(scheduler) from None
    except ShuttingDownError:
        raise APIError(503, "the server is shutting down", "service_unavailable") from None
    return inference


async def _next_event(inference: InferenceRequest, keepalive_s: float) -> tuple[str, Any] | None:
    """The next event, or None when `keepalive_s` passed without one."""
    try:
        return await asyncio.wait_for(inference.events.get(), timeout=keepalive_s)
    except TimeoutError:
        return None


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(request: Request, inference: InferenceRequest) -> tuple[str, Any]:
    """Waits for a non-streamed result; a client that hangs up cancels its generation."""

    async def gather() -> tuple[str, Any]:
        pieces: list[str] = []
        while True:
            kind, payload = await inference.events.get()
            if kind == "delta":
                pieces.append(payload)
            elif kind == "done":
                return "".join(pieces), payload
            else:
                raise payload

    result_task = asyncio.ensure_future(gather())
    disconnect_task = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({result_task, disconnect_task}, return_when=asyncio.FIRST_COMPLETED)
        if not result_task.done():
            inference.cancel()
            result_task.cancel()
            raise APIError(499, "client disconnected")
        return result_task.result()
    finally:
        disconnect_task.cancel()
        if not result_task.done():
            inference.cancel()
            result_task.cancel()


def _sse(payload: bytes, event: str | None = None) -> bytes:
    prefix = f"event: {event}\n".encode() if event else b""
    return prefix + b"data: " + payload + b"\n\n"


KEEPALIVE = b": keep-alive\n\n"


async def _event_stream(inference: InferenceRequest, keepalive_s: float) -> AsyncIterator[tuple[str, Any] | None]:
    """Yields events until done/error, and None every `keepalive_s` of silence; cancels the job if abandoned."""
    try:
        while True:
            event = await _next_event(inference, keepalive_s)
            yield event
            if event is not None and event[0] != "delta":
                return
    finally:
        inference.cancel()  # no-op once finished; stops the generation when the client went away


def _sse_response(body: AsyncIterator[bytes], inference: InferenceRequest) -> Stream:
    async def cancel_if_abandoned() -> None:
        inference.cancel()

    from litestar.background_tasks import BackgroundTask

    return Stream(
        body,
        status_code=200,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(cancel_if_abandoned),
    )


def _error_event(exc: BaseException) -> bytes:
    if isinstance(exc, APIError):
        return encode(error_body(exc.message, exc.type, code=exc.code))
    return encode(error_body(str(exc), "server_error"))


@post("/chat/completions", status_code=200, summary="Create a chat completion (OpenAI-compatible)")
async def chat_completions(
    request: Request, data: Annotated[ChatCompletionRequest, Body(media_type=RequestEncodingType.JSON)]
) -> Response:
    scheduler, settings = _state(request)
    _check_model(data.model, settings)
    inference = await _submit(request, chat_job(data, settings))
    completion_id, created, model = new_id("chatcmpl"), now(), data.model
    if not data.stream:
        text, result = await _collect(request, inference)
        body = ChatCompletion(
            id=completion_id,
            created=created,
            model=model,
            choices=[ChatChoice(0, AssistantMessage(text), result.finish_reason)],
            usage=_usage(result),
        )
        return Response(encode(body), status_code=200, media_type="application/json")

    include_usage = bool(data.stream_options and data.stream_options.include_usage)

    def chunk(delta: ChunkDelta, finish: str | None = None) -> bytes:
        return _sse(encode(ChatCompletionChunk(completion_id, created, model, [ChunkChoice(0, delta, finish)])))

    async def body_stream() -> AsyncIterator[bytes]:
        yield chunk(ChunkDelta(role="assistant", content=""))
        async for event in _event_stream(inference, settings.keepalive_s):
            if event is None:
                yield KEEPALIVE
                continue
            kind, payload = event
            if kind == "delta":
                yield chunk(ChunkDelta(content=payload))
            elif kind == "done":
                yield chunk(ChunkDelta(), payload.finish_reason)
                if include_usage:
                    yield _sse(encode(ChatCompletionChunk(completion_id, created, model, [], usage=_usage(payload))))
            else:
                yield _sse(_error_event(payload))
        yield b"data: [DONE]\n\n"

    return _sse_response(body_stream(), inference)


def _usage(result: Any) -> CompletionUsage:
    return CompletionUsage(
        result.prompt_tokens, result.completion_tokens, result.prompt_tokens + result.completion_tokens
    )


def _response_object(
    response_id: str, message_id: str, created: int, body: ResponsesRequest, text: str, result: Any | None
) -> ResponseObject:
    status, incomplete, usage = "in_progress", None, None
    if result is not None:
        status = "completed" if result.finish_reason != "length" else "incomplete"
        if status == "incomplete":
            incomplete = IncompleteDetails("max_output_tokens")
        usage = ResponseUsage(
            result.prompt_tokens, result.completion_tokens, result.prompt_tokens + result.completion_tokens
        )
    output = [OutputMessage(message_id, [OutputText(text)], status=status)] if result is not None else []
    return ResponseObject(
        id=response_id,
        created_at=created,
        model=body.model,
        output=output,
        status=status,
        usage=usage,
        incomplete_details=incomplete,
        instructions=body.instructions,
        temperature=body.temperature,
        top_p=body.top_p,
        max_output_tokens=body.max_output_tokens,
    )


@post("/responses", status_code=200, summary="Create a model response (OpenAI Responses API)")
async def responses(
    request: Request, data: Annotated[ResponsesRequest, Body(media_type=RequestEncodingType.JSON)]
) -> Response:
    scheduler, settings = _state(request)
    _check_model(data.model, settings)
    inference = await _submit(request, responses_job(data, settings))
    response_id, message_id, created = new_id("resp"), new_id("msg"), now()
    if not data.stream:
        text, result = await _collect(request, inference)
        return Response(
            encode(_response_object(response_id, message_id, created, data, text, result)),
            status_code=200,
            media_type="application/json",
        )

    async def body_stream() -> AsyncIterator[bytes]:
        sequence = 0

        def event(kind: str, **fields: Any) -> bytes:
            nonlocal sequence
            payload = {"type": kind, "sequence_number": sequence, **fields}
            sequence += 1
            return _sse(encode(payload), event=kind)

        started = _response_object(response_id, message_id, created, data, "", None)
        yield event("response.created", response=started)
        yield event("response.in_progress", response=started)
        in_progress_item = {
            "id": message_id,
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        yield event("response.output_item.added", output_index=0, item=in_progress_item)
        yield event(
            "response.content_part.added",
            item_id=message_id,
            output_index=0,
            content_index=0,
            part={"type": "output_text", "text": "", "annotations": []},
        )
        pieces: list[str] = []
        async for item in _event_stream(inference, settings.keepalive_s):
            if item is None:
                yield KEEPALIVE
                continue
            kind, payload = item
            if kind == "delta":
                pieces.append(payload)
                yield event(
                    "response.output_text.delta",
                    item_id=message_id,
                    output_index=0,
                    content_index=0,
                    delta=payload,
                    logprobs=[],
                )
            elif kind == "done":
                text = "".join(pieces)
                final = _response_object(response_id, message_id, created, data, text, payload)
                yield event(
                    "response.output_text.done",
                    item_id=message_id,
                    output_index=0,
                    content_index=0,
                    text=text,
                    logprobs=[],
                )
                yield event(
                    "response.content_part.done",
                    item_id=message_id,
                    output_index=0,
                    content_index=0,
                    part=OutputText(text),
                )
                yield event("response.output_item.done", output_index=0, item=final.output[0])
                yield event(
                    "response.completed" if final.status == "completed" else "response.incomplete",
                    response=final,
                )
            else:
                message = payload.message if isinstance(payload, APIError) else str(payload)
                failed = _response_object(response_id, message_id, created, data, "".join(pieces), None)
                failed.status = "failed"
                failed.error = error_body(message, "server_error").error
                yield event("response.failed", response=failed)

    return _sse_response(body_stream(), inference)


@get("/models", summary="List the served model")
async def list_models(request: Request) -> ModelList:
    _, settings = _state(request)
    return ModelList(data=[ModelCard(id=settings.model_ids[0], created=request.app.state.started_at)])


@get("/models/{model_id:path}", summary="Describe the served model")
async def retrieve_model(request: Request, model_id: Annotated[str, Parameter()]) -> ModelCard:
    _, settings = _state(request)
    name = model_id.lstrip("/")
    _check_model(name, settings)
    return ModelCard(id=settings.model_ids[0], created=request.app.state.started_at)


@get("/health", summary="Liveness and readiness", sync_to_thread=False)
def health(request: Request) -> Response:
    scheduler: Scheduler = request.app.state.scheduler
    body: dict[str, Any] = {
        "status": scheduler.state,
        "queue_depth": scheduler.queue_depth,
        "running": scheduler.running,
    }
    if scheduler.state == "loading" and scheduler.progress:
        body["progress"] = scheduler.progress
    if scheduler.state == "error":
        body["error"] = scheduler.load_error
    if scheduler.ready and scheduler.engine is not None:
        body["model"] = scheduler.engine.describe()
    return Response(encode(body), status_code=200 if scheduler.ready else 503, media_type="application/json")


@get("/metrics", summary="Prometheus metrics", sync_to_thread=False)
def metrics(request: Request) -> Response:
    scheduler: Scheduler = request.app.state.scheduler
    text = request.app.state.metrics.render(scheduler.queue_depth, scheduler.running, scheduler.ready)
    return Response(text, status_code=200, media_type="text/plain; version=0.0.4; charset=utf-8")


def _require_api_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    key: str | None = connection.app.state.settings.api_key
    if not key:
        return
    scheme, _sep, token = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise NotAuthorizedException("missing or invalid API key: send the header 'Authorization: Bearer <key>'")


# ------------------------------------------------------------------------------------------------ app


def create_app(engine_or_loader: EngineLike | EngineLoader, settings: ServerSettings | None = None) -> Litestar:
    """The Litestar app. Pass a loaded engine, or a loader `(progress) -> engine` run on the worker thread."""
    settings = settings or ServerSettings()
    app_metrics = Metrics()
    scheduler = Scheduler(engine_or_loader, settings.max_queue, app_metrics, settings.on_load_error)

    def add_model_aliases(engine: EngineLike) -> None:
        names = list(settings.model_ids)
        model_dir = getattr(engine, "model_dir", None)
        if model_dir is not None:
            names += [Path(model_dir).name, str(model_dir)]
        settings.model_ids = tuple(dict.fromkeys(n for n in names if n))
        settings.family = getattr(engine, "family", settings.family)  # its modes are the ones requests may use

    scheduler.on_ready(add_model_aliases)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        scheduler.start()  # loads the model on the worker thread; /health says "loading" meanwhile
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    v1 = Router(
        "/v1",
        route_handlers=[chat_completions, responses, list_models, retrieve_model],
        guards=[_require_api_key],
        security=[{"bearer": []}],
    )
    cors = (
        CORSConfig(allow_origins=list(settings.cors_origins), allow_methods=["*"], allow_headers=["*"])
        if settings.cors_origins
        else None
    )
    app = Litestar(
        route_handlers=[v1, health, metrics],
        lifespan=[lifespan],
        middleware=[MetricsMiddleware],
        exception_handlers={
            APIError: _handle_api_error,
            HTTPException: _handle_http_exception,
            DsocrError: _handle_dsocr_error,
            Exception: _handle_unexpected,
        },
        cors_config=cors,
        request_max_body_size=int(settings.max_body_mb * 1024 * 1024),
        openapi_config=OpenAPIConfig(
            title="dsocr",
            version="0.1.0",
            description="OpenAI-compatible DeepSeek-OCR server",
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(type="http", scheme="bearer", description="--api-key / DSOCR_API_KEY"),
                }
            ),
        ),
        debug=False,
    )
    app.state.settings = settings
    app.state.scheduler = scheduler
    app.state.metrics = app_metrics
    app.state.started_at = now()
    return app


# ------------------------------------------------------------------------------------------------ command line


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsocr-server", description="OpenAI-compatible DeepSeek-OCR server")
    parser.add_argument(
        "--model",
        default=None,
        help="model directory or Hugging Face repo id (default deepseek-ai/DeepSeek-OCR)",
    )
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--offline", action="store_true", help="never touch the network; use the local cache")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 to expose)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "metal"])
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"])
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (backend-dependent)")
    parser.add_argument(
        "--mode", default=None, help="default resolution mode (default gundam): tiny, small, base, large, gundam "
        "for DeepSeek-OCR; gundam, base, small for DeepSeek-OCR 2"
    )
    parser.add_argument("--max-queue", type=int, default=16, help="requests allowed to wait (then 429)")
    parser.add_argument("--max-body-mb", type=float, default=64.0, help="request body limit in MB (then 413)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("DSOCR_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $DSOCR_API_KEY)",
    )
    parser.add_argument("--cors-origins", default="", help="comma-separated origins allowed for browsers (none)")
    parser.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="allow image URLs that resolve to private, loopback or link-local addresses",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"default and maximum completion tokens per request (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    return parser


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    model_ids = [MODEL_ID]
    if args.model:
        model_ids += [args.model, Path(args.model).name]
    return ServerSettings(
        model_ids=tuple(dict.fromkeys(model_ids)),
        mode=args.mode,
        max_queue=args.max_queue,
        max_body_mb=args.max_body_mb,
        api_key=args.api_key or None,
        cors_origins=tuple(o.strip() for o in args.cors_origins.split(",") if o.strip()),
        allow_private_urls=args.allow_private_urls,
        max_new_tokens=args.max_new_tokens,
    )


def main(argv: Iterable[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.max_queue < 1 or args.max_body_mb <= 0 or args.max_new_tokens < 1:
        print("error: --max-queue, --max-body-mb and --max-new-tokens must be positive", file=sys.stderr)
        return 2
    try:
        check_mode_name(args.mode)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = settings_from_args(args)
    if not _is_loopback(args.host) and not settings.api_key:
        print(
            f"warning: listening on {args.host} without an API key: anyone who can reach this port can use the "
            "model. Set --api-key or DSOCR_API_KEY.",
            file=sys.stderr,
        )

    import uvicorn

    def load_engine(progress: ProgressCallback) -> EngineLike:
        from common.engine import Engine
        from common.hub import resolve_model

        model_dir = resolve_model(args.model, revision=args.revision, offline=args.offline)
        resolve_mode(args.mode, family=family_of_model_dir(model_dir))  # a preset the model lacks: fail before loading
        return Engine.load(
            str(model_dir),
            backend=args.backend,
            device=args.device,
            dtype=args.dtype,
            revision=args.revision,
            offline=args.offline,
            progress=progress,
        )

    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    settings.on_load_error = on_load_error
    app = create_app(load_engine, settings)

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Cancel in-flight generations first so open streams end and uvicorn's shutdown is prompt.
            threading.Thread(target=app.state.scheduler.stop, daemon=True).start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="debug" if args.verbose > 1 else "info",
        timeout_graceful_shutdown=30,
        access_log=args.verbose > 0,
    )
    server = GracefulServer(config)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the captured Ctrl-C after shutting down
        server.run()
    if failed:
        print(f"error: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
