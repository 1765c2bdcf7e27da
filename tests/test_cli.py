"""End-to-end tests of cli.py on the tiny fixture models of both families.

Generation runs in-process on one engine per family loaded once (torch, CPU, float32); a few runs go through a
subprocess for exit codes, stdin and environment-dependent behaviour. A scripted fake backend covers what random
tiny weights never produce (grounding boxes and figures) and Ctrl-C. Expected token counts and ids come from the
fixtures (cases.json and the case tensors).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import cli
from common.documents.postprocess import strip_grounding
from common.documents.workitems import parse_page_ranges, select_pages
from common.engine.engine import Engine
from common.engine.sampling import DEFAULT_MAX_NEW_TOKENS
from common.model.config import load_config
from common.model.families import DEEPSEEK_OCR, DEEPSEEK_OCR_2
from tests import fakes
from tests.conftest import FIXTURES, MODEL_DIR, ROOT, case_by_id, fixture_tokenizer
from tests.helpers import FAST, GEN_FLAGS, json_lines, make_pdf, one_error_line, page_image
from tests.helpers import run_cli as run
from tests.helpers_backend import FAMILIES, FamilyFixtures

V1, V2 = DEEPSEEK_OCR.name, DEEPSEEK_OCR_2.name


class Engines(dict):
    """Each family's tiny model (torch, CPU, float32), loaded on first use."""

    def __missing__(self, family: str) -> Engine:
        self[family] = Engine.load(str(FAMILIES[family].model_dir), backend="torch", device="cpu", dtype="float32")
        return self[family]


@pytest.fixture(scope="module")
def engines() -> Iterator[Engines]:
    loaded = Engines()
    yield loaded
    for engine in loaded.values():
        engine.close()


@pytest.fixture(scope="module")
def real_engine(engines: Engines) -> Engine:
    return engines[V1]


def no_weights(args: Any, weights: bool, reporter: Any) -> Engine:
    """cli.load_engine for a dry run: it must not ask for the weights (the model's tokenizer is loaded once)."""
    assert not weights, "a dry run must not load weights"
    model_dir = Path(args.model)
    return Engine(model_dir, fixture_tokenizer(model_dir), load_config(model_dir))


def default_image_tokens(fixtures: FamilyFixtures, image: str) -> int:
    """The image tokens of `image` (images/NAME.png) in the family's default preset, from its preprocessing
    entries (one per prompt, all with the same count)."""
    [count] = {e["n_image_tokens"] for e in fixtures.entries()
               if e["image"] == image and fixtures.mode_name(e) == fixtures.family.default.name}
    return count


def v2_token_layout() -> tuple[int, int]:
    """DeepSeek-OCR 2's image tokens in its default setting, from the fixtures' entries: (the global view with its
    separator, each tile); every default entry is global + tiles x per tile."""
    fixtures = FAMILIES[V2]
    entries = [e for e in fixtures.entries() if fixtures.mode_name(e) == DEEPSEEK_OCR_2.default.name]
    [global_tokens] = {e["n_image_tokens"] for e in entries if not e["n_local_crops"]}
    per_tile = {(e["n_image_tokens"] - global_tokens) / e["n_local_crops"] for e in entries if e["n_local_crops"]}
    assert len(per_tile) == 1, per_tile
    return global_tokens, int(per_tile.pop())


GROUNDED_TEXT = (
    "<|ref|>title<|/ref|><|det|>[[100, 50, 900, 150]]<|/det|>\n# Quarterly report\n\n"
    "<|ref|>image<|/ref|><|det|>[[100, 200, 600, 700]]<|/det|>\n\n"
    "<|ref|>text<|/ref|><|det|>[[100, 750, 900, 950]]<|/det|>\nRevenue grew."
)


def scripted_engine(text: str = GROUNDED_TEXT, interrupt_on: int | None = None) -> Engine:
    return fakes.script_engine(text, interrupt_on=interrupt_on)


# ------------------------------------------------------------------------------------------ dry run


DRY_RUN_CASES = {
    V1: ["pm01_doc_base", "pm02_doc_gundam", "pm04_receipt_tall_gundam", "pm05_banner_wide_base", "pm07_gray_tiny"],
    V2: ["pm01_doc_default", "pm02_doc_nocrop1024", "pm05_banner_wide_default", "pm08_rgba_nocrop768"],
}


