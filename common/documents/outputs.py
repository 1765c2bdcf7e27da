"""Output writers of a batch: NAME.md, NAME.json, NAME_images/, NAME.boxes.jpg and the combined PDFNAME.md.

Every file is written to a temporary name, flushed to disk and renamed, so a crash or a full disk never leaves a
half-written output under its real name; NAME.json is written last and marks an item done only when it parses.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from common.documents.postprocess import MarkdownResult, clean_output, crop_figures, draw_boxes, to_markdown
from common.documents.workitems import Prepared, WorkItem
from common.engine.requests import GenerationResult

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


@dataclass
class Page:
    """One item's result, post-processed once: its JSON record and, for a page of an image, the Markdown with the
    figures and boxes its grounding markup names."""

    record: dict[str, Any]
    converted: MarkdownResult | None = None


def page_record(item: WorkItem, prepared: Prepared, result: GenerationResult, mode_name: str, json_output: bool,
                out_dir: Path | None) -> Page:
    """The item's post-processed result: the --json line and NAME.json. `text` is the Markdown (figure links
    into NAME_images/ when written to -o DIR); `json_output` keeps the text exactly and adds `data`, the parsed
    value."""
    raw = result.text if json_output else (clean_output(result.text) if result.text.strip() else "")
    converted = None
    if prepared.image is not None and not json_output:
        image_dir = output_paths(out_dir, item)["images"].name if out_dir is not None else "images"
        converted = to_markdown(raw, prepared.image.size, image_dir=image_dir)
    timings = dict(result.timings, prepare_s=prepared.prepare_s)
    record = {
        "source": item.source,
        "page": item.page,
        "text": converted.markdown if converted is not None else raw,
        "raw_text": raw,
        "token_ids": list(result.token_ids),
        "finish_reason": result.finish_reason,
        "usage": result.usage(),
        "crop_grid": result.crop_grid,
        "mode": mode_name,
        "image_size": list(prepared.image.size) if prepared.image is not None else None,
        # grounding boxes, pixel coordinates of the input image
        "boxes": [_box_dict(b) for b in converted.boxes] if converted is not None else [],
        "timings": {k: round(v, 6) for k, v in timings.items()},
    }
    if json_output:
        record["data"] = parsed_json(result.text)
    return Page(record, converted)


def write_outputs(out_dir: Path, item: WorkItem, prepared: Prepared, page: Page) -> dict[str, Any]:
    """NAME_images/*.jpg, NAME.md, NAME.boxes.jpg, then NAME.json (last: it marks the item done). Returns the
    record written."""
    paths = output_paths(out_dir, item)
    record = page.record
    if "data" in record:  # JSON output: `text` stays the JSON; NAME.md shows it as a code block
        atomic_write(paths["md"], f"```json\n{record['raw_text']}\n```\n")
    else:
        converted = page.converted
        if converted is not None and prepared.image is not None:
            for index, crop in enumerate(crop_figures(prepared.image, converted.figures) if converted.figures else []):
                _save_image(paths["images"] / f"{index}.jpg", crop)
            if converted.boxes:
                _save_image(paths["boxes"], draw_boxes(prepared.image, converted.boxes))
        atomic_write(paths["md"], record["text"].rstrip() + "\n")
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
