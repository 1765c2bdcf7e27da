"""Grounding post-processing against the 9 cases of postprocess_goldens.json, plus malformed output."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import numpy as np
import pytest
from PIL import Image

from common.documents.postprocess import (
    EOS_TEXT,
    GroundingBox,
    MarkdownResult,
    clean_output,
    crop_figures,
    draw_boxes,
    parse_grounding,
    to_markdown,
)
from tests.conftest import FIXTURES


@cache
def goldens() -> dict[str, Any]:
    return json.loads((FIXTURES / "postprocess_goldens.json").read_text())


def golden_cases() -> list[dict[str, Any]]:
    return list(goldens()["cases"])


@cache
def golden_image() -> Image.Image:
    image = Image.open(FIXTURES / goldens()["image"])
    image.load()
    return image.convert("RGB")


IMAGE_SIZE: tuple[int, int] = tuple(goldens()["image_size"])  # type: ignore[assignment]
CASE_IDS = [case["id"] for case in golden_cases()]


def test_goldens_cover_nine_cases_and_image_size() -> None:
    assert len(CASE_IDS) == 9
    assert golden_image().size == IMAGE_SIZE == (850, 1100)


@pytest.mark.parametrize("case", golden_cases(), ids=CASE_IDS)
def test_clean_output_is_eval_mode_return(case: dict[str, Any]) -> None:
    assert case["decoded"].endswith(EOS_TEXT)
    assert clean_output(case["decoded"]) == case["eval_mode_return"]
    assert clean_output(case["eval_mode_return"]) == case["eval_mode_return"]


@pytest.mark.parametrize("case", golden_cases(), ids=CASE_IDS)
def test_markdown_matches_result_mmd(case: dict[str, Any]) -> None:
    from_decoded = to_markdown(case["decoded"], IMAGE_SIZE)
    assert isinstance(from_decoded, MarkdownResult)
    assert from_decoded.markdown == case["result_mmd"]
    # the cleaned text gives the same result
    assert to_markdown(case["eval_mode_return"], IMAGE_SIZE).markdown == case["result_mmd"]


@pytest.mark.parametrize("case", golden_cases(), ids=CASE_IDS)
def test_parse_grounding_matches_regex_and_boxes(case: dict[str, Any]) -> None:
    groups = parse_grounding(clean_output(case["decoded"]), IMAGE_SIZE)
    assert [[g.markup, g.label] for g in groups] == [m[:2] for m in case["matches"]]
    assert len(groups) == len(case["boxes"])
    for group, expected in zip(groups, case["boxes"], strict=True):
        assert group.label == expected["label"]
        drawable = "points_px" in expected
        if drawable:
            assert [list(p) for p in group.points] == expected["points_0_999"]
            assert [list(b) for b in group.boxes] == expected["points_px"]
        else:
            # unparsable list or a wrong number of values: the official code draws nothing for it
            assert group.points == [] and group.boxes == []
    # every drawn rectangle of the official code, in order
    drawn = [list(b) for g in groups for b in g.boxes]
    assert drawn == case["drawn_boxes_px"]
    # without an image size only the 0..999 points are known
    assert all(g.boxes == [] for g in parse_grounding(case["decoded"]))


@pytest.mark.parametrize("case", golden_cases(), ids=CASE_IDS)
def test_markdown_result_boxes_and_figures(case: dict[str, Any]) -> None:
    result = to_markdown(case["decoded"], IMAGE_SIZE)
    assert [list(b) for g in result.boxes for b in g.boxes] == case["drawn_boxes_px"]
    assert all(g.label == "image" for g in result.figures)
    figure_markups = [g.markup for g in result.figures]
    assert figure_markups == case["matches_image"]


@pytest.mark.parametrize("case", golden_cases(), ids=CASE_IDS)
def test_crop_figures_sizes(case: dict[str, Any]) -> None:
    result = to_markdown(case["decoded"], IMAGE_SIZE)
    crops = crop_figures(golden_image(), result.figures)
    saved = case["saved_image_crops"]
    assert [f"{k}.jpg" for k in range(len(crops))] == list(saved)
    figure_boxes = [box for figure in result.figures for box in figure.boxes]
    for k, crop in enumerate(crops):
        assert list(crop.size) == saved[f"{k}.jpg"]
        assert crop.mode == "RGB"
        # the crop holds exactly the image's pixels of that region
        x1, y1, x2, y2 = figure_boxes[k]
        region = np.asarray(golden_image())[y1:y2, x1:x2]
        assert np.array_equal(np.asarray(crop), region)


def test_text_after_each_group() -> None:
    case = next(c for c in golden_cases() if c["id"] == "title_and_text")
    groups = parse_grounding(case["eval_mode_return"])
    assert [(g.label, g.text) for g in groups] == [
        ("title", "# Quarterly Report 2024"),
        ("text", "The total amount is 1,234."),
    ]


def test_image_dir_names_the_links() -> None:
    case = next(c for c in golden_cases() if c["id"] == "two_images_multi_box")
    md = to_markdown(case["decoded"], IMAGE_SIZE, image_dir="page_images").markdown
    assert md == case["result_mmd"].replace("images/", "page_images/")
    md_space = to_markdown(case["decoded"], IMAGE_SIZE, image_dir="my scan_images").markdown
    assert md_space.startswith("![](<my scan_images/0.jpg>)\n")


# ---------------------------------------------------------------------------------------- malformed output

MALFORMED = [
    "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]",  # unclosed det (cut off at max tokens)
    "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]<|/det|>tail",  # unbalanced brackets
    "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4], [5, 6]]<|/det|>tail",  # second box short
    "<|ref|>text<|/ref|><|det|>[1, 2, 3, 4]<|/det|>flat",  # not nested
    '<|ref|>image<|/ref|><|det|>[["a", 2, 3, 4]]<|/det|>strings',
    "<|ref|>image<|/ref|><|det|>[[0, 0, 5000, 99999]]<|/det|>huge",  # coordinates > 999
    "<|ref|>image<|/ref|><|det|>[[900, 900, 100, 100]]<|/det|>reversed",
    "<|ref|>image<|/ref|><|det|>[[500, 500, 500, 500]]<|/det|>empty",
    "<|ref|>image<|/ref|><|det|>[[-50, -50, 10, 10]]<|/det|>negative",
    "<|ref|>text<|/ref|><|det|>[[1e400, 2, 3, 4]]<|/det|>inf",
    "<|ref|>title<|/ref|><|det|>" + "[" * 5000 + "<|/det|>deep",
    "<|ref|>text<|/ref|><|det|>__import__('os')<|/det|>code",
    "<|ref|><|/ref|><|det|><|/det|>",
    "<|ref|>unclosed ref <|det|>[[1, 2, 3, 4]]<|/det|> text",
    "<|det|>[[1, 2, 3, 4]]<|/det|> det only",
    "",
    EOS_TEXT,
]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_never_raises(text: str) -> None:
    result = to_markdown(text, IMAGE_SIZE)
    assert isinstance(result.markdown, str)
    for group in result.boxes:
        assert len(group.points) == len(group.boxes) >= 1
    crops = crop_figures(golden_image(), result.figures)
    assert len(crops) == sum(len(f.boxes) for f in result.figures)
    assert all(c.width >= 1 and c.height >= 1 for c in crops)
    drawn = draw_boxes(golden_image(), result.boxes)
    assert drawn.size == IMAGE_SIZE


def test_malformed_details() -> None:
    # unclosed tags stay as text
    assert to_markdown(MALFORMED[0], IMAGE_SIZE).markdown == MALFORMED[0]
    assert parse_grounding(MALFORMED[0]) == []
    # the official loop stops at the first bad box but keeps the ones before it
    (group,) = parse_grounding(MALFORMED[2], IMAGE_SIZE)
    assert group.points == [(1, 2, 3, 4)] and group.boxes == [(0, 2, 2, 4)]
    assert to_markdown(MALFORMED[2], IMAGE_SIZE).markdown == "tail"
    # a flat list is not a list of boxes (the official unpacking fails on it)
    assert parse_grounding(MALFORMED[3], IMAGE_SIZE)[0].points == []
    # no code is evaluated
    assert parse_grounding(MALFORMED[11], IMAGE_SIZE)[0].points == []
    # coordinates beyond 999 are scaled like the official code; the crop is clipped to the image
    (huge,) = parse_grounding(MALFORMED[5], IMAGE_SIZE)
    assert huge.boxes == [(0, 0, int(5000 / 999 * 850), int(99999 / 999 * 1100))]
    assert crop_figures(golden_image(), [huge])[0].size == IMAGE_SIZE
    # reversed corners are put in order for the crop
    (rev,) = parse_grounding(MALFORMED[6], IMAGE_SIZE)
    x1, y1, x2, y2 = rev.boxes[0]
    assert crop_figures(golden_image(), [rev])[0].size == (x1 - x2, y1 - y2)
    # an image group whose det does not parse still becomes a link (official), but has no crop
    result = to_markdown(MALFORMED[4], IMAGE_SIZE)
    assert result.markdown == "![](images/0.jpg)\nstrings"
    assert result.figures == []


def test_coloneqq_only_rewritten_with_non_image_refs() -> None:
    # figure refs alone do not trigger the LaTeX rewrite (the official rewrite runs per non-image ref)
    text = "<|ref|>image<|/ref|><|det|>[[0, 0, 10, 10]]<|/det|>\nx \\coloneqq y"
    assert to_markdown(text, IMAGE_SIZE).markdown == "![](images/0.jpg)\n\nx \\coloneqq y"
    text2 = text + "\n<|ref|>text<|/ref|><|det|>[[0, 0, 10, 10]]<|/det|>z \\eqqcolon w"
    assert to_markdown(text2, IMAGE_SIZE).markdown == "![](images/0.jpg)\n\nx := y\nz =: w"


def test_repeated_identical_figure_groups() -> None:
    # str.replace replaces every occurrence at once, so both links say 0 while two crops are made
    markup = "<|ref|>image<|/ref|><|det|>[[0, 0, 100, 100]]<|/det|>"
    result = to_markdown(markup + "a" + markup + "b", IMAGE_SIZE)
    assert result.markdown == "![](images/0.jpg)\na![](images/0.jpg)\nb"
    assert len(crop_figures(golden_image(), result.figures)) == 2


# ---------------------------------------------------------------------------------------------- drawing


def test_draw_boxes_on_box_edges() -> None:
    blank = Image.new("RGB", (400, 300), (255, 255, 255))
    boxes = [
        GroundingBox("title", "", [(0, 0, 0, 0)], [(40, 50, 200, 120)]),
        GroundingBox("text", "", [(0, 0, 0, 0)], [(60, 150, 380, 280)]),
    ]
    drawn = np.asarray(draw_boxes(blank, boxes)).astype(int)
    before = np.asarray(blank).astype(int)
    assert drawn.shape == before.shape
    assert np.array_equal(np.asarray(blank), before)  # the input is not modified

    def changed(x: int, y: int) -> bool:
        return bool(np.any(drawn[y, x] != before[y, x]))

    for x1, y1, x2, y2 in (b for g in boxes for b in g.boxes):
        # every pixel of the four edges (the label sits above the top edge)
        assert all(changed(x, y1) and changed(x, y2) for x in range(x1, x2 + 1))
        assert all(changed(x1, y) and changed(x2, y) for y in range(y1, y2 + 1))
        # just outside the right and bottom edges nothing is drawn
        assert not changed(x2 + 3, (y1 + y2) // 2)
        assert not changed((x1 + x2) // 2, y2 + 3)
        # the label is written above the box
        assert np.any(drawn[max(0, y1 - 15) : y1 - 2, x1 : x1 + 20] != 255)
    # far from every box the image is untouched
    assert not changed(10, 10) and not changed(390, 10)


def test_draw_boxes_golden_rectangles() -> None:
    case = next(c for c in golden_cases() if c["id"] == "two_images_multi_box")
    result = to_markdown(case["decoded"], IMAGE_SIZE)
    blank = Image.new("RGB", IMAGE_SIZE, (255, 255, 255))
    drawn = np.asarray(draw_boxes(blank, result.boxes))
    for x1, y1, x2, y2 in case["drawn_boxes_px"]:
        x2, y2 = min(x2, IMAGE_SIZE[0] - 1), min(y2, IMAGE_SIZE[1] - 1)
        assert np.any(drawn[y2, x1 : x2 + 1] != 255, axis=-1).all()
        assert np.any(drawn[y1 : y2 + 1, x2] != 255, axis=-1).all()


def test_draw_boxes_accepts_other_modes_and_labels() -> None:
    rgba = Image.new("RGBA", (120, 80), (0, 0, 0, 0))
    boxes = [GroundingBox("标题 ✓\nline", "", [(0, 0, 999, 999)], [(5, 20, 100, 70)])]
    out = draw_boxes(rgba, boxes)
    assert out.mode == "RGB" and out.size == (120, 80)


def test_grounding_stripper_streams_like_one_shot() -> None:
    from common.documents.postprocess import GroundingStripper, strip_grounding

    for case in golden_cases():
        text = case["model_text"]
        expected = strip_grounding(text)
        assert "<|ref|>" not in expected and "<|det|>" not in expected
        for step in (1, 2, 3, 7, 50):
            stripper = GroundingStripper()
            streamed = "".join(stripper.feed(text[i:i + step]) for i in range(0, len(text), step)) + stripper.flush()
            assert streamed == expected, (case["id"], step)


def test_grounding_stripper_passes_malformed_output() -> None:
    from common.documents.postprocess import GroundingStripper

    text = "a <|ref|>never closed " + "x" * 600 + " end <|re"
    stripper = GroundingStripper(max_group=100)
    out = "".join(stripper.feed(ch) for ch in text) + stripper.flush()
    assert out == text
