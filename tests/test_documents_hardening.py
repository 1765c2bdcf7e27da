"""Hardening, round 2: one test (or a few) per defect of documents in and outputs out, numbered as in the review.
"Work a request controls runs on shared threads before it is bounded, and inputs are trusted where they are
counted": PDF pages render in worker processes bounded in time and memory (3), page counts stop at the limit
(5) and are checked against the file (12), every decoder exception is the file's error (10), stdin is capped
(11), a finished output is reused only for its own source (9), and output names and the -o folder are checked
before any work (13, 14). Bounds are generous: they catch minutes and gigabytes, not milliseconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageFile

from common.documents import workitems
from common.documents.document import open_document
from common.documents.images import DEFAULT_MAX_PIXELS, image_frame_count, load_image
from common.documents.outputs import atomic_write
from common.documents.render import RenderLimits, RenderPool, configure_render_pool, render_pool
from common.documents.workitems import expand_inputs
from common.errors import ImageError
from common.memory import rss_bytes
from server import ServerSettings, create_app
from tests.conftest import MODEL_DIR, ROOT, fixture_tokenizer
from tests.fakes import RecordingBackend, fixture_engine, script_engine
from tests.helpers import LiveServer, json_lines, make_pdf, one_error_line, page_image, peak_rss, peak_rss_reset
from tests.helpers import run_cli as run
from tests.hostile import (
    HEAVY_OPERATOR,
    data_url,
    file_chat,
    image_chat,
    pdf_bytes,
    pdf_claiming_pages,
    pdf_content_bomb,
    pdf_repeating_page,
    png_bytes,
    tiff_pages,
    tiff_without_dimensions,
)

MB = 1 << 20
TIME_BOMB = 200_000  # long strokes: 9 KB, ~45 s to render at 144 dpi
MEMORY_BOMB = 6_000_000  # short strokes: 160 KB, ~1.6 GB to load the page


@pytest.fixture
def strict_renderer() -> Iterator[None]:
    """This process's render workers with tight limits: 1.5 s a page, 0.5 GiB each, 2 of them."""
    configure_render_pool(RenderLimits(workers=2, memory_gib=0.5, page_timeout_s=1.5))
    yield
    configure_render_pool(None)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    engine = fixture_engine(RecordingBackend(fixture_tokenizer()))
    with LiveServer(create_app(engine, ServerSettings(mode="tiny", prepare_workers=2))) as live:
        yield live


def post(server: LiveServer, body: object, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=timeout)


def error_message(response: httpx.Response) -> str:
    return str(response.json()["error"]["message"])


def render(pool: RenderPool, pdf: bytes, page: int = 1) -> Image.Image:
    return pool.render(pdf, page, 144, 2_000_000, DEFAULT_MAX_PIXELS)


# ------------------------------------------------------------------------------------------------ 3: content bombs


def test_03_runaway_page_is_killed_and_its_worker_replaced() -> None:
    """A page that draws for minutes is refused at the deadline; the worker is killed, the next page renders."""
    bomb = pdf_content_bomb(TIME_BOMB)
    assert len(bomb) < 10_000
    pool = RenderPool(RenderLimits(workers=1, memory_gib=1, page_timeout_s=0.5))
    try:
        assert render(pool, pdf_bytes([(100, 200)]), 1).size == (200, 400)  # the worker has started
        first = pool.worker_pids()
        t0 = time.monotonic()
        with pytest.raises(ImageError, match=r"page 1 took longer than 0.5 s to render"):
            render(pool, bomb)
        assert time.monotonic() - t0 < 3
        assert pool.worker_pids() == []  # killed, not left drawing
        with pytest.raises(ProcessLookupError):
            os.kill(first[0], 0)
        assert render(pool, pdf_bytes([(100, 200)] * 2), 2).size == (200, 400)  # a fresh worker
    finally:
        pool.close()
    assert pool.worker_pids() == []


