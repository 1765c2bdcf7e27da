"""Issue 14: one test per defect found by the bad-input run, with the bound (time or memory) measured where the
defect was a denial of service. Bounds are generous: they catch gigabytes and minutes, not milliseconds."""

from __future__ import annotations

import concurrent.futures
import errno
import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from common.engine.engine import Engine
from common.memory import rss_bytes
from common.serve.media import FetchPolicy
from server import ServerSettings, create_app
from tests.conftest import MODEL_DIR, ROOT, fixture_tokenizer, model_context
from tests.fakes import RecordingBackend, SlowBackend, fixture_engine, script_engine
from tests.helpers import LiveServer, make_pdf, one_error_line, page_image, peak_rss, peak_rss_reset
from tests.helpers import run_cli as run
from tests.hostile import data_url, file_chat, image_chat, pdf_bytes, png_bomb, png_bytes, text_chat


def fake_engine(backend: object | None = None, max_batch: int | None = None) -> Engine:
    return fixture_engine(backend or RecordingBackend(fixture_tokenizer()), max_batch=max_batch)


class SlowSender(http.server.BaseHTTPRequestHandler):
    """Sends an image one byte per second."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = png_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for byte in body:
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return
            time.sleep(1.0)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    settings = ServerSettings(mode="tiny", fetch=FetchPolicy(allow_private=True, timeout_s=1.5), prepare_workers=2,
                              fetch_workers=4)
    with LiveServer(create_app(fake_engine(), settings)) as live:
        yield live


def post(server: LiveServer, body: object, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=timeout)


# ------------------------------------------------------------------------------------------------ server


@pytest.mark.server
def test_01_tiny_pdf_of_huge_pages_stays_small(server: LiveServer) -> None:
    pdf = pdf_bytes([(5000, 5000)] * 8)
    assert len(pdf) < 2000
    measured = peak_rss_reset()
    assert measured or not sys.platform.startswith("linux"), "cannot reset the peak RSS (/proc/self/clear_refs)"
    before = rss_bytes()
    response = post(server, file_chat(pdf))
    assert response.status_code == 200, response.text
    if measured:  # pages rendered at the mode's size: tens of MB, not the 4 GB of 144-dpi renders
        assert peak_rss() - before < 400 * 1024 * 1024
    three = file_chat(pdf)
    three["messages"][0]["content"] *= 3
    t0 = time.perf_counter()
    refused = post(server, three)
    assert refused.status_code == 400 and "at most 16" in refused.json()["error"]["message"]
    assert time.perf_counter() - t0 < 5  # refused from the page counts, before rendering


@pytest.mark.server
@pytest.mark.slow
def test_02_slow_sender_cannot_outlast_the_fetch_deadline(server: LiveServer) -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowSender)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/slow.png"
    try:
        t0 = time.perf_counter()
        response = post(server, image_chat(url))
        assert response.status_code == 400 and "timed out" in response.json()["error"]["message"]
        assert time.perf_counter() - t0 < 6  # 1.5 s deadline (was 90 s)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            slow = [pool.submit(post, server, image_chat(url)) for _ in range(7)]
            time.sleep(0.2)
            t0 = time.perf_counter()
            unrelated = post(server, image_chat(data_url(png_bytes())))
            unrelated_s = time.perf_counter() - t0
            assert all(f.result().status_code == 400 for f in slow)
        assert unrelated.status_code == 200 and unrelated_s < 6  # not starved by the slow fetches
    finally:
        httpd.shutdown()


@pytest.mark.server
def test_03_stop_strings_bounded(server: LiveServer) -> None:
    t0 = time.perf_counter()
    response = post(server, text_chat(stop=["x" * 200] * 20_000))
    assert response.status_code == 400 and response.json()["error"]["param"] == "stop"
    assert time.perf_counter() - t0 < 10
    assert post(server, text_chat(stop=["a", "", "b"])).status_code == 200  # empty ones ignored


@pytest.mark.server
def test_04_prompt_beyond_context_refused_fast(server: LiveServer) -> None:
    t0 = time.perf_counter()
    response = post(server, text_chat("lorem ipsum " * 21_000))  # 256 KB
    assert response.status_code == 400 and "context" in response.json()["error"]["message"]
    assert time.perf_counter() - t0 < 10
    t0 = time.perf_counter()
    assert post(server, text_chat("next")).status_code == 200
    assert time.perf_counter() - t0 < 10  # the worker was never held


@pytest.mark.server
def test_05_06_07_errors_name_the_field(server: LiveServer) -> None:
    nested = httpx.post(f"{server.base}/v1/chat/completions", content=b'{"messages": ' + b"[" * 100_000 +
                        b"]" * 100_000 + b"}", headers={"Content-Type": "application/json"}, timeout=60)
    assert nested.status_code == 400 and "nested" in nested.json()["error"]["message"]
    seed = post(server, text_chat(seed=2**64))
    assert seed.status_code == 400 and seed.json()["error"]["param"] == "seed"
    top_p = post(server, text_chat(top_p=0))
    assert top_p.status_code == 400 and top_p.json()["error"]["param"] == "top_p"
    empty = httpx.post(f"{server.base}/v1/chat/completions", content=b"", timeout=60)
    assert empty.status_code == 400 and "empty" in empty.json()["error"]["message"]


@pytest.mark.server
@pytest.mark.slow
def test_09_memory_returned_after_large_requests(server: LiveServer) -> None:
    big = data_url(png_bytes((3000, 3000), "gray"))
    post(server, image_chat(big, mode="gundam"))  # warm-up: first-use allocations
    baseline = rss_bytes()
    for _ in range(4):
        assert post(server, image_chat(big, mode="gundam")).status_code == 200
    time.sleep(0.5)
    grown = rss_bytes() - baseline
    assert grown < 150 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MB"


@pytest.mark.server
@pytest.mark.slow
def test_10_disconnect_while_queued_frees_the_slot() -> None:
    tokenizer = fixture_tokenizer()
    engine = fake_engine(SlowBackend(tokenizer.eos_id, prefill_s=0.2, step_s=0.02), max_batch=1)  # one runs at a time
    with LiveServer(create_app(engine, ServerSettings(mode="tiny", max_queue=1, keepalive_s=0.1))) as live:
        long = {"messages": [{"role": "user", "content": "long"}], "max_tokens": 400, "stream": True}
        with httpx.Client(base_url=live.base, timeout=30) as client, \
                client.stream("POST", "/v1/chat/completions", json=long) as running:
            lines = running.iter_lines()  # kept: a dropped iterator would close the stream (a disconnect)
            next(lines)
            live.wait_for_metric("dsocr_requests_running", 1)
            with pytest.raises(httpx.ReadTimeout):  # queued, then its client gives up
                httpx.post(f"{live.base}/v1/chat/completions", json={**long, "stream": False}, timeout=1.0)
            deadline = time.monotonic() + 3
            while live.metric("dsocr_queue_depth") > 0:
                assert time.monotonic() < deadline, "the abandoned request kept its slot"
                time.sleep(0.05)
            queued = client.build_request("POST", "/v1/chat/completions", json={**long, "max_tokens": 1,
                                                                                 "stream": False})
            pool = concurrent.futures.ThreadPoolExecutor(1)
            accepted = pool.submit(httpx.Client(base_url=live.base, timeout=30).send, queued)
            time.sleep(0.5)
            assert not accepted.done()  # waiting in the freed slot behind the running request, not refused
        assert accepted.result().status_code == 200
        pool.shutdown()


# ------------------------------------------------------------------------------------------------ CLI


def test_11_huge_page_ranges_exit_at_once(tmp_path, capsys, monkeypatch) -> None:
    pdf = make_pdf(tmp_path / "two.pdf", 2)
    for ranges in ("1-10000000", "1-10000000000", "3-99999999999999999"):
        t0 = time.perf_counter()
        code, _, err = run([str(pdf), "--pages", ranges, "--dry-run"], capsys, monkeypatch)
        assert code == 2 and "has 2 page(s)" in one_error_line(err)
        assert time.perf_counter() - t0 < 5
    code, out, _ = run([str(tmp_path), "--pages", "1-10000000000", "--dry-run", "--json", "--mode", "tiny"], capsys,
                       monkeypatch)
    assert code == 0 and out.count("\n") == 2  # inside a folder the range is clamped to the pages there


@pytest.mark.slow
def test_12_resume_redoes_empty_or_truncated_json(tmp_path, capsys, monkeypatch) -> None:
    for name in ("a", "b", "c"):
        page_image(name).save(tmp_path / f"{name}.png")
    out_dir = tmp_path / "out"
    argv = [str(tmp_path / f"{n}.png") for n in "abc"] + ["-o", str(out_dir), "--mode", "tiny", "--json"]
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    assert run(argv, capsys, monkeypatch, script_engine("Hello."))[0] == 0
    assert len(synced) >= 6  # every NAME.md and NAME.json reached the disk before its rename
    (out_dir / "a.json").write_text("")
    (out_dir / "b.json").write_text((out_dir / "b.json").read_text()[:40])
    code, out, err = run(argv, capsys, monkeypatch, script_engine("Hello."))
    assert code == 0, err
    assert "Traceback" not in err and err.count("] skipped") == 1  # only c.json was a finished record
    assert len(out.splitlines()) == 3 and '"text": "Hello."' in (out_dir / "a.json").read_text().replace("\n", "")


def test_13_disk_full_on_the_combined_file(tmp_path, capsys, monkeypatch) -> None:
    pdf = make_pdf(tmp_path / "report.pdf", 2)
    out_dir = tmp_path / "out"
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".report.md.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    code, _, err = run([str(pdf), "-o", str(out_dir), "--mode", "tiny", "--dpi", "72"], capsys, monkeypatch,
                       script_engine("Hello."))
    assert code == 1 and "Traceback" not in err
    assert "cannot write report.md: No space left on device" in err and "dsocr summary" in err
    assert not list(out_dir.rglob("*.tmp")) and not (out_dir / "report.md").exists()
    assert (out_dir / "report_page001.json").is_file()  # the pages themselves are kept


@pytest.mark.slow
def test_14_empty_stop_string_is_ignored(tmp_path, capsys, monkeypatch) -> None:
    png = tmp_path / "p.png"
    page_image("x").save(png)
    plain = run([str(png), "--mode", "tiny"], capsys, monkeypatch, script_engine("Hello there."))
    empty = run([str(png), "--mode", "tiny", "--stop", ""], capsys, monkeypatch, script_engine("Hello there."))
    assert plain[0] == empty[0] == 0 and empty[1] == plain[1] and "Hello there." in plain[1]
    code, _, err = run([str(png), "--dry-run", *sum((["--stop", f"s{i}"] for i in range(5)), [])], capsys,
                       monkeypatch)
    assert code == 2 and "at most 4 stop strings" in one_error_line(err)


def test_15_16_option_bounds_and_messages(tmp_path, capsys, monkeypatch) -> None:
    png = tmp_path / "p.png"
    page_image("x").save(png)
    context = model_context()  # no room left for a prompt
    for argv, needle in (
        (["--max-new-tokens", "1000000000000"], "argument --max-new-tokens: must be at most"),
        (["--max-new-tokens", str(context)], f"does not fit the model's context of {context} tokens"),
        (["--seed", str(2**64)], "--seed must be between 0 and"),
        (["--image-size", "63"], "--image-size must be a positive multiple of 64"),
        (["--mode", "tiny", "--image-size", "63"], "--image-size must be a positive multiple of 64"),
    ):
        code, _, err = run([str(png), "--dry-run", *argv], capsys, monkeypatch)
        assert code == 2 and needle in one_error_line(err), err
    empty = tmp_path / "empty.pdf"
    empty.write_bytes(pdf_bytes([]))
    code, _, err = run([str(empty), "--dry-run"], capsys, monkeypatch)
    assert code == 1 and one_error_line(err).endswith("the PDF has no pages")


def test_17_no_pillow_bomb_warning_and_capped_prompt_file(tmp_path) -> None:
    bomb = tmp_path / "big.png"
    bomb.write_bytes(png_bomb(11_000, 10_800))  # 118.8 Mpx: accepted by dsocr's limit, above Pillow's warning
    code = ("import sys; from common.documents.images import image_frame_sizes; from pathlib import Path; "
            f"print(image_frame_sizes(Path({str(bomb)!r}), [0]))")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 0 and "(11000, 10800)" in proc.stdout
    assert "DecompressionBombWarning" not in proc.stderr
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--prompt-file", "/dev/zero", "--dry-run",
                           "--model", str(MODEL_DIR)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "larger than" in one_error_line(proc.stderr)
    assert time.perf_counter() - t0 < 30
