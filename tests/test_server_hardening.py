"""Hardening, round 2 (issue 22), the server's share, through the live HTTP server: what reaches a handler (Host,
Origin, Content-Type, the API key on /metrics), what a body may cost (its values, the one bound on accepted
requests), how long a client may take to send its request and how many connections it may hold, and the words of
the errors for bodies that are not JSON."""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from common.engine.engine import Engine
from common.logs import RepeatFilter
from common.serve.guard import MAX_JSON_SEPARATORS, HostAllowList, is_json_type, origin_allowed
from common.serve.ledger import Ledger, LedgerFull
from common.serve.media import FetchPolicy
from server import ServerSettings, create_app
from tests.conftest import ROOT, fixture_tokenizer
from tests.fakes import RecordingBackend, SlowBackend, fixture_engine
from tests.helpers import LiveServer
from tests.hostile import image_chat, png_bytes, text_chat

pytestmark = pytest.mark.server

KEY = "sk-local-123"


def fake_engine(backend: object | None = None, max_batch: int | None = None) -> Engine:
    return fixture_engine(backend or RecordingBackend(fixture_tokenizer()), max_batch=max_batch)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    settings = ServerSettings(mode="tiny", api_key=KEY, protect_metrics=True, allowed_hosts=("ocr.lan",),
                              cors_origins=("http://app.example",))
    with LiveServer(create_app(fake_engine(), settings), max_connections=24, head_timeout_s=1.0,
                    body_timeout_s=2.0) as live:
        yield live


def chat(server: LiveServer, body: bytes | dict, headers: dict[str, str] | None = None) -> httpx.Response:
    sent = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.base}/v1/chat/completions", content=content, headers=sent, timeout=60)


# ------------------------------------------------------------------------------------ 18: Host, Origin, type


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io"])
def test_a_foreign_host_name_is_refused_on_every_route(server: LiveServer, host: str) -> None:
    """DNS rebinding: the page's own name arrives in Host; nothing is answered to it, not even /health."""
    for reply in (chat(server, text_chat(), {"Host": host}),
                  httpx.get(f"{server.base}/health", headers={"Host": host}, timeout=10)):
        assert reply.status_code == 403, reply.text
        assert reply.json()["error"]["code"] == "host_not_allowed"
        assert "--allowed-hosts" in reply.json()["error"]["message"]


@pytest.mark.parametrize("host", ["localhost:8000", "127.0.0.1", "[::1]:8000", "host.docker.internal:8000",
                                  "app.localhost", "printer.local", "OCR.LAN", "10.0.0.7:8000", socket.gethostname()])
def test_local_and_configured_host_names_are_answered(server: LiveServer, host: str) -> None:
    assert httpx.get(f"{server.base}/health", headers={"Host": host}, timeout=10).status_code == 200


def test_host_allow_list_rules() -> None:
    hosts = HostAllowList([".corp.example", "Dsocr"], bind_address="192.168.1.5")
    assert hosts.allows("dsocr:8000") and hosts.allows("a.corp.example") and hosts.allows("corp.example.")
    assert not hosts.allows("corp.example.evil") and not hosts.allows("xcorp.example")
    assert HostAllowList(["*"]).allows("anything.example")
    assert HostAllowList([], bind_address="ocr-box").allows("ocr-box:8000")


def test_origin_must_be_the_server_or_a_cors_origin(server: LiveServer) -> None:
    evil = chat(server, text_chat(), {"Origin": "http://evil.example"})
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "origin_not_allowed"
    assert chat(server, text_chat(), {"Origin": "null"}).status_code == 403
    same = chat(server, text_chat(), {"Origin": server.base})
    assert same.status_code == 200, same.text
    cors = chat(server, text_chat(), {"Origin": "http://app.example"})
    assert cors.status_code == 200 and cors.headers["access-control-allow-origin"] == "http://app.example"
    assert origin_allowed("https://x.example", "x.example", ()) and not origin_allowed("http://x", "y", ())


@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain;charset=UTF-8",
                                          "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                          "application/json; charset=latin-1"])
def test_json_routes_refuse_other_content_types(server: LiveServer, content_type: str | None) -> None:
    """The content types a page may POST cross-site without a preflight are exactly the ones refused."""
    headers = {"Authorization": f"Bearer {KEY}"} | ({"Content-Type": content_type} if content_type else {})
    body = json.dumps(text_chat()).encode()
    reply = httpx.post(f"{server.base}/v1/chat/completions", content=body, headers=headers, timeout=30)
    assert reply.status_code == 415, reply.text
    assert "application/json" in reply.json()["error"]["message"]


