"""OpenAI-compatible HTTP server for DeepSeek-OCR (Litestar + uvicorn).

    python server.py --model deepseek-ai/DeepSeek-OCR --port 8000
    # Open WebUI / openai client: base URL http://localhost:8000/v1, model "deepseek-ocr"

Handlers check the body, fold the chat (`common.serve.chat`), resolve options, fetch remote media on
their own executor with a hard deadline, then prepare the inputs on a small bounded executor (`common.serve.media`:
limits first, decoding last) and hand the job to the `Scheduler`, whose one worker thread owns the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import logging
import sys
import threading
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

from litestar import Litestar, Request, Response, Router, get, post
from litestar.background_tasks import BackgroundTask
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.enums import RequestEncodingType
from litestar.exceptions import HTTPException, NotAuthorizedException, ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.params import Body, Parameter
from litestar.response import Stream

from common.engine.engine import ModelOptions
from common.engine.queue import QueueFullError
from common.engine.sampling import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_NEW_TOKENS_BOUND,
    SamplingOptions,
    SamplingParams,
    fit_max_tokens,
)
from common.engine.structured import JsonSpec, spec_from_response_format, spec_from_text_param
from common.logs import setup_logging
from common.model.families import DEEPSEEK_OCR, ModelFamily, ModeOptions
from common.model.modes import Mode
from common.options.argtypes import boolean, finite_float, int_in_range, port_number, positive_int
from common.options.choices import choices
from common.options.flags import add_model_arguments, env_default
from common.serve import stream as sse
from common.serve.admission import (
    EngineLike,
    EngineLoader,
    InferenceRequest,
    ProgressCallback,
    Scheduler,
    ShuttingDownError,
)
from common.serve.chat import FoldedChat, fold_chat, turn_of, widen_placeholders
from common.serve.errors import APIError, api_error_for, error_type
from common.serve.limits import RequestLimits, check_prompt_chars
from common.serve.media import FetchPolicy, is_remote, load_media, media_bytes
from common.serve.metrics import Metrics, MetricsMiddleware
from common.serve.schema import (
    MODEL_ID,
    ChatCompletionRequest,
    ModelCard,
    ModelList,
    ResponsesRequest,
    encode,
    error_body,
    json_body_problem,
    now,
)

log = logging.getLogger("dsocr.server")


@dataclass
class ServerSettings:
    model_ids: tuple[str, ...] = (MODEL_ID,)  # first is advertised; all are accepted (case-insensitive)
    mode: str | None = None  # None: the model family's default preset
    family: ModelFamily = DEEPSEEK_OCR  # the loaded model's (set when it is ready): its presets are the valid modes
    max_queue: int = 16
    max_queued_mb: float = 1024.0  # bytes of prepared views the waiting requests may hold
    max_body_mb: float = 64.0
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # default and upper bound for a request
    keepalive_s: float = 5.0
    limits: RequestLimits = field(default_factory=RequestLimits)
    fetch: FetchPolicy = field(default_factory=FetchPolicy)
    prepare_workers: int = 2  # images decoded and tiled at once (fetches have their own threads)
    fetch_workers: int = 8
    on_load_error: Any = None  # Callable[[BaseException], None]


# ------------------------------------------------------------------------------------------------ errors


def _error_response(error: APIError) -> Response[bytes]:
    body = error_body(error.message, error.type, code=error.code, param=error.param)
    return Response(encode(body), status_code=error.status, media_type="application/json", headers=error.headers)


def _handle_http_exception(_: Request, exc: HTTPException) -> Response[bytes]:
    status, message, param = exc.status_code, exc.detail or "error", None
    if isinstance(exc, ValidationException) and exc.extra:
        problems = exc.extra if isinstance(exc.extra, list) else [exc.extra]
        first = problems[0] if isinstance(problems[0], dict) else {"message": str(problems[0])}
        param = first.get("key") or None
        details = "; ".join(str(p.get("message", p)) if isinstance(p, dict) else str(p) for p in problems)
        message = f"invalid request body: {details}" + (f" (field {param})" if param else "")
    code = {401: "invalid_api_key", 404: "not_found", 413: "request_too_large"}.get(status)
    return _error_response(APIError(status, message, error_type(status), code=code, param=param,
                                    headers=getattr(exc, "headers", None)))


def _handle_exception(request: Request, exc: Exception) -> Response[bytes]:
    error = api_error_for(exc)
    if error.status >= 500:
        log.exception("unexpected error handling %s %s", request.method, request.url.path)
    return _error_response(error)


async def _check_body(request: Request) -> None:
    """Refuses an empty, malformed or absurdly nested JSON body before Litestar decodes it."""
    if request.method == "POST" and (problem := json_body_problem(await request.body())):
        raise APIError(400, problem)


# ------------------------------------------------------------------------------------------------ jobs


@dataclass
class Job:
    folded: FoldedChat
    mode: Mode
    params: SamplingParams
    max_tokens: int | None  # what the client asked for (None: the default, shrunk to fit the context)
    strip_grounding: bool = True


def _job(body: ChatCompletionRequest | ResponsesRequest, folded: FoldedChat, max_tokens: int | None,
         settings: ServerSettings, json_spec: JsonSpec | None) -> Job:
    """Both APIs share the sampling and DeepSeek-OCR fields; only the messages and the token limit differ."""
    mode = ModeOptions(body.mode or settings.mode, body.base_size, body.image_size, body.crop_mode,
                       body.min_crops, body.max_crops).resolve(settings.family)
    # Text-only requests (titles, tags, follow-ups) are capped: they must not hold the worker for long.
    cap = settings.limits.max_text_tokens if folded.text_only else settings.max_new_tokens
    params = SamplingOptions(max_tokens, body.temperature, body.top_p, body.top_k, body.seed, body.stop,
                             body.no_repeat_ngram_size, body.ngram_window, json_spec).resolve(cap)
    given = min(max_tokens, cap) if max_tokens is not None else None
    # JSON text goes out exactly as generated (grounding markup cannot occur in it).
    return Job(folded, mode, params, given, body.grounding != "keep" and json_spec is None)


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


def prepare_job(engine: EngineLike, job: Job, fetched: dict[int, tuple[str, bytes]],
                settings: ServerSettings) -> tuple[Any, SamplingParams]:
    """Media to images (limits first), model inputs, and the completion budget. Runs off the event loop."""
    context = engine.config.language.max_position_embeddings  # type: ignore[attr-defined]
    folded = job.folded
    check_prompt_chars(len(folded.prompt), context)
    if job.params.json_spec is not None:  # the grammar is compiled here, off the worker thread
        engine.compile_json_spec(job.params.json_spec)
    blobs = [fetched[i] if i in fetched else media_bytes(ref, settings.fetch) for i, ref in enumerate(folded.media)]
    pages = load_media(blobs, job.mode, settings.limits)
    prompt = widen_placeholders(folded.prompt, [len(group) for group in pages])
    prepared = engine.prepare(prompt, [image for group in pages for image in group], job.mode)
    budget = fit_max_tokens(prepared.prompt_tokens, job.max_tokens, job.params.max_new_tokens, context)
    return prepared, replace(job.params, max_new_tokens=budget)


# ------------------------------------------------------------------------------------------------ handlers


def _state(request: Request) -> tuple[Scheduler, ServerSettings]:
    return request.app.state.scheduler, request.app.state.settings


def _check_model(name: str, settings: ServerSettings) -> None:
    if name.strip().lower() not in {m.lower() for m in settings.model_ids}:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {settings.model_ids[0]!r}",
                       code="model_not_found", param="model")


def _check_ready(scheduler: Scheduler) -> EngineLike:
    if scheduler.state == "error":
        raise APIError(503, f"the model failed to load: {scheduler.load_error}")
    if not scheduler.ready or scheduler.engine is None:
        raise APIError(503, "the model is still loading; try again shortly", headers={"Retry-After": "5"})
    return scheduler.engine


def _queue_full(scheduler: Scheduler) -> APIError:
    return APIError(429, "the server is busy (request queue full); retry later", code="queue_full",
                    headers={"Retry-After": str(scheduler.retry_after_s())})


async def _fetch_remote(request: Request, job: Job) -> dict[int, tuple[str, bytes]]:
    """The request's http(s) media, fetched in parallel on the fetch executor, within one overall deadline."""
    settings: ServerSettings = request.app.state.settings
    remote = [(i, ref) for i, ref in enumerate(job.folded.media) if is_remote(ref)]
    if not remote:
        return {}
    loop = asyncio.get_running_loop()
    pool = request.app.state.fetch_pool
    tasks = [loop.run_in_executor(pool, media_bytes, ref, settings.fetch) for _, ref in remote]
    try:
        blobs = await asyncio.wait_for(asyncio.gather(*tasks), timeout=settings.fetch.timeout_s + 1.0)
    except TimeoutError:
        raise APIError(400, f"fetching the image URLs took longer than {settings.fetch.timeout_s:g} s",
                       param="messages") from None
    return {i: blob for (i, _), blob in zip(remote, blobs, strict=True)}


