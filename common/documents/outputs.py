"""Output writers of a batch: NAME.md, NAME.json, NAME_images/, NAME.boxes.jpg and the combined PDFNAME.md.

Every file is written to a temporary name, flushed to disk and renamed, so a crash or a full disk never leaves a
half-written output under its real name; NAME.json is written last and marks an item done only when it parses,
and only for the source it records (`input`: path, page, size and time, or stdin's hash). The temporary name is
short whatever NAME is, and every output name is checked against the folder's NAME_MAX before any work
(`unwritable_names`); -o DIR is probed for writing before any work (`probe_writable`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from common.documents.postprocess import MarkdownResult, clean_output, crop_figures, draw_boxes, to_markdown
from common.documents.workitems import Prepared, WorkItem, item_identity
from common.engine.requests import GenerationResult

PAGE_SEPARATOR = "\n\n<!-- page {page} -->\n\n"  # between pages in the combined PDFNAME.md


def atomic_write(path: Path, data: bytes | str) -> None:
    """Writes `path` all or nothing: temp file, fsync, rename; the temp file is removed on any failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(_temporary_name(path))
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


def _temporary_name(path: Path) -> str:
    """A hidden name next to `path`, unique to this write: `.TOKEN.NAME.tmp` when that fits the file system's
    NAME_MAX, else `.TOKEN.tmp` (a NAME of 250 bytes is legal; its temporary name must be too)."""
    token = secrets.token_hex(6)
    named = f".{token}.{path.name}.tmp"
    return named if len(os.fsencode(named)) <= name_max(path.parent) else f".{token}.tmp"


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
    """The item's NAME.json when it is a finished record of this item's source; None when missing, empty,
    truncated, not ours, or recorded for another source (`stored_record_status` says which)."""
    return stored_record_status(out_dir, item)[0]


def stored_record_status(out_dir: Path, item: WorkItem) -> tuple[dict[str, Any] | None, str]:
    """(record, "") for a finished record of this item; (None, why) otherwise: "" when there is no finished
    record, else why it is not this item's (another source, or written before records named their source)."""
    try:
        record = json.loads(output_paths(out_dir, item)["json"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, ""
    if not isinstance(record, dict) or not {"source", "text", "raw_text", "token_ids"} <= record.keys():
        return None, ""
    recorded = record.get("input")
    if recorded is None:
        return None, "its record does not name its source (written by an older dsocr)"
    if recorded != item_identity(item):
        if not isinstance(recorded, dict) or recorded.get("path") != item_identity(item).get("path"):
            return None, "its record is another source's"
        return None, "the source changed since its record was written"
    return record, ""


def name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system of `folder` (or of its nearest existing parent) takes."""
    for candidate in (folder, *folder.parents):
        try:
            return int(os.pathconf(candidate, "PC_NAME_MAX"))
        except (OSError, ValueError, AttributeError):
            if candidate.exists():
                break
    return 255


def item_output_names(item: WorkItem) -> list[str]:
    """Every path component the item's outputs may have under -o DIR (folders of NAME included)."""
    base = Path(item.name)
    names = [*base.parent.parts, *(p.name for p in output_paths(Path(), item).values())]
    if item.group:
        names.append(Path(item.group).name + ".md")
    return names


def unwritable_names(out_dir: Path, items: list[WorkItem]) -> dict[int, str]:
    """{index of the item: why} for items whose output names are longer than the file system allows: checked
    before any work, so a long name is refused up front and not after its page is generated."""
    limit = name_max(out_dir)
    refused: dict[int, str] = {}
    for index, item in enumerate(items):
        for name in item_output_names(item):
            size = len(os.fsencode(name))
            if size > limit:
                refused[index] = (f"the output name {name!r} would be {size} bytes, longer than the {limit} the file "
                                  f"system of -o {out_dir} allows; rename the input")
                break
    return refused


def probe_writable(out_dir: Path) -> None:
    """Creates and removes a small file in -o DIR: OSError when nothing can be written there (a read-only mount,
    no permission), before any page is generated."""
    probe = out_dir / f".dsocr-probe-{secrets.token_hex(6)}"
    with open(probe, "xb") as f:
        f.write(b"\0")
    probe.unlink()


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
        "input": item_identity(item),  # what a resumed run checks before reusing this record
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
