"""From a parsed request to a running generation, refusing before the expensive work.

The order: the model must be ready (503 otherwise) and the engine's queue must have room (429 with Retry-After);
remote media are fetched on the fetch executor within one deadline; then, on the small prepare executor, the chat's
media become images (limits first, decoding last), the images become model inputs, and the request is submitted
to the engine core (which fits its token budget to a lane or refuses it). Nothing proportional to a request's size
runs on the event loop; the generated text comes back through the request's handle.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from common.engine.backend import ProgressCallback
from common.engine.engine import Engine
from common.engine.requests import RequestHandle
from common.engine.sampling import DEFAULT_MAX_NEW_TOKENS, SamplingOptions, SamplingParams
from common.engine.scheduler import QueueFullError
from common.engine.sequence import BACKGROUND, INTERACTIVE, inputs_nbytes
from common.engine.structured import JsonSpec, spec_from_response_format, spec_from_text_param
from common.model.families import DEEPSEEK_OCR, ModelFamily, ModeOptions
from common.model.modes import Mode
from common.serve.chat import FoldedChat, fold_chat, turn_of, widen_placeholders
from common.serve.errors import APIError
from common.serve.ledger import Ledger, LedgerFull, Ticket
from common.serve.limits import RequestLimits, check_prompt_chars
from common.serve.media import FetchPolicy, is_remote, load_media, media_bytes
from common.serve.metrics import Metrics
from common.serve.schema import MODEL_ID, ChatCompletionRequest, ResponsesRequest

log = logging.getLogger("dsocr.server")


@dataclass
class ServerSettings:
    model_ids: tuple[str, ...] = (MODEL_ID,)  # first is advertised; all are accepted (case-insensitive)
    mode: str | None = None  # None: the model family's default preset
    family: ModelFamily = DEEPSEEK_OCR  # the loaded model's (set when it is ready): its presets are the valid modes
    max_queue: int = 16  # requests accepted beyond those generating (fetching, preparing or queued)
    max_queued_mb: float = 1024.0  # memory all accepted requests may hold (common.serve.ledger)
    max_body_mb: float = 64.0
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # Host names besides the local ones ("*": any); see common.serve.guard
    bind_address: str | None = None  # the address the server listens on: an allowed Host too
    protect_metrics: bool = False  # the API key on /metrics and /schema too
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # default and upper bound of a request's max_tokens
    keepalive_s: float = 5.0
    limits: RequestLimits = field(default_factory=RequestLimits)
    fetch: FetchPolicy = field(default_factory=FetchPolicy)
    prepare_workers: int = 2  # images decoded and tiled at once (fetches have their own threads)
    fetch_workers: int = 8
    on_load_error: Any = None  # Callable[[BaseException], None]
    # The extraction routes (PUT /process, POST /v1/ocr: common.serve.extraction) and Open WebUI's tasks.
    max_document_pages: int = 100  # pages of one document; each page is then one request within `limits`
    extract_figures: str = "reference"  # figures in /process text: "reference" (![img-0.jpeg](img-0.jpeg)), embed, drop
    max_stored_files: int = 64  # the /v1/files store (common.serve.files), by count
    max_stored_mb: float = 1024.0  # and by bytes
    model_tasks: bool = False  # Open WebUI's background tasks go to the model (else answered at once: serve.tasks)


# ------------------------------------------------------------------------------------------------ the model


class ModelService:
    """The engine the server serves: loaded on a thread of its own while /health says "loading", then ready (or
    failed, with the reason). Wires the engine core's hooks to the metrics."""

    def __init__(self, source: Engine | Callable[[ProgressCallback], Engine], settings: ServerSettings,
                 metrics: Metrics, on_ready: Callable[[Engine], None] | None = None) -> None:
        self._source, self.settings, self.metrics, self._on_ready = source, settings, metrics, on_ready
        self.engine: Engine | None = None
        self.ledger = Ledger(settings.max_queue, int(settings.max_queued_mb * 1024 * 1024))
        self.state = "loading"
        self.load_error: str | None = None
        self.progress: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._load, name="dsocr-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Refuses new requests, ends waiting and running ones (cancelled) and closes the engine."""
        self.state = "stopping" if self.state == "ready" else self.state
        if self.engine is not None:
            self.engine.close()

    def _progress(self, what: str, done: int, total: int) -> None:
        self.progress = {"what": what, "done": done, "total": total}
        if total and (done == total or done % max(1, total // 10) == 0):
            log.info("loading %s: %d/%d", what, done, total)

    def _load(self) -> None:
        try:
            engine = self._source if isinstance(self._source, Engine) else self._source(self._progress)
            core = engine.core
            if core is None:
                raise RuntimeError("the server needs an engine loaded with weights")
            core.limit_queue(self.settings.max_queue, int(self.settings.max_queued_mb * 1024 * 1024))
            core.on_step = self._on_step
            core.on_finish = self._on_finish
        except BaseException as exc:  # reported on /health and by main(), never lost
            self.state, self.load_error = "error", str(exc) or type(exc).__name__
            log.error("model failed to load: %s", self.load_error)
            if self.settings.on_load_error is not None:
                self.settings.on_load_error(exc)
            return
        self.engine = engine
        self.ledger.max_requests = self.settings.max_queue + core.max_batch  # the queue, and those generating
        if self._on_ready is not None:
            self._on_ready(engine)
        self.state = "ready"
        log.info("model ready: %s (up to %d sequences per decode step)", engine.describe(), core.max_batch)

    def _on_step(self, batch: int) -> None:
        self.metrics.record_batch(batch)
        self.metrics.running_sequences = self.running

    def _on_finish(self, handle: RequestHandle) -> None:
        result = handle.result
        if result is None:
            self.metrics.record_failed()
            return
        if result.completion_tokens:
            self.metrics.record_ttft(result.timings.get("ttft_s", 0.0))
        self.metrics.record_generation(result.prompt_tokens, result.completion_tokens,
                                       result.finish_reason == "cancelled")

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def waiting(self) -> int:
        return self.engine.core.waiting if self.engine is not None and self.engine.core is not None else 0

    @property
    def running(self) -> int:
        return self.engine.core.running if self.engine is not None and self.engine.core is not None else 0

    def ready_engine(self) -> Engine:
        if self.state == "error":
            raise APIError(503, f"the model failed to load: {self.load_error}")
        if self.state == "stopping":
            raise APIError(503, "the server is shutting down")
        if not self.ready or self.engine is None:
            raise APIError(503, "the model is still loading; try again shortly", headers={"Retry-After": "5"})
        return self.engine

    def queue_full(self) -> APIError:
        self.metrics.record_rejected()
        core = self.engine.core if self.engine is not None else None
        retry = max(1, round(core.wait_estimate_s())) if core is not None else 5
        return APIError(429, "the server is busy (request queue full); retry later", code="queue_full",
                        headers={"Retry-After": str(retry)})


# ------------------------------------------------------------------------------------------------ jobs


@dataclass
class Job:
    """What a request asks the model for, checked and resolved, before any media is read."""

    folded: FoldedChat
    mode: Mode
    params: SamplingParams
    strip_grounding: bool = True

    @property
    def priority(self) -> int:
        # Text-only requests (titles, tags, follow-ups) wait behind image requests: a user watches those.
        return BACKGROUND if self.folded.text_only else INTERACTIVE


def refuse_what_would_change_the_answer(body: ChatCompletionRequest | ResponsesRequest) -> None:
    """Fields a client may send but this model cannot honour: accepted where leaving them out changes nothing (the
    tools Open WebUI sends with every chat: the model never calls one), otherwise a 400 naming the field."""
    forced_call = {"tool_choice": body.tool_choice, "function_call": getattr(body, "function_call", None)}
    for name, value in forced_call.items():
        if value is not None and value not in ("auto", "none"):
            raise APIError(400, f"{name} {value!r} asks for a tool call; this model does not call tools (send no "
                           f"{name}, or 'auto'/'none')", param=name)
    if isinstance(body, ResponsesRequest):
        if body.response_format is not None:
            raise APIError(400, "response_format is a chat completions field; the Responses API takes text.format",
                           param="response_format")
        return
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported (0 or absent); the n-gram guard (no_repeat_ngram_size) "
                           "is this model's repetition control", param=name)
    if body.modalities is not None and set(body.modalities) - {"text"}:
        raise APIError(400, f"modalities {body.modalities!r}: this model answers in text only", param="modalities")
    if body.prediction is not None:
        raise APIError(400, "prediction (predicted outputs) is not supported", param="prediction")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


def logprobs_asked(body: ChatCompletionRequest | ResponsesRequest) -> int | None:
    """How many most likely tokens to report beside each answer token's log-probability; None: no log-probabilities."""
    if isinstance(body, ResponsesRequest):
        wanted = "message.output_text.logprobs" in (body.include or [])
        return (body.top_logprobs or 0) if wanted else None
    return (body.top_logprobs or 0) if body.logprobs else None


def _job(body: ChatCompletionRequest | ResponsesRequest, folded: FoldedChat, max_tokens: int | None,
         settings: ServerSettings, json_spec: JsonSpec | None) -> Job:
    """Both APIs share the sampling and DeepSeek-OCR fields; only the messages and the token limit differ."""
    refuse_what_would_change_the_answer(body)
    mode = ModeOptions(body.mode or settings.mode, body.base_size, body.image_size, body.crop_mode,
                       body.min_crops, body.max_crops).resolve(settings.family)
    if folded.text_only:
        # Text-only requests are background work: capped so they never hold a lane for long.
        cap = settings.limits.max_text_tokens
        max_tokens = min(max_tokens, cap) if max_tokens is not None else None
    else:
        cap = settings.max_new_tokens
        if max_tokens is not None and max_tokens > cap:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {cap} "
                                "(--max-new-tokens)", param="max_tokens")
    params = SamplingOptions(max_tokens, body.temperature, body.top_p, body.top_k, body.seed, body.stop,
                             body.no_repeat_ngram_size, body.ngram_window, json_spec,
                             logprobs_asked(body)).resolve(cap)
    # JSON text goes out exactly as generated (grounding markup cannot occur in it).
    return Job(folded, mode, params, body.grounding != "keep" and json_spec is None)


