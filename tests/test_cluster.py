"""`dsocr ... -o DIR --ray`: the batch as a Ray Data job on a local 2-CPU Ray cluster, against a local run.

Ray is a test dependency (the `dev` extra installs `ray[data]`), so these tests run in CI rather than skip. The
cluster starts once for the module; each job starts its own generation actors (the tiny model, torch CPU float32).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from PIL import Image

import cli
from common.documents import cluster
from common.documents.workitems import Prepared, WorkItem
from common.engine.engine import Engine
from common.model.families import resolve_mode
from tests import ray_faults
from tests.conftest import FIXTURES, MODEL_DIR, ROOT
from tests.helpers import FAST, json_lines, make_pdf, one_error_line, page_image

RAY_FLAGS = ["--ray", "--ray-actor-cpus", "0.5"]  # two actors and a preparing task fit in 2 CPUs


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    # log_to_driver off: worker output would land in the captured stdout the tests parse as JSON lines. The memory
    # monitor off: on a machine near full memory it kills workers, which the jobs survive, but slowly.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},  # workers import tests.ray_faults
             _system_config={"memory_monitor_refresh_ms": 0})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two images (one in a sub-folder), a 3-page PDF and a corrupt PNG."""
    folder = tmp_path_factory.mktemp("cluster") / "in"
    (folder / "sub").mkdir(parents=True)
    page_image("invoice", (340, 400)).save(folder / "a.png")
    page_image("receipt", (300, 440)).save(folder / "sub" / "b.jpg")
    make_pdf(folder / "doc.pdf", 3)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["--model", str(MODEL_DIR), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def outputs(out_dir: Path) -> dict[str, Any]:
    """Every .md (bytes) and .json (parsed, timings removed) under out_dir."""
    found: dict[str, Any] = {}
    for path in sorted(out_dir.rglob("*")):
        if path.suffix == ".md":
            found[path.relative_to(out_dir).as_posix()] = path.read_bytes()
        elif path.suffix == ".json":
            record = json.loads(path.read_text())
            assert isinstance(record.pop("timings"), dict)
            found[path.relative_to(out_dir).as_posix()] = record
    return found


def differences(got: dict[str, Any], expected: dict[str, Any]) -> str:
    """Each output that differs, field by field (a failure names what changed, not just the file)."""
    lines = []
    for name in sorted(set(got) | set(expected)):
        a, b = got.get(name), expected.get(name)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            lines += [f"{name}.{k}: {a.get(k)!r} != {b.get(k)!r}" for k in fields]
        else:
            lines.append(f"{name}: {a!r} != {b!r}")
    return "\n".join(lines)


def without_timings(records: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps({k: v for k, v in r.items() if k != "timings"}, sort_keys=True) for r in records)


@pytest.fixture(scope="module")
def local_run(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[str], Path]:
    """The reference: the same inputs through the single-machine CLI (outputs, --json lines, the folder)."""
    out_dir = tmp_path_factory.mktemp("local") / "out"
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(["--model", str(MODEL_DIR), str(inputs), "-o", str(out_dir), "--json", "--dpi", "72", *FAST])
    assert code == 1, err.getvalue()  # the corrupt PNG
    found = outputs(out_dir)
    assert len(found) == 11  # a, b, 3 pages (.md + .json each) and doc.md
    return found, without_timings(json_lines(out.getvalue())), out_dir


# ------------------------------------------------------------------------------------------ without a cluster


def test_views_travel_as_bytes_exactly() -> None:
    engine = Engine.load(str(MODEL_DIR), weights=False)
    image = Image.open(FIXTURES / "images" / "receipt_tall.png")
    inputs = engine.prepare("<image>\nFree OCR.", [image], resolve_mode("gundam"))
    views = inputs.images[0]
    assert views.local_views is not None and len(views.local_views) > 1
    for array in (views.global_view, views.local_views):
        codes = cluster.encode_views(array)
        assert codes.dtype == np.uint8 and codes.nbytes * 4 == array.nbytes
        np.testing.assert_array_equal(cluster.decode_views(codes), array)
    odd = views.global_view + np.float32(1e-3)  # not a value the pixel table makes: sent as it is
    assert cluster.encode_views(odd) is odd

    prepared = Prepared(WorkItem("x.png", "image", "x"), image, inputs, 0.5, error=ValueError("boom"))
    back, error = cluster.unpack_prepared(cluster.pack_prepared(prepared))
    assert error == "ValueError: boom" and back.image.size == image.size and back.item == prepared.item
    np.testing.assert_array_equal(back.inputs.images[0].local_views, views.local_views)
    np.testing.assert_array_equal(back.inputs.input_ids, inputs.input_ids)


def test_without_ray_one_clear_line(inputs: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    code, out, err = run([str(inputs), "-o", str(tmp_path / "out"), "--ray", *FAST], capsys)
    assert code == 2 and out == ""
    assert "pip install 'dsocr[ray]'" in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_resource_check() -> None:
    cluster._check_resources({"CPU": 8.0, "GPU": 2.0}, 2, 1.0, gpu=True)
    cluster._check_resources({"CPU": 2.0}, 2, 0.5, gpu=False)
    with pytest.raises(cluster.ClusterError, match="need a GPU each; the Ray cluster has 2 GPU"):
        cluster._check_resources({"CPU": 8.0, "GPU": 2.0}, 3, 1.0, gpu=True)
    with pytest.raises(cluster.ClusterError, match="has no GPU"):
        cluster._check_resources({"CPU": 8.0}, 1, 1.0, gpu=True)
    with pytest.raises(cluster.ClusterError, match="leave no CPU to prepare pages"):
        cluster._check_resources({"CPU": 8.0}, 4, 2.0, gpu=False)


def test_ray_needs_an_output_folder_and_takes_a_folder_for_an_input(inputs: Path, capsys) -> None:
    code, _, err = run(["--ray", str(inputs), *FAST], capsys)  # argparse hands the folder to --ray
    assert code == 2 and "-o DIR" in one_error_line(err)
    args = cli.build_parser().parse_args(["--ray", str(inputs), "-o", "out"])
    cluster.check_ray_args(args)
    assert args.ray == "auto" and args.inputs == [str(inputs)]
    args = cli.build_parser().parse_args([str(inputs), "--ray", "10.0.0.5:6379", "-o", "out"])
    cluster.check_ray_args(args)
    assert args.ray == "10.0.0.5:6379" and args.inputs == [str(inputs)]


# ------------------------------------------------------------------------------------------ on the cluster


PAGES = ["a", "sub/b", "doc_page001", "doc_page002", "doc_page003"]


def writes(root: Path) -> list[tuple[str, int, int]]:
    """(page, pid, largest batch so far) per page an actor wrote (tests.ray_faults.RecordingGenerator)."""
    return [(name, int(pid), int(batch)) for name, pid, batch in
            (line.split() for line in (root / "writes.log").read_text().splitlines())]


@pytest.mark.ray
@pytest.mark.slow
def test_same_outputs_as_a_local_run_then_resume(
    ray_cluster, inputs, local_run, tmp_path, capsys, monkeypatch
) -> None:
    """One actor decoding up to 4 pages together writes what the local CLI writes; a second run skips them."""
    monkeypatch.setattr(cluster, "PageGenerator", ray_faults.BatchingGenerator)
    out_dir = tmp_path / "out"
    argv = [str(inputs), "-o", str(out_dir), "--json", "--dpi", "72", *FAST, *RAY_FLAGS, "--max-batch", "4"]
    code, out, err = run(argv, capsys)
    assert code == 1, err  # the corrupt PNG failed; everything else finished
    assert outputs(out_dir) == local_run[0], differences(outputs(out_dir), local_run[0])
    assert without_timings(json_lines(out)) == local_run[1]  # the --json lines too (the error line included)
    failed = json_lines((out_dir / "failed.jsonl").read_text())
    assert [(Path(f["source"]).name, f["name"]) for f in failed] == [("broken.png", "broken")]
    assert "not a recognised image format" in failed[0]["error"]
    assert "dsocr summary" in err and "broken.png" in err and "Traceback" not in err
    written = writes(tmp_path)
    assert Counter(name for name, _, _ in written) == Counter(PAGES)
    assert max(batch for _, _, batch in written) > 1  # concurrent calls shared the actor's decode batch

    # Resume: nothing is generated again; a deleted page (and only it) is redone, and the combined file with it.
    times = {p: p.stat().st_mtime_ns for p in out_dir.rglob("*.json")}
    (out_dir / "doc_page002.json").unlink()
    code, out, err = run(argv, capsys)
    assert code == 1
    assert err.count("] skipped ") == 4 and err.count("] ok ") == 1
    redone = [p.name for p, t in times.items() if not p.exists() or p.stat().st_mtime_ns != t]
    assert redone == ["doc_page002.json"]
    assert outputs(out_dir) == local_run[0], differences(outputs(out_dir), local_run[0])
    assert len(json_lines(out)) == 6  # stored records of the skipped pages, the redone page, the error line
    assert [name for name, _, _ in writes(tmp_path)[len(written):]] == ["doc_page002"]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_killed_actors_every_page_written_once(
    ray_cluster, inputs, local_run, tmp_path, capsys, monkeypatch, overwrite
) -> None:
    """Two actors; doc p.2's dies at its first token, doc p.3's right after writing it: Ray restarts them and
    retries their pages, and no page is lost or written twice (with --overwrite, over a finished folder)."""
    monkeypatch.setattr(cluster, "PageGenerator", ray_faults.KillingGenerator)
    out_dir = tmp_path / "out"
    argv = [str(inputs), "-o", str(out_dir), "--json", "--dpi", "72", *FAST, *RAY_FLAGS, "--ray-actors", "2",
            "--max-batch", "2"]
    if overwrite:
        shutil.copytree(local_run[2], out_dir)
        argv.append("--overwrite")
    code, out, err = run(argv, capsys)
    assert code == 1, err  # only the corrupt PNG
    mid = int((tmp_path / "killed-mid-page.pid").read_text())
    after = int((tmp_path / "killed-after-write.pid").read_text())
    written = writes(tmp_path)
    assert Counter(name for name, _, _ in written) == Counter(PAGES)
    pids = {name: pid for name, pid, _ in written}
    assert pids[ray_faults.KILL_MID_PAGE] != mid  # redone by the actor that replaced the killed one
    assert pids[ray_faults.KILL_AFTER_WRITE] == after  # written before the kill, and not again after it
    assert outputs(out_dir) == local_run[0], differences(outputs(out_dir), local_run[0])
    # Ray's own messages about the dead workers stay off stdout, which holds exactly one JSON line per page.
    assert without_timings(json_lines(out)) == local_run[1]
    assert err.count("] ok ") == 5 and err.count("] failed ") == 1
    assert not (out_dir / cluster.JOB_MARKER).exists()


@pytest.mark.ray
@pytest.mark.slow
def test_actors_that_cannot_start_fail_the_job_in_one_line(ray_cluster, inputs, tmp_path, capsys, monkeypatch) -> None:
    out_dir = tmp_path / "out"
    code, out, err = run([str(inputs), "-o", str(out_dir), *FAST, "--ray", "--ray-actors", "2"], capsys)
    assert code == 2 and out == ""  # 2 actors of 1 CPU would leave no CPU of 2 to prepare pages: refused
    assert "leave no CPU to prepare pages" in one_error_line(err)

    monkeypatch.setattr(cluster, "PageGenerator", ray_faults.UnloadableGenerator)
    code, out, err = run([str(inputs), "-o", str(out_dir), *FAST, *RAY_FLAGS], capsys)
    assert code == 2 and out == ""
    assert one_error_line(err).endswith(
        "the Ray job failed: common.errors.ModelNotFoundError: model directory /nowhere does not exist"
    )
