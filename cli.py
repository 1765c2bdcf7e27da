"""dsocr command line: OCR images, PDFs and folders with DeepSeek-OCR on a local backend.

    dsocr report.pdf -o out/                 # Markdown per page + combined report.md
    dsocr scan.png                           # streams the text to the terminal
    dsocr scans/ -o out/ --json > all.jsonl  # a folder, resumable, one JSON object per page
    dsocr convert ...                        # MLX weight conversion (dsocr_mlx.convert)

`main(argv)` is the console script `dsocr`; it returns the exit code: 0 ok, 1 some item failed (or an internal
error), 2 a usage error (bad flag, missing file, no model ...), 130 interrupted with Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import queue
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from PIL import Image

from common.errors import DsocrError, InputError
from common.families import all_mode_names
from common.postprocess import GroundingStripper
from common.sampling import DEFAULT_MAX_NEW_TOKENS, SamplingParams

log = logging.getLogger("dsocr")

PROG = "dsocr"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"})
MULTIPAGE_IMAGE_EXTENSIONS = frozenset({".tif", ".tiff"})  # GIF/WebP animations: first frame only
PDF_EXTENSION = ".pdf"
DEFAULT_DPI = 144  # the authors' PDF script renders at 144 dpi
MODE_NAMES = all_mode_names()  # every family's presets; the loaded model's family decides which are valid
TASK_NAMES = ("markdown", "ocr", "figure", "describe", "locate", "grounding")
PAGE_SEPARATOR = "\n\n<!-- page {page} -->\n\n"  # between pages in the combined PDFNAME.md


class UsageError(DsocrError):
    """A bad command line: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so every mistake is one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


# ------------------------------------------------------------ arguments


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Run DeepSeek-OCR locally on images, PDFs and folders.",
        epilog=f"`{PROG} convert --help` converts weights for the MLX backend.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="image files (PNG, JPEG, WebP, TIFF, BMP, GIF), PDFs, folders (recursive), or - for stdin",
    )
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an input image (repeatable; same as a positional input)",
    )

    g = p.add_argument_group("prompt")
    g.add_argument(
        "--task",
        choices=TASK_NAMES,
        default=None,
        help="prompt preset (default markdown): markdown, ocr, figure, describe, locate, grounding",
    )
    g.add_argument("--ref", default=None, metavar="TEXT", help="what to find, for --task locate")
    g.add_argument(
        "--prompt",
        default=None,
        help="custom prompt; put <image> where the image goes (a literal \\n is a newline)",
    )
    g.add_argument("--prompt-file", type=Path, default=None, metavar="FILE", help="read the prompt from a file")

    g = p.add_argument_group("image mode")
    g.add_argument(
        "--mode",
        choices=MODE_NAMES,
        default=None,
        help="resolution preset of the model (default gundam: a 1024 global view + tiles, 640 px for DeepSeek-OCR "
        "(presets tiny, small, base, large, gundam), 768 px for DeepSeek-OCR 2 (presets gundam, base, small))",
    )
    g.add_argument(
        "--base-size", metavar="PX", type=_positive_int, default=None, help="global view size (overrides the mode)"
    )
    g.add_argument(
        "--image-size", metavar="PX", type=_positive_int, default=None, help="tile size (overrides the mode)"
    )
    g.add_argument(
        "--crop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cut the image into tiles (overrides the mode)",
    )
    g.add_argument("--min-crops", metavar="N", type=_positive_int, default=None, help="fewest tiles (default 2)")
    g.add_argument(
        "--max-crops", metavar="N", type=_positive_int, default=None,
        help="most tiles (default 9 for DeepSeek-OCR, 6 for DeepSeek-OCR 2)",
    )
    g.add_argument(
        "--dpi",
        metavar="DPI",
        type=_positive_int,
        default=DEFAULT_DPI,
        help=f"PDF render resolution (default {DEFAULT_DPI})",
    )
    g.add_argument(
        "--pages",
        default=None,
        metavar="RANGES",
        help="pages of PDFs / multi-page TIFFs, e.g. 1-3,7 or 5- (default all)",
    )

    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        metavar="DIR|REPO",
        default=None,
        help="local model directory or Hugging Face repo id (default deepseek-ai/DeepSeek-OCR, "
        "downloaded on first use)",
    )
    g.add_argument("--revision", metavar="REV", default=None, help="Hub revision (branch, tag or commit)")
    g.add_argument("--offline", action="store_true", help="never touch the network (use the Hugging Face cache)")
    g.add_argument("--backend", choices=("auto", "torch", "mlx"), default="auto", help="default: auto")
    g.add_argument("--device", choices=("auto", "cpu", "cuda", "metal"), default="auto", help="default: auto")
    g.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="compute dtype (default auto: bfloat16 where the device supports it)",
    )

    g = p.add_argument_group("generation")
    g.add_argument(
        "--max-new-tokens",
        metavar="N",
        type=_positive_int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"most tokens generated per page (default {DEFAULT_MAX_NEW_TOKENS}, as the official infer())",
    )
    g.add_argument("--temperature", metavar="T", type=_float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", metavar="P", type=_float, default=1.0)
    g.add_argument("--top-k", metavar="K", type=_non_negative_int, default=0, help="0 = off")
    g.add_argument("--seed", metavar="N", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument(
        "--no-repeat-ngram-size",
        metavar="N",
        type=_non_negative_int,
        default=20,
        help="ban repeating n-grams of this size (default 20 as the official infer(); 0 = off)",
    )
    g.add_argument(
        "--ngram-window",
        metavar="W",
        type=_non_negative_int,
        default=0,
        help="look back this many tokens for repeats (default 0 = the whole sequence)",
    )

    g = p.add_argument_group("output")
    g.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        metavar="DIR",
        help="write NAME.md, NAME.json, NAME_images/ and NAME.boxes.jpg per image or page",
    )
    g.add_argument("--json", action="store_true", help="print one JSON object per image or page on stdout")
    g.add_argument("--overwrite", action="store_true", help="redo items whose outputs already exist in -o DIR")
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="prepare the inputs and print token counts without loading the weights",
    )
    g.add_argument(
        "--prefetch",
        type=_non_negative_int,
        default=2,
        metavar="N",
        help="items prepared ahead while the model generates (default 2; 0 = no overlap)",
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    g.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug); tracebacks on errors")
    g.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return p


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("dsocr")
    except Exception:  # not installed: running from a checkout
        return "0.1.0"


