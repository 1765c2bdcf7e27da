"""The files of the Mistral OCR API (`/v1/files`): documents uploaded for OCR, kept a while in a temporary folder.

The store is bounded by count and by bytes (an upload past either bound is refused, after expired files are
cleared), every file expires (after the upload's `expiry` hours, at most MAX_LIFETIME_H), and the folder is removed
with the server. A signed URL (`GET /v1/files/{id}/url`) names a file with an expiry and an HMAC under a key made at
start-up; the OCR route reads such a URL straight from the store (`StoredFiles.signed`), never over the network, so
it works whatever host name the client reached this server by.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from common.serve.errors import APIError

MAX_LIFETIME_H = 24  # the longest a file is kept (Mistral's `expiry` is in hours)
MAX_URL_EXPIRY_H = 168  # the longest a signed URL may last (Mistral's bound)
DEFAULT_URL_EXPIRY_H = 24
MAX_SIGNED_URL_CHARS = 4096  # ours are about 150 characters, whatever the host name
_ID = re.compile(r"^[0-9a-f]{32}$")
_CONTENT_PATH = re.compile(r"^/v1/files/([0-9a-f]{32})/content$")


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    mimetype: str
    nbytes: int
    created_at: int  # unix seconds
    expires_at: int
    path: Path

    def describe(self) -> dict[str, object]:
        """The file as the Mistral API describes one (`CreateFileResponse`, `FileSchema`)."""
        return {"id": self.id, "object": "file", "bytes": self.nbytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "sample_type": "ocr_input", "source": "upload",
                "num_lines": None, "mimetype": self.mimetype, "expires_at": self.expires_at, "signature": None}


class StoredFiles:
    """Thread-safe (uploads are written on a worker thread). `close` removes every file and the folder."""

    def __init__(self, max_files: int, max_bytes: int) -> None:
        self.max_files, self.max_bytes = max_files, max_bytes
        self._files: dict[str, StoredFile] = {}
        self._lock = threading.Lock()
        self._key = secrets.token_bytes(32)
        self._folder: Path | None = None

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self._files.values())

    def _directory(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="dsocr-files-"))
        return self._folder

    def sweep(self, now: float | None = None) -> int:
        """Removes the expired files; returns how many."""
        now = time.time() if now is None else now
        with self._lock:
            expired = [f for f in self._files.values() if f.expires_at <= now]
            for stored in expired:
                self._remove(stored)
        return len(expired)

    def _remove(self, stored: StoredFile) -> None:  # with the lock held
        self._files.pop(stored.id, None)
        with contextlib.suppress(OSError):
            stored.path.unlink()

    def add(self, data: bytes, filename: str, purpose: str, mimetype: str, expiry_h: int | None = None) -> StoredFile:
        """Keeps `data`; APIError 413 for a file past the store's bytes, 429 while the store is full."""
        if len(data) > self.max_bytes:
            raise APIError(413, f"the file is {len(data) / 1e6:.1f} MB; this server keeps files of at most "
                           f"{self.max_bytes / 1e6:.0f} MB (--max-stored-mb)", code="request_too_large", param="file")
        self.sweep()
        now = int(time.time())
        lifetime_h = min(expiry_h, MAX_LIFETIME_H) if expiry_h else MAX_LIFETIME_H
        with self._lock:
            if len(self._files) >= self.max_files or self.nbytes + len(data) > self.max_bytes:
                raise APIError(429, f"the file store is full ({len(self._files)} files, {self.nbytes / 1e6:.1f} MB; "
                               f"at most {self.max_files} files, {self.max_bytes / 1e6:.0f} MB: --max-stored-files, "
                               "--max-stored-mb); delete files you are done with (DELETE /v1/files/{id})",
                               code="file_store_full", headers={"Retry-After": "60"})
            file_id = secrets.token_hex(16)
            path = self._directory() / (file_id + _suffix(data))
            stored = StoredFile(file_id, filename, purpose, mimetype, len(data), now, now + lifetime_h * 3600, path)
            self._files[file_id] = stored  # reserved: a concurrent upload counts it
        try:
            with open(path, "xb") as out:
                out.write(data)
        except OSError as exc:
            with self._lock:
                self._remove(stored)
            raise APIError(507, f"cannot keep the file: {exc.strerror or exc}", code="storage_error") from None
        return stored

    def get(self, file_id: str) -> StoredFile:
        """The file; APIError 404 when there is none of that id (or it expired)."""
        self.sweep()
        with self._lock:
            stored = self._files.get(file_id) if _ID.match(file_id) else None
        if stored is None:
            raise APIError(404, f"no file {file_id!r}: it was never uploaded, was deleted or has expired",
                           code="file_not_found", param="file_id")
        return stored

    def files(self) -> list[StoredFile]:
        self.sweep()
        with self._lock:
            return sorted(self._files.values(), key=lambda f: f.created_at)

    def delete(self, file_id: str) -> StoredFile:
        stored = self.get(file_id)
        with self._lock:
            self._remove(stored)
        return stored

    def read(self, stored: StoredFile) -> bytes:
        try:
            return stored.path.read_bytes()
        except OSError:  # deleted meanwhile
            raise APIError(404, f"the file {stored.id!r} was deleted", code="file_not_found") from None

    # ---- signed URLs ---------------------------------------------------------------------------------------------

    def _signature(self, file_id: str, expires: int) -> str:
        return hmac.new(self._key, f"{file_id}:{expires}".encode(), hashlib.sha256).hexdigest()

    def signed_url(self, stored: StoredFile, base_url: str, expiry_h: int = DEFAULT_URL_EXPIRY_H) -> str:
        """A URL naming the file's content, valid for `expiry_h` hours (never past the file's own expiry)."""
        expires = min(int(time.time()) + expiry_h * 3600, stored.expires_at)
        return (f"{base_url.rstrip('/')}/v1/files/{stored.id}/content?expires={expires}"
                f"&signature={self._signature(stored.id, expires)}")

    def signed(self, url: str) -> StoredFile | None:
        """The file a signed URL of this store names; None for any other URL. APIError 400 for one of ours that has
        expired (404 when its file is gone)."""
        if len(url) > MAX_SIGNED_URL_CHARS:  # a data: URL can be 64 MB: parsing it would hold the event loop
            return None
        parts = urlsplit(url.strip())
        match = _CONTENT_PATH.match(parts.path)
        if parts.scheme not in ("http", "https") or match is None:
            return None
        query = parse_qs(parts.query)
        expires_text, signature = query.get("expires", [""])[0], query.get("signature", [""])[0]
        if not (expires_text.isascii() and expires_text.isdigit()) or len(expires_text) > 12:
            return None
        expires = int(expires_text)
        if not hmac.compare_digest(signature, self._signature(match.group(1), expires)):
            return None  # not ours (another server's, or altered): an ordinary URL
        if expires <= time.time():
            raise APIError(400, "the signed URL has expired; ask for a new one (GET /v1/files/{id}/url)",
                           code="url_expired")
        return self.get(match.group(1))

    def close(self) -> None:
        with self._lock:
            self._files.clear()
            folder, self._folder = self._folder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _suffix(data: bytes) -> str:
    """The stored file's extension: a TIFF's pages are counted only in a file named as one (a PDF's by content)."""
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return ".tiff"
    return ".pdf" if data[:5] == b"%PDF-" else ""


def clean_filename(name: str, fallback: str = "document") -> str:
    """A file name fit for logs and replies: its last path component, control characters removed, at most 255
    characters."""
    name = os.path.basename(name.replace("\\", "/"))
    name = "".join(c for c in name if c.isprintable()).strip()
    return name[:255] or fallback
