"""End-to-end run of the real Open WebUI against dsocr, recording every request dsocr receives.

What it does: renders a scanned 2-page PDF (text drawn into images, no text layer), starts dsocr's server behind a
small recording reverse proxy, starts Open WebUI (its own virtualenv) with the OpenAI connection pointed at dsocr's
/v1 and Documents -> Content Extraction Engine = External pointed at dsocr, then drives Chromium with Playwright:
attach the PDF in a chat and ask about it; upload a second scanned PDF to a new Knowledge base; ask about the
Knowledge base in a new chat (`#` mention). Every request the proxy forwards is one line of <out>/capture.jsonl
(method, path, headers, the body with binary and base64 parts described instead of copied, the answer). The report
checks that the page text dsocr's `PUT /process` returned appears in each chat completion request Open WebUI sent
afterwards (exit status 0 only then).

Open WebUI runs offline: OFFLINE_MODE, no Ollama, and embeddings served by the proxy itself (a deterministic
bag-of-words stub at /stub-embeddings/v1) so that neither sentence-transformers nor a model download is needed.

Setup (once; nothing here touches the project's environment):
    python3 -m venv /work/venvs/owui && /work/venvs/owui/bin/pip install open-webui playwright
    apt-get install chromium            # Playwright drives this executable; no browser download
Run (from the repository root; dsocr runs with the project's python, the harness with the venv's):
    /work/venvs/owui/bin/python .ci/openwebui_e2e.py --out /tmp/owui-e2e [--save-fixtures tests/fixtures/openwebui]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
API_KEY = "dsocr-e2e-key"
MODEL_ID = "deepseek-ocr"
PAGE_TEXT = [  # the PDF attached in a chat
    ["ACME Harbour Logistics", "Inspection report 2024-117", "Vessel: Northern Tern", "Berth 7, arrived 06:40",
     "Cargo: 412 containers", "Inspector: Dana Whitfield"],
    ["Findings", "1. Two reefer units above -18 C", "2. Lashing rods missing on bay 14",
     "3. Paperwork complete", "Total fee due: 1,980.00 EUR", "Signed at Rotterdam"],
]
KNOWLEDGE_PAGE_TEXT = [  # another PDF, uploaded to the Knowledge base, so the two flows' texts can be told apart
    ["Port of Rotterdam", "Berth allocation 2024-W12", "Berth 7: Northern Tern", "Berth 9: Grey Heron",
     "Pilot on board: 05:55"],
    ["Invoice 88-4410", "Harbour dues 1,250.00 EUR", "Pilotage 730.00 EUR", "Payment within 30 days",
     "Harbour master: J. de Vries"],
]
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
TASK_MARKERS = {  # second line of Open WebUI's task templates (its config.py) -> task name
    "Generate a concise title": "title",
    "Generate 1-3 broad tags": "tags",
    "Predict 3-5 useful messages": "follow_ups",
    "Suggest 3-5 relevant follow-up": "follow_ups",
    "Analyze the chat history to determine the necessity of generating search queries": "queries",
    "You are an autocompletion system": "autocomplete",
    "Your task is to reflect the speaker's likely facial expression": "emoji",
}


# ---------------------------------------------------------------- the scanned PDF

def make_scanned_pdf(path: Path, text: list[list[str]]) -> list[str]:
    """Pages of text drawn into greyscale images and saved as an image-only PDF (nothing to extract)."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    pages = []
    font = ImageFont.load_default(size=34)
    for lines in text:
        page = Image.new("L", (1100, 1420), 247)
        draw = ImageDraw.Draw(page)
        for row, line in enumerate(lines):
            draw.text((90, 110 + row * 70), line, fill=25, font=font)
        pages.append(page.rotate(0.4, fillcolor=247).filter(ImageFilter.GaussianBlur(0.6)).convert("RGB"))
    pages[0].save(path, "PDF", resolution=130.0, save_all=True, append_images=pages[1:])
    return ["\n".join(lines) for lines in text]


# ---------------------------------------------------------------- the recording proxy

def describe_bytes(data: bytes, content_type: str) -> dict[str, Any]:
    return {"binary": True, "content_type": content_type, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "starts_with": data[:8].decode("latin-1")}