# ------------------------------------------------------------ inputs


@dataclass
class WorkItem:
    """One image or page to OCR."""

    source: str  # what the user named: a path, "-" for stdin, "" for a text-only prompt
    kind: str  # "image", "pdf" or "text"
    name: str  # output path stem relative to -o DIR (posix), e.g. "sub/report_page003"
    page: int | None = None  # 1-based page of a PDF / frame of a multi-page TIFF
    path: Path | None = None
    data: bytes | None = None  # stdin contents
    group: str | None = None  # combined-document stem (PDFNAME) for multi-page sources
    group_pages: int = 0  # how many items the group has in this run
    error: str | None = None  # known to fail before preparing (e.g. an encrypted PDF)

    @property
    def short_label(self) -> str:
        """File name and page, for the progress bar."""
        name = Path(self.source).name if self.source not in ("", "-") else self.label
        return f"{name} p.{self.page}" if self.page is not None and name != self.label else name

    @property
    def label(self) -> str:
        base = "<stdin>" if self.source == "-" else (self.source or "<text prompt>")
        return f"{base} p.{self.page}" if self.page is not None else base


def parse_page_ranges(text: str) -> list[tuple[int, int | None]]:
    """'1-3,7,10-' -> [(1, 3), (7, 7), (10, None)]; raises UsageError on anything else."""
    ranges: list[tuple[int, int | None]] = []
    for part in text.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:(-)(\d*))?", part)
        if not m:
            raise UsageError(f"bad --pages {text!r}: use page numbers and ranges like 1-3,7 or 5-")
        first = int(m.group(1))
        last: int | None = first if not m.group(2) else (int(m.group(3)) if m.group(3) else None)
        if first < 1 or (last is not None and last < first):
            raise UsageError(f"bad --pages {text!r}: pages count from 1 and ranges go upwards")
        ranges.append((first, last))
    return ranges


def select_pages(ranges: list[tuple[int, int | None]] | None, n_pages: int, source: str, strict: bool) -> list[int]:
    if ranges is None:
        return list(range(1, n_pages + 1))
    wanted = sorted({p for first, last in ranges for p in range(first, (last or n_pages) + 1)})
    outside = [p for p in wanted if p > n_pages]
    if outside and strict:
        raise UsageError(f"{source} has {n_pages} page(s); --pages asks for page {outside[0]}")
    return [p for p in wanted if p <= n_pages]


# pdfium is not thread-safe: every call takes this lock (the prefetch thread renders, the main thread counts).
_PDFIUM_LOCK = threading.Lock()


def _pdf_page_count(source: Path | bytes) -> int:
    import pypdfium2 as pdfium

    with _PDFIUM_LOCK:
        try:
            pdf = pdfium.PdfDocument(source)
        except pdfium.PdfiumError as exc:
            raise InputError(f"cannot open PDF: {_pdfium_reason(exc)}") from None
        try:
            return len(pdf)
        finally:
            pdf.close()


