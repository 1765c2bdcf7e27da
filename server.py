"""OpenAI-compatible HTTP server for DeepSeek-OCR (Litestar + uvicorn).

    python server.py --model deepseek-ai/DeepSeek-OCR --port 8000
    # Open WebUI / openai client: base URL http://localhost:8000/v1, model "deepseek-ocr"

This file is the routes, their wiring and the command line. A request's path: the handler checks the body and
builds a job (`common.serve.admission`), which is admitted into the engine (`admit`: fetch, prepare, submit); the
reply is written from the request's handle (`common.serve.stream`). The model loads on its own thread while
/health says "loading".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
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
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.utils.scope.state import ScopeState

from common.documents.render import configure_render_pool
from common.engine.backend import ProgressCallback
from common.engine.engine import Engine
from common.engine.requests import RequestHandle
from common.engine.sampling import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS_BOUND
from common.logs import quiet_repeats, setup_logging
from common.memory import keep_freed_heap
from common.model.families import ModeOptions
from common.options.argtypes import api_key, finite_float, int_in_range, port_number, positive_int
from common.options.flags import (
    add_model_arguments,
    add_render_arguments,
    choices,
    model_options,
    read_environment,
    render_limits,
)
from common.options.version import VersionAction
from common.serve.admission import ModelService, ServerSettings, admit, chat_job, responses_job
from common.serve.connections import (
    BODY_TIMEOUT_S,
    HEAD_TIMEOUT_S,
    bounded_protocol,
    connection_bound,
    raise_open_file_limit,
)
from common.serve.errors import APIError, api_error_for, bad_json_message, error_type
from common.serve.external import FIGURE_POLICIES, process_document
from common.serve.files import StoredFiles
from common.serve.guard import HostAllowList, RequestGuard, bearer_matches, is_json_type
from common.serve.limits import RequestLimits
from common.serve.media import FetchPolicy, close_media
from common.serve.metrics import Metrics, MetricsMiddleware
from common.serve.mistral import FILE_ROUTES, file_content, ocr
from common.serve.schema import (
    MODEL_ID,
    ChatCompletionRequest,
    ModelCard,
    ModelList,
    ResponsesRequest,
    encode,
    error_body,
    now,
)
from common.serve.stream import ChatReply, ResponsesReply, Shown, TokenNames, collect
from common.serve.tasks import answer_task

log = logging.getLogger("dsocr.server")
T = TypeVar("T")

__all__ = ["ServerSettings", "create_app", "main"]


# ------------------------------------------------------------------------------------------------ errors


def _error_response(error: APIError) -> Response[bytes]:
    body = error_body(error.message, error.type, code=error.code, param=error.param)
    return Response(encode(body), status_code=error.status, media_type="application/json", headers=error.headers)


def _handle_http_exception(request: Request, exc: HTTPException) -> Response[bytes]:
    status, message, param = exc.status_code, exc.detail or "error", None
    if isinstance(exc, ValidationException) and exc.extra:
        problems = exc.extra if isinstance(exc.extra, list) else [exc.extra]
        first = problems[0] if isinstance(problems[0], dict) else {"message": str(problems[0])}
        param = first.get("key") or None
        details = "; ".join(str(p.get("message", p)) if isinstance(p, dict) else str(p) for p in problems)
        message = f"invalid request body: {details}" + (f" (field {param})" if param else "")
    elif status == 413:  # Litestar's answer to a body past request_max_body_size
        limit = request.app.state.settings.max_body_mb
        message = f"the request body is larger than {limit:g} MB, this server's limit (--max-body-mb)"
    elif status == 400:  # Litestar's answer to a body its decoder refused
        body = ScopeState.from_scope(request.scope).body
        message = bad_json_message(body if isinstance(body, bytes) else b"", message)
    code = {401: "invalid_api_key", 404: "not_found", 413: "request_too_large"}.get(status)
    return _error_response(APIError(status, message, error_type(status), code=code, param=param,
                                    headers=getattr(exc, "headers", None)))


def _handle_exception(request: Request, exc: Exception) -> Response[bytes]:
    if isinstance(exc, RecursionError):  # msgspec's answer to a body nested thousands of levels deep
        return _error_response(APIError(400, "the JSON body is nested too deeply"))
    error = api_error_for(exc)
    if error.status >= 500 and not isinstance(exc, APIError):  # a bug, not an answer such as "still loading"
        log.exception("unexpected error handling %s %s", request.method, request.url.path)
    return _error_response(error)


# Bodies past this size are decoded on a request thread: msgspec holds the GIL while it decodes, but between
# two bodies the event loop runs (decoded on the loop, a burst of big bodies would hold it for all of them in turn).
DECODE_OFF_LOOP_BYTES = 256 * 1024


def _decode_json(body: bytes) -> Any:
    """The body's JSON as Python values, or the APIError that says what is wrong with it."""
    try:
        return msgspec.json.decode(body)
    except RecursionError:
        return APIError(400, "the JSON body is nested too deeply")
    except msgspec.DecodeError as exc:
        return APIError(400, bad_json_message(body, str(exc)))