@pytest.mark.parametrize(("family", "case_id"), [(f, c) for f, cases in DRY_RUN_CASES.items() for c in cases])
def test_dry_run_counts_equal_fixtures(family: str, case_id: str, capsys, monkeypatch) -> None:
    """--dry-run's counts, grid and sizes are the official ones; --mode is left out for the family's default."""
    monkeypatch.setattr(cli, "load_engine", no_weights)
    fixtures = FAMILIES[family]
    case, mode = fixtures.case(case_id), fixtures.mode_name(fixtures.case(case_id))
    argv = ["--image", str(fixtures.root / case["image"]), "--prompt", case["prompt"], "--dry-run", "--json"]
    if mode != fixtures.family.default.name:
        argv += ["--mode", mode]
    code, out, _ = run(argv, capsys, monkeypatch, model=fixtures.model_dir)
    assert code == 0
    [record] = json_lines(out)
    assert record["prompt_tokens"] == case["input_len"]
    assert record["image_tokens"] == case["n_image_tokens"]
    expected_grid = case["images_spatial_crop"] if case["n_local_crops"] else None
    assert record["crop_grid"] == expected_grid
    assert record["mode"] == mode
    assert record["tiles"] == case["n_local_crops"]
    assert (record["base_size"], record["image_size"]) == (case["base_size"], case["image_size"])


