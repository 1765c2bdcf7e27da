"""Chat folding: images first, then the instruction; file manifests dropped; follow-ups; continuation."""

from __future__ import annotations

from typing import Any

import pytest

from common.errors import InputError
from common.serve.chat import (
    DEFAULT_IMAGE_INSTRUCTION,
    MediaRef,
    Turn,
    fold_chat,
    instruction_text,
    turn_of,
    widen_placeholders,
)

A, B, C = MediaRef("data:a"), MediaRef("data:b"), MediaRef("data:c")
MANIFEST = ('<attached_files>\n<file type="file" id="4f0c" content_type="image/png" name="scan.png"/>\n'
            "</attached_files>\n\n")


def test_last_user_turn_images_first() -> None:
    folded = fold_chat([
        Turn("system", ["You are helpful."]),
        Turn("user", ["old question"], [A]),
        Turn("assistant", ["old answer"]),
        Turn("user", ["Free OCR.", "Thanks"], [B, C]),
    ])
    assert folded.media == [B, C]
    assert folded.prompt == "<image>\n<image>\nFree OCR.\nThanks"
    assert folded.continuation == "" and not folded.text_only


def test_file_manifest_is_not_an_instruction() -> None:
    assert instruction_text(MANIFEST + "Free OCR.").strip() == "Free OCR."
    only_image = fold_chat([Turn("user", [MANIFEST], [A])])
    assert only_image.prompt == "<image>\n" + DEFAULT_IMAGE_INSTRUCTION
    with_text = fold_chat([Turn("user", [MANIFEST + "Free OCR."], [A])])
    plain = fold_chat([Turn("user", ["Free OCR."], [A])])
    assert with_text.prompt == plain.prompt == "<image>\nFree OCR."


def test_follow_up_reuses_earlier_images() -> None:
    folded = fold_chat([
        Turn("user", [], [A]),
        Turn("user", ["Convert to markdown."], [B, C]),
        Turn("assistant", ["# Title"]),
        Turn("user", ["What is the title?"]),
    ])
    assert folded.media == [B, C]
    assert folded.prompt == "<image>\n<image>\nWhat is the title?"


def test_final_assistant_message_is_continued() -> None:
    folded = fold_chat([Turn("user", ["Free OCR."], [A]), Turn("assistant", ["# Quarterly rep"])])
    assert folded.prompt == "<image>\nFree OCR.# Quarterly rep"
    assert folded.continuation == "# Quarterly rep"
    empty = fold_chat([Turn("user", ["hi"]), Turn("assistant", [""])])
    assert empty.prompt == "hi" and empty.continuation == ""


def test_text_only_and_errors() -> None:
    folded = fold_chat([Turn("user", ["a", "b <image> c"])])
    assert (folded.prompt, folded.media, folded.text_only) == ("a\nb  c", [], True)
    with pytest.raises(InputError) as info:
        fold_chat([Turn("system", ["x"])])
    assert info.value.param == "messages"


def test_widen_placeholders_for_documents() -> None:
    assert widen_placeholders("<image>\n<image>\nFree OCR.", [3, 1]) == "<image>\n<image>\n<image>\n<image>\nFree OCR."
    with pytest.raises(ValueError):
        widen_placeholders("<image>\nx", [1, 2])


@pytest.mark.parametrize("content", ["", None, [], "   ", [{"type": "input_audio", "input_audio": {"data": "AAAA"}}],
                                     [{"type": "text", "text": "<attached_files></attached_files>"}]])
def test_a_user_turn_with_nothing_the_model_can_read_is_refused(content: Any) -> None:
    import msgspec

    from common.serve.schema import ContentPart

    parts = content if not isinstance(content, list) else msgspec.convert(content, list[ContentPart])
    with pytest.raises(InputError, match="no text and no image") as err:
        fold_chat([turn_of("user", parts)])
    assert err.value.param == "messages"
