"""Small generated hostile inputs (nothing large is committed): broken, encrypted and oversized PDFs, image bombs,
bad URLs and bodies, with the answer the server must give each. Used by the tests and benchmarks/soak_server.py.
Also the inputs of "Hardening, round 2": PDFs whose pages hold millions of flate-compressed drawing operators
(`pdf_content_bomb`), page trees that lie about their page count, TIFFs of tens of thousands of pages or with a
directory that has no dimensions.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image


def pdf_bytes(page_sizes: list[tuple[float, float]], *, encrypted: bool = False) -> bytes:
    """A minimal PDF with empty pages of the given point sizes (optionally with a user password set)."""
    kids = " ".join(f"{3 + i} 0 R" for i in range(len(page_sizes))).encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" %
               len(page_sizes)]
    objects += [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %g %g] >>" % size for size in page_sizes]
    trailer = b""
    if encrypted:  # a standard security handler whose user password is not empty
        objects.append(b"<< /Filter /Standard /V 1 /R 2 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32 + b"> /P -4 >>")
        trailer = b"/Encrypt %d 0 R /ID [<%s> <%s>] " % (len(objects), b"ab" * 16, b"ab" * 16)
    return _pdf(objects, trailer)


def _pdf(objects: list[bytes], trailer: bytes = b"") -> bytes:
    """A PDF of the given objects (1 0 obj is the catalog) with a correct cross-reference table; `trailer`: more
    entries of the trailer dictionary."""
    out = b"%PDF-1.4\n"
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R " % (len(objects) + 1) + trailer + b">>\nstartxref\n%d\n%%%%EOF\n" % xref
    return out


# Long diagonal strokes: cheap to parse, slow to draw (200,000 of them: 9 KB, ~45 s for pdfium at 144 dpi).
SLOW_OPERATOR = b"0 0 m 612 792 l S\n"
# Short strokes: each a page object of its own in pdfium (2 million: 55 KB, ~550 MB; 6 million: ~1.6 GB).
HEAVY_OPERATOR = b"0 0 m 1 1 l S\n"


def pdf_content_bomb(operators: int, operator: bytes = SLOW_OPERATOR, pages: int = 1) -> bytes:
    """A PDF whose pages share one content stream of `operators` drawing operators, flate-compressed: small on
    disk, minutes or gigabytes to load and render."""
    stream = zlib.compress(operator * operators, 9)
    kids = " ".join(f"{3 + i} 0 R" for i in range(pages)).encode()
    contents = 3 + pages
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % pages]
    objects += [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R >>" % contents] * pages
    objects.append(b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream")
    return _pdf(objects)


def pdf_claiming_pages(claimed: int, real: int = 1) -> bytes:
    """A PDF of `real` empty pages whose page tree's /Count claims `claimed` (pdfium believes it)."""
    return pdf_bytes([(612, 792)] * real).replace(b"/Count %d" % real, b"/Count %d" % claimed)


