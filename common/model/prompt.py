"""Prompts: task presets and the official `plain` template with `<image>` expansion (chat folding: common.serve.chat).

infer() formats the conversation with the `plain` template, which reduces to `prompt.strip()`, splits it on
`<image>`, encodes every text piece without special tokens, replaces each `<image>` by its run of image tokens
and prepends BOS (no EOS).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from common.errors import InputError
from common.model.families import DEEPSEEK_OCR, TASK_PROMPTS, ModelFamily, family_named, view_token_side
from common.model.inputs import ImageInput, PreparedInputs
from common.model.modes import Mode
from common.model.tiling import image_token_count, tile_image, to_image_input
from common.model.tokenizer import Tokenizer

IMAGE_TOKEN = "<image>"
_REF_PLACEHOLDER = "<|ref|>TEXT<|/ref|>"
_FIELDS_PLACEHOLDER = "FIELDS"

# The authors' prompts and dsocr's `extract` (the same for both families; each family carries its own in
# common.model.families).
TASKS = TASK_PROMPTS
_ANY_FIELDS = "the content"  # a schema without named properties (or any JSON object)


def extract_fields(schema: Mapping[str, Any] | None) -> list[str]:
    """What `--task extract` asks for: the schema's top-level properties, each with its own properties (of an
    object, or of an array's items) in parentheses, e.g. ["vendor", "lines (description, amount)"]."""
    properties = (schema or {}).get("properties")
    if not isinstance(properties, Mapping):
        return []
    fields = []
    for name, sub in properties.items():
        if isinstance(sub, Mapping) and isinstance(sub.get("items"), Mapping):
            sub = sub["items"]
        inner = sub.get("properties") if isinstance(sub, Mapping) else None
        fields.append(f"{name} ({', '.join(map(str, inner))})" if isinstance(inner, Mapping) and inner else str(name))
    return fields


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def task_prompt(
    task: str, ref: str | None = None, fields: Sequence[str] | None = None, family: ModelFamily = DEEPSEEK_OCR
) -> str:
    """The preset prompt of a task; `locate` needs `ref`, the text to find, `extract` the JSON schema's `fields`
    (`extract_fields`; empty: any JSON object)."""
    key = task.strip().lower()
    if key not in family.prompts:
        raise InputError(f"unknown task {task!r}; choose one of {', '.join(family.prompts)}")
    template = family.prompts[key]
    if _REF_PLACEHOLDER in template:
        if ref is None or not ref.strip():
            raise InputError(f"task {key!r} needs the text to locate (ref)")
        return template.replace(_REF_PLACEHOLDER, f"<|ref|>{ref.strip()}<|/ref|>")
    if key == "extract":
        if fields is None:
            raise InputError("task 'extract' needs a JSON schema (or any JSON object) for the output")
        return template.replace(_FIELDS_PLACEHOLDER, _join(fields) if fields else _ANY_FIELDS)
    return template


def prepare_inputs(
    tokenizer: Tokenizer, prompt: str, images: list[Image.Image], mode: Mode
) -> PreparedInputs:
    """Token ids, image mask and views for one request, identical to what infer() builds.

    A prompt without `<image>` gets one `<image>\\n` per image in front; otherwise the number of `<image>`
    placeholders must equal the number of images.
    """
    text = prompt.strip()
    placeholders = text.count(IMAGE_TOKEN)
    if placeholders == 0 and images:
        text = f"{IMAGE_TOKEN}\n" * len(images) + text
        placeholders = len(images)
    if placeholders != len(images):
        raise InputError(
            f"the prompt has {placeholders} {IMAGE_TOKEN} placeholder(s) but {len(images)} image(s)"
            " were given"
        )
    pieces = text.split(IMAGE_TOKEN)
    input_ids: list[int] = [tokenizer.bos_id]
    mask: list[bool] = [False]
    prepared_images: list[ImageInput] = []
    starts: list[int] = []  # where each image's run of tokens begins
    for piece, image in zip(pieces, images, strict=False):
        piece_ids = tokenizer.encode(piece)
        input_ids += piece_ids
        mask += [False] * len(piece_ids)
        tiled = tile_image(image, mode)
        image_input = to_image_input(tiled)
        count = image_token_count(mode, image_input.crop_grid, image_input.has_crops)
        starts.append(len(input_ids))
        input_ids += [tokenizer.image_token_id] * count
        mask += [True] * count
        prepared_images.append(image_input)
    tail_ids = tokenizer.encode(pieces[-1])
    input_ids += tail_ids
    mask += [False] * len(tail_ids)
    return PreparedInputs(
        input_ids=np.asarray(input_ids, dtype=np.int64),
        images_seq_mask=np.asarray(mask, dtype=np.bool_),
        images=prepared_images,
        embedding_rows=embedding_rows(len(input_ids), prepared_images, starts, family_named(mode.family))
        if prepared_images else None,
    )


def embedding_rows(length: int, images: list[ImageInput], starts: list[int], family: ModelFamily) -> np.ndarray:
    """For a prompt of `length` positions whose images' token runs begin at `starts`: the row of the embedding
    table each position takes (see common.engine.backend.Backend.embed_prompt). The table is the prompt's token
    embeddings, then every view's tokens (each image's global view, then its tiles), then the newline and the
    separator embeddings."""
    rows = np.arange(length, dtype=np.int64)
    view_rows = [_view_rows(image) for image in images]
    newline = length + sum(view_rows)
    first = length
    for image, start, count in zip(images, starts, view_rows, strict=True):
        tiles = len(image.local_views) if image.has_crops else 0  # type: ignore[arg-type]
        tile_side = view_token_side(image.local_views.shape[-1]) if tiles else 0  # type: ignore[union-attr]
        run = family.layout.image_rows(view_token_side(image.global_view.shape[-1]), tile_side, image.crop_grid,
                                       tiles, first, newline, newline + 1)
        rows[start : start + len(run)] = run
        first += count
    return rows


def _view_rows(image: ImageInput) -> int:
    """Vision tokens of all of an image's views (before layout embeddings)."""
    count = view_token_side(image.global_view.shape[-1]) ** 2
    if image.has_crops:
        count += len(image.local_views) * view_token_side(image.local_views.shape[-1]) ** 2  # type: ignore[arg-type]
    return count