def shrink(value: Any) -> Any:
    """JSON with data URLs and long base64 strings replaced by a description (so captures stay readable)."""
    if isinstance(value, dict):
        return {k: shrink(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shrink(v) for v in value]
    if isinstance(value, str) and len(value) > 512:
        match = re.match(r"data:([^;,]+)?(;base64)?,", value)
        if match:
            return f"<data URL {match.group(1)}: {len(value) - match.end()} chars, sha256 " \
                   f"{hashlib.sha256(value.encode()).hexdigest()[:16]}>"
        if re.fullmatch(r"[A-Za-z0-9+/=\s]+", value[:4096]):
            return f"<base64: {len(value)} chars>"
    return value


def summarize_body(data: bytes, content_type: str) -> Any:
    if not data:
        return None
    if "json" in content_type:
        try:
            return shrink(json.loads(data))
        except ValueError:
            pass
    if "text/event-stream" in content_type:
        events, text = [], []
        for line in data.decode("utf-8", "replace").splitlines():
            if line.startswith("data:"):
                payload = line[5:].strip()
                events.append(payload)
                try:
                    for choice in json.loads(payload).get("choices", []):
                        text.append((choice.get("delta") or {}).get("content") or "")
                except (ValueError, AttributeError):
                    pass
        return {"sse_events": len(events), "first_event": events[:1], "last_events": events[-2:],
                "text": "".join(text)}
    if content_type.startswith("text/") or not content_type:
        try:
            return data.decode("utf-8")[:4000]
        except UnicodeDecodeError:
            pass
    return describe_bytes(data, content_type)


def stub_embedding(text: str, dims: int = 64) -> list[float]:
    vector = [0.0] * dims
    for word in re.findall(r"\w+", text.lower()):
        vector[int(hashlib.md5(word.encode()).hexdigest(), 16) % dims] += 1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


class Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.records: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> None:
        with self.lock:
            record["seq"] = len(self.records) + 1
            self.records.append(record)
            with self.path.open("a") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.records)


def make_proxy(upstream: tuple[str, int], recorder: Recorder) -> type[BaseHTTPRequestHandler]:
    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # close-delimited answers: streams pass through as they come

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def handle_any(self) -> None:
            started = time.time()
            body = self.read_body()
            content_type = self.headers.get("Content-Type", "")
            record: dict[str, Any] = {
                "time": round(started, 3), "method": self.command, "path": self.path,
                "headers": dict(self.headers.items()), "body": summarize_body(body, content_type),
                "body_bytes": len(body)}
            if self.path.startswith("/stub-embeddings/"):
                self.answer_embeddings(body, record)
            else:
                self.forward(body, record)
            record["duration_s"] = round(time.time() - started, 3)
            recorder.add(record)

        def answer_embeddings(self, body: bytes, record: dict[str, Any]) -> None:
            texts = json.loads(body or b"{}").get("input", [])
            texts = [texts] if isinstance(texts, str) else texts
            answer = json.dumps({"object": "list", "model": "stub", "usage": {"prompt_tokens": 0, "total_tokens": 0},
                                 "data": [{"object": "embedding", "index": i, "embedding": stub_embedding(t)}
                                          for i, t in enumerate(texts)]}).encode()
            record.update(upstream="stub", status=200, response={"embeddings": len(texts)})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def forward(self, body: bytes, record: dict[str, Any]) -> None:
            record["upstream"] = "dsocr"
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"content-length"}}
            if body or self.command in ("POST", "PUT", "PATCH"):
                headers["Content-Length"] = str(len(body))
            connection = http.client.HTTPConnection(*upstream, timeout=None)
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
                answer = connection.getresponse()
            except OSError as error:
                record.update(status=502, response=f"proxy: dsocr unreachable: {error}")
                self.send_error(502)
                return
            self.send_response_only(answer.status, answer.reason)
            for key, value in answer.getheaders():
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            self.end_headers()
            received, disconnected = [], False
            while chunk := answer.read1(65536):
                received.append(chunk)
                if not disconnected:
                    try:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                    except OSError:  # the client went away (Open WebUI's Stop): stop reading too
                        disconnected = True
                        break
            connection.close()
            data = b"".join(received)
            record.update(status=answer.status, response_headers=dict(answer.getheaders()),
                          response=summarize_body(data, answer.getheader("Content-Type", "")),
                          client_disconnected=disconnected)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = handle_any

    return Proxy


