"""Documents as pages: image files, multi-page TIFFs and PDFs, from a path, bytes or a data URL.

pypdfium2 is not thread-safe, not even across documents, so every pdfium call in the process holds
`PDFIUM_LOCK`. A document is opened header-only first (`open_document`): its page count and each page's pixel
size are known before a single page is rendered or decoded, so limits are checked before the expensive work.
PDF pages are rendered at the requested dpi but never larger than the image mode can use (`mode_pixel_budget`):
a huge page becomes a few megapixels, not gigabytes.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from common.documents.images import DEFAULT_MAX_PIXELS, image_frame_count, image_frame_sizes, load_image
from common.errors import ImageError
from common.model.modes import Mode

# One lock for the whole process: pdfium keeps global state shared by all documents.
PDFIUM_LOCK = threading.RLock()

DEFAULT_DPI = 144  # the authors' PDF script renders at 144 dpi
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"})
MULTIPAGE_IMAGE_EXTENSIONS = frozenset({".tif", ".tiff"})  # GIF/WebP animations: first frame only
PDF_EXTENSION = ".pdf"
# The views are resized from the page: more than a few times the pixels they hold only costs memory.
RENDER_HEADROOM = 2

Content = Path | bytes


def decode_data_url(url: str) -> tuple[str, bytes]:
    """(media type, bytes) of a `data:` URL; ImageError for a malformed one."""
    header, sep, payload = url.strip()[len("data:") :].partition(",")
    if not sep:
        raise ImageError("malformed data URL: expected data:<type>;base64,<data>")
    media_type, *params = header.split(";")
    if "base64" in (p.strip().lower() for p in params):
        compact = "".join(payload.split())
        try:
            data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            try:  # some clients send URL-safe base64
                data = base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
            except (binascii.Error, ValueError):
                raise ImageError("the data URL is not valid base64") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
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


def pdf_render_scale(width_pt: float, height_pt: float, dpi: int, pixel_budget: int | None) -> float:
    """Points -> pixels: `dpi`, lowered so the page holds at most `pixel_budget` pixels."""
    scale = dpi / 72.0
    area_pt = max(width_pt * height_pt, 1e-6)
    if pixel_budget is not None and area_pt * scale * scale > pixel_budget:
        scale = math.sqrt(pixel_budget / area_pt)
    return scale


@dataclass
class Document:
    """An opened document: its kind and page count, with pages sized and rendered on demand (1-based)."""

    kind: str  # "image" or "pdf"
    content: Content
    pages: int
    name: str = ""

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
        """The page as an RGB image (a PDF page on white, at most `pixel_budget` pixels)."""
        if self.kind == "image":
            return load_image(self.content, max_pixels=max_pixels, frame=page - 1)
        import pypdfium2 as pdfium

        with PDFIUM_LOCK:
            pdf = _open_pdf(self.content)
            try:
                pdf_page = pdf[page - 1]
                try:
                    width_pt, height_pt = pdf_page.get_size()
                    scale = pdf_render_scale(width_pt, height_pt, dpi, pixel_budget)
                    if width_pt * height_pt * scale * scale > max_pixels:
                        raise ImageError(
                            f"page {page} would render to {int(width_pt * scale)}x{int(height_pt * scale)} pixels "
                            f"at {dpi} dpi, above the limit; lower the dpi"
                        )
                    return pdf_page.render(scale=scale).to_pil().convert("RGB")
                finally:
                    pdf_page.close()
            except pdfium.PdfiumError as exc:
                raise ImageError(f"cannot render page {page}: {exc}") from None
            finally:
                pdf.close()


def open_document(content: Content, kind: str | None = None, name: str = "") -> Document:
    """Reads only what gives the page count; ImageError for an unreadable or empty document."""
    if kind is None:
        kind = path_kind(content) if isinstance(content, Path) else kind_of_bytes(content)
        if kind is None:
            raise ImageError(f"not an image or a PDF: {name or content}")
    if kind == "pdf":
        with PDFIUM_LOCK:
            pdf = _open_pdf(content)
            try:
                pages = len(pdf)
            finally:
                pdf.close()
        if pages == 0:
            raise ImageError(_NO_PAGES)
    else:
        multipage = isinstance(content, bytes) or content.suffix.lower() in MULTIPAGE_IMAGE_EXTENSIONS
        pages = image_frame_count(content) if multipage and _is_tiff(content) else 1
    return Document(kind, content, pages, name)


def _is_tiff(content: Content) -> bool:
    if isinstance(content, Path):
        return content.suffix.lower() in MULTIPAGE_IMAGE_EXTENSIONS
    return content[:4] in (b"II*\x00", b"MM\x00*")
