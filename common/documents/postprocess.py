"""The official grounding post-processing: parse ``<|ref|>…<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>``,
scale boxes to pixels, turn figures into Markdown image links, crop figures, draw labelled boxes.

Reproduces what ``infer(save_results=True)`` writes (``result.mmd``, ``images/<k>.jpg``, the boxes image) and
what ``infer(eval_mode=True)`` returns. Model output is untrusted: nothing here raises on malformed markup,
it just stays text.
"""

from __future__ import annotations

import ast
import colorsys
import re
import zlib
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

EOS_TEXT = "<｜end▁of▁sentence｜>"
FIGURE_LABEL = "image"
# Coordinates are on a 0..999 grid; pixels = int(v / 999 * width|height), as the official code does.
GRID_MAX = 999

# The official pattern (non-greedy, DOTALL: a label may span lines).
GROUNDING_PATTERN = re.compile(r"(<\|ref\|>(.*?)<\|/ref\|><\|det\|>(.*?)<\|/det\|>)", re.DOTALL)
_FIGURE_MARKUP = f"<|ref|>{FIGURE_LABEL}<|/ref|>"

Box = tuple[int, int, int, int]


@dataclass
class GroundingBox:
    """One ``<|ref|>label<|/ref|><|det|>…<|/det|>`` group.

    `points` are the model's 0..999 coordinates (one entry per box of the group), `boxes` the same in
    pixels (empty when no image size was given). `text` is what the model wrote after the group, up to the
    next group (stripped). `markup` is the matched source text.
    """

    label: str
    text: str
    points: list[Box]
    boxes: list[Box]
    markup: str = ""

    @property
    def is_figure(self) -> bool:
        return self.label == FIGURE_LABEL


@dataclass
class MarkdownResult:
    markdown: str
    boxes: list[GroundingBox] = field(default_factory=list)
    figures: list[GroundingBox] = field(default_factory=list)


def clean_output(decoded: str) -> str:
    """What ``infer(eval_mode=True)`` returns: one trailing EOS text removed, then stripped."""
    if decoded.endswith(EOS_TEXT):
        decoded = decoded[: -len(EOS_TEXT)]
    return decoded.strip()


def _parse_points(det: str) -> list[tuple[float, float, float, float]]:
    """The boxes of a det payload; like the official code, stops at the first entry that is not 4 numbers."""
    try:
        value = ast.literal_eval(det.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return []
    if not isinstance(value, list | tuple):
        return []
    points: list[tuple[float, float, float, float]] = []
    for entry in value:
        if not isinstance(entry, list | tuple) or len(entry) != 4:
            break
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in entry):
            break
        if not all(abs(v) < 1e9 for v in entry):  # also rejects inf / nan
            break
        points.append((entry[0], entry[1], entry[2], entry[3]))
    return points


def _to_pixels(point: tuple[float, float, float, float], image_size: tuple[int, int]) -> Box:
    width, height = image_size
    x1, y1, x2, y2 = point
    return (
        int(x1 / GRID_MAX * width),
        int(y1 / GRID_MAX * height),
        int(x2 / GRID_MAX * width),
        int(y2 / GRID_MAX * height),
    )


def _as_grid_ints(point: tuple[float, float, float, float]) -> Box:
    return (int(point[0]), int(point[1]), int(point[2]), int(point[3]))


def parse_grounding(text: str, image_size: tuple[int, int] | None = None) -> list[GroundingBox]:
    """Every grounding group of `text` in order, one `GroundingBox` per group (also for unparsable ones,
    whose `points` are empty). Pixel `boxes` are filled in when `image_size` (width, height) is given."""
    groups: list[GroundingBox] = []
    found = list(GROUNDING_PATTERN.finditer(text))
    for index, match in enumerate(found):
        following_end = found[index + 1].start() if index + 1 < len(found) else len(text)
        points = _parse_points(match.group(3))
        groups.append(
            GroundingBox(
                label=match.group(2),
                text=text[match.end() : following_end].strip(),
                points=[_as_grid_ints(p) for p in points],
                boxes=[_to_pixels(p, image_size) for p in points] if image_size else [],
                markup=match.group(1),
            )
        )
    return groups


def _link_target(image_dir: str, index: int) -> str:
    target = f"{image_dir.rstrip('/')}/{index}.jpg" if image_dir else f"{index}.jpg"
    # CommonMark needs <...> around a destination with spaces or parentheses.
    return f"<{target}>" if any(c in target for c in " ()") else target


