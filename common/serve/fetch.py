"""Fetching images named by http(s) URLs without letting a request reach places it should not.

Server-side request forgery defence: every host name is resolved and *every* address it resolves to must be public
(loopback, private, link-local, multicast, reserved and unspecified ranges are refused, including IPv4-mapped IPv6
forms), and the connection is then made to one of those vetted addresses, so a DNS answer that changes between the
check and the connect (rebinding) cannot redirect it. Redirects are followed by hand, a few at most, and each new
location is checked the same way. The body is read with a deadline and a byte cap; the content type must be an
image (or a PDF when the caller allows it). Standard library only.

Written here rather than taken from an HTTP client: the clients (httpx, requests, urllib3) resolve and connect in
one step, so checking the addresses first and then connecting would let a rebinding DNS answer slip between the
two; pinning the connection to the vetted address needs the connection classes below.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from common.errors import ImageError, InputError

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_REDIRECTS = 3
_CHUNK = 64 * 1024
_REDIRECTS = {301, 302, 303, 307, 308}


class RemoteFetchError(InputError):
    """A URL could not be fetched, or was refused."""


@dataclass(frozen=True)
class FetchedFile:
    data: bytes
    content_type: str
    url: str  # the final URL after redirects


def is_public_address(address: str) -> bool:
    """True only for globally routable unicast addresses."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return is_public_address(str(mapped))
        if ip.teredo is not None:
            return False
    if (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)
    ):
        return False
    return ip.is_global


def resolve_host(host: str, port: int, *, allow_private: bool) -> list[str]:
    """Addresses to connect to; raises RemoteFetchError if any address the name resolves to is not public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise RemoteFetchError(f"cannot resolve host {host!r}: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise RemoteFetchError(f"host {host!r} has no addresses")
    if not allow_private:
        refused = [a for a in addresses if not is_public_address(a)]
        if refused:
            raise RemoteFetchError(
                f"refusing to fetch {host!r}: it resolves to a non-public address ({refused[0]}); "
                "start the server with --allow-private-urls to permit this"
            )
    return addresses


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        # Certificate and SNI are checked against the host name, not the pinned address.
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _arm_deadline(conn: http.client.HTTPConnection, deadline: float) -> threading.Timer:
    """Shuts the connection down at `deadline`, however slowly the server trickles bytes (socket timeouts
    only bound each read, not the whole transfer)."""

    def expire() -> None:
        sock = conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), expire)
    timer.daemon = True
    timer.start()
    return timer


def _acceptable_type(content_type: str, allow_pdf: bool) -> bool:
    if content_type.startswith("image/") or content_type in ("application/octet-stream", ""):
        return True
    return allow_pdf and content_type == "application/pdf"


def fetch_url(
    url: str,
    *,
    allow_private: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_redirects: int = DEFAULT_MAX_REDIRECTS,
    allow_pdf: bool = False,
) -> FetchedFile:
    """GETs an image (or PDF) from an http(s) URL, enforcing the limits described in the module docstring."""
    deadline = time.monotonic() + timeout_s
    current = url
    for _ in range(max_redirects + 1):
        parts = urlsplit(current)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise RemoteFetchError(f"only http and https image URLs are supported, got {scheme or 'none'!r}")
        if not parts.hostname:
            raise RemoteFetchError(f"image URL has no host: {current!r}")
        if parts.username or parts.password:
            raise RemoteFetchError("image URLs with credentials are not allowed")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise RemoteFetchError(f"image URL has an invalid port: {current!r}") from None
        address = resolve_host(parts.hostname, port, allow_private=allow_private)[0]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RemoteFetchError(f"timed out fetching {url}")
        conn_type = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        conn = conn_type(parts.hostname, port, address, remaining)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        timer = _arm_deadline(conn, deadline)
        try:
            conn.request(
                "GET", path, headers={"User-Agent": "dsocr-server", "Accept": "image/*, application/pdf"}
            )
            response = conn.getresponse()
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise RemoteFetchError(f"{current} redirected without a Location header")
                current = urljoin(current, location)
                continue
            if response.status != 200:
                raise RemoteFetchError(f"fetching {current} failed with HTTP {response.status}")
            content_type = (response.getheader("Content-Type") or "").split(";", 1)[0].strip().lower()
            if not _acceptable_type(content_type, allow_pdf):
                raise RemoteFetchError(f"{current} is not an image (Content-Type {content_type!r})")
            length = response.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ImageError(f"{current} is {int(length):,} bytes, above the {max_bytes:,}-byte limit")
            chunks: list[bytes] = []
            total = 0
            while True:
                chunk = response.read1(_CHUNK)  # returns after one receive, so the deadline is seen in time
                if time.monotonic() >= deadline:
                    raise RemoteFetchError(f"timed out fetching {url}")
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise ImageError(f"{current} is larger than the {max_bytes:,}-byte limit")
                chunks.append(chunk)
            return FetchedFile(b"".join(chunks), content_type, current)
        except TimeoutError:
            raise RemoteFetchError(f"timed out fetching {url}") from None
        except (OSError, http.client.HTTPException) as exc:
            if time.monotonic() >= deadline:
                raise RemoteFetchError(f"timed out fetching {url}") from None
            raise RemoteFetchError(f"cannot fetch {current}: {exc}") from None
        finally:
            timer.cancel()
            conn.close()
    raise RemoteFetchError(f"too many redirects fetching {url} (at most {max_redirects})")