def chat_job(body: ChatCompletionRequest, settings: ServerSettings) -> Job:
    turns = [turn_of(m.role, m.content, f"messages.{i}") for i, m in enumerate(body.messages)]
    spec = spec_from_response_format(body.response_format)
    return _job(body, fold_chat(turns), body.max_completion_tokens or body.max_tokens, settings, spec)


def responses_job(body: ResponsesRequest, settings: ServerSettings) -> Job:
    if isinstance(body.input, str):
        turns = [turn_of("user", body.input)]
    else:
        turns = [turn_of(item.role, item.content, f"input.{i}") for i, item in enumerate(body.input)]
    return _job(body, fold_chat(turns), body.max_output_tokens, settings, spec_from_text_param(body.text))


def prepare_and_submit(engine: Engine, job: Job, fetched: dict[int, tuple[str, bytes]],
                       settings: ServerSettings, ticket: Ticket | None = None) -> RequestHandle:
    """Media to images (limits first), model inputs (charged to the request's ticket), then the engine's queue.
    Runs on the prepare executor."""
    folded = job.folded
    check_prompt_chars(len(folded.prompt), engine.config.language.max_position_embeddings)
    if job.params.json_spec is not None:  # compiled here, so a bad grammar is refused before the images are read
        engine.compile_json_spec(job.params.json_spec)
    blobs = [fetched[i] if i in fetched else media_bytes(ref, settings.fetch) for i, ref in enumerate(folded.media)]
    pages = load_media(blobs, job.mode, settings.limits)
    prompt = widen_placeholders(folded.prompt, [len(group) for group in pages])
    prepared = engine.prepare(prompt, [image for group in pages for image in group], job.mode)
    if ticket is not None:
        ticket.add(inputs_nbytes(prepared))
    return engine.submit(prepared, job.params, priority=job.priority)


