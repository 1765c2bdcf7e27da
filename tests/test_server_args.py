"""Server start-up settings: every one a flag and a DSOCR_* variable; bad values are one argparse line, exit 2,
before any model loading."""

from __future__ import annotations

import pytest

import server
from common.engine.engine import ModelOptions


@pytest.fixture(autouse=True)
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ModelOptions, "load", lambda *a, **k: pytest.fail("the model must not be loaded"))


@pytest.mark.parametrize(("argv", "needle"), [
    (["--port", "99999"], "argument --port: must be at most 65535"),
    (["--port", "-1"], "argument --port: must be at least 1"),
    (["--max-body-mb", "nan"], "argument --max-body-mb: expected a finite number"),
    (["--max-body-mb", "inf"], "argument --max-body-mb: expected a finite number"),
    (["--max-queue", "0"], "argument --max-queue: must be at least 1"),
    (["--max-new-tokens", "1000000000000"], "argument --max-new-tokens: must be at most"),
    (["--mode", "huge"], "argument --mode: invalid choice"),
    (["--device", "gpu"], "argument --device: invalid choice"),
])
def test_bad_startup_values_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        server.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"DSOCR_PORT": "9001", "DSOCR_HOST": "0.0.0.0", "DSOCR_MAX_QUEUE": "3", "DSOCR_API_KEY": "k",
           "DSOCR_MAX_IMAGE_TOKENS": "999", "DSOCR_FETCH_TIMEOUT": "2.5", "DSOCR_ALLOW_PRIVATE_URLS": "1",
           "DSOCR_MODEL": "some/repo", "DSOCR_DEVICE": "cpu", "DSOCR_MAX_TEXT_TOKENS": "64",
           "DSOCR_CORS_ORIGINS": "http://a, http://b"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = server.build_parser().parse_args([])
    settings = server.settings_from_args(args)
    assert (args.port, args.host, args.model, args.device) == (9001, "0.0.0.0", "some/repo", "cpu")
    assert settings.max_queue == 3 and settings.api_key == "k" and settings.limits.max_image_tokens == 999
    assert settings.fetch.timeout_s == 2.5 and settings.fetch.allow_private and settings.limits.max_text_tokens == 64
    assert settings.cors_origins == ("http://a", "http://b")
    assert server.build_parser().parse_args(["--port", "9002"]).port == 9002  # the flag wins
    monkeypatch.setenv("DSOCR_PORT", "http")
    with pytest.raises(SystemExit):
        server.build_parser().parse_args([])


def test_help_names_every_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        server.main(["--help"])
    out = capsys.readouterr().out
    for name in ("DSOCR_MODEL", "DSOCR_BACKEND", "DSOCR_DEVICE", "DSOCR_DTYPE", "DSOCR_HOST", "DSOCR_PORT",
                 "DSOCR_API_KEY", "DSOCR_MAX_QUEUE", "DSOCR_MAX_IMAGE_TOKENS", "DSOCR_FETCH_TIMEOUT",
                 "DSOCR_FETCH_MAX_MB", "DSOCR_CORS_ORIGINS", "DSOCR_MAX_TEXT_TOKENS"):
        assert name in out


def test_extraction_settings_as_flags_and_variables(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    defaults = server.settings_from_args(server.build_parser().parse_args([]))
    assert (defaults.max_document_pages, defaults.extract_figures, defaults.model_tasks) == (100, "reference", False)
    env = {"DSOCR_MAX_DOCUMENT_PAGES": "7", "DSOCR_EXTRACT_FIGURES": "embed", "DSOCR_MAX_STORED_FILES": "5",
           "DSOCR_MAX_STORED_MB": "2.5", "DSOCR_MODEL_TASKS": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = server.settings_from_args(server.build_parser().parse_args([]))
    assert (settings.max_document_pages, settings.extract_figures, settings.model_tasks) == (7, "embed", True)
    assert (settings.max_stored_files, settings.max_stored_mb) == (5, 2.5)
    flags = server.build_parser().parse_args(["--max-document-pages", "9", "--extract-figures", "drop"])
    assert (flags.max_document_pages, flags.extract_figures) == (9, "drop")  # the flag wins
    for argv in (["--extract-figures", "inline"], ["--max-document-pages", "0"], ["--max-stored-mb", "-1"]):
        with pytest.raises(SystemExit) as info:
            server.main(argv)
        assert info.value.code == 2 and "Traceback" not in capsys.readouterr().err