def pdf_repeating_page(times: int) -> bytes:
    """A PDF whose page tree names one page object `times` times (6 bytes a page: pdfium counts each)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [" + b"3 0 R " * times + b"] /Count %d >>" % times,
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>"]
    return _pdf(objects)


def _tiff_directory(entries: list[tuple[int, int, int, int]], next_offset: int) -> bytes:
    out = struct.pack("<H", len(entries))
    out += b"".join(struct.pack("<HHII", tag, kind, count, value) for tag, kind, count, value in entries)
    return out + struct.pack("<I", next_offset)


# One 1x1 8-bit grey page: width, length, bits, compression, photometric, strip offset 0, samples, strip bytes.
_TIFF_PAGE = [(256, 4, 1, 1), (257, 4, 1, 1), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 0),
              (277, 3, 1, 1), (279, 4, 1, 1)]


def tiff_pages(pages: int) -> bytes:
    """A little-endian TIFF of `pages` 1x1 pages (~110 bytes a page: 40,000 pages are 4.4 MB)."""
    size = 2 + 12 * len(_TIFF_PAGE) + 4
    body = b"".join(_tiff_directory(_TIFF_PAGE, 8 + size * (i + 1) if i < pages - 1 else 0) for i in range(pages))
    return b"II*\x00" + struct.pack("<I", 8) + body


def tiff_without_dimensions() -> bytes:
    """A TIFF whose second directory has no width or length: Pillow raises TypeError counting its pages."""
    size = 2 + 12 * len(_TIFF_PAGE) + 4
    dimensionless = [entry for entry in _TIFF_PAGE if entry[0] not in (256, 257)]
    return b"II*\x00" + struct.pack("<I", 8) + _tiff_directory(_TIFF_PAGE, 8 + size) + _tiff_directory(
        dimensionless, 0)


def png_bytes(size: tuple[int, int] = (300, 200), color: str = "white") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header announces width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def image_chat(url: str, text: str = "Free OCR.", **extra: Any) -> dict[str, Any]:
    return {"model": "deepseek-ocr", "max_tokens": 2, **extra,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": text}]}]}


def file_chat(pdf: bytes, **extra: Any) -> dict[str, Any]:
    part = {"type": "file", "file": {"file_data": data_url(pdf, "application/pdf"), "filename": "doc.pdf"}}
    return {"model": "deepseek-ocr", "max_tokens": 2, **extra, "messages": [{"role": "user", "content": [part]}]}


def text_chat(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "deepseek-ocr", "max_tokens": 2, **extra, "messages": [{"role": "user", "content": text}]}


@dataclass(frozen=True)
class Case:
    name: str
    status: int
    needle: str  # in the error message (lower case)
    body: Any = None  # JSON body, or
    raw: bytes | None = None  # a raw body
    param: str | None = "-"  # the expected error `param` ("-": not checked)


# The tiny fixture model's config.json (what the tests serve; benchmarks/soak_server.py serves it by default).
FIXTURE_CONFIG = Path(__file__).resolve().parent / "fixtures" / "deepseek-ocr" / "model" / "config.json"


def corpus(context: int | None = None) -> list[Case]:
    """The cases, for a model of `context` tokens (default: the fixture model's max_position_embeddings)."""
    if context is None:
        context = int(json.loads(FIXTURE_CONFIG.read_text())["max_position_embeddings"])
    png = png_bytes()
    return [
        Case("corrupt png", 400, "image", image_chat(data_url(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50))),
        Case("truncated png", 400, "truncated", image_chat(data_url(png_bytes((600, 600), "red")[:300]))),
        Case("png bomb", 400, "pixels", image_chat(data_url(png_bomb()))),
        Case("broken pdf", 400, "pdf", file_chat(b"%PDF-1.4\n%garbage without objects\n")),
        Case("encrypted pdf", 400, "encrypted", file_chat(pdf_bytes([(612, 792)], encrypted=True))),
        Case("empty pdf", 400, "the pdf has no pages", file_chat(pdf_bytes([]))),
        Case("too many pdf pages", 400, "at most 8", file_chat(pdf_bytes([(612, 792)] * 9))),
        Case("too many images", 400, "at most 16", {"model": "deepseek-ocr", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png)}}] * 17}]}),
        Case("giant tiles", 400, "image tokens", image_chat(data_url(png_bytes((3000, 2500))), mode="gundam",
             base_size=4096, image_size=4096, max_crops=30), param="mode"),
        Case("base_size not a multiple", 400, "base_size", image_chat(data_url(png), base_size=100), param="base_size"),
        Case("image_size 63", 400, "image_size", image_chat(data_url(png), image_size=63), param="image_size"),
        Case("unknown mode", 400, "unknown mode", text_chat(mode="huge"), param="mode"),
        Case("bad base64", 400, "base64", image_chat("data:image/png;base64,@@not base64!!")),
        Case("data url without comma", 400, "malformed", image_chat("data:image/png;base64")),
        Case("ftp url", 400, "http", image_chat("ftp://example.com/a.png")),
        Case("not a url", 400, "http", image_chat("scan.png")),
        Case("loopback url", 400, "non-public", image_chat("http://127.0.0.1:1/secret.png")),
        Case("metadata url", 400, "non-public", image_chat("http://169.254.169.254/latest/meta-data/")),
        Case("image part without url", 400, "image_url", {"messages": [{"role": "user", "content": [
            {"type": "image_url"}]}]}),
        Case("max_tokens a string", 400, "max_tokens", text_chat(max_tokens="many"), param="max_tokens"),
        Case("messages a string", 400, "messages", {"messages": "hi"}, param="messages"),
        Case("content a number", 400, "content", {"messages": [{"role": "user", "content": 5}]}),
        Case("temperature negative", 400, "temperature", text_chat(temperature=-1), param="temperature"),
        Case("top_p zero", 400, "top_p", text_chat(top_p=0), param="top_p"),
        Case("seed 2^64", 400, "seed", text_chat(seed=2**64), param="seed"),
        Case("no user message", 400, "user", {"messages": [{"role": "system", "content": "x"}]}, param="messages"),
        Case("too many stop strings", 400, "stop", text_chat(stop=["x" * 200] * 20_000), param="stop"),
        Case("stop strings too long", 400, "stop", text_chat(stop=["y" * 1000, "z" * 1000]), param="stop"),
        Case("prompt beyond the context", 400, "context", text_chat("word " * 60_000)),
        Case("max_tokens beyond the context", 400, "context", image_chat(data_url(png), max_tokens=context),
             param="max_tokens"),
        Case("unknown model", 404, "does not exist", text_chat(model="gpt-4o"), param="model"),
        Case("empty body", 400, "empty", raw=b""),
        Case("not json", 400, "not valid json", raw=b"{not json"),
        Case("nested arrays", 400, "nested", raw=b'{"messages": [], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        Case("lone surrogate", 400, "surrogate", raw=b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
        Case("missing messages", 400, "messages", {"model": "deepseek-ocr"}),
    ]
