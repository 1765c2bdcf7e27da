"""A request's media -> images, with every limit checked before the expensive step it protects.

Order: bytes (data URL decoded, or http(s) fetched with a hard deadline), then each document opened
header-only (page counts checked; a TIFF's pages are counted only up to the request's image limit + 1), then
every page's pixel size (image tokens predicted and checked), and only then decoding and rendering, PDF pages at
no more pixels than the mode uses, in the render workers (`common.documents.render`: a page that takes longer or
more memory than they allow is refused, and never holds up other requests' pages).
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from common.documents.document import (
    DEFAULT_DPI,
    decode_data_url,
    is_data_url,
    kind_of_bytes,
    mode_pixel_budget,
    open_document,
)
from common.documents.render import close_render_pool
from common.errors import InputError
from common.model.modes import Mode
from common.serve.chat import MediaRef
from common.serve.fetch import DEFAULT_MAX_BYTES, fetch_url
from common.serve.limits import RequestLimits


@dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool = False
    timeout_s: float = 15.0
    max_bytes: int = DEFAULT_MAX_BYTES


def is_remote(ref: MediaRef) -> bool:
    # only the head of the URL is looked at: a data: URL can be 64 MB, and a whole-string copy holds the GIL
    return ref.url[:64].lstrip().lower().startswith(("http://", "https://"))


def media_bytes(ref: MediaRef, policy: FetchPolicy) -> tuple[str, bytes]:
    """(media type, bytes) of a data: URL, or of an http(s) URL fetched within the policy."""
    if is_data_url(ref.url):
        return decode_data_url(ref.url)
    if is_remote(ref):
        fetched = fetch_url(
            ref.url.strip(),
            allow_private=policy.allow_private,
            timeout_s=policy.timeout_s,
            max_bytes=policy.max_bytes,
            allow_pdf=True,
        )
        return fetched.content_type, fetched.data
    raise InputError("image URLs must be data: URLs (base64) or http(s) URLs", param="messages")


def load_media(blobs: list[tuple[str, bytes]], mode: Mode, limits: RequestLimits) -> list[list[Image.Image]]:
    """The pages of each (media type, bytes) document as RGB images, one list per document."""
    documents = [open_document(data, kind_of_bytes(data, media_type), max_pages=limits.max_images)
                 for media_type, data in blobs]
    limits.check_pages([(doc.kind, doc.pages) for doc in documents], at_least=any(doc.capped for doc in documents))
    budget = mode_pixel_budget(mode)
    sizes = [doc.page_size(page, DEFAULT_DPI, budget) for doc in documents for page in range(1, doc.pages + 1)]
    limits.check_image_tokens(mode, sizes)
    return [
        [doc.render(page, DEFAULT_DPI, budget, limits.max_image_pixels) for page in range(1, doc.pages + 1)]
        for doc in documents
    ]


def close_media() -> None:
    """Stops the PDF render workers (the server's shutdown; a later request starts them again)."""
    close_render_pool()
