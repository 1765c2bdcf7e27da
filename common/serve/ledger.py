"""One bound for everything the server has accepted: a request counts from the moment its body starts to arrive
until its response has been sent, whatever it is doing meanwhile (receiving, waiting for a fetch or a prepare
worker, prepared and queued, generating, streaming).

A request holds a `Ticket` for that span. Its charge in bytes is an estimate of what it keeps in memory: its body
three times over (the bytes received, the decoded JSON holding the same text, and the media decoded from it),
then the prepared model inputs once they exist. The server refuses (429) a request that would take the count past
`max_requests` or the bytes past `max_bytes`, before reading its body when the body announces its length.
"""

from __future__ import annotations

import threading

BODY_COPIES = 3  # received bytes, their decoded JSON, the media decoded from that


class LedgerFull(Exception):
    """Accepting this request would pass the server's bound on accepted requests (count or bytes)."""


class Ticket:
    """One accepted request's share of the ledger; `close` (idempotent) gives it back."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger, self.nbytes, self.closed = ledger, 0, False

    def add(self, nbytes: int) -> None:
        """Charges `nbytes` more: LedgerFull (and nothing charged) when that passes the bound."""
        self._ledger._charge(self, nbytes)

    def add_body(self, nbytes: int) -> None:
        self.add(nbytes * BODY_COPIES)

    def close(self) -> None:
        self._ledger._close(self)


class Ledger:
    """Thread-safe: the event loop opens and closes tickets, the prepare workers charge prepared inputs."""

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self._lock = threading.Lock()
        self.requests = 0
        self.nbytes = 0

    def open(self, announced_body: int = 0) -> Ticket:
        """A ticket for a new request whose body announces `announced_body` bytes; LedgerFull when it does not fit."""
        with self._lock:
            charge = announced_body * BODY_COPIES
            if self.requests >= self.max_requests or (self.requests and self.nbytes + charge > self.max_bytes):
                raise LedgerFull
            ticket = Ticket(self)
            ticket.nbytes = charge
            self.requests += 1
            self.nbytes += charge
            return ticket

    def _charge(self, ticket: Ticket, nbytes: int) -> None:
        with self._lock:
            if ticket.closed:
                return
            # A request alone is never refused for its size (the body and image limits bound that): only a crowd.
            if self.nbytes + nbytes > self.max_bytes and self.nbytes > ticket.nbytes:
                raise LedgerFull
            ticket.nbytes += nbytes
            self.nbytes += nbytes

    def _close(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.closed:
                return
            ticket.closed = True
            self.requests -= 1
            self.nbytes -= ticket.nbytes
