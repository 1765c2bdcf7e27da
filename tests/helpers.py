"""Helpers shared by the CLI and server tests: running cli.main in-process, a live server on a free port,
and small input makers. (Stand-in backends and engines are in tests/fakes.py.)"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from PIL import Image, ImageDraw

from common.engine.engine import Engine
from tests.conftest import MODEL_DIR
from tests.fakes import Lent

# Real generation in the CLI tests: torch on the CPU in float32, a few tokens.
GEN_FLAGS = ["--backend", "torch", "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "8"]
FAST = ["--mode", "tiny", *GEN_FLAGS]  # 512 px global view, no tiles: DeepSeek-OCR's cheapest real run


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
            engine: Any = None, model: Path | str = MODEL_DIR) -> tuple[int, str, str]:
    """cli.main(["--model", model, *argv]) in-process with `engine` injected (None: main loads the model itself)."""
    import cli

    if engine is not None:
        shared = Lent(engine) if isinstance(engine, Engine) else engine  # main() closes its engine: not this one
        monkeypatch.setattr(cli, "load_engine", lambda args, weights, reporter: shared)
    code = cli.main(["--model", str(model), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def page_image(text: str, size: tuple[int, int] = (300, 400)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((20, 20), text, fill="black")
    return image


def make_pdf(path: Path, pages: int) -> Path:
    images = [page_image(f"Page {i + 1}") for i in range(pages)]
    images[0].save(path, "PDF", save_all=True, append_images=images[1:], resolution=72.0)
    return path


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("dsocr: error: "), err
    assert "Traceback" not in err
    return lines[0]


def data_url(path: Path, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(path.read_bytes()).decode()


def peak_rss_reset() -> bool:
    """Resets this process's peak resident size (False where the system cannot)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """This process's peak resident size since the last reset, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """uvicorn in a background thread on a free loopback port."""

    def __init__(self, app: Any, **bounds: Any) -> None:
        from server import uvicorn_config

        self.app = app
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(app, "127.0.0.1", self.port, log_level="warning", lifespan="on", **bounds)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not become ready")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.base}/metrics", timeout=5).text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))

    def wait_for_metric(self, name: str, value: float, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.metric(name) < value:
            assert time.monotonic() < deadline, f"{name} never reached {value}"
            time.sleep(0.02)