def test_03_page_needing_too_much_memory_is_refused() -> None:
    """A page whose operators need gigabytes hits the worker's address-space limit: refused, the caller unharmed."""
    bomb = pdf_content_bomb(MEMORY_BOMB, HEAVY_OPERATOR)
    assert len(bomb) < 200_000
    pool = RenderPool(RenderLimits(workers=1, memory_gib=0.5, page_timeout_s=60))
    before = rss_bytes()
    try:
        with pytest.raises(ImageError, match=r"page 1 needed more than 0.5 GiB to render"):
            render(pool, bomb)
        assert render(pool, pdf_bytes([(100, 200)])).size == (200, 400)
    finally:
        pool.close()
    assert rss_bytes() - before < 100 * MB


def test_03_pages_render_in_worker_processes_in_parallel() -> None:
    """While one page draws for a long time, another renders at once in the other worker (behind the old
    process-wide lock it waited for the first)."""
    pool = RenderPool(RenderLimits(workers=2, memory_gib=1, page_timeout_s=60))
    try:
        with ThreadPoolExecutor(2) as threads:  # start both workers first
            list(threads.map(lambda _: render(pool, pdf_bytes([(100, 100)])), range(2)))
            slow = threads.submit(render, pool, pdf_content_bomb(TIME_BOMB))
            time.sleep(0.2)
            t0 = time.monotonic()
            assert render(pool, pdf_bytes([(300, 400)])).size == (600, 800)
            assert time.monotonic() - t0 < 1.0 and not slow.done()
            pool.close()  # kills the worker still drawing
            with pytest.raises(ImageError):
                slow.result()
    finally:
        pool.close()


@pytest.mark.server
@pytest.mark.slow
def test_03_server_refuses_the_bomb_within_the_deadline_and_answers_others(server: LiveServer,
                                                                           strict_renderer: None) -> None:
    """49 KB used to take 500 MB and 11 s of the server's own process, holding the process-wide pdfium lock so
    every other PDF waited. Now: refused at the deadline, the server's RSS flat, a normal PDF answered at once."""
    normal = file_chat(pdf_bytes([(612, 792)]))
    assert post(server, normal).status_code == 200  # the workers have started
    measured = peak_rss_reset()
    before = rss_bytes()
    with ThreadPoolExecutor(1) as threads:
        t0 = time.monotonic()
        bombed = threads.submit(post, server, file_chat(pdf_content_bomb(TIME_BOMB)))
        time.sleep(0.3)  # the bomb is drawing in one worker
        t1 = time.monotonic()
        answered = post(server, normal)
        normal_s = time.monotonic() - t1
        bomb_pending = not bombed.done()
        refused = bombed.result()
        bomb_s = time.monotonic() - t0
    assert answered.status_code == 200, answered.text
    assert normal_s < 1.0 and bomb_pending, (normal_s, bomb_pending)  # in parallel, not behind the bomb
    assert refused.status_code == 400, refused.text
    assert "page 1 took longer than 1.5 s to render" in error_message(refused)
    assert bomb_s < 1.5 + 3
    memory = post(server, file_chat(pdf_content_bomb(MEMORY_BOMB, HEAVY_OPERATOR)))
    assert memory.status_code == 400 and "needed more than 0.5 GiB" in error_message(memory)
    if measured:
        assert peak_rss() - before < 100 * MB
    assert post(server, normal).status_code == 200