async def _submit(request: Request, job: Job) -> InferenceRequest:
    scheduler, settings = _state(request)
    engine = _check_ready(scheduler)
    if scheduler.full():  # refuse before spending time on images
        scheduler.metrics.record_rejected()
        raise _queue_full(scheduler)
    fetched = await _fetch_remote(request, job)
    loop = asyncio.get_running_loop()
    prepared, params = await loop.run_in_executor(request.app.state.prepare_pool, prepare_job, engine, job,
                                                  fetched, settings)
    inference = InferenceRequest(prepared, params, loop, background=job.folded.text_only,
                                 strip_grounding=job.strip_grounding)
    try:
        scheduler.submit(inference)
    except QueueFullError:
        raise _queue_full(scheduler) from None
    except ShuttingDownError:
        raise APIError(503, "the server is shutting down") from None
    return inference


def _stream_response(body: AsyncIterator[bytes], inference: InferenceRequest) -> Stream:
    async def cancel_if_abandoned() -> None:
        inference.cancel()

    return Stream(body, status_code=200, media_type="text/event-stream",
                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                  background=BackgroundTask(cancel_if_abandoned))


def _json(obj: Any) -> Response[bytes]:
    return Response(encode(obj), status_code=200, media_type="application/json")


@post("/chat/completions", status_code=200, summary="Create a chat completion (OpenAI-compatible)")
async def chat_completions(
    request: Request, data: Annotated[ChatCompletionRequest, Body(media_type=RequestEncodingType.JSON)]
) -> Response:
    scheduler, settings = _state(request)
    _check_model(data.model, settings)
    inference = await _submit(request, chat_job(data, settings))
    reply = sse.ChatReply(data.model)
    if not data.stream:
        text, result = await sse.collect(request.receive, inference)
        return _json(reply.completion(text, result))
    include_usage = bool(data.stream_options and data.stream_options.include_usage)
    events = sse.event_stream(inference, settings.keepalive_s)
    return _stream_response(reply.chunks(events, include_usage), inference)


