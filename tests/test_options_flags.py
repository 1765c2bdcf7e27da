"""common.options.flags: the CLI reads the same DSOCR_* variables as the server, each parsed by its flag's type;
a bad value is one usage line naming the variable."""

from __future__ import annotations

import argparse

import pytest

import cli
from common.options.flags import model_options, read_environment, variable_of
from tests.helpers import one_error_line


def test_the_cli_reads_the_shared_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"DSOCR_MODEL": "some/repo", "DSOCR_DEVICE": "cpu", "DSOCR_MAX_CONTEXT": "2048",
                        "DSOCR_OFFLINE": "yes", "DSOCR_MAX_NEW_TOKENS": "100", "DSOCR_MODE": "base",
                        "DSOCR_QUANTIZE": "int8"}.items():
        monkeypatch.setenv(name, value)
    args = cli.build_parser().parse_args([])
    assert (args.model, args.device, args.max_context, args.offline) == ("some/repo", "cpu", 2048, True)
    assert (args.max_new_tokens, args.mode, args.quantize) == (100, "base", "int8")
    assert model_options(args).quantize == "int8"
    assert cli.build_parser().parse_args(["--mode", "tiny"]).mode == "tiny"  # the flag wins


@pytest.mark.parametrize(("name", "value", "needle"), [
    ("DSOCR_OFFLINE", "perhaps", "$DSOCR_OFFLINE: expected yes or no, got 'perhaps'"),
    ("DSOCR_MAX_CONTEXT", "8", "$DSOCR_MAX_CONTEXT: must be at least 16"),
    ("DSOCR_DEVICE", "gpu", "$DSOCR_DEVICE: invalid choice: 'gpu'"),
    ("DSOCR_QUANTIZE", "int4", "$DSOCR_QUANTIZE: invalid choice: 'int4'"),
])
def test_a_bad_variable_is_one_usage_line(name: str, value: str, needle: str, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(name, value)
    assert cli.main(["page.png"]) == 2
    assert needle in one_error_line(capsys.readouterr().err)


def test_what_has_no_variable() -> None:
    parser = argparse.ArgumentParser()
    actions = {a.dest: a for a in (parser.add_argument("pos"), parser.add_argument("--stop", action="append"),
                                   parser.add_argument("--json", action="store_true"),
                                   parser.add_argument("-q", "--quiet", action="store_false"))}
    assert variable_of(actions["pos"]) is None and variable_of(actions["stop"]) is None
    assert variable_of(actions["json"]) == "DSOCR_JSON"
    read_environment(parser, {"DSOCR_QUIET": "1", "DSOCR_JSON": "on"})
    assert parser.parse_args(["x"]).quiet is False and parser.parse_args(["x"]).json is True
