"""Chat folding: an OpenAI-style conversation -> the single-turn prompt DeepSeek-OCR answers, and its media.

The model is single-turn and expects the images first, then the instruction: `<image>\\n<instruction>`.
Folding keeps the last user turn; a follow-up question without an image reuses the images of the latest
earlier user turn that had some. Text that carries no instruction is dropped: Open WebUI's file manifest
(`<attached_files>…</attached_files>`), and system and earlier turns. Images without an instruction get the
document-to-Markdown task. A conversation that ends with an assistant message is continued: that text
becomes the start of the answer, and only what follows it is generated.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.errors import InputError
from common.model.prompt import IMAGE_TOKEN, TASKS
from common.serve.schema import ContentPart

# When a request has images but no instruction, OCR the page to Markdown (the authors' document prompt).
DEFAULT_IMAGE_INSTRUCTION = TASKS["markdown"].replace(f"{IMAGE_TOKEN}\n", "")
# File manifests chat clients put in front of the user's text (Open WebUI: <attached_files><file …/>…).
_FILE_MANIFEST = re.compile(r"<attached_files>.*?</attached_files>|<attached_files\s*/>", re.DOTALL)


@dataclass(frozen=True)
class MediaRef:
    """An image or document named by a request (a data: or http(s) URL), resolved only if its turn is kept."""

    url: str
    kind: str = "image"  # "image" (image_url parts) or "file" (file parts: a PDF or an image)


@dataclass
class Turn:
    role: str
    texts: list[str] = field(default_factory=list)
    media: list[MediaRef] = field(default_factory=list)


@dataclass(frozen=True)
class FoldedChat:
    prompt: str  # "<image>\n" per image, the instruction, then the continued assistant text if any
    media: list[MediaRef]
    continuation: str = ""  # the final assistant message being continued ("" when there is none)

    @property
    def text_only(self) -> bool:
        return not self.media


def instruction_text(text: str) -> str:
    """User text without file manifests and without a literal `<image>` (which would be taken for a slot)."""
    return _FILE_MANIFEST.sub("", text).replace(IMAGE_TOKEN, "")


def turn_of(role: str, content: str | Sequence[ContentPart] | None, where: str = "messages") -> Turn:
    """One message of either API as a Turn; parts the model cannot read (audio, refusal, ...) are skipped."""
    turn = Turn(role.strip().lower())
    if content is None:
        return turn
    if isinstance(content, str):
        turn.texts.append(content)
        return turn
    for index, part in enumerate(content):
        kind = part.type
        if kind in ("text", "input_text", "output_text") and part.text is not None:
            turn.texts.append(part.text)
        elif kind in ("image_url", "input_image"):
            image_url = part.image_url
            url = image_url if isinstance(image_url, str) else image_url.url if image_url is not None else None
            if not url:
                raise InputError(f"a {kind} part needs an image_url", param=f"{where}.content.{index}.image_url")
            turn.media.append(MediaRef(url))
        elif kind in ("file", "input_file"):
            url = (part.file.file_data or part.file.url) if part.file is not None else None
            url = url or part.file_data
            if not url:
                raise InputError("a file part needs file_data (a data: URL)", param=f"{where}.content.{index}.file")
            turn.media.append(MediaRef(url, kind="file"))
    return turn


def fold_chat(turns: Sequence[Turn]) -> FoldedChat:
    """The prompt and media the model gets for a conversation (see the module docstring)."""
    continuation = ""
    if turns and turns[-1].role == "assistant" and "".join(turns[-1].texts).strip():
        continuation = "".join(turns[-1].texts)
        turns = turns[:-1]
    user_turns = [t for t in turns if t.role == "user"]
    if not user_turns:
        raise InputError("the conversation has no user message", param="messages")
    last = user_turns[-1]
    media = list(last.media)
    if not media:
        media = next((list(t.media) for t in reversed(user_turns[:-1]) if t.media), [])
    pieces = (instruction_text(text).strip() for text in last.texts)
    instruction = "\n".join(piece for piece in pieces if piece)
    if media and not instruction:
        instruction = DEFAULT_IMAGE_INSTRUCTION
    if not media and not instruction:
        raise InputError("the last user message has no text and no image (parts the model cannot read, such as "
                         "audio, are left out): send an instruction, an image or a document", param="messages")
    prompt = f"{IMAGE_TOKEN}\n" * len(media) + instruction + continuation
    return FoldedChat(prompt, media, continuation)


def widen_placeholders(prompt: str, pages_per_media: Sequence[int]) -> str:
    """A document stands for several images: its one `<image>\\n` becomes one per page."""
    head, *rest = prompt.split(IMAGE_TOKEN)
    if len(rest) != len(pages_per_media):
        raise ValueError("one page count per <image> placeholder is needed")
    return head + "".join(f"{IMAGE_TOKEN}\n" * (pages - 1) + IMAGE_TOKEN + piece
                          for pages, piece in zip(pages_per_media, rest, strict=True))
