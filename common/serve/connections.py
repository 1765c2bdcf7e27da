"""Connections bounded in number and in the time a client may take to send its request (uvicorn's h11 protocol).

uvicorn waits forever for a request's head and body: idle or half-sent connections pile up until the process runs
out of file descriptors, and then nothing, /health included, gets through. Here a client has `head_timeout_s` to
send a request's head and `body_timeout_s` more for its body (a generation, once the request is in, has no limit);
past `max_connections`, a new connection closes the oldest one still sending its request, so a flood of slow
clients cannot crowd out a quick one. The file-descriptor limit is raised to its hard limit at start-up, and the
connection bound stays below it.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("dsocr.server")

HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 120.0  # 64 MB at about 0.5 MB/s
SPARE_FILES = 64  # descriptors kept for the model files, logs and fetches


def raise_open_file_limit() -> int:
    """Raises the soft RLIMIT_NOFILE to the hard limit (capped); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard if hard != resource.RLIM_INFINITY else 1 << 16, 1 << 16)
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):  # macOS refuses some values its getrlimit reports
            pass
    return soft


def connection_bound(wanted: int, open_file_limit: int) -> int:
    return max(8, min(wanted, open_file_limit - SPARE_FILES))


class BoundedH11Protocol(H11Protocol):
    """H11Protocol with request read deadlines and a bound on connections (configured by `bounded_protocol`)."""

    max_connections = 1024
    head_timeout_s = HEAD_TIMEOUT_S
    body_timeout_s = BODY_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waiting_since: float | None = None  # when it began to wait for the current request; None: not waiting
        self._deadline: asyncio.TimerHandle | None = None
        self._reading_body = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_request()
        if len(self.connections) > self.max_connections and not self._evict_oldest_waiting():
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\n"
                            b"Connection: close\r\n\r\n")
            transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.SEND_BODY and not self._reading_body:
            self._reading_body = True
            self._arm(self.body_timeout_s)
        elif state not in (h11.IDLE, h11.SEND_BODY):  # the request is in: no limit on its answer
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._await_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _await_request(self) -> None:
        self._reading_body = False
        self.waiting_since = self.loop.time()
        self._arm(self.head_timeout_s)

    def _arm(self, seconds: float) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(seconds, self._read_timed_out)

    def _disarm(self) -> None:
        self.waiting_since = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _read_timed_out(self) -> None:
        self._deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            log.debug("closing a connection from %s: its request did not arrive in time", self.client)
            self.transport.close()

    def _evict_oldest_waiting(self) -> bool:
        waiting = [c for c in self.connections if c is not self and isinstance(c, BoundedH11Protocol)
                   and c.waiting_since is not None and not c.transport.is_closing()]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c.waiting_since or 0.0)
        oldest.transport.close()
        return True


def bounded_protocol(max_connections: int, head_timeout_s: float = HEAD_TIMEOUT_S,
                     body_timeout_s: float = BODY_TIMEOUT_S) -> type[BoundedH11Protocol]:
    """The protocol class for uvicorn.Config(http=...), with these bounds."""
    return type("BoundedH11", (BoundedH11Protocol,), {"max_connections": max_connections,
                                                       "head_timeout_s": head_timeout_s,
                                                       "body_timeout_s": body_timeout_s})
