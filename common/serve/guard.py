"""What every request passes before a handler sees it: the checks that keep a local server to its own clients, and
the bounds on what a body may cost the event loop and the memory.

- Host: a web page can point its own domain at 127.0.0.1 (DNS rebinding) and then read this server's answers as
  same-origin. Such a request carries the page's host name, so only names that can only mean this machine are
  accepted by default (IP literals, localhost and *.localhost, *.local, *.internal such as host.docker.internal,
  this machine's name); others are added with --allowed-hosts ("*": any).
- Origin: a browser names the page that sent a request; one that is neither this server nor a --cors-origins
  entry is refused, so pages cannot drive the server with simple cross-site POSTs.
- Content-Type: the JSON routes take application/json only (the types a page may send without asking first,
  text/plain, forms, multipart, are exactly what a cross-site POST uses). Two routes take other bodies: the file
  upload (`POST /v1/files`, multipart/form-data, as the Mistral API has it) and Open WebUI's External loader
  (`PUT /process`, the file's raw bytes under its own type); the Origin check and the API key guard them.
- The ledger (`common.serve.ledger`): a request with a body is counted from its first byte until its response is
  sent; a crowd past the bound gets 429 before its body is read.
- The JSON body's size in values: commas and colons are counted chunk by chunk as the body arrives, so decoding it
  on the event loop (msgspec holds the GIL) stays a bounded piece of work, whatever its shape.
- Optionally the API key on /metrics and /schema too (--protect-metrics).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from common.memory import trim_heap
from common.serve.errors import APIError
from common.serve.ledger import BODY_COPIES, LedgerFull, Ticket
from common.serve.schema import encode, error_body

# Separators (commas and colons) a JSON body may hold: past any real request (Open WebUI's 36 tools and a long
# chat are a few thousand; a prompt's own commas are bounded by the context), and small enough that decoding it
# is a few milliseconds.
MAX_JSON_SEPARATORS = 65_536
LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
JSON_ROUTE_PREFIX = "/v1/"
FORM_ROUTES = frozenset({("POST", "/v1/files")})  # under /v1, but a multipart form
PROTECTED_PREFIXES = ("/metrics", "/schema")
TRIM_AFTER_BYTES = 32 << 20
IDLE_TRIM_S = 2.0

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port, lower case, without a trailing dot ("[::1]:8000" -> "::1")."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


class HostAllowList:
    """The Host names this server answers: the local ones, and those configured (exact, or ".suffix" for a domain
    and its subdomains, or "*" for any)."""

    def __init__(self, allowed: Iterable[str] = (), bind_address: str | None = None) -> None:
        names = [name.strip().lower().rstrip(".") for name in allowed if name.strip()]
        self.any = "*" in names
        self.suffixes = tuple(name for name in names if name.startswith("."))
        self.names = {name for name in names if not name.startswith(".")}
        self.names.update(("localhost", socket.gethostname().lower()))
        if bind_address:
            self.names.add(host_name(bind_address))

    def allows(self, host_header: str) -> bool:
        if self.any or not host_header:  # HTTP/1.0 clients may send no Host: nothing for a rebinding page to use
            return True
        name = host_name(host_header)
        try:
            ipaddress.ip_address(name)
            return True  # an address literal is never a rebinding attacker's name
        except ValueError:
            pass
        if name in self.names or name.endswith(LOCAL_SUFFIXES):
            return True
        return any(name.endswith(suffix) or name == suffix[1:] for suffix in self.suffixes)


def origin_allowed(origin: str, host_header: str, cors_origins: Iterable[str]) -> bool:
    """A browser request's Origin is this server itself (same origin) or one the CORS setting allows."""
    allowed = set(cors_origins)
    if "*" in allowed or origin in allowed:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and parts.netloc.lower() == host_header.lower()


def is_json_type(content_type: str) -> bool:
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
        return False
    charset = next((value.strip().strip('"').lower() for key, _, value in
                    (p.partition("=") for p in params.split(";")) if key.strip().lower() == "charset"), "utf-8")
    return charset in ("utf-8", "utf8")


def is_form_upload(method: str, path: str, content_type: str) -> bool:
    """A multipart form sent to a route that takes one (the file upload)."""
    media = content_type.partition(";")[0].strip().lower()
    return (method, path.rstrip("/")) in FORM_ROUTES and media == "multipart/form-data"


def json_body(method: str, path: str, content_type: str) -> bool:
    """The request's body must be JSON: a /v1 route's, except the file upload's form."""
    return path.startswith(JSON_ROUTE_PREFIX) and not is_form_upload(method, path, content_type)


def bearer_matches(authorization: str, key: str) -> bool:
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}