@pytest.mark.slow
def test_03_cli_refuses_the_bomb_and_goes_on(tmp_path: Path, capsys, monkeypatch) -> None:
    """The CLI renders through the same workers (here with DSOCR_RENDER_TIMEOUT=1): the bomb's page fails, the
    other inputs are done."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bomb.pdf").write_bytes(pdf_content_bomb(TIME_BOMB))
    page_image("fine").save(folder / "fine.png")
    monkeypatch.setenv("DSOCR_RENDER_TIMEOUT", "1")
    configure_render_pool(None)
    try:
        t0 = time.monotonic()
        code, out, err = run([str(folder), "--json", "--mode", "tiny", "-q"], capsys, monkeypatch,
                             script_engine("Hello."))
    finally:
        monkeypatch.delenv("DSOCR_RENDER_TIMEOUT")
        configure_render_pool(None)
    assert time.monotonic() - t0 < 20
    records = {Path(r["source"]).name: r for r in json_lines(out)}
    assert code == 1, err
    assert "took longer than 1 s to render" in records["bomb.pdf"]["error"]
    assert records["fine.png"]["text"] == "Hello."


def test_03_render_limits_from_the_environment() -> None:
    limits = RenderLimits.from_environment({"DSOCR_RENDER_WORKERS": "3", "DSOCR_RENDER_TIMEOUT": "7.5",
                                            "DSOCR_RENDER_MEMORY_GB": "2"})
    assert limits == RenderLimits(workers=3, memory_gib=2.0, page_timeout_s=7.5)
    assert RenderLimits.from_environment({}) == RenderLimits(workers=2, memory_gib=4.0, page_timeout_s=30.0)
    with pytest.raises(ImageError, match="DSOCR_RENDER_TIMEOUT"):
        RenderLimits.from_environment({"DSOCR_RENDER_TIMEOUT": "-1"})
    assert render_pool() is render_pool()


# ------------------------------------------------------------------------------------------------ 5: TIFF pages


def test_05_tiff_pages_are_counted_up_to_the_limit() -> None:
    tiff = tiff_pages(40_000)
    assert len(tiff) < 5 * MB
    t0 = time.monotonic()
    assert image_frame_count(tiff, limit=16) == 17
    document = open_document(tiff, max_pages=16)
    assert document.pages == 17 and document.capped
    assert time.monotonic() - t0 < 1  # all 40,000 took half a minute
    few = open_document(tiff_pages(5), max_pages=16)
    assert few.pages == 5 and not few.capped
    assert [few.render(page).size for page in (1, 5)] == [(1, 1), (1, 1)]


@pytest.mark.server
def test_05_server_refuses_a_40000_page_tiff_at_once(server: LiveServer) -> None:
    t0 = time.monotonic()
    response = post(server, image_chat(data_url(tiff_pages(40_000), "image/tiff")))
    assert response.status_code == 400, response.text
    assert "at least 17 images" in error_message(response) and "at most 16" in error_message(response)
    assert time.monotonic() - t0 < 5


def test_05_cli_refuses_a_tiff_longer_than_max_pages(tmp_path: Path, capsys, monkeypatch) -> None:
    tiff = tmp_path / "long.tif"
    tiff.write_bytes(tiff_pages(40_000))
    t0 = time.monotonic()
    code, _, err = run([str(tiff), "--max-pages", "100", "--dry-run"], capsys, monkeypatch)
    assert code == 2 and "long.tif has more than 100 pages" in one_error_line(err)
    assert time.monotonic() - t0 < 5


# ------------------------------------------------------------------------------------------------ 10: decode errors


def test_10_every_decoder_exception_is_the_files_error(monkeypatch) -> None:
    bad = tiff_without_dimensions()
    assert len(bad) < 200
    with pytest.raises(ImageError, match="Missing dimensions"):
        open_document(bad)
    with pytest.raises(ImageError):
        load_image(bad, frame=1)

    def broken_decoder(self: Image.Image) -> None:  # what a decoder bug on a malformed file looks like
        raise KeyError("strip")

    png = png_bytes()
    monkeypatch.setattr(ImageFile.ImageFile, "load", broken_decoder)
    with pytest.raises(ImageError, match="KeyError"):
        load_image(png)


@pytest.mark.server
def test_10_server_answers_400_for_a_malformed_tiff(server: LiveServer) -> None:
    response = post(server, image_chat(data_url(tiff_without_dimensions(), "image/tiff")))
    assert response.status_code == 400, response.text
    assert "image" in error_message(response)


def test_10_cli_folder_goes_on_past_a_malformed_tiff(tmp_path: Path, capsys, monkeypatch) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bad.tif").write_bytes(tiff_without_dimensions())
    page_image("good").save(folder / "good.png")
    out_dir = tmp_path / "out"
    code, out, err = run([str(folder), "-o", str(out_dir), "--json", "--mode", "tiny"], capsys, monkeypatch,
                         script_engine("Hello."))
    assert code == 1 and "internal error" not in err and "Traceback" not in err
    records = {Path(r["source"]).name: r for r in json_lines(out)}
    assert "Missing dimensions" in records["bad.tif"]["error"]
    assert records["good.png"]["text"] == "Hello." and (out_dir / "good.md").read_text() == "Hello.\n"


# ------------------------------------------------------------------------------------------------ 11: stdin


class Zeros:
    """An endless stdin (up to `total` bytes, so that a reader without a cap ends too), counting what is read."""

    def __init__(self, total: int) -> None:
        self.total, self.read_bytes = total, 0

    def read(self, size: int = -1) -> bytes:
        size = self.total - self.read_bytes if size < 0 else min(size, self.total - self.read_bytes)
        self.read_bytes += size
        return bytes(size)


def test_11_stdin_is_read_with_a_cap(capsys, monkeypatch) -> None:
    zeros = Zeros(64 * MB)
    monkeypatch.setattr(workitems, "MAX_STDIN_BYTES", 4 * MB)
    monkeypatch.setattr(sys, "stdin", type("Stdin", (), {"buffer": zeros})())
    code, _, err = run(["-", "--dry-run"], capsys, monkeypatch)
    assert code == 2 and "stdin (input '-') holds more than 4 MiB" in one_error_line(err)
    assert zeros.read_bytes <= 4 * MB + 1


@pytest.mark.slow
def test_11_dev_zero_on_stdin_exits_2(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with open("/dev/zero", "rb") as zero:
        proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "-", "--model", str(MODEL_DIR), "--dry-run"],
                              stdin=zero, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "holds more than 512 MiB" in one_error_line(proc.stderr)
    assert time.monotonic() - t0 < 60


# ------------------------------------------------------------------------------------------------ 12: page counts


def test_12_a_lying_page_tree_is_counted_by_its_pages(tmp_path: Path) -> None:
    liar = tmp_path / "liar.pdf"
    liar.write_bytes(pdf_claiming_pages(1_000_000))
    assert liar.stat().st_size < 600
    t0 = time.monotonic()
    items = expand_inputs([str(liar)], None)
    assert [(item.name, item.page) for item in items] == [("liar_page001", 1)]
    assert time.monotonic() - t0 < 5
    assert open_document(pdf_claiming_pages(50, real=7)).pages == 7
    assert open_document(pdf_bytes([(612, 792)] * 3)).pages == 3
    with pytest.raises(ImageError, match="more than a file of"):  # one page object named 100,000 times
        open_document(pdf_repeating_page(100_000))


def test_12_max_pages_refuses_a_long_document_before_its_items(tmp_path: Path, capsys, monkeypatch) -> None:
    pdf = make_pdf(tmp_path / "three.pdf", 3)
    message = "three.pdf has 3 pages; at most 2 are accepted per document (--max-pages)"
    code, _, err = run([str(pdf), "--max-pages", "2", "--dry-run"], capsys, monkeypatch)
    assert code == 2 and message in one_error_line(err)
    monkeypatch.setenv("DSOCR_MAX_PAGES", "2")
    code, _, err = run([str(pdf), "--dry-run"], capsys, monkeypatch)
    assert code == 2 and message in one_error_line(err)
    page_image("one").save(tmp_path / "one.png")  # in a folder: that document fails, the others go on
    code, out, _ = run([str(tmp_path), "--dry-run", "--json", "--mode", "tiny"], capsys, monkeypatch)
    records = {Path(r["source"]).name: r for r in json_lines(out)}
    assert code == 1 and message in records["three.pdf"]["error"] and records["one.png"]["prompt_tokens"] > 0
    code, out, _ = run([str(pdf), "--max-pages", "3", "--dry-run", "--json", "--mode", "tiny"], capsys, monkeypatch)
    assert code == 0 and len(json_lines(out)) == 3


# ------------------------------------------------------------------------------------------------ 9: resume


def run_folder(folder: Path, out_dir: Path, text: str, capsys, monkeypatch) -> tuple[int, list[dict[str, Any]], str]:
    code, out, err = run([str(folder), "-o", str(out_dir), "--json", "--mode", "tiny", "--dpi", "72"], capsys,
                         monkeypatch, script_engine(text))
    return code, json_lines(out), err


def test_09_resume_never_takes_another_sources_record(tmp_path: Path, capsys, monkeypatch) -> None:
    folder, out_dir = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    page_image("jpg").save(folder / "x_page001.jpg")
    code, records, _ = run_folder(folder, out_dir, "From the JPG.", capsys, monkeypatch)
    assert code == 0 and [r["text"] for r in records] == ["From the JPG."]
    make_pdf(folder / "x.pdf", 1)  # its page 1 would be named x_page001 too
    code, records, err = run_folder(folder, out_dir, "From the PDF.", capsys, monkeypatch)
    assert code == 0, err
    by_source = {Path(r["source"]).name: r for r in records}
    assert by_source["x.pdf"]["text"] == "From the PDF."  # not the JPG's record
    assert by_source["x.pdf"]["input"]["path"] == str((folder / "x.pdf").resolve())
    assert by_source["x_page001.jpg"]["text"] == "From the JPG."  # resumed: its name is its own
    assert "x.pdf: its outputs would take the names of another input's; written as x_pdf" in err
    assert "From the PDF." in (out_dir / "x_pdf.md").read_text()
    outputs = {p.name: json.loads(p.read_text())["source"] for p in out_dir.glob("*.json")}
    assert outputs == {"x_page001.json": str(folder / "x_page001.jpg"), "x_pdf_page001.json": str(folder / "x.pdf")}
    code, records, _ = run_folder(folder, out_dir, "Third run.", capsys, monkeypatch)
    assert code == 0 and [r["text"] for r in records] == ["From the PDF.", "From the JPG."]  # all resumed


def test_09_output_names_of_different_sources_never_collide(tmp_path: Path) -> None:
    for name in ("x_page001.png", "x_page002_page001.png", "x_page002.png"):
        page_image(name).save(tmp_path / name)
    make_pdf(tmp_path / "x.pdf", 2)  # x_page001, x_page002 and x.md
    make_pdf(tmp_path / "x_page002.pdf", 1)  # x_page002_page001 and x_page002.md
    items = expand_inputs([str(tmp_path)], None)
    stems = [item.name for item in items] + sorted({item.group for item in items if item.group})
    assert len(stems) == len(set(stems)), stems
    assert {item.name for item in items if item.kind == "image"} == {"x_page001", "x_page002_page001",
                                                                    "x_page002_png"}


def test_09_changed_source_and_old_records_are_redone(tmp_path: Path, capsys, monkeypatch) -> None:
    folder, out_dir = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    page_image("a").save(folder / "a.png")
    page_image("b").save(folder / "b.png")
    assert run_folder(folder, out_dir, "First.", capsys, monkeypatch)[0] == 0
    page_image("a, edited", (320, 400)).save(folder / "a.png")  # another size, another time
    old = json.loads((out_dir / "b.json").read_text())
    old.pop("input", None)  # as written before records named their source
    (out_dir / "b.json").write_text(json.dumps(old))
    code, records, err = run_folder(folder, out_dir, "Second.", capsys, monkeypatch)
    assert code == 0 and [r["text"] for r in records] == ["Second.", "Second."]
    assert "a.png: redone: the source changed" in err
    assert "b.png: redone: its record does not name its source (written by an older dsocr)" in err


# ------------------------------------------------------------------------------------------------ 13: long names


def test_13_temporary_names_fit_whatever_the_name(tmp_path: Path) -> None:
    longest = tmp_path / ("x" * os.pathconf(tmp_path, "PC_NAME_MAX"))
    atomic_write(longest, "fits")
    assert longest.read_text() == "fits" and [p.name for p in tmp_path.iterdir()] == [longest.name]


def test_13_a_249_character_name_is_written_with_its_boxes(tmp_path: Path, capsys, monkeypatch) -> None:
    """NAME.boxes.jpg of a 245-byte NAME is 255 bytes, the most a name may have: it used to fail at its
    temporary name (.NAME.boxes.jpg.tmp), after the page was generated."""
    stem = "b" * (os.pathconf(tmp_path, "PC_NAME_MAX") - len(".boxes.jpg"))  # 245 on most file systems
    page_image("boxes", (400, 300)).save(tmp_path / f"{stem}.png")
    out_dir = tmp_path / "out"
    grounding = "<|ref|>title<|/ref|><|det|>[[100, 100, 500, 300]]<|/det|>\nHello."
    code, _, err = run([str(tmp_path / f"{stem}.png"), "-o", str(out_dir), "--mode", "tiny"], capsys, monkeypatch,
                       script_engine(grounding))
    assert code == 0, err
    assert (out_dir / f"{stem}.boxes.jpg").is_file() and (out_dir / f"{stem}.json").is_file()
    assert not list(out_dir.glob(".*"))


def test_13_names_too_long_for_the_folder_are_refused_before_any_work(tmp_path: Path, capsys, monkeypatch) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    long = "l" * (limit - 9)  # + ".png": a legal 250-byte name, but NAME.boxes.jpg would be 256 bytes
    page_image("long").save(folder / f"{long}.png")
    page_image("short").save(folder / "short.png")
    out_dir = tmp_path / "out"
    engine = fixture_engine(backend := RecordingBackend(fixture_tokenizer(), "Hello."))
    code, out, err = run([str(folder), "-o", str(out_dir), "--json", "--mode", "tiny"], capsys, monkeypatch, engine)
    records = {Path(r["source"]).name: r for r in json_lines(out)}
    assert code == 1, err
    assert f"longer than the {limit} the file system" in records[f"{long}.png"]["error"]
    assert records["short.png"]["text"] == "Hello."
    assert len(backend.seen) == 1  # the long name was refused before its page was generated
    assert sorted(p.name for p in out_dir.iterdir()) == ["short.json", "short.md"]


# ------------------------------------------------------------------------------------------------ 14: read-only -o


def unwritable_folder(tmp_path: Path) -> Path | None:
    """A folder nobody may write in: a read-only one of our own, else (as root) /sys; None if there is none."""
    mine = tmp_path / "read-only"
    mine.mkdir()
    mine.chmod(0o555)
    for folder in (mine, Path("/sys")):
        try:
            (folder / ".dsocr-probe-test").touch()
        except OSError:
            return folder
        (folder / ".dsocr-probe-test").unlink()
    return None


def test_14_read_only_output_folder_is_a_usage_error(tmp_path: Path, capsys, monkeypatch) -> None:
    folder = unwritable_folder(tmp_path)
    if folder is None:
        pytest.skip("no unwritable folder here")
    page_image("a").save(tmp_path / "a.png")
    engine = fixture_engine(backend := RecordingBackend(fixture_tokenizer(), "Hello."))
    code, _, err = run([str(tmp_path / "a.png"), "-o", str(folder), "--mode", "tiny"], capsys, monkeypatch, engine)
    assert code == 2 and f"cannot write to -o {folder}" in one_error_line(err)
    assert backend.seen == []