async def _read_body(request: Request) -> None:
    """An empty body gets a clear answer; a large one is decoded off the event loop (Litestar then uses the result)."""
    if request.method != "POST" or not is_json_type(request.headers.get("content-type", "")):
        return  # the file upload's form (the guard lets no other type through)
    body = await request.body()
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    if len(body) > DECODE_OFF_LOOP_BYTES:
        decoded = await asyncio.get_running_loop().run_in_executor(request.app.state.request_pool, _decode_json, body)
        if isinstance(decoded, APIError):
            raise decoded
        ScopeState.from_scope(request.scope).json = decoded


# ------------------------------------------------------------------------------------------------ handlers


def _service(request: Request) -> tuple[ModelService, ServerSettings]:
    return request.app.state.service, request.app.state.settings


def _tokens(request: Request) -> TokenNames:
    """The served model's tokenizer (there is one once a request is admitted): names tokens in log-probabilities."""
    engine = request.app.state.service.engine
    assert engine is not None
    return engine.tokenizer


def _check_model(name: str, settings: ServerSettings) -> None:
    if name.strip().lower() not in {m.lower() for m in settings.model_ids}:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {settings.model_ids[0]!r}",
                       code="model_not_found", param="model")


async def _off_loop(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a request thread: building a job validates its JSON schema (llguidance, on its own threads)."""
    return await asyncio.get_running_loop().run_in_executor(request.app.state.request_pool, fn, *args)


async def _admit(request: Request, job: Any) -> RequestHandle:
    state = request.app.state
    return await admit(state.service, job, state.fetch_pool, state.prepare_pool, request.scope.get("dsocr.ticket"))


def _event_stream(messages: AsyncIterator[ServerSentEventMessage], handle: RequestHandle) -> ServerSentEvent:
    async def cancel_if_abandoned() -> None:
        handle.cancel()

    return ServerSentEvent(messages, status_code=200, background=BackgroundTask(cancel_if_abandoned))


def _json(obj: Any) -> Response[bytes]:
    return Response(encode(obj), status_code=200, media_type="application/json")


@post("/chat/completions", status_code=200, summary="Create a chat completion (OpenAI-compatible)")
async def chat_completions(
    request: Request, data: Annotated[ChatCompletionRequest, Body(media_type=RequestEncodingType.JSON)]
) -> Response:
    service, settings = _service(request)
    _check_model(data.model, settings)
    # common.serve.tasks; off the loop, as a job is built: it reads the whole message
    task = None if settings.model_tasks else await _off_loop(request, answer_task, data)
    if task is not None:
        service.ready_engine()
        log.debug("Open WebUI's %s task answered without the model", task.task)
        handle, shown = RequestHandle.answered(task.text), Shown(False)
    else:
        job = await _off_loop(request, chat_job, data, settings)
        handle, shown = await _admit(request, job), Shown(job.strip_grounding)
    reply = ChatReply(data.model, _tokens(request))
    if not data.stream:
        result = await collect(request.receive, handle)
        return _json(reply.completion(shown.whole(result.text), result))
    include_usage = bool(data.stream_options and data.stream_options.include_usage)
    return _event_stream(reply.chunks(handle, shown, settings.keepalive_s, include_usage), handle)


@post("/responses", status_code=200, summary="Create a model response (OpenAI Responses API)")
async def responses(
    request: Request, data: Annotated[ResponsesRequest, Body(media_type=RequestEncodingType.JSON)]
) -> Response:
    _, settings = _service(request)
    _check_model(data.model, settings)
    job = await _off_loop(request, responses_job, data, settings)
    handle = await _admit(request, job)
    reply, shown = ResponsesReply(data, _tokens(request)), Shown(job.strip_grounding)
    if not data.stream:
        result = await collect(request.receive, handle)
        return _json(reply.response(shown.whole(result.text), result))
    return _event_stream(reply.events(handle, shown, settings.keepalive_s), handle)


@get("/models", summary="List the served model")
async def list_models(request: Request) -> ModelList:
    _, settings = _service(request)
    return ModelList(data=[ModelCard(id=settings.model_ids[0], created=request.app.state.started_at)])


@get("/models/{model_id:path}", summary="Describe the served model")
async def retrieve_model(request: Request, model_id: Annotated[str, Parameter()]) -> ModelCard:
    _, settings = _service(request)
    _check_model(model_id.lstrip("/"), settings)
    return ModelCard(id=settings.model_ids[0], created=request.app.state.started_at)


@get("/health", summary="Liveness and readiness", sync_to_thread=False)
def health(request: Request) -> Response:
    service: ModelService = request.app.state.service
    body: dict[str, Any] = {"status": service.state, "queue_depth": service.waiting, "running": service.running}
    if service.state == "loading" and service.progress:
        body["progress"] = service.progress
    if service.state == "error":
        body["error"] = service.load_error
    if service.ready and service.engine is not None:
        described = dict(service.engine.describe())
        model_dir = described.pop("model_dir", None)  # a filesystem path: only its name is shown
        body["model"] = {"name": Path(model_dir).name if model_dir else None, **described}
    return Response(encode(body), status_code=200 if service.ready else 503, media_type="application/json")


@get("/metrics", summary="Prometheus metrics", sync_to_thread=False)
def metrics(request: Request) -> Response:
    service: ModelService = request.app.state.service
    text = request.app.state.metrics.render(service.waiting, service.running, service.ready)
    return Response(text, status_code=200, media_type="text/plain; version=0.0.4")  # Litestar adds the charset


def _require_api_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    key: str | None = connection.app.state.settings.api_key
    if key and not bearer_matches(connection.headers.get("authorization", ""), key):
        raise NotAuthorizedException("missing or invalid API key: send the header 'Authorization: Bearer <key>'")


# ------------------------------------------------------------------------------------------------ app


def create_app(engine_or_loader: Engine | Any, settings: ServerSettings | None = None) -> Litestar:
    """The Litestar app. Pass a loaded engine, or a loader `(progress) -> engine` run on a thread of its own."""
    settings = settings or ServerSettings()
    app_metrics = Metrics()

    def on_ready(engine: Engine) -> None:
        names = [*settings.model_ids, Path(engine.model_dir).name, str(engine.model_dir)]
        settings.model_ids = tuple(dict.fromkeys(n for n in names if n))
        settings.family = engine.family

    service = ModelService(engine_or_loader, settings, app_metrics, on_ready)
    prepare_pool = ThreadPoolExecutor(settings.prepare_workers, thread_name_prefix="dsocr-prepare")
    fetch_pool = ThreadPoolExecutor(settings.fetch_workers, thread_name_prefix="dsocr-fetch")
    request_pool = ThreadPoolExecutor(2, thread_name_prefix="dsocr-request")
    files = StoredFiles(settings.max_stored_files, int(settings.max_stored_mb * 1024 * 1024))

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        service.start()  # loads the model on its own thread; /health says "loading" meanwhile
        lag_sampler = asyncio.create_task(app_metrics.sample_loop_lag())
        try:
            yield
        finally:
            lag_sampler.cancel()
            service.stop()
            prepare_pool.shutdown(wait=False, cancel_futures=True)
            fetch_pool.shutdown(wait=False, cancel_futures=True)
            request_pool.shutdown(wait=False, cancel_futures=True)
            close_media()  # the PDF render workers
            files.close()

    v1 = Router("/v1", route_handlers=[chat_completions, responses, list_models, retrieve_model, ocr, *FILE_ROUTES],
                guards=[_require_api_key], security=[{"bearer": []}], before_request=_read_body)
    # Open WebUI's External document loader (not under /v1: it adds /process to the URL it is given)
    external = Router("/", route_handlers=[process_document], guards=[_require_api_key], security=[{"bearer": []}])
    cors = (CORSConfig(allow_origins=list(settings.cors_origins), allow_methods=["*"], allow_headers=["*"])
            if settings.cors_origins else None)
    bearer = SecurityScheme(type="http", scheme="bearer", description="--api-key / DSOCR_API_KEY")
    app = Litestar(
        route_handlers=[v1, external, file_content, health, metrics],
        lifespan=[lifespan],
        middleware=[MetricsMiddleware, RequestGuard],
        exception_handlers={HTTPException: _handle_http_exception, Exception: _handle_exception},
        cors_config=cors,
        request_max_body_size=int(settings.max_body_mb * 1024 * 1024),
        openapi_config=OpenAPIConfig(title="dsocr", version="0.1.0",
                                     description="OpenAI-compatible DeepSeek-OCR server",
                                     components=Components(security_schemes={"bearer": bearer})),
        debug=False,
    )
    app.state.update(settings=settings, service=service, metrics=app_metrics, started_at=now(),
                     prepare_pool=prepare_pool, fetch_pool=fetch_pool, request_pool=request_pool, files=files,
                     allowed_hosts=HostAllowList(settings.allowed_hosts, settings.bind_address))
    return app


# ------------------------------------------------------------------------------------------------ command line


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def uvicorn_config(app: Litestar, host: str, port: int, max_connections: int = 1024,
                   head_timeout_s: float = HEAD_TIMEOUT_S, body_timeout_s: float = BODY_TIMEOUT_S, **options: Any
                   ) -> Any:
    """uvicorn's settings for this app: connections bounded in number and in the time their requests may take to
    arrive (common.serve.connections), the open-file limit raised to fit them."""
    import uvicorn

    bound = connection_bound(max_connections, raise_open_file_limit())
    protocol = bounded_protocol(bound, head_timeout_s, body_timeout_s)
    return uvicorn.Config(app, host=host, port=port, http=protocol, timeout_graceful_shutdown=30, **options)


def build_parser() -> argparse.ArgumentParser:
    """Every setting is a flag and a DSOCR_* environment variable (the flag wins)."""
    parser = argparse.ArgumentParser(prog="dsocr-server", description="OpenAI-compatible DeepSeek-OCR server",
                                     epilog="Each flag's environment variable is named after it: --max-queue is "
                                     "DSOCR_MAX_QUEUE.")
    add_model_arguments(parser)
    add_render_arguments(parser)
    limits, fetch = RequestLimits(), FetchPolicy()
    add = parser.add_argument
    add("--host", metavar="ADDRESS", default="127.0.0.1", help="bind address (0.0.0.0 exposes it: set an API key)")
    add("--port", metavar="PORT", type=port_number, default=8000, help="port (default 8000)")
    add("--api-key", metavar="KEY", type=api_key, default=None,
        help="require 'Authorization: Bearer KEY' on /v1 (printable ASCII)")
    add("--protect-metrics", action="store_true",
        help="require the API key on /metrics and /schema too (/health stays open for probes)")
    add("--allowed-hosts", metavar="HOSTS", default="",
        help="comma-separated Host names this server answers besides localhost, *.localhost, *.local, *.internal, "
        "IP addresses and this machine's name ('.example.com': a domain and its subdomains; '*': any)")
    add("--mode", choices=choices("mode"), default=None, metavar="MODE",
        help="default resolution mode, a preset of the model (unset: gundam): tiny, small, base, large, gundam for "
        "DeepSeek-OCR; gundam, base, small for DeepSeek-OCR 2")
    add("--max-new-tokens", metavar="N", type=int_in_range(1, MAX_NEW_TOKENS_BOUND), default=DEFAULT_MAX_NEW_TOKENS,
        help=f"default and most completion tokens of a request (default {DEFAULT_MAX_NEW_TOKENS}; never more than "
        "the context allows)")
    add("--max-text-tokens", metavar="N", type=positive_int, default=limits.max_text_tokens,
        help=f"most completion tokens of a text-only request: titles, tags, follow-ups (default "
        f"{limits.max_text_tokens})")
    add("--max-queue", metavar="N", type=positive_int, default=16,
        help="requests allowed to wait (then 429; default 16)")
    add("--max-queued-mb", metavar="MB", type=finite_float(0, exclusive=True), default=1024.0,
        help="memory the waiting requests' images may hold (default 1024)")
    add("--max-body-mb", metavar="MB", type=finite_float(0, exclusive=True), default=64.0,
        help="request body limit in MB (then 413; default 64)")
    add("--max-images", metavar="N", type=positive_int, default=limits.max_images,
        help=f"images per request, PDF pages included (default {limits.max_images})")
    add("--max-pdf-pages", metavar="N", type=positive_int, default=limits.max_pdf_pages,
        help=f"pages of one PDF (default {limits.max_pdf_pages})")
    add("--max-image-tokens", metavar="N", type=positive_int, default=limits.max_image_tokens,
        help=f"image tokens of one request (default {limits.max_image_tokens}: a Gundam page with 9 tiles fits)")
    add("--fetch-timeout", metavar="S", type=finite_float(0, exclusive=True), default=fetch.timeout_s,
        help=f"seconds to fetch a request's image URLs (default {fetch.timeout_s:g})")
    add("--fetch-max-mb", metavar="MB", type=finite_float(0, exclusive=True), default=fetch.max_bytes / (1 << 20),
        help=f"largest image URL download in MB (default {fetch.max_bytes / (1 << 20):g})")
    add("--cors-origins", metavar="ORIGINS", default="",
        help="comma-separated web page origins allowed to call the server from a browser (default none)")
    add("--max-connections", metavar="N", type=positive_int, default=1024,
        help="open connections (then the oldest one still sending its request is closed; default 1024)")
    add("--allow-private-urls", action="store_true",
        help="let image URLs reach private, loopback or link-local addresses")
    documents = ServerSettings()
    add("--max-document-pages", metavar="N", type=positive_int, default=documents.max_document_pages,
        help=f"pages of one document sent to PUT /process or POST /v1/ocr, each read as one request (default "
        f"{documents.max_document_pages})")
    add("--extract-figures", choices=FIGURE_POLICIES, default=documents.extract_figures,
        help="figures in PUT /process text: reference (![img-0.jpeg](img-0.jpeg), default), embed (JPEG data URLs) "
        "or drop")
    add("--max-stored-files", metavar="N", type=positive_int, default=documents.max_stored_files,
        help=f"files kept for OCR by POST /v1/files (default {documents.max_stored_files})")
    add("--max-stored-mb", metavar="MB", type=finite_float(0, exclusive=True), default=documents.max_stored_mb,
        help=f"bytes of the files kept for OCR, in MB (default {documents.max_stored_mb:g})")
    add("--model-tasks", action="store_true",
        help="send Open WebUI's background tasks (titles, tags, follow-ups, search queries, autocompletion, emoji) "
        "to the model instead of answering them at once")
    add("-v", "--verbose", action="count", default=0, help="access log; -vv: debug logging")
    add("--version", action=VersionAction)
    read_environment(parser)
    return parser


def _listed(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    model_ids = [MODEL_ID] + ([args.model, Path(args.model).name] if args.model else [])
    limits = RequestLimits(max_images=args.max_images, max_pdf_pages=args.max_pdf_pages,
                           max_image_tokens=args.max_image_tokens, max_text_tokens=args.max_text_tokens)
    fetch = FetchPolicy(args.allow_private_urls, args.fetch_timeout, int(args.fetch_max_mb * 1024 * 1024))
    return ServerSettings(
        model_ids=tuple(dict.fromkeys(model_ids)), mode=args.mode, max_queue=args.max_queue,
        max_queued_mb=args.max_queued_mb, max_body_mb=args.max_body_mb, api_key=args.api_key or None,
        cors_origins=_listed(args.cors_origins), allowed_hosts=_listed(args.allowed_hosts), bind_address=args.host,
        protect_metrics=args.protect_metrics,
        max_new_tokens=args.max_new_tokens, limits=limits, fetch=fetch,
        max_document_pages=args.max_document_pages, extract_figures=args.extract_figures,
        max_stored_files=args.max_stored_files, max_stored_mb=args.max_stored_mb, model_tasks=args.model_tasks,
    )


def main(argv: Iterable[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    setup_logging(args.verbose, default=logging.INFO, fmt="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keep_freed_heap()  # before any thread starts: see there
    settings = settings_from_args(args)
    configure_render_pool(render_limits(args))
    if not _is_loopback(args.host) and not settings.api_key:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this port can use the "
              "model. Set --api-key or DSOCR_API_KEY.", file=sys.stderr)

    import uvicorn

    model = model_options(args)

    def load_engine(progress: ProgressCallback) -> Engine:
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
            threading.Thread(target=app.state.service.stop, daemon=True).start()
            super().handle_exit(sig, frame)

    config = uvicorn_config(app, args.host, args.port, args.max_connections,
                            log_level="debug" if args.verbose > 1 else "info", access_log=args.verbose > 0)
    quiet_repeats("uvicorn", "uvicorn.error", "uvicorn.access", "asyncio")  # after uvicorn set up its logging
    server = GracefulServer(config)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the captured Ctrl-C after shutting down
        server.run()
    if failed:
        print(f"error: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