def test_v2_crop_overrides_in_dry_run(capsys, monkeypatch) -> None:
    """--max-crops and --no-crop on DeepSeek-OCR 2: the counts follow its layout (a global view, then a fixed
    number of tokens per tile; one 768 px view without crops)."""
    monkeypatch.setattr(cli, "load_engine", no_weights)
    fixtures = FAMILIES[V2]
    image = str(fixtures.root / "images" / "doc_text.png")  # 850x1100: (2, 3) tiles by default
    code, out, _ = run([image, "--max-crops", "4", "--dry-run", "--json"], capsys, monkeypatch,
                       model=fixtures.model_dir)
    record = json.loads(out)
    assert code == 0 and record["mode"] == "gundam-custom" and 1 < record["tiles"] <= 4
    global_tokens, per_tile = v2_token_layout()
    assert record["image_tokens"] == global_tokens + per_tile * record["tiles"]
    code, out, _ = run([image, "--no-crop", "--dry-run", "--json"], capsys, monkeypatch, model=fixtures.model_dir)
    record, entry = json.loads(out), fixtures.entry("doc_text.nocrop_768")  # crops off: one 768 px view
    assert code == 0 and record["image_tokens"] == entry["n_image_tokens"]
    assert (record["base_size"], record["image_size"], record["tiles"]) == (entry["base_size"], entry["image_size"], 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_mode_is_the_familys_gundam(family: str, capsys, monkeypatch) -> None:
    """Without --mode each family's model gets its own gundam preset (v1: 640 px tiles, OCR 2: 768 px)."""
    monkeypatch.setattr(cli, "load_engine", no_weights)
    fixtures = FAMILIES[family]
    official = {fixtures.mode_name({"mode": k}): v for k, v in fixtures.manifest()["modes"].items()}["gundam"]
    image = str(FAMILIES[V2].root / "images" / "doc_text.png")
    code, out, _ = run([image, "--dry-run", "--json"], capsys, monkeypatch, model=fixtures.model_dir)
    record = json.loads(out)
    assert code == 0
    assert (record["mode"], record["image_size"], record["base_size"]) == (
        "gundam", official["image_size"], official["base_size"])


def test_dry_run_literal_backslash_n_is_a_newline(capsys, monkeypatch) -> None:
    case = case_by_id("pm01_doc_base")
    shell_prompt = case["prompt"].replace("\n", "\\n")  # what `--prompt "<image>\n..."` passes from a shell
    code, out, _ = run(
        [str(FIXTURES / case["image"]), "--prompt", shell_prompt, "--mode", "base", "--dry-run", "--json"],
        capsys,
        monkeypatch,
    )
    assert code == 0
    assert json_lines(out)[0]["prompt_tokens"] == case["input_len"]


def test_dry_run_multipage_tiff_and_pages(tmp_path, capsys, monkeypatch) -> None:
    tiff = tmp_path / "scan.tiff"
    frames = [page_image(f"frame {i}") for i in range(3)]
    frames[0].save(tiff, save_all=True, append_images=frames[1:])
    code, out, _ = run([str(tiff), "--pages", "2-", "--mode", "tiny", "--dry-run", "--json"], capsys, monkeypatch)
    assert code == 0
    records = json_lines(out)
    assert [r["page"] for r in records] == [2, 3]
    assert all(r["image_tokens"] == case_by_id("pm07_gray_tiny")["n_image_tokens"] for r in records)


# ------------------------------------------------------------------------------------------ generation


@pytest.mark.parametrize(("family", "case_id"), [(V1, "pm01_doc_base"), (V2, "pm08_rgba_nocrop768")])
def test_json_token_ids_match_official_infer(family: str, case_id: str, engines, capsys, monkeypatch) -> None:
    """torch, float32, the default n-gram rule (infer()'s): the CLI's token ids are the official ones."""
    fixtures = FAMILIES[family]
    case, engine = fixtures.case(case_id), engines[family]
    official = case["infer"]
    assert case["generate_kwargs_infer"]["no_repeat_ngram_size"] == engine.family.ngram.size
    code, out, _ = run(
        [
            "--image",
            str(fixtures.root / case["image"]),
            "--prompt",
            case["prompt"],
            "--mode",
            fixtures.mode_name(case),
            "--backend",
            "torch",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--max-new-tokens",
            str(official["n_new"]),
            "--json",
        ],
        capsys,
        monkeypatch,
        engine,
        fixtures.model_dir,
    )
    assert code == 0
    [record] = json_lines(out)
    expected = fixtures.tensors(case_id)["infer.ids"].reshape(-1).tolist()
    assert record["token_ids"] == expected == official["ids"]
    assert record["finish_reason"] == ("stop" if official["stopped_on_eos"] else "length")
    assert record["usage"] == {
        "prompt_tokens": case["input_len"],
        "completion_tokens": official["n_new"],
        "image_tokens": case["n_image_tokens"],
    }
    assert record["crop_grid"] == (case["images_spatial_crop"] if case["n_local_crops"] else None)
    assert record["mode"] == fixtures.mode_name(case)
    assert record["source"] == str(fixtures.root / case["image"]) and record["page"] is None
    assert record["raw_text"] == engine.tokenizer.decode(expected).strip()
    assert set(record["timings"]) >= {"prepare_s", "ttft_s", "total_s"}


@pytest.mark.parametrize(("family", "repo"), [(V1, "deepseek-ai/DeepSeek-OCR"), (V2, "deepseek-ai/DeepSeek-OCR-2")])
def test_hub_repo_id_downloads_config_tokenizer_and_weights(family: str, repo: str, capsys, monkeypatch) -> None:
    """`--model deepseek-ai/DeepSeek-OCR(-2)` goes through the Hub download (config, tokenizer, weights only); the
    downloaded folder is then a model of that family. The Hub is faked: no network."""
    import huggingface_hub

    from common.model.hub import ALLOW_PATTERNS

    fixtures = FAMILIES[family]
    calls: list[tuple[str, dict[str, Any]]] = []

    def fake_snapshot_download(repo_id: str, **kwargs: Any) -> str:
        calls.append((repo_id, kwargs))
        return str(fixtures.model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(cli, "load_engine", no_weights)
    argv = [str(fixtures.root / "images" / "small.png"), "--dry-run", "--json", "-q"]
    code, out, _ = run(argv, capsys, monkeypatch, model=fixtures.family.repo)
    assert code == 0
    assert json.loads(out)["image_tokens"] == default_image_tokens(fixtures, "images/small.png")
    [(requested, kwargs)] = calls  # resolved once, then loaded from the local folder
    assert requested == repo == fixtures.family.repo and kwargs["allow_patterns"] == ALLOW_PATTERNS


def test_pdf_three_pages_outputs_and_json_lines(real_engine, tmp_path, capsys, monkeypatch) -> None:
    pdf = make_pdf(tmp_path / "report.pdf", 3)
    out_dir = tmp_path / "out"
    code, out, err = run(
        [str(pdf), "-o", str(out_dir), "--dpi", "72", "--json", *FAST], capsys, monkeypatch, real_engine
    )
    assert code == 0, err
    records = json_lines(out)
    assert [r["page"] for r in records] == [1, 2, 3]
    for record in records:
        assert record["source"] == str(pdf)
        assert record["image_size"] == [300, 400]  # 72 dpi: one pixel per point
        assert record["usage"]["completion_tokens"] == len(record["token_ids"]) <= 8
        assert record["usage"]["image_tokens"] == case_by_id("pm07_gray_tiny")["n_image_tokens"]
        assert record["finish_reason"] in ("stop", "length")
        stored = json.loads((out_dir / f"report_page{record['page']:03d}.json").read_text())
        assert stored["token_ids"] == record["token_ids"] and stored["boxes"] == []
        md = (out_dir / f"report_page{record['page']:03d}.md").read_text()
        assert md == record["text"].rstrip() + "\n"
    combined = (out_dir / "report.md").read_text()
    assert [combined.find(f"<!-- page {p} -->") >= 0 for p in (1, 2, 3)] == [True] * 3
    assert combined.index("<!-- page 1 -->") < combined.index("<!-- page 2 -->") < combined.index("<!-- page 3 -->")
    assert "[3/3] ok" in err and "dsocr summary" in err


def test_folder_with_corrupt_file_and_resume(real_engine, tmp_path, capsys, monkeypatch) -> None:
    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    page_image("first").save(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    page_image("third").save(folder / "sub" / "c.jpg")
    (folder / "notes.txt").write_text("ignored: not an image")
    out_dir = tmp_path / "out"
    code, out, err = run([str(folder), "-o", str(out_dir), *FAST], capsys, monkeypatch, real_engine)
    assert code == 1
    assert out == ""
    assert (out_dir / "a.md").is_file() and (out_dir / "a.json").is_file()
    assert (out_dir / "sub" / "c.md").is_file() and (out_dir / "sub" / "c.json").is_file()
    assert not (out_dir / "b.json").exists()
    assert "failed" in err and "b.png" in err and "dsocr summary" in err
    a_mtime = (out_dir / "a.json").stat().st_mtime_ns

    # Second run: finished items are skipped, the corrupt one fails again.
    code, out, err = run([str(folder), "-o", str(out_dir), *FAST], capsys, monkeypatch, real_engine)
    assert code == 1
    assert err.count("skipped") >= 2 and "already done" in err
    assert (out_dir / "a.json").stat().st_mtime_ns == a_mtime

    # --json on a resumed run still prints every item: stored records for the skipped ones, an error line for b.
    (folder / "b.png").unlink()
    code, out, _ = run([str(folder), "-o", str(out_dir), "--json", *FAST], capsys, monkeypatch, real_engine)
    assert code == 0
    records = json_lines(out)
    assert [Path(r["source"]).name for r in records] == ["a.png", "c.jpg"]
    assert records[0] == {k: v for k, v in json.loads((out_dir / "a.json").read_text()).items()}

    code, _, err = run([str(folder), "-o", str(out_dir), "--overwrite", *FAST], capsys, monkeypatch, real_engine)
    assert code == 0 and "skipped" not in err.split("dsocr summary")[0]
    assert (out_dir / "a.json").stat().st_mtime_ns != a_mtime


def test_text_only_prompt_and_streaming(real_engine, capsys, monkeypatch) -> None:
    code, out, _ = run(["--prompt", "The quick brown fox", "--json", *GEN_FLAGS], capsys, monkeypatch, real_engine)
    assert code == 0
    [record] = json_lines(out)
    assert record["usage"]["image_tokens"] == 0 and record["crop_grid"] is None and record["source"] == ""
    # Without --json or -o the same generation streams to stdout.
    code, streamed, _ = run(["--prompt", "The quick brown fox", *GEN_FLAGS], capsys, monkeypatch, real_engine)
    assert code == 0
    assert streamed.strip() == strip_grounding(record["raw_text"])


def test_terminal_stream_drops_grounding_markup(tmp_path, capsys, monkeypatch) -> None:
    source = tmp_path / "page.png"
    page_image("streamed").save(source)
    code, streamed, _ = run([str(source), "--mode", "tiny"], capsys, monkeypatch, scripted_engine())
    assert code == 0
    assert streamed.strip() == strip_grounding(GROUNDED_TEXT).strip()
    assert "<|ref|>" not in streamed and "# Quarterly report" in streamed and "Revenue grew." in streamed


@pytest.mark.slow
def test_stdin_subprocess(tmp_path) -> None:
    png = tmp_path / "in.png"
    page_image("from stdin").save(png)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "-", "--model", str(MODEL_DIR), "--json", *FAST],
        input=png.read_bytes(),
        capture_output=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    [record] = json_lines(proc.stdout.decode())
    assert record["source"] == "-" and record["image_size"] == [300, 400]
    assert 1 <= record["usage"]["completion_tokens"] <= 8


# ------------------------------------------------------------------------------------------ scripted backend


def test_grounding_outputs_figures_and_boxes(tmp_path, capsys, monkeypatch) -> None:
    image = page_image("report", size=(1000, 1000))
    source = tmp_path / "page.png"
    image.save(source)
    out_dir = tmp_path / "out"
    code, out, err = run(
        [str(source), "-o", str(out_dir), "--json", "--mode", "tiny"], capsys, monkeypatch, scripted_engine()
    )
    assert code == 0, err
    [record] = json_lines(out)
    md = (out_dir / "page.md").read_text()
    assert "![](page_images/0.jpg)" in md and "# Quarterly report" in md and "<|ref|>" not in md
    crop = Image.open(out_dir / "page_images" / "0.jpg")
    assert crop.size == (500, 500)  # [100, 200, 600, 700] / 999 * 1000 px, truncated like the official code
    assert Image.open(out_dir / "page.boxes.jpg").size == (1000, 1000)
    stored = json.loads((out_dir / "page.json").read_text())
    assert [b["label"] for b in stored["boxes"]] == ["title", "image", "text"]
    assert stored["boxes"][0]["boxes"] == [[100, 50, 900, 150]]
    assert stored["boxes"][0]["points"] == [[100, 50, 900, 150]]
    assert record["finish_reason"] == "stop" and record["raw_text"] == GROUNDED_TEXT
    assert record["boxes"] == stored["boxes"] and record["text"] == stored["text"]
    assert md == record["text"].rstrip() + "\n"


@pytest.mark.slow
def test_output_folder_inside_input_folder_is_not_scanned(tmp_path, capsys, monkeypatch) -> None:
    page_image("report", size=(1000, 1000)).save(tmp_path / "page.png")
    out_dir = tmp_path / "out"
    for _ in range(2):  # the second scan must not pick up out/page_images/0.jpg or out/page.boxes.jpg
        code, out, _ = run(
            [str(tmp_path), "-o", str(out_dir), "--json", "--mode", "tiny"], capsys, monkeypatch, scripted_engine()
        )
        assert code == 0
        assert [Path(r["source"]).name for r in json_lines(out)] == ["page.png"]
    assert (out_dir / "page_images" / "0.jpg").is_file()


def test_ctrl_c_keeps_finished_outputs(tmp_path, capsys, monkeypatch) -> None:
    for name in ("one", "two", "three"):
        page_image(name).save(tmp_path / f"{name}.png")
    out_dir = tmp_path / "out"
    engine = scripted_engine("Hello.", interrupt_on=2)
    code, _, err = run(
        [
            str(tmp_path / "one.png"),
            str(tmp_path / "two.png"),
            str(tmp_path / "three.png"),
            "-o",
            str(out_dir),
            "--mode",
            "tiny",
        ],
        capsys,
        monkeypatch,
        engine,
    )
    assert code == 130
    assert "interrupted" in err and "Traceback" not in err
    assert (out_dir / "one.json").is_file() and (out_dir / "one.md").read_text() == "Hello.\n"
    assert not (out_dir / "two.json").exists() and not (out_dir / "three.json").exists()


@pytest.mark.slow
def test_no_prefetch_gives_same_results(tmp_path, capsys, monkeypatch) -> None:
    pdf = make_pdf(tmp_path / "doc.pdf", 3)
    results = []
    for prefetch in ("0", "2"):
        code, out, _ = run(
            [str(pdf), "--json", "--dpi", "72", "--mode", "tiny", "--prefetch", prefetch],
            capsys,
            monkeypatch,
            scripted_engine("Same."),
        )
        assert code == 0
        results.append([(r["page"], r["text"], r["usage"]) for r in json_lines(out)])
    assert results[0] == results[1] and [r[0] for r in results[0]] == [1, 2, 3]


def test_convert_subcommand_delegates(monkeypatch) -> None:
    import types

    seen: list[list[str]] = []
    fake = types.ModuleType("dsocr_mlx.convert")
    fake.main = lambda argv: seen.append(list(argv)) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dsocr_mlx.convert", fake)
    assert cli.main(["convert", "--model", "a", "--out", "b"]) == 0
    assert seen == [["--model", "a", "--out", "b"]]


# ------------------------------------------------------------------------------------------ user errors


USAGE_ERRORS = [
    (V1, ["missing.png"], "input not found: missing.png"),
    (V1, ["{txt}"], "unsupported input format"),
    (V1, ["{pdf}", "--pages", "3-1"], "bad --pages '3-1'"),
    (V1, ["{pdf}", "--pages", "one"], "bad --pages 'one'"),
    (V1, ["{pdf}", "--pages", "5"], "has 2 page(s); --pages asks for page 5"),
    (V1, ["{png}", "--mode", "huge"], "argument --mode: invalid choice: 'huge'"),
    (V1, ["{png}", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1"),
    (V1, ["{png}", "--temperature", "hot"], "argument --temperature: expected a number"),
    (V1, ["{png}", "--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
    (V1, ["{png}", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (V1, ["{png}", "--task", "locate"], "--task locate needs --ref"),
    (V1, ["{png}", "--prompt", "Free OCR."], "the prompt has no <image> placeholder"),
    (V1, ["--task", "ocr"], "no input given"),
    (V1, ["{png}", "--base-size", "100"], "base"),
    (V1, ["{png}", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    # DeepSeek-OCR 2's presets and view sizes
    (V2, ["{png}", "--mode", "tiny"], "unknown mode 'tiny' for DeepSeek-OCR 2; choose one of gundam, base, small"),
    (V2, ["{png}", "--image-size", "640"], "DeepSeek-OCR 2 tiles must be 768 px"),
    (V2, ["{png}", "--base-size", "1280"], "DeepSeek-OCR 2 global views must be 768 or 1024 px"),
]


@pytest.mark.parametrize(("family", "argv", "message"), USAGE_ERRORS)
def test_usage_errors_exit_2_with_one_line(family, argv, message, tmp_path, capsys, monkeypatch) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("plain text")
    pdf = make_pdf(tmp_path / "two.pdf", 2)
    png = tmp_path / "p.png"
    page_image("x").save(png)
    argv = [a.format(txt=txt, pdf=pdf, png=png) for a in argv]
    monkeypatch.setattr(cli, "load_engine", lambda *a, **k: pytest.fail("the model must not be loaded"))
    code, out, err = run([*argv, "--dry-run"], capsys, monkeypatch, model=FAMILIES[family].model_dir)
    assert code == 2
    assert message in one_error_line(err)
    assert out == ""


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_architecture_exits_2_naming_it(family: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli, "load_engine", lambda *a, **k: pytest.fail("the model must not be loaded"))
    fixtures = FAMILIES[family]
    model = tmp_path / "model"
    shutil.copytree(fixtures.model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["DeepseekOCR3ForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    code, _, err = run([str(fixtures.root / "images" / "small.png")], capsys, monkeypatch, model=model)
    assert code == 2 and "'architectures' = ['DeepseekOCR3ForCausalLM'] is not a supported model" in one_error_line(err)


def test_model_dir_without_weights(tmp_path, capsys, monkeypatch) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (model / name).write_bytes((MODEL_DIR / name).read_bytes())
    png = tmp_path / "p.png"
    page_image("x").save(png)
    code = cli.main([str(png), "--model", str(model), *FAST])
    _, err = capsys.readouterr()
    assert code == 2
    assert "has no weights" in one_error_line(err)


def test_corrupt_single_input_exit_1(tmp_path, capsys, monkeypatch) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    code, out, err = run([str(bad), *FAST], capsys, monkeypatch, scripted_engine())
    assert code == 1 and out == ""
    assert "bad.jpg" in one_error_line(err)


def test_subprocess_exit_codes_offline_and_missing(tmp_path) -> None:
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0")
    png = tmp_path / "p.png"
    page_image("x").save(png)
    offline = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), str(png), "--model", "someone/not-cached", "--offline"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert offline.returncode == 2
    line = one_error_line(offline.stderr)
    assert "someone/not-cached is not in the Hugging Face cache" in line and str(tmp_path / "hf") in line

    missing = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), str(tmp_path / "nope.png"), "--model", str(MODEL_DIR)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert missing.returncode == 2 and missing.stdout == ""
    assert one_error_line(missing.stderr) == f"dsocr: error: input not found: {tmp_path / 'nope.png'}"


def test_help_and_default_max_new_tokens(capsys) -> None:
    assert cli.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--max-new-tokens" in out and f"{DEFAULT_MAX_NEW_TOKENS} as the official infer()" in out
    assert cli.build_parser().parse_args([]).max_new_tokens is None  # as many as fit, up to the default


@pytest.mark.parametrize(("max_new_tokens", "message"), [
    # 4 prompt tokens: 62 would fit the model's context but not --max-context 64 (it was shortened silently).
    ("62", "the prompt (4 tokens) plus max_tokens (62) exceeds each sequence's context (--max-context) of 64 tokens; "
           "ask for at most 60"),
    ("64", "--max-new-tokens 64 does not fit --max-context of 64 tokens with any prompt"),
])
def test_max_new_tokens_that_do_not_fit_max_context_are_refused(max_new_tokens: str, message: str, capsys,
                                                                monkeypatch) -> None:
    code, out, err = run(["--prompt", "Hello there.", "--max-context", "64", "--max-new-tokens", max_new_tokens,
                          *GEN_FLAGS[:6]], capsys, monkeypatch)
    assert code == 2 and out == ""
    assert message in one_error_line(err)


def test_max_new_tokens_that_fit_max_context_run(capsys, monkeypatch) -> None:
    code, out, _ = run(["--prompt", "Hello there.", "--max-context", "64", "--max-new-tokens", "60", "--json",
                        *GEN_FLAGS[:6]], capsys, monkeypatch)
    record = json_lines(out)[0]
    assert code == 0 and record["usage"]["completion_tokens"] + record["usage"]["prompt_tokens"] <= 64


def test_page_ranges() -> None:
    assert parse_page_ranges("1-3,7,10-") == [(1, 3), (7, 7), (10, None)]
    assert select_pages(parse_page_ranges("2,1-2,4-"), 5, "x.pdf", strict=True) == [1, 2, 4, 5]
    assert select_pages(parse_page_ranges("4-"), 3, "x.pdf", strict=False) == []
    assert np.array_equal(select_pages(None, 3, "x.pdf", strict=True), [1, 2, 3])


def _without_timings(path: Path) -> Any:
    if path.suffix == ".json":
        record = json.loads(path.read_text())
        record.pop("timings", None)
        return record
    return path.read_bytes()


def test_batched_run_writes_what_a_sequential_run_writes(real_engine, tmp_path, capsys, monkeypatch) -> None:
    """Pages generated together (--max-batch 4) give the same files and --json lines as one at a time."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i, text in enumerate(("invoice", "receipt", "letter")):
        page_image(text, (300 + 40 * i, 400)).save(folder / f"p{i}.png")
    make_pdf(folder / "doc.pdf", 3)
    results = {}
    for batch in (1, 4):
        real_engine.core.scheduler.max_batch = batch  # what --max-batch sets when the engine loads
        steps_before = dict(real_engine.core.batch_sizes)
        out_dir = tmp_path / f"out{batch}"
        code, out, _ = run([str(folder), "-o", str(out_dir), "--json", "--dpi", "72", *FAST], capsys, monkeypatch,
                           real_engine)
        assert code == 0
        sizes = {k: v - steps_before.get(k, 0) for k, v in real_engine.core.batch_sizes.items()}
        files = {p.relative_to(out_dir): _without_timings(p) for p in sorted(out_dir.rglob("*")) if p.is_file()}
        lines = sorted(json.dumps({k: v for k, v in r.items() if k != "timings"}, sort_keys=True)
                       for r in json_lines(out))
        results[batch] = (files, lines, sizes)
    real_engine.core.scheduler.max_batch = 8
    assert results[4][0] == results[1][0] and len(results[1][0]) >= 12
    assert results[4][1] == results[1][1] and len(results[1][1]) == 6
    assert max(k for k, v in results[1][2].items() if v) == 1
    assert max(k for k, v in results[4][2].items() if v) > 1  # they really ran together
