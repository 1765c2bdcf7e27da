"""cli.py with --json-schema / --json-object on the tiny random-weight model (torch, CPU, float32): the output is
the JSON (streamed, --json lines, NAME.json with a parsed `data` field), --task extract is the default prompt,
and bad schemas or flag combinations are one error line with exit code 2 before the model loads."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import cli
from common.engine.engine import Engine
from common.model.families import resolve_mode
from common.model.prompt import extract_fields, task_prompt
from tests.conftest import FIXTURES, MODEL_DIR
from tests.helpers import json_lines, one_error_line, page_image
from tests.helpers import run_cli as run
from tests.structured_cases import SCHEMAS, parses, validated

IMAGE = FIXTURES / "images" / "doc_text.png"
FLAGS = ["--mode", "tiny", "--backend", "torch", "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "160"]


@pytest.fixture(scope="module")
def real_engine() -> Iterator[Engine]:
    engine = Engine.load(str(MODEL_DIR), backend="torch", device="cpu", dtype="float32")
    yield engine
    engine.close()


def schema_file(tmp_path: Path, name: str, schema: Any = None) -> Path:
    path = tmp_path / f"{name}.schema.json"
    path.write_text(json.dumps(SCHEMAS[name] if schema is None else schema, indent=2))
    return path


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=[] if name in ("enums", "string_patterns") else [pytest.mark.slow]) for name in SCHEMAS
])
def test_json_schema_streamed_and_as_json_lines(name: str, real_engine: Engine, tmp_path: Path, capsys,
                                                monkeypatch) -> None:
    argv = [str(IMAGE), "--json-schema", str(schema_file(tmp_path, name)), *FLAGS]
    code, streamed, err = run(argv, capsys, monkeypatch, real_engine)  # no -o, no --json: streams to stdout
    assert code == 0, err
    assert streamed.endswith("}\n")
    validated(streamed.rstrip("\n"), SCHEMAS[name])
    code, out, err = run([*argv, "--json"], capsys, monkeypatch, real_engine)
    assert code == 0, err
    [record] = json_lines(out)
    assert record["text"] == streamed.rstrip("\n") and record["finish_reason"] == "stop"
    assert record["data"] == validated(record["text"], SCHEMAS[name])


@pytest.mark.parametrize(
    "extra",
    [[], pytest.param(["--temperature", "0.8", "--seed", "4"], marks=pytest.mark.slow),
     pytest.param(["--no-repeat-ngram-size", "30", "--ngram-window", "90"], marks=pytest.mark.slow)],
    ids=["greedy", "sampled", "vllm-ngram"],
)
def test_outputs_and_json_lines_carry_the_parsed_data(
    extra: list[str], real_engine: Engine, tmp_path: Path, capsys, monkeypatch
) -> None:
    images = []
    for i in range(3):
        path = tmp_path / f"page{i}.png"
        page_image(f"Invoice {i}: 12.50 EUR").save(path)
        images.append(str(path))
    out_dir = tmp_path / "out"
    schema = SCHEMAS["array_min_max_items"]
    code, out, err = run([*images, "--json-schema", str(schema_file(tmp_path, "array_min_max_items")), "-o",
                          str(out_dir), "--json", *FLAGS, *extra], capsys, monkeypatch, real_engine)
    assert code == 0, err
    records = json_lines(out)
    assert len(records) == 3
    for record in records:
        assert record["finish_reason"] == "stop"
        assert record["data"] == validated(record["text"], schema)
        assert record["text"] == record["raw_text"] and record["boxes"] == []
        name = Path(record["source"]).stem
        stored = json.loads((out_dir / f"{name}.json").read_text())
        assert stored["data"] == record["data"] and stored["text"] == record["text"]
        assert (out_dir / f"{name}.md").read_text() == f"```json\n{record['text']}\n```\n"


def test_extract_is_the_default_prompt_with_a_schema(real_engine: Engine, tmp_path: Path, capsys,
                                                     monkeypatch) -> None:
    schema = schema_file(tmp_path, "required_fields")
    expected = real_engine.prepare(task_prompt("extract", fields=extract_fields(SCHEMAS["required_fields"])),
                                   [Image.open(IMAGE).convert("RGB")], resolve_mode("tiny")).prompt_tokens
    counts = []
    for prompt in ([], ["--task", "extract"], ["--prompt", "<image>\\nFree OCR."]):
        code, out, err = run([str(IMAGE), "--json-schema", str(schema), "--json", *FLAGS, *prompt], capsys,
                             monkeypatch, real_engine)
        assert code == 0, err
        [record] = json_lines(out)
        validated(record["text"], SCHEMAS["required_fields"])
        counts.append(record["usage"]["prompt_tokens"])
    assert counts[0] == counts[1] == expected != counts[2]


def test_json_object(real_engine: Engine, capsys, monkeypatch) -> None:
    code, out, err = run([str(IMAGE), "--json-object", "--json", *FLAGS[:-1], "40", "--temperature", "0.7",
                          "--seed", "3"], capsys, monkeypatch, real_engine)
    assert code == 0, err
    [record] = json_lines(out)
    assert record["text"].startswith("{")
    if record["finish_reason"] == "stop":
        assert isinstance(record["data"], dict) and record["data"] == json.loads(record["text"])
    else:
        assert record["finish_reason"] == "length" and record["data"] is None


def test_budget_ends_the_json_early(real_engine: Engine, tmp_path: Path, capsys, monkeypatch) -> None:
    out_dir = tmp_path / "out"
    code, out, err = run([str(IMAGE), "--json-schema", str(schema_file(tmp_path, "array_min_max_items")), "--json",
                          "-o", str(out_dir), *FLAGS[:-1], "9"], capsys, monkeypatch, real_engine)
    assert code == 0, err
    [record] = json_lines(out)
    assert record["finish_reason"] == "length" and record["usage"]["completion_tokens"] == 9
    assert not parses(record["text"]) and record["data"] is None
    assert json.loads((out_dir / "doc_text.json").read_text())["data"] is None


class NoModel:
    """Fails the test if the CLI tries to load the model."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the model was used ({name}) although the command line was wrong")


BAD = [
    (["--json-schema", "{missing}"], "--json-schema {missing}: cannot read it"),
    (["--json-schema", "{not_json}"], "not valid JSON"),
    (["--json-schema", "{bad_type}"], "invalid JSON schema"),
    (["--json-schema", "{array}"], "a JSON schema must be a JSON object"),
    (["--json-schema", "{ok}", "--json-object"], "--json-schema and --json-object cannot be used together"),
    (["--task", "extract"], "--task extract needs --json-schema FILE"),
    (["--task", "extract", "--json-schema", "{ok}", "--prompt", "x <image>"], "cannot be used together"),
]


@pytest.mark.parametrize(("argv", "needle"), BAD)
def test_bad_structured_flags_are_one_line_exit_2(argv: list[str], needle: str, tmp_path: Path, capsys,
                                                  monkeypatch) -> None:
    files = {"missing": tmp_path / "nope.json", "not_json": tmp_path / "bad.json", "bad_type": tmp_path / "t.json",
             "array": tmp_path / "a.json", "ok": schema_file(tmp_path, "enums")}
    files["not_json"].write_text("{not json")
    files["bad_type"].write_text(json.dumps({"type": "strange"}))
    files["array"].write_text("[1, 2]")
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    code, _, err = run([str(IMAGE), *argv, *FLAGS], capsys, monkeypatch, NoModel())
    assert code == 2
    assert needle.format(missing=files["missing"]) in one_error_line(err)


def test_help_lists_the_flags(capsys) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--json-schema FILE" in out and "--json-object" in out and "extract" in out