# ---------------------------------------------------------------- processes

def wait_http(url: str, seconds: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"process for {url} exited with {process.returncode}; see its log")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1.0)
    raise SystemExit(f"{url} not up after {seconds:.0f} s")


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    print("$", " ".join(cmd), f"> {log}", flush=True)
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def open_webui_env(args: argparse.Namespace, proxy: str, data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "DATA_DIR": str(data_dir), "WEBUI_AUTH": "False", "WEBUI_SECRET_KEY": "e2e-secret",
        "OFFLINE_MODE": "True", "HF_HUB_OFFLINE": "1", "ANONYMIZED_TELEMETRY": "False", "DO_NOT_TRACK": "True",
        "SCARF_NO_ANALYTICS": "True", "ENABLE_OLLAMA_API": "False",
        # Chat: dsocr's OpenAI-compatible API, through the recording proxy.
        "OPENAI_API_BASE_URL": f"{proxy}/v1", "OPENAI_API_KEY": API_KEY, "DEFAULT_MODELS": MODEL_ID,
        # Documents -> Content Extraction Engine = External; both URL and key must be set or it is ignored.
        "CONTENT_EXTRACTION_ENGINE": "external", "EXTERNAL_DOCUMENT_LOADER_URL": proxy,
        "EXTERNAL_DOCUMENT_LOADER_API_KEY": API_KEY,
        # Embeddings without sentence-transformers (which would download a model): the proxy's stub.
        "RAG_EMBEDDING_ENGINE": "openai", "RAG_EMBEDDING_MODEL": "stub-embedding",
        "RAG_OPENAI_API_BASE_URL": f"{proxy}/stub-embeddings/v1", "RAG_OPENAI_API_KEY": "stub",
        "ENABLE_AUTOCOMPLETE_GENERATION": "True",
    })
    if args.bypass_embedding:
        env["BYPASS_EMBEDDING_AND_RETRIEVAL"] = "True"
    return env


# ---------------------------------------------------------------- the browser

def settle(recorder: Recorder, quiet_s: float, limit_s: float) -> None:
    """Wait until the proxy has seen no request for quiet_s (background tasks follow an answer)."""
    deadline = time.time() + limit_s
    while time.time() < deadline:
        records = recorder.snapshot()
        last = records[-1]["time"] + records[-1]["duration_s"] if records else 0.0
        if time.time() - last > quiet_s:
            return
        time.sleep(1.0)


def wait_for(predicate: Callable[[], bool], limit_s: float, what: str) -> bool:
    deadline = time.time() + limit_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    print(f"  (gave up waiting for {what} after {limit_s:.0f} s)", flush=True)
    return False


def count(recorder: Recorder, method: str, path: str) -> int:
    return sum(r["method"] == method and r["path"].split("?")[0] == path for r in recorder.snapshot())


class Session:
    """One browser page on Open WebUI, with the few gestures the flows need."""

    def __init__(self, page: Any, args: argparse.Namespace, recorder: Recorder, shots: Path) -> None:
        self.page, self.args, self.recorder, self.shots = page, args, recorder, shots

    def open(self, url: str) -> None:
        self.page.goto(url, wait_until="load")  # never "networkidle": Open WebUI keeps a socket busy
        self.page.wait_for_timeout(1500)
        self.dismiss_changelog()

    def dismiss_changelog(self) -> None:
        """The "What's New" dialog of a first visit comes a moment after the page and blocks every click."""
        button = self.page.get_by_role("button", name="Okay, Let's Go!")
        try:
            button.first.wait_for(state="visible", timeout=8000)
        except Exception:  # noqa: BLE001 (Playwright's TimeoutError: no dialog this time)
            return
        button.first.click()
        self.page.wait_for_timeout(500)

    def shot(self, name: str) -> None:
        self.page.screenshot(path=self.shots / f"{name}.png")

    def wait_for_process(self, before: int, what: str) -> None:
        wait_for(lambda: count(self.recorder, "PUT", "/process") > before, self.args.timeout, f"PUT /process ({what})")
        settle(self.recorder, quiet_s=5.0, limit_s=self.args.timeout)

    def ask(self, question: str, name: str) -> None:
        seen = len(self.recorder.snapshot())
        box = self.page.locator("#chat-input")
        box.click()
        box.press_sequentially(question, delay=60)  # typed, so autocomplete tasks fire as they would
        self.page.wait_for_timeout(1500)
        box.press("Enter")
        self.shot(f"{name}-sent")
        wait_for(lambda: any(is_chat_request(r) and question in json.dumps(r["body"], ensure_ascii=False)
                             for r in self.recorder.snapshot()[seen:]), self.args.timeout, "the chat request")
        settle(self.recorder, quiet_s=10.0, limit_s=self.args.timeout)  # title, tags, follow-ups come after
        self.shot(f"{name}-answered")