def _pdfium_reason(exc: Exception) -> str:
    text = str(exc)
    if "password" in text.lower():
        return "it is encrypted (password-protected)"
    return text


def render_pdf_page(source: Path | bytes, page: int, dpi: int, max_pixels: int) -> Image.Image:
    """Renders one 1-based page to RGB at `dpi` on a white background."""
    import pypdfium2 as pdfium

    with _PDFIUM_LOCK:
        try:
            pdf = pdfium.PdfDocument(source)
        except pdfium.PdfiumError as exc:
            raise InputError(f"cannot open PDF: {_pdfium_reason(exc)}") from None
        try:
            pdf_page = pdf[page - 1]
            try:
                width_pt, height_pt = pdf_page.get_size()
                scale = dpi / 72.0
                if width_pt * scale * height_pt * scale > max_pixels:
                    raise InputError(
                        f"page {page} would render to {int(width_pt * scale)}x{int(height_pt * scale)} pixels "
                        f"at {dpi} dpi, above the limit; lower --dpi"
                    )
                return pdf_page.render(scale=scale).to_pil().convert("RGB")
            finally:
                pdf_page.close()
        except pdfium.PdfiumError as exc:
            raise InputError(f"cannot render page {page}: {exc}") from None
        finally:
            pdf.close()


