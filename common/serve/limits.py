"""Request limits, checked before the expensive work: images, PDF pages, image tokens, prompt and output length.

Image token counts are predicted from page sizes (header or PDF page box) and the mode, exactly as the tiler
will choose its grid, so a request that would need 100k image tokens is refused before anything is decoded.
Every refusal is an InputError naming the field at fault.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import InputError
from common.model.modes import Mode
from common.model.tiling import default_max_image_tokens, image_tokens_for

# Characters per token never exceed this in practice; a longer text is refused before it is tokenized.
MAX_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class RequestLimits:
    max_images: int = 16  # images per request, PDF pages included
    max_pdf_pages: int = 8  # pages of one PDF
    max_image_tokens: int = default_max_image_tokens()  # <image> tokens of all images of one request
    max_text_tokens: int = 512  # completion tokens of a text-only request (titles, tags, follow-ups)
    max_image_pixels: int = 120_000_000  # one decoded image or rendered page

    def check_pages(self, pages_per_document: list[tuple[str, int]], at_least: bool = False) -> None:
        """(kind, pages) per document: refuses too many pages before any is rendered. `at_least`: some counts
        stopped at the image limit + 1 (a TIFF's pages are not all counted), so the total is a lower bound."""
        for kind, pages in pages_per_document:
            if kind == "pdf" and pages > self.max_pdf_pages:
                raise InputError(
                    f"the PDF has {pages} pages; at most {self.max_pdf_pages} are accepted per request",
                    param="messages",
                )
        total = sum(pages for _, pages in pages_per_document)
        if total > self.max_images:
            raise InputError(
                f"the request has {'at least ' if at_least else ''}{total} images (PDF pages included); at most "
                f"{self.max_images} are accepted",
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