def to_markdown(text: str, image_size: tuple[int, int], image_dir: str = "images") -> MarkdownResult:
    """``result.mmd`` of ``infer(save_results=True)``: figure groups become ``![](image_dir/k.jpg)\\n``,
    the other groups are removed (and, only then, ``\\coloneqq`` -> ``:=``, ``\\eqqcolon`` -> ``=:``).

    `text` may be the raw decode (with the EOS text) or `clean_output` of it. `boxes` are the groups that
    have at least one box, `figures` the image-labelled ones among them; `crop_figures` gives their crops
    in the official numbering (one crop per box, k counting from 0).
    """
    output = clean_output(text)
    groups = parse_grounding(output, image_size)
    markups = [group.markup for group in groups]
    figure_markups = [m for m in markups if _FIGURE_MARKUP in m]
    other_markups = [m for m in markups if _FIGURE_MARKUP not in m]
    # Same replace-all order as the official code, so repeated identical groups behave the same.
    for index, markup in enumerate(figure_markups):
        output = output.replace(markup, f"![]({_link_target(image_dir, index)})\n")
    for markup in other_markups:
        output = output.replace(markup, "").replace("\\coloneqq", ":=").replace("\\eqqcolon", "=:")
    boxes = [group for group in groups if group.boxes]
    return MarkdownResult(markdown=output, boxes=boxes, figures=[g for g in boxes if g.is_figure])


def _ordered_clamped(box: Box, size: tuple[int, int], margin: int) -> Box:
    width, height = size
    x1, x2 = sorted((box[0], box[2]))
    y1, y2 = sorted((box[1], box[3]))
    x1, x2 = (min(max(v, -margin), width + margin) for v in (x1, x2))
    y1, y2 = (min(max(v, -margin), height + margin) for v in (y1, y2))
    return x1, y1, x2, y2


def crop_figures(image: Image.Image, figures: list[GroundingBox]) -> list[Image.Image]:
    """One RGB crop per figure box, in order (crop k is the official ``images/k.jpg``).

    Boxes are clipped to the image (the official code would pad with black beyond the border) and kept
    at least 1x1 pixel, so a crop always exists and can be saved.
    """
    width, height = image.size
    crops: list[Image.Image] = []
    for figure in figures:
        for box in figure.boxes:
            x1, y1, x2, y2 = _ordered_clamped(box, image.size, 0)
            x1, y1 = min(x1, width - 1), min(y1, height - 1)
            x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
            crop = image.crop((x1, y1, x2, y2))
            crops.append(crop if crop.mode == "RGB" else crop.convert("RGB"))
    return crops


def _label_colour(label: str) -> tuple[int, int, int]:
    # Stable per label (the official code picks random colours); dark enough to read on white.
    hue = (zlib.crc32(label.encode("utf-8")) % 360) / 360.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.75)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_boxes(image: Image.Image, boxes: list[GroundingBox]) -> Image.Image:
    """A copy of `image` with every box outlined (4 px for titles, 2 px otherwise, as the official code),
    a faint fill, and its label above the top-left corner."""
    canvas = image.convert("RGB") if image.mode != "RGB" else image.copy()
    draw = ImageDraw.Draw(canvas)
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    overlay_draw = ImageDraw.Draw(overlay)
    font = ImageFont.load_default()
    for group in boxes:
        colour = _label_colour(group.label)
        for box in group.boxes:
            x1, y1, x2, y2 = _ordered_clamped(box, canvas.size, 8)
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=4 if group.label == "title" else 2)
            overlay_draw.rectangle((x1, y1, x2, y2), fill=(*colour, 20))
            try:
                text_x, text_y = x1, max(0, y1 - 15)
                left, top, right, bottom = draw.textbbox((0, 0), group.label, font=font)
                draw.rectangle(
                    (text_x, text_y, text_x + right - left, text_y + bottom - top), fill=(255, 255, 255)
                )
                draw.text((text_x, text_y), group.label, font=font, fill=colour)
            except (UnicodeError, ValueError, OSError):
                pass  # a label the font cannot render: the box alone is still useful
    canvas.paste(overlay, (0, 0), overlay)
    return canvas


_REF_OPEN = "<|ref|>"
_DET_CLOSE = "<|/det|>"


def strip_grounding(text: str) -> str:
    """Removes every `<|ref|>…<|/ref|><|det|>…<|/det|>` group, keeping the text around it (for chat clients)."""
    return GROUNDING_PATTERN.sub("", text)


class GroundingStripper:
    """Streaming `strip_grounding`: feed text deltas, get back deltas with the grounding groups removed.

    Text that might start a group is held back until the group closes; an opening tag with no close within
    `max_group` characters is malformed output and is passed through as text rather than held forever.
    """

    def __init__(self, max_group: int = 512) -> None:
        self.max_group = max_group
        self._pending = ""

    def feed(self, delta: str) -> str:
        buf = self._pending + delta
        out: list[str] = []
        while True:
            start = buf.find(_REF_OPEN)
            if start < 0:
                keep = next((k for k in range(min(len(_REF_OPEN) - 1, len(buf)), 0, -1)
                             if buf.endswith(_REF_OPEN[:k])), 0)
                out.append(buf[: len(buf) - keep])
                buf = buf[len(buf) - keep:]
                break
            out.append(buf[:start])
            rest = buf[start:]
            end = rest.find(_DET_CLOSE)
            if end < 0:
                if len(rest) > self.max_group:  # malformed: give the tag back as text and move on
                    out.append(_REF_OPEN)
                    buf = rest[len(_REF_OPEN):]
                    continue
                buf = rest
                break
            group = rest[: end + len(_DET_CLOSE)]
            out.append(strip_grounding(group))  # a stray open tag inside stays as text
            buf = rest[end + len(_DET_CLOSE):]
        self._pending = buf
        return "".join(out)

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return rest
