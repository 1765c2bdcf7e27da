"""Image loading: official conversion (EXIF, alpha, palette) and clear errors for bad input."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from common.documents.images import DEFAULT_MAX_PIXELS, image_frame_count, load_image
from common.errors import ImageError
from tests.conftest import FIXTURES, cases_manifest


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _png_with_header(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height over a few bytes of data: a decompression bomb's shape."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("entry", cases_manifest()["images"], ids=lambda e: Path(e["file"]).name)
def test_fixture_images_match_official_conversion(entry: dict) -> None:
    path = FIXTURES / entry["file"]
    image = load_image(path)
    assert image.mode == "RGB"
    width, height = entry["size"]
    if entry["exif_orientation"] in (5, 6, 7, 8):
        width, height = height, width  # rotated by 90 degrees
    assert image.size == (width, height)
    with Image.open(path) as raw:
        expected = ImageOps.exif_transpose(raw).convert("RGB")
    assert image.tobytes() == expected.tobytes()
    # bytes in, same pixels out
    assert load_image(path.read_bytes()).tobytes() == image.tobytes()


def test_alpha_is_dropped_not_composited() -> None:
    # Fully transparent: compositing would give white or black.
    rgba = Image.new("RGBA", (4, 3), (10, 200, 30, 0))
    image = load_image(_encode(rgba, "PNG"))
    assert image.getpixel((0, 0)) == (10, 200, 30)


def test_palette_is_expanded() -> None:
    palette = Image.new("P", (5, 5), 1)
    palette.putpalette([0, 0, 0, 12, 34, 56] + [0] * (256 * 3 - 6))
    assert load_image(_encode(palette, "PNG")).getpixel((2, 2)) == (12, 34, 56)


def test_exif_rotation_applied() -> None:
    source = Image.new("RGB", (6, 2), (0, 0, 0))
    source.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = load_image(_encode(source, "PNG", exif=exif.tobytes()))
    assert image.size == (2, 6)
    # the top-left red pixel of the stored image ends up top-right
    red = np.argwhere(np.asarray(image)[:, :, 0] > 128)
    assert red.tolist() == [[0, 1]]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("hello, I am not a picture")
    with pytest.raises(ImageError, match="not a recognised image"):
        load_image(path)
    with pytest.raises(ImageError):
        load_image(b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(fmt: str) -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = _encode(noisy, fmt)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])


def test_pixel_limit_checked_before_decoding() -> None:
    # A 10,000 x 10,000 header over a few bytes of data: decoding would fail as truncated, so an error that
    # talks about pixels proves the size check ran first.
    bomb = _png_with_header(10_000, 10_000)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageError, match="pixels"):
        load_image(bomb, max_pixels=50_000_000)
    small = _encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageError, match="10,000 pixels"):
        load_image(small, max_pixels=9_999)
    assert load_image(small, max_pixels=10_000).size == (100, 100)


def test_huge_bomb_never_decodes() -> None:
    # Above Pillow's own hard limit: refused at open, reported as an ImageError.
    bomb = _png_with_header(60_000, 60_000)
    with pytest.raises(ImageError, match="pixels"):
        load_image(bomb)
    assert DEFAULT_MAX_PIXELS < 60_000 * 60_000


def test_multi_frame() -> None:
    frames = [Image.new("RGB", (8, 8), color) for color in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="TIFF", save_all=True, append_images=frames[1:])
    data = buffer.getvalue()
    assert image_frame_count(data) == 3
    assert [load_image(data, frame=i).getpixel((3, 3)) for i in range(3)] == [
        (255, 0, 0),
        (0, 255, 0),
        (0, 0, 255),
    ]
    with pytest.raises(ImageError, match="3 frame"):
        load_image(data, frame=3)
    with pytest.raises(ImageError):
        load_image(data, frame=-1)
    assert image_frame_count(FIXTURES / "images" / "small.png") == 1