def drive_browser(args: argparse.Namespace, base: str, pdfs: tuple[Path, Path], recorder: Recorder,
                  shots: Path) -> list[str]:
    from playwright.sync_api import sync_playwright

    notes: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: m.type == "error" and notes.append(f"console: {m.text[:300]}"))
        session = Session(page, args, recorder, shots)
        try:
            run_flows(session, base, pdfs, notes)
        except Exception:
            session.shot("failure")
            raise
        finally:
            browser.close()
    return notes


def run_flows(session: Session, base: str, pdfs: tuple[Path, Path], notes: list[str]) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page = session.page
    pdf, knowledge_pdf = pdfs
    print("browser: chat with the PDF attached", flush=True)
    session.open(base)
    page.wait_for_selector("#chat-input", timeout=120_000)
    before = count(session.recorder, "PUT", "/process")
    page.locator("#input-menu-button").click()
    with page.expect_file_chooser() as chooser:
        page.get_by_text("Upload Files", exact=True).click()
    chooser.value.set_files(str(pdf))
    session.wait_for_process(before, "chat attachment")
    session.shot("chat-attached")
    session.ask("What is the total fee due in this inspection report?", "chat")

    print("browser: Knowledge base upload", flush=True)
    session.open(f"{base}/workspace/knowledge/create")
    page.get_by_placeholder("Name your knowledge base").fill("Inspection reports")
    page.get_by_placeholder("Describe your knowledge base and objectives").fill("Scanned PDFs for the e2e run")
    page.get_by_role("button", name="Create Knowledge").click()
    page.wait_for_url(re.compile(r".*/workspace/knowledge/[0-9a-f-]{8,}"), timeout=60_000)
    # The upload needs the loaded Knowledge base (its id goes with the file): wait for its "Add Content" menu,
    # which is drawn only then, and upload through it as a user would.
    add_content = page.get_by_role("button", name="Add Content")
    add_content.wait_for(state="visible", timeout=60_000)
    before = count(session.recorder, "PUT", "/process")
    add_content.click()
    with page.expect_file_chooser() as chooser:
        page.get_by_text("Upload files", exact=True).click()
    chooser.value.set_files(str(knowledge_pdf))
    session.wait_for_process(before, "knowledge base")
    session.shot("knowledge-uploaded")

    print("browser: chat about the Knowledge base (# mention)", flush=True)
    session.open(base)
    page.wait_for_selector("#chat-input", timeout=60_000)
    box = page.locator("#chat-input")
    box.click()
    box.press_sequentially("#Inspection", delay=80)
    try:
        page.locator("button", has_text="Inspection reports").first.click(timeout=15_000)
    except PlaywrightTimeout:
        notes.append("the # Knowledge suggestion did not appear; Knowledge chat skipped")
        session.shot("knowledge-chat-failed")
        return
    page.wait_for_timeout(1000)
    session.ask("Which vessel was inspected?", "knowledge-chat")


# ---------------------------------------------------------------- the report

