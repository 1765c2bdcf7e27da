"""Request limits, checked before the expensive work: images, PDF pages, image tokens, prompt and output length.

Image token counts are predicted from page sizes (header or PDF page box) and the mode, exactly as the tiler
will choose its grid, so a request that would need 100k image tokens is refused before anything is decoded.
Every refusal is an InputError naming the field at fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.errors import InputError
from common.modes import Mode
from common.tiling import candidate_grids, choose_crop_grid, image_token_count

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 1024  # all stop strings together
MAX_SEED = 2**63 - 1  # a signed 64-bit seed, what every backend's generator accepts
# Characters per token never exceed this in practice; a longer text is refused before it is tokenized.
MAX_CHARS_PER_TOKEN = 32


def image_tokens_for(mode: Mode, size: tuple[int, int]) -> int:
    """<image> tokens one page of `size` pixels takes in `mode`, as `common.tiling.tile_image` would tile it.

    EXIF rotation may swap width and height after this is read, so both orientations are considered.
    """
    counts = []
    for width, height in (size, size[::-1]):
        grid, crops = (1, 1), False
        if mode.crop_mode and not (width <= mode.image_size and height <= mode.image_size):
            grid = choose_crop_grid(width, height, mode.min_crops, mode.max_crops, mode.image_size)
            crops = grid != (1, 1)
        counts.append(image_token_count(mode, grid, crops))
    return max(counts)


def most_image_tokens(mode: Mode) -> int:
    """The largest count one image can take in `mode` (its worst tile grid)."""
    grids = candidate_grids(mode.min_crops, mode.max_crops) if mode.crop_mode else [(1, 1)]
    return max(image_token_count(mode, grid, grid != (1, 1)) for grid in grids)


def default_max_image_tokens() -> int:
    """What a Gundam page with 9 tiles needs, plus a quarter of headroom, in whole blocks of 256."""
    from common.modes import MODES

    needed = most_image_tokens(MODES["gundam"]) * 5 // 4
    return -(-needed // 256) * 256


@dataclass(frozen=True)
class RequestLimits:
    max_images: int = 16  # images per request, PDF pages included
    max_pdf_pages: int = 8  # pages of one PDF
    max_image_tokens: int = default_max_image_tokens()  # <image> tokens of all images of one request
    max_text_tokens: int = 512  # completion tokens of a text-only request (titles, tags, follow-ups)
    max_image_pixels: int = 120_000_000  # one decoded image or rendered page

    def check_pages(self, pages_per_document: list[tuple[str, int]]) -> None:
        """(kind, pages) per document: refuses too many pages before any is rendered."""
        for kind, pages in pages_per_document:
            if kind == "pdf" and pages > self.max_pdf_pages:
                raise InputError(
                    f"the PDF has {pages} pages; at most {self.max_pdf_pages} are accepted per request",
                    param="messages",
                )
        total = sum(pages for _, pages in pages_per_document)
        if total > self.max_images:
            raise InputError(
                f"the request has {total} images (PDF pages included); at most {self.max_images} are accepted",
                param="messages",
            )

    def check_image_tokens(self, mode: Mode, sizes: list[tuple[int, int]]) -> None:
        tokens = sum(image_tokens_for(mode, size) for size in sizes)
        if tokens > self.max_image_tokens:
            raise InputError(
                f"the images would take {tokens} image tokens in mode {mode.name} "
                f"(base_size {mode.base_size}, image_size {mode.image_size}, up to {mode.max_crops} tiles); "
                f"at most {self.max_image_tokens} are accepted: use a smaller mode or fewer images",
                param="mode",
            )


def check_prompt_chars(text_chars: int, context: int) -> None:
    """Refuses a prompt text that cannot fit the context whatever its tokens, before tokenizing it."""
    if text_chars > context * MAX_CHARS_PER_TOKEN:
        raise InputError(
            f"the prompt has {text_chars:,} characters, far more than the model's context of {context} tokens",
            param="messages",
        )


def fit_max_tokens(prompt_tokens: int, requested: int | None, default: int, context: int) -> int:
    """The completion budget for a prompt: `requested` must fit the context; the default shrinks to fit.

    InputError when the prompt alone fills the context, or when an explicit request does not fit.
    """
    room = context - prompt_tokens
    if room < 1:
        raise InputError(
            f"the prompt is {prompt_tokens} tokens; the model's context is {context} tokens "
            "(shorten the text, or use fewer images or a smaller mode)",
            param="messages",
        )
    if requested is not None and requested > room:
        raise InputError(
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({requested}) exceeds the model's context of "
            f"{context} tokens; ask for at most {room}",
            param="max_tokens",
        )
    return min(requested if requested is not None else default, room)


def check_stop_strings(stop: tuple[str, ...]) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise InputError(f"at most {MAX_STOP_STRINGS} stop strings are accepted, got {len(stop)}", param="stop")
    total = sum(len(s) for s in stop)
    if total > MAX_STOP_CHARS:
        raise InputError(
            f"the stop strings are {total} characters together; at most {MAX_STOP_CHARS} are accepted", param="stop"
        )


def check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed must be between 0 and {MAX_SEED}, got {seed}", param="seed")


def read_capped_text(path: Path, max_bytes: int, *, param: str, kind: str) -> str:
    """A small text file (a prompt, a JSON schema) read with a cap, as UTF-8: a device like /dev/zero never ends.
    InputError naming the file and `param`; `kind` says what the file should be ("a prompt")."""
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read it: {exc.strerror or exc}", param=param) from None
    if len(data) > max_bytes:
        raise InputError(f"{path}: larger than {max_bytes:,} bytes; {kind} is far shorter", param=param)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text: {exc}", param=param) from None