@post("/responses", status_code=200, summary="Create a model response (OpenAI Responses API)")
async def responses(
    request: Request, data: Annotated[ResponsesRequest, Body(media_type=RequestEncodingType.JSON)]
) -> Response:
    scheduler, settings = _state(request)
    _check_model(data.model, settings)
    inference = await _submit(request, responses_job(data, settings))
    reply = sse.ResponsesReply(data)
    if not data.stream:
        text, result = await sse.collect(request.receive, inference)
        return _json(reply.response(text, result))
    return _stream_response(reply.events(sse.event_stream(inference, settings.keepalive_s)), inference)


@get("/models", summary="List the served model")
async def list_models(request: Request) -> ModelList:
    _, settings = _state(request)
    return ModelList(data=[ModelCard(id=settings.model_ids[0], created=request.app.state.started_at)])


@get("/models/{model_id:path}", summary="Describe the served model")
async def retrieve_model(request: Request, model_id: Annotated[str, Parameter()]) -> ModelCard:
    _, settings = _state(request)
    _check_model(model_id.lstrip("/"), settings)
    return ModelCard(id=settings.model_ids[0], created=request.app.state.started_at)


@get("/health", summary="Liveness and readiness", sync_to_thread=False)
def health(request: Request) -> Response:
    scheduler: Scheduler = request.app.state.scheduler
    body: dict[str, Any] = {"status": scheduler.state, "queue_depth": scheduler.queue_depth,
                            "running": scheduler.running}
    if scheduler.state == "loading" and scheduler.progress:
        body["progress"] = scheduler.progress
    if scheduler.state == "error":
        body["error"] = scheduler.load_error
    if scheduler.ready and scheduler.engine is not None:
        described = dict(scheduler.engine.describe())
        model_dir = described.pop("model_dir", None)  # a filesystem path: only its name is shown
        body["model"] = {"name": Path(model_dir).name if model_dir else None, **described}
    return Response(encode(body), status_code=200 if scheduler.ready else 503, media_type="application/json")


