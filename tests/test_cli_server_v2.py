"""The CLI and the server with a DeepSeek-OCR 2 model: its presets and defaults, its token counts in --dry-run,
its errors before anything loads, and real generation equal to the official ids."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import cli
from common.engine.engine import Engine
from tests.conftest import FIXTURES_V2, MODEL_DIR, MODEL_DIR_V2, V2_MODE_NAMES, case_by_id_v2, case_tensors_v2


def run(argv: list[str], capsys: pytest.CaptureFixture[str], model: Path = MODEL_DIR_V2) -> tuple[int, str, str]:
    code = cli.main(["--model", str(model), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dsocr: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "case_id", ["pm01_doc_default", "pm02_doc_nocrop1024", "pm05_banner_wide_default", "pm08_rgba_nocrop768"]
)
def test_dry_run_counts_equal_fixtures(case_id: str, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setattr(cli, "load_engine", _no_weights)
    case = case_by_id_v2(case_id)
    mode = V2_MODE_NAMES[case["mode"]]
    argv = [str(FIXTURES_V2 / case["image"]), "--prompt", case["prompt"], "--dry-run", "--json"]
    code, out, _ = run(argv + (["--mode", mode] if mode != "gundam" else []), capsys)  # gundam: the default
    assert code == 0
    [record] = [json.loads(line) for line in out.splitlines()]
    assert (record["prompt_tokens"], record["image_tokens"]) == (case["input_len"], case["n_image_tokens"])
    assert record["crop_grid"] == (case["images_spatial_crop"] if case["n_local_crops"] else None)
    assert (record["mode"], record["tiles"]) == (mode, case["n_local_crops"])
    assert (record["base_size"], record["image_size"]) == (case["base_size"], case["image_size"])


def test_overrides_work_for_v2(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setattr(cli, "load_engine", _no_weights)
    image = str(FIXTURES_V2 / "images" / "doc_text.png")  # 850x1100: (2, 3) tiles by default
    code, out, _ = run([image, "--max-crops", "4", "--dry-run", "--json"], capsys)
    record = json.loads(out)
    assert code == 0 and record["mode"] == "gundam-custom" and record["tiles"] <= 4
    assert record["image_tokens"] == 257 + 144 * record["tiles"]
    code, out, _ = run([image, "--no-crop", "--dry-run", "--json"], capsys)
    assert code == 0 and json.loads(out)["image_tokens"] == 145  # crops off: one 768 px view


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "tiny"], "unknown mode 'tiny' for DeepSeek-OCR 2; choose one of gundam, base, small"),
        (["--image-size", "640"], "DeepSeek-OCR 2 tiles must be 768 px"),
        (["--base-size", "1280"], "DeepSeek-OCR 2 global views must be 768 or 1024 px"),
    ],
)
def test_v2_usage_errors_exit_2_before_loading(argv: list[str], message: str, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli, "load_engine", lambda *a, **k: pytest.fail("the model must not be loaded"))
    code, out, err = run([str(FIXTURES_V2 / "images" / "small.png"), *argv], capsys)
    assert code == 2 and out == ""
    assert message in one_error_line(err)


def test_unknown_architecture_exits_2_naming_it(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli, "load_engine", lambda *a, **k: pytest.fail("the model must not be loaded"))
    model = tmp_path / "model"
    shutil.copytree(MODEL_DIR_V2, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["DeepseekOCR3ForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    code, _, err = run([str(FIXTURES_V2 / "images" / "small.png")], capsys, model)
    assert code == 2 and "'architectures' = ['DeepseekOCR3ForCausalLM'] is not a supported model" in one_error_line(err)


def test_v1_default_mode_is_still_gundam_640(capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli, "load_engine", _no_weights)
    code, out, _ = run([str(FIXTURES_V2 / "images" / "doc_text.png"), "--dry-run", "--json"], capsys, MODEL_DIR)
    record = json.loads(out)
    assert code == 0 and (record["mode"], record["image_size"], record["base_size"]) == ("gundam", 640, 1024)


def test_generation_through_the_cli_equals_official_infer(capsys) -> None:
    """torch, float32, infer()'s n-gram 20: the CLI's token ids are the official ones."""
    case = case_by_id_v2("pm08_rgba_nocrop768")
    argv = [str(FIXTURES_V2 / case["image"]), "--prompt", case["prompt"], "--mode", "small", "--json",
            "--backend", "torch", "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "32"]
    code, out, _ = run(argv, capsys)
    record = json.loads(out)
    assert code == 0 and record["token_ids"] == case_tensors_v2(case["id"])["infer.ids"].tolist()
    assert record["usage"]["image_tokens"] == case["n_image_tokens"] and record["mode"] == "small"


def test_server_uses_the_models_presets() -> None:
    """Requests resolve modes with the loaded model's family: default gundam (768 tiles), 'tiny' refused."""
    from litestar.testing import TestClient

    from server import ServerSettings, create_app

    engine = Engine.load(str(MODEL_DIR_V2), backend="torch", device="cpu", dtype="float32")
    image = "data:image/png;base64," + base64.b64encode((FIXTURES_V2 / "images" / "small.png").read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Free OCR."}]
    body: dict[str, Any] = {"model": "deepseek-ocr", "max_tokens": 4}
    body["messages"] = [{"role": "user", "content": content}]
    try:
        with TestClient(create_app(engine, ServerSettings())) as client:
            ok = client.post("/v1/chat/completions", json=body)
            assert ok.status_code == 200, ok.text
            assert ok.json()["usage"]["prompt_tokens"] == 257 + 5  # BOS, 257 image tokens, "\nFree OCR."
            bad = client.post("/v1/chat/completions", json={**body, "mode": "tiny"})
            assert bad.status_code == 400 and "DeepSeek-OCR 2" in bad.json()["error"]["message"]
            assert client.get("/health").json()["model"]["family"] == "deepseek-ocr-2"
    finally:
        engine.close()


def _no_weights(args: Any, weights: bool, reporter: Any) -> Engine:
    assert not weights, "a dry run must not load weights"
    return Engine.load(args.model, weights=False)


def test_hub_repo_id_of_ocr2_downloads_like_v1(capsys, monkeypatch) -> None:
    """`--model deepseek-ai/DeepSeek-OCR-2` goes through the same Hub download (config, tokenizer, weights only);
    the downloaded folder is then an OCR 2 model. The Hub is faked: no network."""
    import huggingface_hub

    from common.model.families import DEEPSEEK_OCR_2
    from common.model.hub import ALLOW_PATTERNS

    calls: list[tuple[str, dict[str, Any]]] = []

    def fake_snapshot_download(repo_id: str, **kwargs: Any) -> str:
        calls.append((repo_id, kwargs))
        return str(MODEL_DIR_V2)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(cli, "load_engine", _no_weights)
    argv = [str(FIXTURES_V2 / "images" / "small.png"), "--dry-run", "--json", "-q"]
    code, out, _ = run(argv, capsys, Path(DEEPSEEK_OCR_2.repo))
    assert code == 0 and json.loads(out)["image_tokens"] == 257
    [(repo, kwargs)] = calls  # resolved once, then loaded from the local folder
    assert repo == "deepseek-ai/DeepSeek-OCR-2" and kwargs["allow_patterns"] == ALLOW_PATTERNS
