"""Documents as pages: image files, multi-page TIFFs and PDFs, from a path, bytes or a data URL.

A document is opened header-only first (`open_document`): its page count and each page's pixel size are known
before a single page is rendered or decoded, so limits are checked before the expensive work. That header work
stays in this process: pypdfium2 is not thread-safe, not even across documents, so every pdfium call here holds
`PDFIUM_LOCK`; it reads the document's cross-references and page tree, never a page's content. Page counts are
not trusted: a TIFF's pages are counted only up to the caller's limit (Pillow's count is quadratic), and a PDF
whose page tree claims pages it does not have is counted by the pages it has (`plausible_page_count`).
Rendering a PDF page is the expensive, attacker-controlled work (millions of drawing operators in a few
kilobytes): it runs in a worker process, bounded in time and memory (`common.documents.render`). PDF pages are
rendered at the requested dpi but never larger than the image mode can use (`mode_pixel_budget`): a huge page
becomes a few megapixels, not gigabytes.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from common.documents.images import DEFAULT_MAX_PIXELS, image_frame_count, image_frame_sizes, load_image
from common.documents.render import document_key, pdf_render_scale, render_pdf_page
from common.errors import ImageError
from common.model.modes import Mode

__all__ = ["PDFIUM_LOCK", "Document", "open_document", "pdf_render_scale"]

log = logging.getLogger("dsocr")

# One lock for the whole process: pdfium keeps global state shared by all documents.
PDFIUM_LOCK = threading.RLock()
# The fewest bytes a PDF page takes in a file (its object, its entry in the page tree and the cross-references,
# compressed in object streams): a page tree claiming more pages than its file can hold is damaged or hostile.
MIN_PDF_BYTES_PER_PAGE = 8

DEFAULT_DPI = 144  # the authors' PDF script renders at 144 dpi
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"})
MULTIPAGE_IMAGE_EXTENSIONS = frozenset({".tif", ".tiff"})  # GIF/WebP animations: first frame only
PDF_EXTENSION = ".pdf"
# The views are resized from the page: more than a few times the pixels they hold only costs memory.
RENDER_HEADROOM = 2

Content = Path | bytes


BASE64_PIECE = 1 << 20  # characters decoded at once: a few milliseconds each, so other threads get the GIL between


def _decode_base64(text: str, start: int = 0) -> bytes:
    """Standard or URL-safe base64 from `text[start:]`, whitespace ignored, decoded piece by piece: the C decoders
    (and every whole-string copy) hold the GIL, and a 64 MB payload handled at once would stall every other
    thread (the server's event loop) for its whole length."""
    urlsafe = False
    out, carry = bytearray(), ""
    try:
        for at in range(start, len(text), BASE64_PIECE):
            piece = carry + "".join(text[at:at + BASE64_PIECE].split())
            urlsafe = urlsafe or "-" in piece or "_" in piece
            whole = len(piece) - len(piece) % 4
            carry = piece[whole:]
            chunk = piece[:whole]
            out += base64.urlsafe_b64decode(chunk) if urlsafe else base64.b64decode(chunk, validate=True)
        if carry:
            padded = carry + "=" * (-len(carry) % 4)
            out += base64.urlsafe_b64decode(padded) if urlsafe else base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the data URL is not valid base64") from None
    return bytes(out)


DATA_URL_HEADER = 1024  # characters of a data: URL searched for the comma that ends its header


def is_data_url(url: str) -> bool:
    return url[:64].lstrip().lower().startswith("data:")


def decode_data_url(url: str) -> tuple[str, bytes]:
    """(media type, bytes) of a `data:` URL; ImageError for a malformed one. The payload is never copied whole."""
    head = url[:64]
    begin = len(head) - len(head.lstrip())
    comma = url.find(",", begin, begin + DATA_URL_HEADER)
    if not url[begin:begin + 5].lower() == "data:" or comma < 0:
        raise ImageError("malformed data URL: expected data:<type>;base64,<data>")
    media_type, *params = url[begin + len("data:"):comma].split(";")
    if "base64" in (p.strip().lower() for p in params):
        data = _decode_base64(url, comma + 1)
    else:
        data = urllib.parse.unquote_to_bytes(url[comma + 1:].strip())
    if not data:
        raise ImageError("the data URL is empty")
    return media_type.strip().lower(), data


def kind_of_bytes(data: bytes, media_type: str = "") -> str:
    """'pdf' or 'image' for document bytes."""
    return "pdf" if media_type == "application/pdf" or data[:5] == b"%PDF-" else "image"


def sniff_path_kind(path: Path) -> str | None:
    """'pdf' / 'image' for a file with an unknown extension, from its content; None if neither."""
    with path.open("rb") as f:
        head = f.read(8)
    if head.startswith(b"%PDF"):
        return "pdf"
    try:
        with Image.open(path):
            return "image"
    except Exception:  # any decoder complaint means "not an image we can read"
        return None


def path_kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix == PDF_EXTENSION:
        return "pdf"
    return "image" if suffix in IMAGE_EXTENSIONS else sniff_path_kind(path)


def mode_pixel_budget(mode: Mode) -> int:
    """Most pixels a page is rendered with for `mode`: what its views hold, times RENDER_HEADROOM."""
    needed = mode.image_size**2
    if mode.crop_mode:
        needed = max(mode.base_size**2, mode.image_size**2 * mode.max_crops)
    return RENDER_HEADROOM * needed


_NO_PAGES = "the PDF has no pages"
_SENTINEL_PATH = b"/nonexistent/dsocr-pdfium-error-sentinel.pdf"


def _open_pdf(content: Content):  # noqa: ANN202 - pypdfium2 is imported lazily
    """Opens a PDF (the caller holds PDFIUM_LOCK); ImageError with the reason it cannot be opened.

    pdfium's last-error code is global and a document without pages fails without setting it, so the code is
    first set to a sentinel (a file-access error, which an in-memory or readable file cannot cause) to tell
    the cases apart.
    """
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    pdfium_c.FPDF_LoadDocument(_SENTINEL_PATH, None)
    try:
        return pdfium.PdfDocument(content)
    except pdfium.PdfiumError as exc:
        code = pdfium_c.FPDF_GetLastError()
        if code == pdfium_c.FPDF_ERR_PASSWORD:
            raise ImageError("cannot open the PDF: it is encrypted (password-protected)") from None
        if code == pdfium_c.FPDF_ERR_FILE and (isinstance(content, bytes) or os.access(content, os.R_OK)):
            raise ImageError(_NO_PAGES) from None
        raise ImageError(f"cannot open the PDF: {exc}") from None


def _content_size(content: Content) -> int:
    if isinstance(content, bytes):
        return len(content)
    try:
        return content.stat().st_size
    except OSError as exc:
        raise ImageError(f"cannot read {content}: {exc.strerror or exc}") from None


def plausible_page_count(pdf, claimed: int, file_size: int, name: str = "") -> int:  # noqa: ANN001 - lazy import
    """The pages a PDF has (the caller holds PDFIUM_LOCK): pdfium takes the page tree's /Count on trust, so a
    590-byte file can claim a million pages. When the last claimed page cannot be found, the pages that can
    are counted (a binary search over page lookups, which read only the page tree); a count still more than
    the file's bytes can hold is refused."""
    import pypdfium2 as pdfium

    def exists(page: int) -> bool:
        try:
            pdf.get_page_size(page - 1)
        except pdfium.PdfiumError:
            return False
        return True

    pages = claimed
    if claimed > 0 and not exists(claimed):
        if not exists(1):
            raise ImageError(f"the PDF claims {claimed} pages but its page tree names none that can be read")
        good, bad = 1, claimed
        while bad - good > 1:
            middle = (good + bad) // 2
            good, bad = (middle, bad) if exists(middle) else (good, middle)
        pages = good
        log.warning("%s: the PDF claims %d pages but has %d; counting %d", name or "a PDF", claimed, pages, pages)
    most = max(1, file_size // MIN_PDF_BYTES_PER_PAGE)
    if pages > most:
        raise ImageError(f"the PDF claims {pages:,} pages, more than a file of {file_size:,} bytes can hold "
                         f"(at most {most:,}); its page tree is damaged")
    return pages


@dataclass
class Document:
    """An opened document: its kind and page count, with pages sized and rendered on demand (1-based).
    `capped`: the pages were counted only up to a limit, and there are at least `pages`."""

    kind: str  # "image" or "pdf"
    content: Content
    pages: int
    name: str = ""
    capped: bool = False
    _key: str | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> str:
        """Names the content for the render workers (hashed once per document)."""
        if self._key is None:
            self._key = document_key(self.content)
        return self._key

    def page_size(self, page: int, dpi: int = DEFAULT_DPI, pixel_budget: int | None = None) -> tuple[int, int]:
        """(width, height) in pixels the page will have, without rendering or decoding it."""
        if self.kind == "image":
            return image_frame_sizes(self.content, [page - 1])[0]
        with PDFIUM_LOCK:
            pdf = _open_pdf(self.content)
            try:
                width_pt, height_pt = pdf.get_page_size(page - 1)
            finally:
                pdf.close()
        scale = pdf_render_scale(width_pt, height_pt, dpi, pixel_budget)
        return max(1, round(width_pt * scale)), max(1, round(height_pt * scale))

    def render(
        self,
        page: int,
        dpi: int = DEFAULT_DPI,
        pixel_budget: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> Image.Image:
        """The page as an RGB image (a PDF page on white, at most `pixel_budget` pixels). A PDF page renders in a
        worker process (`common.documents.render`): ImageError when it takes longer or more memory than allowed."""
        if self.kind == "image":
            return load_image(self.content, max_pixels=max_pixels, frame=page - 1)
        return render_pdf_page(self.content, page, dpi, pixel_budget, max_pixels, key=self.key)


def open_document(content: Content, kind: str | None = None, name: str = "", max_pages: int | None = None) -> Document:
    """Reads only what gives the page count; ImageError for an unreadable or empty document. The pages of a
    multi-page TIFF are counted up to `max_pages` + 1 at most (then `capped`: there are more than `max_pages`)."""
    if kind is None:
        kind = path_kind(content) if isinstance(content, Path) else kind_of_bytes(content)
        if kind is None:
            raise ImageError(f"not an image or a PDF: {name or content}")
    capped = False
    if kind == "pdf":
        size = _content_size(content)
        with PDFIUM_LOCK:
            pdf = _open_pdf(content)
            try:
                pages = plausible_page_count(pdf, len(pdf), size, name)
            finally:
                pdf.close()
        if pages == 0:
            raise ImageError(_NO_PAGES)
    else:
        multipage = isinstance(content, bytes) or content.suffix.lower() in MULTIPAGE_IMAGE_EXTENSIONS
        pages = image_frame_count(content, limit=max_pages) if multipage and _is_tiff(content) else 1
        capped = max_pages is not None and pages > max_pages
    return Document(kind, content, pages, name, capped)


def _is_tiff(content: Content) -> bool:
    if isinstance(content, Path):
        return content.suffix.lower() in MULTIPAGE_IMAGE_EXTENSIONS
    return content[:4] in (b"II*\x00", b"MM\x00*")