@get("/metrics", summary="Prometheus metrics", sync_to_thread=False)
def metrics(request: Request) -> Response:
    scheduler: Scheduler = request.app.state.scheduler
    text = request.app.state.metrics.render(scheduler.queue_depth, scheduler.running, scheduler.ready)
    return Response(text, status_code=200, media_type="text/plain; version=0.0.4")  # Litestar adds the charset


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
    scheduler = Scheduler(engine_or_loader, settings.max_queue, app_metrics, settings.on_load_error,
                          max_queued_bytes=int(settings.max_queued_mb * 1024 * 1024))

    def add_model_aliases(engine: EngineLike) -> None:
        names = list(settings.model_ids)
        model_dir = getattr(engine, "model_dir", None)
        if model_dir is not None:
            names += [Path(model_dir).name, str(model_dir)]
        settings.model_ids = tuple(dict.fromkeys(n for n in names if n))
        settings.family = getattr(engine, "family", settings.family)

    scheduler.on_ready(add_model_aliases)
    prepare_pool = ThreadPoolExecutor(settings.prepare_workers, thread_name_prefix="dsocr-prepare")
    fetch_pool = ThreadPoolExecutor(settings.fetch_workers, thread_name_prefix="dsocr-fetch")

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        scheduler.start()  # loads the model on the worker thread; /health says "loading" meanwhile
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)
            prepare_pool.shutdown(wait=False, cancel_futures=True)
            fetch_pool.shutdown(wait=False, cancel_futures=True)

    v1 = Router("/v1", route_handlers=[chat_completions, responses, list_models, retrieve_model],
                guards=[_require_api_key], security=[{"bearer": []}], before_request=_check_body)
    cors = (CORSConfig(allow_origins=list(settings.cors_origins), allow_methods=["*"], allow_headers=["*"])
            if settings.cors_origins else None)
    bearer = SecurityScheme(type="http", scheme="bearer", description="--api-key / DSOCR_API_KEY")
    app = Litestar(
        route_handlers=[v1, health, metrics],
        lifespan=[lifespan],
        middleware=[MetricsMiddleware],
        exception_handlers={HTTPException: _handle_http_exception, Exception: _handle_exception},
        cors_config=cors,
        request_max_body_size=int(settings.max_body_mb * 1024 * 1024),
        openapi_config=OpenAPIConfig(title="dsocr", version="0.1.0",
                                     description="OpenAI-compatible DeepSeek-OCR server",
                                     components=Components(security_schemes={"bearer": bearer})),
        debug=False,
    )
    app.state.update(settings=settings, scheduler=scheduler, metrics=app_metrics, started_at=now(),
                     prepare_pool=prepare_pool, fetch_pool=fetch_pool)
    return app


# ------------------------------------------------------------------------------------------------ command line


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _choice(option: str) -> Any:
    def parse(text: str) -> str:
        if text not in choices(option):
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(choices(option))})")
        return text

    return parse


