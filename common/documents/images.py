"""Image loading exactly as the official `infer()` does it, with clear errors for bad input.

Official: `Image.open(path)` -> `ImageOps.exif_transpose(image)` -> `.convert('RGB')`. Alpha is dropped
(not composited on white) and palettes are expanded; we do the same so the views stay byte-identical. On top
of that we refuse images whose header announces more than `max_pixels` pixels before any pixel data is
decoded, and force a full decode so truncated or corrupt files fail here, not halfway through preprocessing.

Pillow's decoders raise whatever a malformed file provokes (OSError and ValueError, but also TypeError for a TIFF
directory without dimensions, IndexError, KeyError, struct.error, ZeroDivisionError ...): every exception from
opening, seeking or decoding is the file's ImageError, never a crash of the batch or a server error.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import ImageError

# A 10,000 x 12,000 scan is the largest page we expect; anything above is more likely a decompression bomb.
DEFAULT_MAX_PIXELS: int = 120_000_000

ImageSource = str | Path | bytes | bytearray | memoryview | Image.Image

# `max_pixels` below is the policy, checked from the header before decoding; Pillow's own size warning
# (at 89 Mpx, meant for callers without a check) would only tell a user about an image we accept.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _describe(source: ImageSource) -> str:
    if isinstance(source, str | Path):
        return str(source)
    if isinstance(source, Image.Image):
        return "<PIL image>"
    return f"<{len(source)} bytes>"


def _open(source: ImageSource) -> Image.Image:
    """Opens lazily (header only); raises ImageError for anything that is not a readable image."""
    name = _describe(source)
    try:
        if isinstance(source, str | Path):
            path = Path(source)
            if not path.exists():
                raise ImageError(f"image not found: {name}")
            if path.is_dir():
                raise ImageError(f"expected an image file but got a directory: {name}")
            return Image.open(path)
        if isinstance(source, bytes | bytearray | memoryview):
            if len(source) == 0:
                raise ImageError("image data is empty")
            return Image.open(io.BytesIO(bytes(source)))
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image {name} has too many pixels to load safely ({exc})") from None
    except Image.DecompressionBombWarning as exc:  # only raised when warnings are turned into errors
        raise ImageError(f"image {name} has too many pixels to load safely ({exc})") from None
    except UnidentifiedImageError:
        raise ImageError(f"not a recognised image format: {name}") from None
    except PermissionError:
        raise ImageError(f"permission denied reading image: {name}") from None
    except Exception as exc:  # whatever a malformed header provokes in Pillow
        raise ImageError(f"cannot read image {name}: {_reason(exc)}") from None
    raise ImageError(f"unsupported image source type {type(source).__name__}; pass a path or bytes")


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text if isinstance(exc, OSError | SyntaxError | ValueError | EOFError) and text else (
        f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def _check_pixels(image: Image.Image, name: str, max_pixels: int) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image {name} has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            f"image {name} is {width}x{height} = {width * height:,} pixels, above the limit of"
            f" {max_pixels:,}; downscale it first or raise the pixel limit"
        )


def image_frame_count(source: ImageSource, limit: int | None = None) -> int:
    """Number of frames (pages of a TIFF, frames of a GIF/APNG/WebP); 1 for ordinary images. With `limit`, the
    count stops at `limit` + 1 ("more than the limit"): Pillow's `n_frames` walks every frame of a TIFF, in time
    quadratic in their number (40,000 pages: half a minute)."""
    image = source if isinstance(source, Image.Image) else _open(source)
    try:
        if limit is None:
            return int(getattr(image, "n_frames", 1))
        count = 1
        while count <= limit:
            try:
                image.seek(count)
            except EOFError:
                break
            count += 1
        if isinstance(source, Image.Image):
            source.seek(0)
        return count
    except ImageError:
        raise
    except Exception as exc:  # a malformed frame directory: the file's error
        raise ImageError(f"cannot read the frames of image {_describe(source)}: {_reason(exc)}") from None
    finally:
        if not isinstance(source, Image.Image):
            image.close()


def image_frame_sizes(source: ImageSource, frames: list[int]) -> list[tuple[int, int]]:
    """(width, height) of the given 0-based frames, from the headers (no pixel data is decoded)."""
    image = source if isinstance(source, Image.Image) else _open(source)
    try:
        sizes = []
        for frame in frames:
            if frame:
                image.seek(frame)
            sizes.append(tuple(image.size))
        return sizes  # type: ignore[return-value]
    except Exception as exc:  # a malformed frame directory: the file's error
        raise ImageError(f"cannot read the frames of image {_describe(source)}: {_reason(exc)}") from None
    finally:
        if not isinstance(source, Image.Image):
            image.close()


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, frame: int = 0) -> Image.Image:
    """Decodes one frame of an image to RGB the way the official code does (EXIF transpose, then convert)."""
    name = _describe(source)
    if isinstance(source, Image.Image):
        image = source
        owned = False
    else:
        image = _open(source)
        owned = True
    try:
        # The header already gives the size: refuse bombs before a single pixel is decoded.
        _check_pixels(image, name, max_pixels)
        if frame < 0:
            raise ImageError(f"frame index must be >= 0, got {frame}")
        if frame:
            try:  # not n_frames first: it would walk every frame of a long TIFF for each page
                image.seek(frame)
            except EOFError:  # the seek walked to the last frame there is
                frames = image.tell() + 1
                raise ImageError(f"image {name} has {frames} frame(s); frame {frame} does not exist") from None
            _check_pixels(image, name, max_pixels)  # frames of a TIFF may have their own size
        image.load()  # full decode: truncated / corrupt data fails here
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image {name} has too many pixels to load safely ({exc})") from None
    except Exception as exc:  # whatever a malformed file provokes in a decoder
        raise ImageError(f"image {name} is truncated or corrupt: {_reason(exc)}") from None
    finally:
        if owned:
            image.close()
    return rgb