async def answer_error(send: Send, error: APIError) -> None:
    body = encode(error_body(error.message, error.type, code=error.code, param=error.param))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware (see the module docstring). Reads the server's settings and service from the app's state."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._idle_trim: asyncio.TimerHandle | None = None

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        try:
            ticket = self.check(scope, state)
        except APIError as error:
            await answer_error(send, error)
            return
        if ticket is None:
            await self.app(scope, receive, send)
            return
        scope["dsocr.ticket"] = ticket  # the handler charges the prepared inputs to it
        try:
            await self.app(scope, self.counting(scope, receive, ticket, state), send)
        finally:
            ticket.close()
            if ticket.nbytes >= TRIM_AFTER_BYTES:  # glibc keeps what a big body freed unless asked to give it back
                asyncio.get_running_loop().run_in_executor(state.request_pool, trim_heap)
            elif state.service.ledger.requests == 0:
                self._trim_when_idle(state)

    def _trim_when_idle(self, state: Any) -> None:
        """Once no request has been open for IDLE_TRIM_S, what the last ones freed (a grammar's compilation, a
        page's activations, a refused document) goes back to the system: the heap keeps freed memory for reuse."""
        loop = asyncio.get_running_loop()
        if self._idle_trim is not None:
            self._idle_trim.cancel()

        def trim() -> None:
            self._idle_trim = None
            if state.service.ledger.requests == 0:
                loop.run_in_executor(state.request_pool, trim_heap)

        self._idle_trim = loop.call_later(IDLE_TRIM_S, trim)

    def check(self, scope: dict[str, Any], state: Any) -> Ticket | None:
        """Refuses what must not reach a handler (APIError); a ledger ticket for a request with a body."""
        settings, headers, path = state.settings, _headers(scope), scope["path"]
        host = headers.get("host", "")
        if not state.allowed_hosts.allows(host):
            raise APIError(403, f"the Host {host_name(host)!r} is not one this server answers to; if it is this "
                           "server's name, start it with --allowed-hosts (DSOCR_ALLOWED_HOSTS)",
                           code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not origin_allowed(origin, host, settings.cors_origins):
            raise APIError(403, f"requests from the web page {origin!r} are not allowed; start the server with "
                           "--cors-origins to allow it", code="origin_not_allowed")
        if settings.protect_metrics and settings.api_key and path.startswith(PROTECTED_PREFIXES) and \
                not bearer_matches(headers.get("authorization", ""), settings.api_key):
            raise APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if scope["method"] not in BODY_METHODS:
            return None
        announced = headers.get("content-length", "")
        json_route = json_body(scope["method"], path, headers.get("content-type", ""))
        if json_route and announced == "0":
            raise APIError(400, "the request body is empty; send a JSON object")
        if json_route and not is_json_type(headers.get("content-type", "")):
            sent = headers.get("content-type") or "none"
            if (scope["method"], path.rstrip("/")) in FORM_ROUTES:
                raise APIError(415, f"upload the file as multipart/form-data (a 'file' field; got {sent!r})",
                               code="unsupported_media_type")
            raise APIError(415, f"the body must be JSON: send the header 'Content-Type: application/json' (got "
                           f"{sent!r})", code="unsupported_media_type")
        try:
            return state.service.ledger.open(int(announced) if announced.isdigit() else 0)
        except LedgerFull:
            raise state.service.queue_full() from None

    @staticmethod
    def counting(scope: dict[str, Any], receive: Receive, ticket: Ticket, state: Any) -> Receive:
        """`receive` that charges the ticket for body bytes past those announced and, for a JSON body, counts its
        separators as they arrive."""
        json_route = json_body(scope["method"], scope["path"], _headers(scope).get("content-type", ""))
        charged = ticket.nbytes // BODY_COPIES  # the body bytes announced, already charged
        received = separators = 0

        async def receive_counted() -> dict[str, Any]:
            nonlocal received, separators, charged
            message = await receive()
            chunk = message.get("body", b"") if message["type"] == "http.request" else b""
            if chunk:
                received += len(chunk)
                if received > charged:  # a chunked body, or one longer than announced (Litestar refuses that)
                    try:
                        ticket.add_body(received - charged)
                    except LedgerFull:
                        raise state.service.queue_full() from None
                    charged = received
                if json_route:
                    separators += chunk.count(b",") + chunk.count(b":")
                    if separators > MAX_JSON_SEPARATORS:
                        raise APIError(413, f"the JSON body holds more than {MAX_JSON_SEPARATORS:,} values; send "
                                       "fewer messages, parts or fields", code="request_too_large")
            return message

        return receive_counted