def build_parser() -> argparse.ArgumentParser:
    """Every setting is a flag and a DSOCR_* environment variable (the flag wins)."""
    parser = argparse.ArgumentParser(prog="dsocr-server", description="OpenAI-compatible DeepSeek-OCR server",
                                     epilog="Each flag's environment variable is named after it: --max-queue is "
                                     "DSOCR_MAX_QUEUE.")
    add_model_arguments(parser, env_prefix="DSOCR")
    limits = RequestLimits()
    for flag, kind, default, help_text in (
        ("--host", str, "127.0.0.1", "bind address (0.0.0.0 exposes it: set an API key)"),
        ("--port", port_number, 8000, "port"),
        ("--api-key", str, None, "require 'Authorization: Bearer KEY' on /v1"),
        ("--mode", _choice("mode"), None, "default resolution mode, a preset of the model (unset: gundam): "
         "tiny, small, base, large, gundam for DeepSeek-OCR; gundam, base, small for DeepSeek-OCR 2"),
        ("--max-new-tokens", int_in_range(1, MAX_NEW_TOKENS_BOUND), DEFAULT_MAX_NEW_TOKENS,
         "default and most completion tokens of a request (never more than the context allows)"),
        ("--max-text-tokens", positive_int, limits.max_text_tokens,
         "most completion tokens of a text-only request (titles, tags, follow-ups)"),
        ("--max-queue", positive_int, 16, "requests allowed to wait (then 429)"),
        ("--max-queued-mb", finite_float(0, exclusive=True), 1024.0, "memory the waiting requests' images may hold"),
        ("--max-body-mb", finite_float(0, exclusive=True), 64.0, "request body limit in MB (then 413)"),
        ("--max-images", positive_int, limits.max_images, "images per request, PDF pages included"),
        ("--max-pdf-pages", positive_int, limits.max_pdf_pages, "pages of one PDF"),
        ("--max-image-tokens", positive_int, limits.max_image_tokens,
         "image tokens of one request (the default fits a Gundam page with 9 tiles)"),
        ("--fetch-timeout", finite_float(0, exclusive=True), 15.0, "seconds to fetch a request's image URLs"),
        ("--fetch-max-mb", finite_float(0, exclusive=True), 32.0, "largest image URL download in MB"),
        ("--cors-origins", str, "", "comma-separated origins allowed for browsers (none)"),
    ):
        env = "DSOCR_" + flag[2:].upper().replace("-", "_")
        parser.add_argument(flag, type=kind, default=env_default(env, default),
                            help=f"{help_text} (default {default!s:.40}; ${env})")
    parser.add_argument("--allow-private-urls", action="store_true",
                        default=boolean(str(env_default("DSOCR_ALLOW_PRIVATE_URLS", "no"))),
                        help="let image URLs reach private, loopback or link-local addresses "
                        "($DSOCR_ALLOW_PRIVATE_URLS=1)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="access log; -vv: debug logging")
    return parser


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    model_ids = [MODEL_ID] + ([args.model, Path(args.model).name] if args.model else [])
    limits = RequestLimits(max_images=args.max_images, max_pdf_pages=args.max_pdf_pages,
                           max_image_tokens=args.max_image_tokens, max_text_tokens=args.max_text_tokens)
    fetch = FetchPolicy(args.allow_private_urls, args.fetch_timeout, int(args.fetch_max_mb * 1024 * 1024))
    return ServerSettings(
        model_ids=tuple(dict.fromkeys(model_ids)), mode=args.mode, max_queue=args.max_queue,
        max_queued_mb=args.max_queued_mb, max_body_mb=args.max_body_mb, api_key=args.api_key or None,
        cors_origins=tuple(o.strip() for o in args.cors_origins.split(",") if o.strip()),
        max_new_tokens=args.max_new_tokens, limits=limits, fetch=fetch,
    )


def main(argv: Iterable[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    setup_logging(args.verbose, default=logging.INFO, fmt="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    if not _is_loopback(args.host) and not settings.api_key:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this port can use the "
              "model. Set --api-key or DSOCR_API_KEY.", file=sys.stderr)

    import uvicorn

    model = ModelOptions.from_args(args)

    def load_engine(progress: ProgressCallback) -> EngineLike:
        resolved, family = model.resolved()
        ModeOptions(args.mode).resolve(family)  # a preset the model lacks fails before its weights load
        return resolved.load(progress=progress)

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

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="debug" if args.verbose > 1 else "info",
                            timeout_graceful_shutdown=30, access_log=args.verbose > 0)
    server = GracefulServer(config)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the captured Ctrl-C after shutting down
        server.run()
    if failed:
        print(f"error: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
