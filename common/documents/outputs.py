"""Output writers of a batch: NAME.md, NAME.json, NAME_images/, NAME.boxes.jpg and the combined PDFNAME.md.

Every file is written to a temporary name, flushed to disk and renamed, so a crash or a full disk never leaves a
half-written output under its real name; NAME.json is written last and marks an item done only when it parses.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

from common.documents.workitems import Prepared, WorkItem

PAGE_SEPARATOR = "\n\n<!-- page {page} -->\n\n"  # between pages in the combined PDFNAME.md


def atomic_write(path: Path, data: bytes | str) -> None:
    """Writes `path` all or nothing: temp file, fsync, rename; the temp file is removed on any failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _save_image(path: Path, image: Image.Image) -> None:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=92)
    atomic_write(path, buffer.getvalue())


def output_paths(out_dir: Path, item: WorkItem) -> dict[str, Path]:
    base = out_dir / item.name
    return {
        "md": base.with_name(base.name + ".md"),
        "json": base.with_name(base.name + ".json"),
        "boxes": base.with_name(base.name + ".boxes.jpg"),
        "images": base.with_name(base.name + "_images"),
    }


def stored_record(out_dir: Path, item: WorkItem) -> dict[str, Any] | None:
    """The item's NAME.json when it is a finished record; None when missing, empty, truncated or not ours."""
    try:
        record = json.loads(output_paths(out_dir, item)["json"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not {"source", "text", "raw_text", "token_ids"} <= record.keys():
        return None
    return record


def _box_dict(box: Any) -> dict[str, Any]:
    return {
        "label": box.label,
        "text": box.text,
        "boxes": [list(b) for b in box.boxes],
        "points": [list(p) for p in box.points],
    }


def parsed_json(text: str) -> Any:
    """The value of a JSON text, or None when it does not parse (a JSON output cut short by the token budget)."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def result_record(
    item: WorkItem, prepared: Prepared, result: Any, mode_name: str, *, json_output: bool = False
) -> dict[str, Any]:
    """The JSON object of one item (--json line and NAME.json); `json_output` adds `data`, the parsed text."""
    from common.documents.postprocess import to_markdown

    timings = dict(result.timings)
    timings["prepare_s"] = prepared.prepare_s
    boxes = (
        to_markdown(result.raw_text, prepared.image.size).boxes
        if prepared.image is not None and not json_output
        else []
    )
    record = {
        "source": item.source,
        "page": item.page,
        "text": result.text,
        "raw_text": result.raw_text,
        "token_ids": list(result.token_ids),
        "finish_reason": result.finish_reason,
        "usage": result.usage(),
        "crop_grid": result.crop_grid,
        "mode": mode_name,
        "image_size": list(prepared.image.size) if prepared.image is not None else None,
        "boxes": [_box_dict(b) for b in boxes],  # grounding boxes, pixel coordinates of the input image
        "timings": {k: round(v, 6) for k, v in timings.items()},
    }
    if json_output:
        record["data"] = parsed_json(result.text)
    return record


def write_outputs(out_dir: Path, item: WorkItem, prepared: Prepared, record: dict[str, Any]) -> dict[str, Any]:
    """NAME_images/*.jpg, NAME.md, NAME.boxes.jpg, then NAME.json (last: it marks the item done).

    Returns the record with `text` = the Markdown of NAME.md (figure links into NAME_images/).
    """
    from common.documents.postprocess import crop_figures, draw_boxes, to_markdown

    paths = output_paths(out_dir, item)
    if "data" in record:  # JSON output: `text` stays the JSON; NAME.md shows it as a code block
        atomic_write(paths["md"], f"```json\n{record['raw_text']}\n```\n")
        atomic_write(paths["json"], json.dumps(record, ensure_ascii=False, indent=1) + "\n")
        return record
    markdown = record["raw_text"]
    if prepared.image is not None:
        converted = to_markdown(record["raw_text"], prepared.image.size, image_dir=paths["images"].name)
        markdown = converted.markdown
        for index, crop in enumerate(crop_figures(prepared.image, converted.figures) if converted.figures else []):
            _save_image(paths["images"] / f"{index}.jpg", crop)
        if converted.boxes:
            _save_image(paths["boxes"], draw_boxes(prepared.image, converted.boxes))
    atomic_write(paths["md"], markdown.rstrip() + "\n")
    record = dict(record, text=markdown)  # links point at NAME_images/ here
    atomic_write(paths["json"], json.dumps(record, ensure_ascii=False, indent=1) + "\n")
    return record


def write_combined(out_dir: Path, group: str, members: list[WorkItem]) -> Path | None:
    """PDFNAME.md: every finished page's Markdown in page order, with a separator naming each page."""
    parts = []
    for item in sorted(members, key=lambda i: i.page or 0):
        md = output_paths(out_dir, item)["md"]
        if md.is_file():
            parts.append(PAGE_SEPARATOR.format(page=item.page) + md.read_text(encoding="utf-8").strip() + "\n")
        else:
            parts.append(PAGE_SEPARATOR.format(page=item.page) + "<!-- this page failed; see the log -->\n")
    if not parts:
        return None
    target = out_dir / f"{group}.md"
    atomic_write(target, "".join(parts).lstrip())
    return target