def _sniff_kind(path: Path) -> str | None:
    """'pdf' / 'image' for a file with an unknown extension, from its first bytes; None if neither."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head.startswith(b"%PDF"):
        return "pdf"
    try:
        with Image.open(path):
            return "image"
    except Exception:
        return None


def _data_kind(data: bytes) -> str:
    return "pdf" if data[:5].startswith(b"%PDF") else "image"


def _frame_count(source: Path | bytes) -> int:
    from common.images import image_frame_count

    return image_frame_count(source)


def expand_inputs(
    inputs: Sequence[str],
    pages: list[tuple[int, int | None]] | None,
    stdin: IO[bytes] | None = None,
    exclude: Path | None = None,
) -> list[WorkItem]:
    """The command line's inputs as work items, in order; UsageError for missing or unsupported ones.

    Files that are readable by name but broken inside (corrupt image, encrypted PDF) become failing items so a
    batch goes on without them. Folder scans leave out `exclude` (the -o folder: its crops are not inputs).
    """
    excluded = exclude.resolve() if exclude is not None else None
    items: list[WorkItem] = []
    for raw in inputs:
        if raw == "-":
            if stdin is None:
                stdin = sys.stdin.buffer
            data = stdin.read()
            if not data:
                raise UsageError("no data on stdin (input '-')")
            items += _document_items("-", _data_kind(data), "stdin", None, data, pages, strict=True)
            continue
        path = Path(raw).expanduser()
        if not path.exists():
            raise UsageError(f"input not found: {raw}")
        if path.is_dir():
            found = sorted(
                (
                    f
                    for f in path.rglob("*")
                    if f.is_file()
                    and f.suffix.lower() in IMAGE_EXTENSIONS | {PDF_EXTENSION}
                    and not (excluded is not None and f.resolve().is_relative_to(excluded))
                ),
                key=lambda f: f.relative_to(path).as_posix(),
            )
            if not found:
                raise UsageError(f"no images or PDFs in folder {raw}")
            for f in found:
                rel = f.relative_to(path).with_suffix("").as_posix()
                kind = "pdf" if f.suffix.lower() == PDF_EXTENSION else "image"
                items += _document_items(str(f), kind, rel, f, None, pages, strict=False)
            continue
        if not os.access(path, os.R_OK):
            raise UsageError(f"cannot read {raw}: permission denied")
        suffix = path.suffix.lower()
        kind = "pdf" if suffix == PDF_EXTENSION else "image" if suffix in IMAGE_EXTENSIONS else _sniff_kind(path)
        if kind is None:
            raise UsageError(f"unsupported input format: {raw} (expected PNG, JPEG, WebP, TIFF, BMP, GIF or PDF)")
        items += _document_items(raw, kind, path.stem, path, None, pages, strict=True)
    _disambiguate_names(items)
    return items


def _document_items(
    source: str,
    kind: str,
    stem: str,
    path: Path | None,
    data: bytes | None,
    pages: list[tuple[int, int | None]] | None,
    strict: bool,
) -> list[WorkItem]:
    content: Path | bytes = path if path is not None else data  # type: ignore[assignment]
    n_pages = 1
    multipage = kind == "pdf" or (path is not None and path.suffix.lower() in MULTIPAGE_IMAGE_EXTENSIONS)
    if multipage:
        try:
            n_pages = _pdf_page_count(content) if kind == "pdf" else _frame_count(content)
        except DsocrError as exc:
            return [WorkItem(source, kind, stem, path=path, data=data, error=str(exc))]
        if n_pages == 0:
            return [WorkItem(source, kind, stem, path=path, data=data, error="the PDF has no pages")]
    if kind == "image" and n_pages == 1:
        if pages is not None and strict and 1 not in select_pages(pages, 1, source, strict=False):
            raise UsageError(f"{source} has 1 page; --pages selects none of it")
        return [WorkItem(source, kind, stem, path=path, data=data)]
    selected = select_pages(pages, n_pages, source, strict)
    if not selected:
        log.warning("%s: --pages selects none of its %d pages; skipped", source, n_pages)
        return []
    width = max(3, len(str(n_pages)))
    return [
        WorkItem(
            source,
            kind,
            f"{stem}_page{p:0{width}d}",
            page=p,
            path=path,
            data=data,
            group=stem,
            group_pages=len(selected),
        )
        for p in selected
    ]


def _disambiguate_names(items: list[WorkItem]) -> None:
    """report.png and report.pdf in one folder would both write report.md: use report_png / report_pdf."""
    sources_by_stem: dict[str, set[str]] = {}
    for item in items:
        stem = item.group or item.name
        sources_by_stem.setdefault(stem, set()).add(item.source)
    for item in items:
        stem = item.group or item.name
        if len(sources_by_stem[stem]) < 2 or item.path is None:
            continue
        new_stem = f"{stem}_{item.path.suffix.lstrip('.').lower() or 'file'}"
        item.name = new_stem + item.name[len(stem) :]
        if item.group:
            item.group = new_stem
    seen: dict[str, int] = {}
    for item in items:  # the same file named twice: keep both outputs apart
        count = seen.get(item.name, 0)
        seen[item.name] = count + 1
        if count:
            item.name = f"{item.name}_{count + 1}"
            if item.group:
                item.group = f"{item.group}_{count + 1}"


def load_item_image(item: WorkItem, dpi: int) -> Image.Image | None:
    from common.images import DEFAULT_MAX_PIXELS, load_image

    if item.error:
        raise InputError(item.error)
    if item.kind == "text":
        return None
    content: Path | bytes = item.path if item.path is not None else item.data  # type: ignore[assignment]
    if item.kind == "pdf":
        return render_pdf_page(content, item.page or 1, dpi, DEFAULT_MAX_PIXELS)
    return load_image(content, frame=(item.page or 1) - 1)


# ------------------------------------------------------------ prompt


def resolve_prompt(args: argparse.Namespace) -> str:
    from common.prompt import task_prompt

    given = [
        name
        for name, value in (
            ("--prompt", args.prompt),
            ("--prompt-file", args.prompt_file),
            ("--task", args.task),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} cannot be used together; pick one")
    if args.ref is not None and args.task != "locate":
        raise UsageError("--ref goes with --task locate")
    if args.prompt is not None:
        # Shells pass "\n" as two characters; the prompts of the official examples mean a newline.
        return args.prompt.replace("\\n", "\n")
    if args.prompt_file is not None:
        try:
            return args.prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --prompt-file {args.prompt_file}: {exc}") from None
    task = args.task or "markdown"
    if task == "locate" and not args.ref:
        raise UsageError("--task locate needs --ref TEXT (what to find)")
    return task_prompt(task, args.ref)


# ------------------------------------------------------------ prefetch


@dataclass
class Prepared:
    item: WorkItem
    image: Image.Image | None = None
    inputs: Any = None  # common.backend.PreparedInputs
    prepare_s: float = 0.0
    error: BaseException | None = None


def prepare_item(engine: Any, item: WorkItem, prompt: str, mode: Any, dpi: int) -> Prepared:
    t0 = time.perf_counter()
    try:
        image = load_item_image(item, dpi)
        inputs = engine.prepare(prompt, [image] if image is not None else [], mode)
    except Exception as exc:  # reported per item; the batch goes on
        return Prepared(item, error=exc, prepare_s=time.perf_counter() - t0)
    return Prepared(item, image, inputs, time.perf_counter() - t0)


def prepared_stream(
    engine: Any, items: list[WorkItem], prompt: str, mode: Any, dpi: int, prefetch: int
) -> Iterator[Prepared]:
    """Prepared items in order; with prefetch > 0 a background thread prepares up to `prefetch` ahead."""
    if prefetch <= 0:
        for item in items:
            yield prepare_item(engine, item, prompt, mode, dpi)
        return
    ready: queue.Queue[Prepared | None] = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def worker() -> None:
        for item in items:
            result = prepare_item(engine, item, prompt, mode, dpi)
            while not stop.is_set():
                try:
                    ready.put(result, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        ready.put(None)

    thread = threading.Thread(target=worker, name="dsocr-prefetch", daemon=True)
    thread.start()
    try:
        while (got := ready.get()) is not None:
            yield got
    finally:
        stop.set()
        while thread.is_alive():  # drain so the worker can see `stop`
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.05)


# ------------------------------------------------------------ outputs


def _atomic_write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def _save_image(path: Path, image: Image.Image) -> None:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=92)
    _atomic_write(path, buffer.getvalue())


def output_paths(out_dir: Path, item: WorkItem) -> dict[str, Path]:
    base = out_dir / item.name
    return {
        "md": base.with_name(base.name + ".md"),
        "json": base.with_name(base.name + ".json"),
        "boxes": base.with_name(base.name + ".boxes.jpg"),
        "images": base.with_name(base.name + "_images"),
    }


def is_done(out_dir: Path, item: WorkItem) -> bool:
    # NAME.json is written last, so it marks a finished item.
    return output_paths(out_dir, item)["json"].is_file()


def _box_dict(box: Any) -> dict[str, Any]:
    return {
        "label": box.label,
        "text": box.text,
        "boxes": [list(b) for b in box.boxes],
        "points": [list(p) for p in box.points],
    }


def result_record(item: WorkItem, prepared: Prepared, result: Any, mode: Any) -> dict[str, Any]:
    """The JSON object of one item (--json line and NAME.json)."""
    from common.postprocess import to_markdown

    timings = dict(result.timings)
    timings["prepare_s"] = prepared.prepare_s
    boxes = to_markdown(result.raw_text, prepared.image.size).boxes if prepared.image is not None else []
    return {
        "source": item.source,
        "page": item.page,
        "text": result.text,
        "raw_text": result.raw_text,
        "token_ids": list(result.token_ids),
        "finish_reason": result.finish_reason,
        "usage": result.usage(),
        "crop_grid": result.crop_grid,
        "mode": mode.name,
        "image_size": list(prepared.image.size) if prepared.image is not None else None,
        "boxes": [_box_dict(b) for b in boxes],  # grounding boxes, pixel coordinates of the input image
        "timings": {k: round(v, 6) for k, v in timings.items()},
    }


def write_outputs(out_dir: Path, item: WorkItem, prepared: Prepared, record: dict[str, Any]) -> dict[str, Any]:
    """NAME_images/*.jpg, NAME.md, NAME.boxes.jpg, then NAME.json (last: it marks the item done).

    Returns the record with `text` = the Markdown of NAME.md (figure links into NAME_images/).
    """
    from common.postprocess import crop_figures, draw_boxes, to_markdown

    paths = output_paths(out_dir, item)
    markdown, boxes = record["raw_text"], []
    if prepared.image is not None:
        converted = to_markdown(record["raw_text"], prepared.image.size, image_dir=paths["images"].name)
        markdown, boxes = converted.markdown, converted.boxes
        if converted.figures:
            for index, crop in enumerate(crop_figures(prepared.image, converted.figures)):
                _save_image(paths["images"] / f"{index}.jpg", crop)
        if boxes:
            _save_image(paths["boxes"], draw_boxes(prepared.image, boxes))
    _atomic_write(paths["md"], markdown.rstrip() + "\n")
    record = dict(record, text=markdown)  # links point at NAME_images/ here
    _atomic_write(paths["json"], json.dumps(record, ensure_ascii=False, indent=1) + "\n")
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
    _atomic_write(target, "".join(parts).lstrip())
    return target


# ------------------------------------------------------------ progress


class Reporter:
    """Progress on stderr: a rich bar on a terminal, plain lines otherwise, nothing with -q."""

    def __init__(self, total: int, *, quiet: bool, live: bool, stream: IO[str] | None = None) -> None:
        self.total, self.quiet = total, quiet
        self.stream = stream or sys.stderr
        self.done = 0
        self.tokens = 0
        self.gen_seconds = 0.0
        self._progress: Any = None
        self._task: Any = None
        if not quiet and live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.console = Console(file=self.stream)
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}", justify="left"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("starting", total=total, rate="")

    @property
    def rich(self) -> bool:
        return self._progress is not None

    def loading(self, what: str, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=f"loading {what} {done}/{total}")

    def start(self, item: WorkItem) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=_short(item.short_label, 30))

    def token(self, live_tokens: int, live_seconds: float) -> None:
        if self._progress is not None and live_seconds > 0:
            rate = (self.tokens + live_tokens) / (self.gen_seconds + live_seconds)
            self._progress.update(self._task, rate=f"{rate:.1f} tok/s")

    def finish(self, item: WorkItem, status: str, tokens: int = 0, seconds: float = 0.0, message: str = "") -> None:
        self.done += 1
        self.tokens += tokens
        self.gen_seconds += seconds
        if self._progress is not None:
            rate = f"{self.tokens / self.gen_seconds:.1f} tok/s" if self.gen_seconds > 0 else ""
            self._progress.update(self._task, advance=1, rate=rate)
            if status == "failed" and self.total > 1:
                self._progress.console.print(f"[red]failed[/red] {item.label}: {message}", highlight=False)
            return
        if (self.quiet and status != "failed") or (status == "failed" and self.total == 1):
            return  # a single failure is main()'s one error line
        detail = {
            "ok": f"{tokens} tokens in {seconds:.1f} s" + (f" ({tokens / seconds:.1f} tok/s)" if seconds > 0 else ""),
            "skipped": "already done (use --overwrite to redo)",
            "failed": message,
        }[status]
        print(f"[{self.done}/{self.total}] {status} {item.label}: {detail}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _short(label: str, width: int = 40) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1) :]


# ------------------------------------------------------------ batch


@dataclass
class Outcome:
    item: WorkItem
    status: str  # "ok", "skipped", "failed"
    tokens: int = 0
    seconds: float = 0.0
    message: str = ""


@dataclass
class BatchOptions:
    prompt: str
    mode: Any  # common.modes.Mode
    params: SamplingParams
    out_dir: Path | None = None
    json_lines: bool = False
    stream_text: bool = False  # print text deltas to stdout as they arrive
    overwrite: bool = False
    dpi: int = DEFAULT_DPI
    prefetch: int = 2
    verbose: int = 0
    stdout: IO[str] = field(default_factory=lambda: sys.stdout)


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, DsocrError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def run_batch(engine: Any, items: list[WorkItem], opts: BatchOptions, reporter: Reporter) -> list[Outcome]:
    """Generates every item (skipping finished ones) and writes outputs; Ctrl-C propagates after cleanup."""
    outcomes: list[Outcome] = []
    out = opts.stdout
    todo: list[WorkItem] = []
    for item in items:
        if opts.out_dir is not None and not opts.overwrite and is_done(opts.out_dir, item):
            outcomes.append(Outcome(item, "skipped"))
            reporter.finish(item, "skipped")
            if opts.json_lines:
                stored = output_paths(opts.out_dir, item)["json"].read_text(encoding="utf-8")
                out.write(json.dumps(json.loads(stored), ensure_ascii=False) + "\n")
                out.flush()
        else:
            todo.append(item)
    groups: dict[str, list[WorkItem]] = {}
    for item in items:
        if item.group:
            groups.setdefault(item.group, []).append(item)
    remaining = {g: sum(1 for i in todo if i.group == g) for g in groups}

    def group_step(item: WorkItem) -> None:
        if opts.out_dir is None or not item.group:
            return
        remaining[item.group] -= 1
        if remaining[item.group] == 0:
            write_combined(opts.out_dir, item.group, groups[item.group])

    for g, members in groups.items():  # all pages skipped but the combined file missing (or being redone)
        if opts.out_dir is not None and remaining[g] == 0 and not (opts.out_dir / f"{g}.md").is_file():
            write_combined(opts.out_dir, g, members)

    for prepared in prepared_stream(engine, todo, opts.prompt, opts.mode, opts.dpi, opts.prefetch):
        item = prepared.item
        reporter.start(item)
        if prepared.error is not None:
            message = _describe_error(prepared.error)
            if opts.verbose and not isinstance(prepared.error, DsocrError):
                traceback.print_exception(prepared.error)
            outcomes.append(Outcome(item, "failed", message=message))
            reporter.finish(item, "failed", message=message)
            _emit_error_line(opts, item, message)
            group_step(item)
            continue
        t0 = time.perf_counter()
        try:
            if opts.stream_text and len(items) > 1:
                out.write(f"==> {item.label} <==\n")
                out.flush()
            result = _generate(engine, prepared, opts, reporter)
            record = result_record(item, prepared, result, opts.mode)
            if opts.out_dir is not None:
                record = write_outputs(opts.out_dir, item, prepared, record)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            message = _describe_error(exc)
            if opts.verbose and not isinstance(exc, DsocrError):
                traceback.print_exc()
            outcomes.append(Outcome(item, "failed", message=message))
            reporter.finish(item, "failed", message=message)
            _emit_error_line(opts, item, message)
            group_step(item)
            continue
        seconds = time.perf_counter() - t0
        if opts.json_lines:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
        outcomes.append(Outcome(item, "ok", result.completion_tokens, seconds))
        reporter.finish(item, "ok", result.completion_tokens, seconds)
        group_step(item)
    return outcomes


def _emit_error_line(opts: BatchOptions, item: WorkItem, message: str) -> None:
    if opts.json_lines:
        opts.stdout.write(
            json.dumps({"source": item.source, "page": item.page, "error": message}, ensure_ascii=False) + "\n"
        )
        opts.stdout.flush()


def _generate(engine: Any, prepared: Prepared, opts: BatchOptions, reporter: Reporter) -> Any:
    generation = engine.generate(prepared.inputs, opts.params)
    out = opts.stdout
    t0 = time.perf_counter()
    deltas = 0
    wrote_text = False
    # The terminal cannot show boxes: drop the grounding markup there (-o / --json keep it).
    stripper = GroundingStripper()
    try:
        for delta in generation:
            deltas += 1
            if opts.stream_text and (shown := stripper.feed(delta)):
                out.write(shown)
                out.flush()
                wrote_text = True
            reporter.token(deltas, time.perf_counter() - t0)
        if opts.stream_text and (tail := stripper.flush()):
            out.write(tail)
            wrote_text = True
    except KeyboardInterrupt:
        generation.cancel()
        raise
    finally:
        if wrote_text:
            out.write("\n")
            out.flush()
    return generation.result


def print_summary(outcomes: list[Outcome], out_dir: Path | None, stream: IO[str], live: bool) -> None:
    ok = [o for o in outcomes if o.status == "ok"]
    skipped = [o for o in outcomes if o.status == "skipped"]
    failed = [o for o in outcomes if o.status == "failed"]
    tokens = sum(o.tokens for o in ok)
    seconds = sum(o.seconds for o in ok)
    from rich.console import Console
    from rich.table import Table

    console = Console(file=stream, width=None if live else 120)
    table = Table(title="dsocr summary", show_lines=False)
    table.add_column("status")
    table.add_column("items", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("time", justify="right")
    table.add_row("ok", str(len(ok)), str(tokens), f"{seconds:.1f} s")
    table.add_row("skipped", str(len(skipped)), "", "")
    table.add_row("failed", str(len(failed)), "", "")
    console.print(table)
    if failed:
        fail_table = Table(title="failed items")
        fail_table.add_column("input", overflow="fold")
        fail_table.add_column("error", overflow="fold")
        for o in failed:
            fail_table.add_row(o.item.label, o.message)
        console.print(fail_table)
    if out_dir is not None and (ok or skipped):
        console.print(f"outputs in {out_dir}")


# ------------------------------------------------------------ main


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    if verbose < 2:
        for noisy in ("httpx", "huggingface_hub", "urllib3", "filelock"):
            logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def _model_family(args: argparse.Namespace) -> Any:
    """The family of --model, from its config.json (downloads the model on first use, as loading would)."""
    from common.families import family_of_model_dir
    from common.hub import resolve_model

    model_dir = resolve_model(args.model, revision=args.revision, offline=args.offline, show_progress=not args.quiet)
    args.model = str(model_dir)  # resolved once: loading reuses the local directory
    return family_of_model_dir(model_dir)


def _resolve_mode(args: argparse.Namespace, family: Any = None) -> Any:
    from common.modes import resolve_mode

    try:
        return resolve_mode(
            args.mode,
            family=family,
            base_size=args.base_size,
            image_size=args.image_size,
            crop_mode=args.crop,
            min_crops=args.min_crops,
            max_crops=args.max_crops,
        )
    except DsocrError as exc:
        raise UsageError(str(exc)) from None


def _sampling(args: argparse.Namespace) -> SamplingParams:
    try:
        return SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=tuple(args.stop),
            no_repeat_ngram_size=args.no_repeat_ngram_size,
            ngram_window=args.ngram_window,
        )
    except InputError as exc:
        raise UsageError(str(exc)) from None


def dry_run(engine: Any, items: list[WorkItem], opts: BatchOptions) -> int:
    """Prepares every item without weights and prints its token counts."""
    failed = 0
    for prepared in prepared_stream(engine, items, opts.prompt, opts.mode, opts.dpi, opts.prefetch):
        item = prepared.item
        if prepared.error is not None:
            failed += 1
            message = _describe_error(prepared.error)
            _error(f"{item.label}: {message}")
            _emit_error_line(opts, item, message)
            continue
        inputs = prepared.inputs
        grid = None
        if inputs.images and inputs.images[0].has_crops:
            grid = [int(v) for v in inputs.images[0].crop_grid]
        mode = opts.mode
        record = {
            "source": item.source,
            "page": item.page,
            "mode": mode.name,
            "base_size": mode.base_size,
            "image_size": mode.image_size,
            "crop_mode": mode.crop_mode,
            "prompt_tokens": inputs.prompt_tokens,
            "image_tokens": inputs.image_tokens,
            "crop_grid": grid,
            "tiles": int(len(inputs.images[0].local_views)) if grid else 0,
            "width": prepared.image.width if prepared.image is not None else None,
            "height": prepared.image.height if prepared.image is not None else None,
            "max_new_tokens": opts.params.max_new_tokens,
        }
        if opts.json_lines:
            opts.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            grid_text = f"{grid[0]}x{grid[1]} tiles" if grid else "no tiles"
            opts.stdout.write(
                f"{item.label}: {record['prompt_tokens']} prompt tokens "
                f"({record['image_tokens']} image tokens, {grid_text}), mode {mode.name}\n"
            )
        opts.stdout.flush()
    return 1 if failed else 0


def load_engine(args: argparse.Namespace, weights: bool, reporter: Reporter | None) -> Any:
    """The model, loaded once (tests replace this to inject a fake backend)."""
    from common.engine import Engine

    return Engine.load(
        args.model,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        revision=args.revision,
        offline=args.offline,
        weights=weights,
        progress=reporter.loading if reporter is not None else None,
        show_download_progress=not getattr(args, "quiet", False),
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        return _convert(argv[1:])
    verbose = sum(a.count("v") for a in argv if re.fullmatch(r"-v+", a)) + argv.count("--verbose")
    try:
        return _main(argv)
    except KeyboardInterrupt:
        _error("interrupted; finished outputs are kept (run the same command again to resume)")
        return 130
    except UsageError as exc:
        _error(str(exc))
        return 2
    except DsocrError as exc:
        if verbose:
            traceback.print_exc()
        _error(str(exc))
        return 2
    except BrokenPipeError:  # e.g. `dsocr ... | head`
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 1
    except Exception as exc:  # a bug, not a user mistake
        if verbose:
            traceback.print_exc()
        _error(f"internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)")
        return 1


def _convert(argv: list[str]) -> int:
    try:
        from dsocr_mlx.convert import main as convert_main
    except ImportError as exc:
        _error(f"the convert command needs the mlx backend: pip install 'dsocr[mlx]' ({exc})")
        return 2
    try:
        return int(convert_main(argv) or 0)
    except SystemExit as exc:  # its argparse: --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except DsocrError as exc:
        _error(str(exc))
        return 2


def _main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    _setup_logging(args.verbose)

    prompt = resolve_prompt(args)
    params = _sampling(args)
    pages = parse_page_ranges(args.pages) if args.pages is not None else None

    from common.prompt import IMAGE_TOKEN

    sources = list(args.image) + list(args.inputs)
    if sources.count("-") > 1:
        raise UsageError("stdin ('-') can be given only once")
    if sources:
        if IMAGE_TOKEN not in prompt:
            raise UsageError(
                f"the prompt has no {IMAGE_TOKEN} placeholder, so the input images would be ignored; "
                f"add {IMAGE_TOKEN} where the image goes"
            )
        items = expand_inputs(sources, pages, exclude=args.output)
        if not items:
            raise UsageError("--pages selects no page of the inputs")
    else:
        if IMAGE_TOKEN in prompt:
            raise UsageError(
                f"no input given: pass an image, PDF or folder (or a prompt without {IMAGE_TOKEN} "
                "for text-only generation)"
            )
        items = [WorkItem("", "text", "text")]

    mode = _resolve_mode(args, _model_family(args))  # the model's presets; a bad mode fails before loading it
    out_dir: Path | None = args.output
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"-o {out_dir} exists and is not a folder")
        if not args.dry_run:
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"cannot create -o {out_dir}: {exc.strerror or exc}") from None

    stream_text = out_dir is None and not args.json and not args.dry_run
    live = not args.quiet and sys.stderr.isatty() and not stream_text
    opts = BatchOptions(
        prompt=prompt,
        mode=mode,
        params=params,
        out_dir=out_dir,
        json_lines=args.json,
        stream_text=stream_text,
        overwrite=args.overwrite,
        dpi=args.dpi,
        prefetch=args.prefetch,
        verbose=args.verbose,
    )

    if args.dry_run:
        engine = load_engine(args, weights=False, reporter=None)
        return dry_run(engine, items, opts)

    # Streaming text to this terminal: progress lines would interleave with it, so only failures are reported.
    reporter = Reporter(len(items), quiet=args.quiet or stream_text, live=live)
    try:
        engine = load_engine(args, weights=True, reporter=reporter)
        try:
            outcomes = run_batch(engine, items, opts, reporter)
        finally:
            engine.close()
    finally:
        reporter.close()
    failed = [o for o in outcomes if o.status == "failed"]
    if len(items) > 1 and not args.quiet:
        print_summary(outcomes, out_dir, sys.stderr, live)
    elif failed and len(items) == 1:
        _error(f"{failed[0].item.label}: {failed[0].message}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