async def fetch_remote(job: Job, settings: ServerSettings, pool: Executor) -> dict[int, tuple[str, bytes]]:
    """The request's http(s) media, fetched in parallel on the fetch executor, within one overall deadline."""
    remote = [(i, ref) for i, ref in enumerate(job.folded.media) if is_remote(ref)]
    if not remote:
        return {}
    loop = asyncio.get_running_loop()
    tasks = [loop.run_in_executor(pool, media_bytes, ref, settings.fetch) for _, ref in remote]
    try:
        blobs = await asyncio.wait_for(asyncio.gather(*tasks), timeout=settings.fetch.timeout_s + 1.0)
    except TimeoutError:
        raise APIError(400, f"fetching the image URLs took longer than {settings.fetch.timeout_s:g} s",
                       param="messages") from None
    return {i: blob for (i, _), blob in zip(remote, blobs, strict=True)}


async def admit(service: ModelService, job: Job, fetch_pool: Executor, prepare_pool: Executor,
                ticket: Ticket | None = None) -> RequestHandle:
    """The job's generation, started; APIError (503, 429, 400) when it is refused. `ticket`: the request's share of
    the ledger (common.serve.guard opened it when the body began to arrive)."""
    engine = service.ready_engine()
    assert engine.core is not None
    if engine.core.full():  # refuse before spending time on images
        raise service.queue_full()
    settings = service.settings
    fetched = await fetch_remote(job, settings, fetch_pool)
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(prepare_pool, prepare_and_submit, engine, job, fetched, settings, ticket)
    except (QueueFullError, LedgerFull):
        raise service.queue_full() from None