def last_user_text(body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
            return content or ""
    return ""


def task_name(record: dict[str, Any]) -> str | None:
    """The background task a chat completion request is, or None for the user's own message.

    Only the known task templates count: the user's message with a document starts with "### Task:" too (Open
    WebUI's RAG template, "Respond to the user query using the provided context").
    """
    text = last_user_text(record.get("body"))
    if not text.startswith("### Task:"):
        return None
    return next((name for marker, name in TASK_MARKERS.items() if marker in text[:400]), None)


def is_chat_request(record: dict[str, Any]) -> bool:
    return record["path"].startswith("/v1/chat/completions") and task_name(record) is None


def extracted_pages(records: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    """(seq, "#seq page N", text) for every page a successful PUT /process answered."""
    pages = []
    for r in records:
        if r["method"] == "PUT" and r["path"] == "/process" and 200 <= r.get("status", 0) < 300:
            items = r["response"] if isinstance(r["response"], list) else [r["response"]]
            for item in items:
                if isinstance(item, dict) and str(item.get("page_content", "")).strip():
                    label = (item.get("metadata") or {}).get("page_label", "?")
                    pages.append((r["seq"], f"#{r['seq']} page {label}", item["page_content"]))
    return pages


SOURCE_TAG = re.compile(r'<source id="[^"]*" name="([^"]*)" resource-type="([^"]*)"')


def report(records: list[dict[str, Any]]) -> dict[str, Any]:
    pages = extracted_pages(records)
    chats = [r for r in records if is_chat_request(r)]
    reached = []
    for r in chats:
        text = last_user_text(r["body"])
        # Open WebUI re-chunks the text (and may normalise whitespace): a page counts as found when every stretch
        # of it is in the request (the tiny model's pages share stretches, so one stretch would prove nothing).
        flat = " ".join(text.split())
        found = [label for seq, label, page in pages
                 if seq < r["seq"] and all(snippet in flat for snippet in snippets(page))]
        sources = sorted({f"{kind}: {name}" for name, kind in SOURCE_TAG.findall(text)})
        reached.append({"seq": r["seq"], "question": text.rsplit("\n", 1)[-1], "sources": sources,
                        "pages_found": found})
    return {
        "requests": [{"seq": r["seq"], "method": r["method"], "path": r["path"], "status": r.get("status"),
                      "task": task_name(r), "duration_s": r["duration_s"]} for r in records],
        "process_requests": [r["seq"] for r in records if r["path"] == "/process"],
        "extracted_pages": [label for _, label, _ in pages],
        "chat_requests": reached,
        "text_reached_every_chat": bool(reached) and all(c["pages_found"] for c in reached),
    }


def snippets(page: str, size: int = 60) -> list[str]:
    flat = " ".join(page.split())
    if len(flat) <= size:
        return [flat]
    return [flat[i:i + size] for i in range(0, len(flat) - size, size)] + [flat[-size:]]


VOLATILE_HEADERS = {"host", "content-length"}


def without_prose(value: Any) -> Any:
    """A request body's structure with Open WebUI's own wording left out: message texts become a note of their
    length (their templates are Open WebUI's prose; tests/owui_tasks.py writes them in our words) and every
    "description" of its tools is dropped (their names and parameter schemas stay)."""
    if isinstance(value, dict):
        return {k: without_prose(v) for k, v in value.items() if k != "description"}
    if isinstance(value, list):
        return [without_prose(v) for v in value]
    return value


def request_shape(r: dict[str, Any]) -> dict[str, Any]:
    body = dict(r["body"]) if isinstance(r["body"], dict) else r["body"]
    if isinstance(body, dict) and "messages" in body:
        body["messages"] = [{"role": m.get("role"), "content": f"<{len(str(m.get('content')))} characters>"}
                            for m in body["messages"]]
        body = without_prose(body)
    headers = {k: v for k, v in r["headers"].items() if k.lower() not in VOLATILE_HEADERS}
    return {"method": r["method"], "path": r["path"], "headers": headers, "body": body, "status": r.get("status")}


def save_fixtures(records: list[dict[str, Any]], folder: Path, version: str) -> None:
    """The real client's requests, for tests/test_server_openwebui_replay.py: the first PUT /process (its headers,
    its body described), the first request of each background task and the first chat request."""
    process = next(r for r in records if r["path"] == "/process")
    tasks: dict[str, dict[str, Any]] = {}
    for r in records:
        name = task_name(r) if r["path"].startswith("/v1/chat/completions") else None
        if name and name not in tasks:
            tasks[name] = request_shape(r)
    chat = next(r for r in records if is_chat_request(r))
    item_metadata = [item["metadata"] for item in process["response"]]
    fixture = {"open_webui_version": version, "captured_by": ".ci/openwebui_e2e.py",
               "process": {**request_shape(process), "answer_metadata": item_metadata},
               "tasks": tasks, "chat": request_shape(chat)}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "requests.json"
    path.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


# ---------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/owui-e2e"), help="logs, capture.jsonl, screenshots")
    parser.add_argument("--open-webui", default=str(Path(sys.executable).parent / "open-webui"),
                        help="the open-webui executable (default: next to this python)")
    parser.add_argument("--dsocr-python", default=shutil.which("python3") or "python3",
                        help="python with dsocr's dependencies (default: python3 on PATH)")
    parser.add_argument("--model", default="tests/fixtures/deepseek-ocr/model")
    parser.add_argument("--chromium", default="/usr/lib/chromium/chromium", help="browser executable")
    parser.add_argument("--port", type=int, default=18500, help="first of three ports: dsocr, proxy, Open WebUI")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each step")
    parser.add_argument("--bypass-embedding", action="store_true", help="Open WebUI's Bypass Embedding and Retrieval")
    parser.add_argument("--save-fixtures", type=Path, help="write the request shapes for tests into this folder")
    parser.add_argument("--dsocr-arg", action="append", default=[], help="extra dsocr flag (repeatable)")
    args = parser.parse_args()

    out: Path = args.out
    shutil.rmtree(out, ignore_errors=True)
    (out / "shots").mkdir(parents=True)
    pdfs = out / "scanned-report.pdf", out / "harbour-invoice.pdf"
    make_scanned_pdf(pdfs[0], PAGE_TEXT)
    make_scanned_pdf(pdfs[1], KNOWLEDGE_PAGE_TEXT)
    dsocr_port, proxy_port, webui_port = args.port, args.port + 1, args.port + 2
    proxy_url, webui_url = f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{webui_port}"

    recorder = Recorder(out / "capture.jsonl")
    proxy = ThreadingHTTPServer(("127.0.0.1", proxy_port), make_proxy(("127.0.0.1", dsocr_port), recorder))
    proxy.daemon_threads = True
    threading.Thread(target=proxy.serve_forever, daemon=True).start()

    processes, version, notes = [], "?", []
    try:
        dsocr = start([args.dsocr_python, "server.py", "--model", args.model, "--device", "cpu", "--mode", "tiny",
                       "--api-key", API_KEY, "--host", "127.0.0.1", "--port", str(dsocr_port),
                       "--max-new-tokens", "96", "--max-text-tokens", "48", "-v", *args.dsocr_arg],
                      out / "dsocr.log", cwd=REPO)
        processes.append(dsocr)
        webui = start([args.open_webui, "serve", "--host", "127.0.0.1", "--port", str(webui_port)],
                      out / "open-webui.log", env=open_webui_env(args, proxy_url, out / "webui-data"), cwd=out)
        processes.append(webui)
        wait_http(f"http://127.0.0.1:{dsocr_port}/health", 180, dsocr)
        wait_http(f"{webui_url}/health", 300, webui)
        version = json.load(urllib.request.urlopen(f"{webui_url}/api/version")).get("version", "?")
        print(f"dsocr and Open WebUI {version} are up", flush=True)
        try:
            notes = drive_browser(args, webui_url, pdfs, recorder, out / "shots")
        except Exception as error:  # report what was captured up to the failure
            notes = [f"browser run failed: {type(error).__name__}: {str(error)[:1000]}"]
    finally:
        for process in reversed(processes):
            stop(process)
        proxy.shutdown()

    records = recorder.snapshot()
    summary = report(records)
    summary["open_webui_version"] = version
    summary["notes"] = notes
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    for r in summary["requests"]:
        print(f"  #{r['seq']:<3} {r['method']:<6} {r['path']:<40} {r['status']} {r['task'] or ''} {r['duration_s']}s")
    print(f"PUT /process: {summary['process_requests']}, pages extracted: {summary['extracted_pages']}")
    for chat in summary["chat_requests"]:
        print(f"chat request #{chat['seq']} ({chat['question']!r}): sources {chat['sources']}, "
              f"extracted pages in it: {chat['pages_found']}")
    print(f"extracted text reached every chat request: {summary['text_reached_every_chat']}")
    for note in notes:
        print("note:", note)
    if args.save_fixtures:
        save_fixtures(records, args.save_fixtures, version)
    return 0 if len(summary["process_requests"]) >= 2 and summary["text_reached_every_chat"] else 1


if __name__ == "__main__":
    sys.exit(main())