def test_json_content_types_accepted() -> None:
    for accepted in ("application/json", "Application/JSON; charset=utf-8", "application/vnd.api+json"):
        assert is_json_type(accepted)


# ------------------------------------------------------------------------------------------------ 19: auth


def test_a_non_ascii_api_key_is_refused_at_startup() -> None:
    run = subprocess.run([sys.executable, "server.py", "--api-key", "clé-secrète", "--model", "unused"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "--api-key" in run.stderr and "'é'" in run.stderr and "Traceback" not in run.stderr


def test_protect_metrics_puts_the_key_on_metrics_and_schema(server: LiveServer) -> None:
    for path in ("/metrics", "/schema/openapi.json"):
        assert httpx.get(f"{server.base}{path}", timeout=10).status_code == 401
        with_key = httpx.get(f"{server.base}{path}", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert with_key.status_code == 200
    assert httpx.get(f"{server.base}/health", timeout=10).status_code == 200  # probes need no key


def test_without_the_flag_metrics_and_schema_stay_open() -> None:
    settings = ServerSettings(mode="tiny", api_key=KEY)
    with LiveServer(create_app(fake_engine(), settings)) as live:
        assert httpx.get(f"{live.base}/metrics", timeout=10).status_code == 200
        assert httpx.get(f"{live.base}/schema/openapi.json", timeout=10).status_code == 200
        assert httpx.post(f"{live.base}/v1/chat/completions", json=text_chat(), timeout=10).status_code == 401


# ----------------------------------------------------------------------------------------- 20: error texts


@pytest.mark.parametrize(("body", "words"), [
    (b'{"model": "m", "temperature": NaN, "messages": []}', "NaN"),
    (b'{"model": "m", "temperature": Infinity, "messages": []}', "Infinity"),
    (b'{"model": "m", "temperature": -Infinity, "messages": []}', "Infinity"),
    (b'{"model": "m", "temperature": 1e400, "messages": []}', "out of range"),
    (b'\xef\xbb\xbf{"model": "m", "messages": []}', "byte order mark"),
    ('{"model": "m", "messages": []}'.encode("utf-16"), "UTF-16"),
    ('{"model": "m", "messages": []}'.encode("utf-16-le"), "UTF-16"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
    (b'{"model": "m", "messages": [}', "not valid JSON"),
    (b'{"model": "m", "messages": ["\xff"]}', "UTF-8"),
])
def test_bodies_that_are_not_json_are_named_for_what_they_are(server: LiveServer, body: bytes, words: str) -> None:
    reply = chat(server, body)
    assert reply.status_code == 400, reply.text
    message = reply.json()["error"]["message"]
    assert words in message, message
    if words != "surrogate":
        assert "surrogate" not in message


# ----------------------------------------------------------------------------- 4: a body's cost on the loop


def test_a_body_of_too_many_values_is_refused_as_it_arrives(server: LiveServer) -> None:
    """A wide body (each value cheap to send, costly to decode on the event loop) is refused by counting its
    separators while it arrives: a 413 naming the bound, and the server stays responsive."""
    messages = [{"role": "user", "content": "a"}] * (MAX_JSON_SEPARATORS // 2)
    reply = chat(server, {"model": "deepseek-ocr", "messages": messages})
    assert reply.status_code == 413, reply.text
    assert f"{MAX_JSON_SEPARATORS:,}" in reply.json()["error"]["message"]
    assert httpx.get(f"{server.base}/health", timeout=5).status_code == 200
    wide_stop = text_chat(stop=["a"] * MAX_JSON_SEPARATORS)
    assert chat(server, wide_stop).status_code == 413


# ---------------------------------------------------------------------------------- 6: connections


def half_sent(server: LiveServer, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n")
        socks.append(sock)
    return socks


def closed_by_server(sock: socket.socket, wait_s: float) -> bool:
    sock.settimeout(wait_s)
    try:
        return sock.recv(1024) == b"" or True  # data (a 503) or EOF: the server let go either way
    except TimeoutError:
        return False
    except OSError:
        return True


def test_half_sent_requests_are_dropped_and_cannot_crowd_out_health(server: LiveServer) -> None:
    """A flood of connections that never finish their request head: past the bound the oldest are closed, each is
    closed when its head deadline passes, and /health answers throughout."""
    socks = half_sent(server, 60)  # the server allows 24 connections
    try:
        started = time.monotonic()
        assert httpx.get(f"{server.base}/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 5
        assert all(closed_by_server(sock, 3.0) for sock in socks)  # evicted, or their 1 s head deadline passed
    finally:
        for sock in socks:
            sock.close()


def test_a_body_that_stops_arriving_is_dropped(server: LiveServer) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        sock.sendall(b"POST /health HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"a\":")
        assert closed_by_server(sock, 6.0)  # the body deadline is 2 s here
    finally:
        sock.close()


def test_repeated_log_lines_are_held_back() -> None:
    clock = [0.0]
    repeat = RepeatFilter(burst=3, window_s=10.0, clock=lambda: clock[0])
    import logging

    records = [logging.LogRecord("asyncio", logging.ERROR, "", 0, "socket.accept() out of system resource", None,
                                 None) for _ in range(1000)]
    assert sum(repeat.filter(r) for r in records) == 3
    clock[0] = 11.0
    later = logging.LogRecord("asyncio", logging.ERROR, "", 0, "socket.accept() out of system resource", None, None)
    assert repeat.filter(later) and "997 more" in later.getMessage()


# --------------------------------------------------------------------------- 7: one bound for all accepted


class HangingImage(http.server.BaseHTTPRequestHandler):
    """Holds each image request for `hold_s` seconds before answering it."""

    hold_s = 3.0

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        time.sleep(self.hold_s)
        body = png_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow
def test_requests_still_fetching_count_against_the_queue_bound() -> None:
    """Requests that wait for their image URLs (or a prepare worker) are accepted requests: with room for 2 queued
    and 1 generating, the fourth is refused at once with 429, although the engine's queue is empty."""
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HangingImage)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{images.server_address[1]}/page.png"
    settings = ServerSettings(mode="tiny", max_queue=2, fetch=FetchPolicy(allow_private=True, timeout_s=10))
    backend = SlowBackend(fixture_tokenizer().eos_id, step_s=0.01)
    try:
        with LiveServer(create_app(fake_engine(backend, max_batch=1), settings)) as live, \
                concurrent.futures.ThreadPoolExecutor(3) as pool:
            body = image_chat(url, max_tokens=2)
            held = [pool.submit(httpx.post, f"{live.base}/v1/chat/completions", json=body, timeout=60)
                    for _ in range(3)]
            time.sleep(1.0)  # all three are fetching
            assert httpx.get(f"{live.base}/health", timeout=5).json()["queue_depth"] == 0
            refused = httpx.post(f"{live.base}/v1/chat/completions", json=body, timeout=10)
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            assert [f.result().status_code for f in held] == [200, 200, 200]
            assert httpx.post(f"{live.base}/v1/chat/completions", json=text_chat(max_tokens=2),
                              timeout=30).status_code == 200  # the bound is given back
    finally:
        images.shutdown()


@pytest.mark.slow
def test_big_bodies_are_refused_before_they_are_read_when_the_memory_bound_is_reached() -> None:
    backend = SlowBackend(fixture_tokenizer().eos_id, step_s=0.05)
    settings = ServerSettings(mode="tiny", max_queued_mb=4.0, max_body_mb=8.0)
    padding = "x" * 1_000_000  # a 1 MB body counts 3 MB: one fits, two do not
    with LiveServer(create_app(fake_engine(backend, max_batch=1), settings)) as live:
        streaming = httpx.stream("POST", f"{live.base}/v1/chat/completions", timeout=60,
                                 json=text_chat(stream=True, max_tokens=40, user=padding))
        with streaming as first:
            lines = first.iter_lines()  # kept: dropping the iterator closes the stream
            next(lines)
            second = httpx.post(f"{live.base}/v1/chat/completions", json=text_chat(user=padding), timeout=10)
            assert second.status_code == 429, second.text
            small = httpx.post(f"{live.base}/v1/chat/completions", json=text_chat(max_tokens=2), timeout=30)
            assert small.status_code == 200, small.text  # a small request still fits beside the big one


def test_ledger_counts_and_bytes() -> None:
    ledger = Ledger(max_requests=2, max_bytes=1000)
    alone = ledger.open(announced_body=10_000)  # alone, a request is never refused for its size
    with pytest.raises(LedgerFull):
        ledger.open(announced_body=1)
    alone.close()
    alone.close()  # idempotent
    a, b = ledger.open(100), ledger.open(100)
    with pytest.raises(LedgerFull):
        ledger.open()
    with pytest.raises(LedgerFull):
        a.add(1000)
    b.close()
    a.close()
    assert ledger.requests == 0 and ledger.nbytes == 0
