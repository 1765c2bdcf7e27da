"""Model integrity (common.model.integrity, `dsocr verify`): a fake Hugging Face cache laid out as huggingface_hub
lays it out (blobs named by the Hub's ETag, snapshot links to them), with correct and corrupted files; the Hub's
file list is the real `ModelInfo` class fed the JSON the Hub sends. No network."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
from huggingface_hub.hf_api import ModelInfo

import cli
from common.errors import ModelNotFoundError
from common.model import integrity
from common.model.hub import resolve_model
from common.model.integrity import ModelIntegrityError, check_model, snapshot_of, verify_download
from tests.conftest import MODEL_DIR

REPO = "acme/tiny-ocr"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeCache:
    root: Path  # HF_HUB_CACHE
    files: dict[str, bytes]

    @property
    def repo_folder(self) -> Path:
        return self.root / ("models--" + REPO.replace("/", "--"))

    @property
    def snapshot(self) -> Path:
        return self.repo_folder / "snapshots" / COMMIT

    def etag(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else git_blob_id(data)

    def blob(self, name: str) -> Path:
        return self.repo_folder / "blobs" / self.etag(name)

    def corrupt(self, name: str) -> None:
        data = bytearray(self.blob(name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        self.blob(name).write_bytes(bytes(data))

    def siblings(self) -> list[dict[str, Any]]:
        """The `siblings` of GET /api/models/REPO/revision/COMMIT?blobs=true."""
        out = []
        for name, data in self.files.items():
            entry: dict[str, Any] = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
            if name.endswith(".safetensors"):
                entry["blobId"] = hashlib.sha1(b"lfs pointer of " + name.encode()).hexdigest()
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            out.append(entry)
        return out


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCache:
    root = tmp_path / "hub"
    files = {
        "config.json": (MODEL_DIR / "config.json").read_bytes(),
        "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}\n',
        "model.safetensors": os.urandom(1 << 20),
    }
    fake = FakeCache(root, files)
    (fake.repo_folder / "blobs").mkdir(parents=True)
    fake.snapshot.mkdir(parents=True)
    (fake.repo_folder / "refs").mkdir()
    (fake.repo_folder / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        fake.blob(name).write_bytes(data)
        (fake.snapshot / name).symlink_to(Path("../../blobs") / fake.etag(name))
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("DSOCR_MODEL", raising=False)
    return fake


@pytest.fixture
def hub(cache: FakeCache, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The Hub's model_info answered from the fake cache's files (as the Hub holds them); returns the calls."""
    calls: list[dict[str, Any]] = []

    def model_info(self: Any, repo_id: str, **kwargs: Any) -> ModelInfo:
        calls.append({"repo_id": repo_id, **kwargs})
        return ModelInfo(id=repo_id, sha=COMMIT, siblings=cache.siblings())

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    return calls


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    def model_info(self: Any, repo_id: str, **kwargs: Any) -> ModelInfo:
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)


def test_git_blob_id_is_git_hash_object() -> None:
    assert git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"  # echo hello | git hash-object --stdin


def test_file_digest_sha256_and_git(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"hello\n")
    assert integrity.file_digest(path, "git") == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert integrity.file_digest(path, "sha256") == hashlib.sha256(b"hello\n").hexdigest()


def test_snapshot_of_reads_repo_and_commit(cache: FakeCache, tmp_path: Path) -> None:
    snapshot = snapshot_of(cache.snapshot)
    assert snapshot is not None and (snapshot.repo_id, snapshot.commit) == (REPO, COMMIT)
    assert snapshot_of(MODEL_DIR) is None
    assert snapshot_of(cache.repo_folder / "snapshots" / "main") is None  # not a commit hash


def test_every_file_matches_the_hubs_hashes(cache: FakeCache, hub: list[dict[str, Any]]) -> None:
    report = check_model(cache.snapshot)
    assert [(f.name, f.status, f.expected.source if f.expected else None) for f in report.files] == [
        ("config.json", "ok", "hub"), ("model.safetensors", "ok", "hub"), ("tokenizer.json", "ok", "hub")]
    weights = next(f for f in report.files if f.name == "model.safetensors")
    assert weights.expected is not None and weights.expected.kind == "sha256"
    assert report.ok and report.note is None and "the Hub's hashes" in report.summary()
    [call] = hub
    assert call["repo_id"] == REPO and call["revision"] == COMMIT and call["files_metadata"] is True


def test_corrupted_weights_are_an_error_naming_the_file(cache: FakeCache, hub: list[dict[str, Any]]) -> None:
    cache.corrupt("model.safetensors")
    report = check_model(cache.snapshot)
    assert [f.name for f in report.having("mismatch")] == ["model.safetensors"]
    message = str(report.error())
    expected = hashlib.sha256(cache.files["model.safetensors"]).hexdigest()
    assert message.startswith(f"{REPO}@{COMMIT}: model.safetensors is corrupt")
    assert expected[:12] in message and "the Hub publishes" in message
    assert str(cache.blob("model.safetensors")) in message and "\n" not in message


def test_a_changed_config_is_caught_by_its_git_blob_id(cache: FakeCache, hub: list[dict[str, Any]]) -> None:
    cache.blob("tokenizer.json").write_bytes(b'{"version": "2.0"}\n')
    assert [f.name for f in check_model(cache.snapshot).having("mismatch")] == ["tokenizer.json"]


def test_offline_uses_the_hashes_recorded_at_download(cache: FakeCache, no_hub: None) -> None:
    report = check_model(cache.snapshot, offline=True)
    assert report.ok and {f.status for f in report.files} == {"ok"}
    assert report.note is not None and "offline" in report.note
    assert "recorded at download" in report.summary()
    cache.corrupt("model.safetensors")
    report = check_model(cache.snapshot, offline=True)
    assert [f.name for f in report.having("mismatch")] == ["model.safetensors"]
    assert "recorded at download" in str(report.error())


def test_hf_hub_offline_is_honoured(cache: FakeCache, no_hub: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert check_model(cache.snapshot).ok


def test_unreachable_hub_falls_back_and_says_so(cache: FakeCache, monkeypatch: pytest.MonkeyPatch) -> None:
    def model_info(self: Any, repo_id: str, **kwargs: Any) -> ModelInfo:
        raise ConnectionError("Name or service not known\nmore detail")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    report = check_model(cache.snapshot)
    assert report.ok and report.note == f"the Hub's hashes for {REPO} could not be read (ConnectionError: Name or " \
        "service not known)"


def test_unknown_hashes_are_reported_not_failed(cache: FakeCache, no_hub: None, tmp_path: Path) -> None:
    (cache.snapshot / "extra.json").write_text("{}")  # a plain file, not a link to a blob: no recorded hash
    report = check_model(cache.snapshot, offline=True)
    assert report.ok and [f.name for f in report.having("unknown")] == ["extra.json"]
    assert "no known hash for extra.json" in report.summary()
    plain = check_model(MODEL_DIR)  # a folder outside the cache: nothing to compare with, and the Hub is not asked
    assert plain.ok and plain.having("unknown") == plain.files and "--repo" in (plain.note or "")


def test_marker_makes_the_check_run_once(cache: FakeCache, hub: list[dict[str, Any]],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[str] = []
    digest = integrity.file_digest

    def counted(path: Path, *args: Any, **kwargs: Any) -> str:
        hashed.append(path.name)
        return digest(path, *args, **kwargs)

    monkeypatch.setattr(integrity, "file_digest", counted)
    assert verify_download(cache.snapshot) is not None
    assert sorted(hashed) == ["config.json", "model.safetensors", "tokenizer.json"]
    marker = json.loads((cache.repo_folder / ".dsocr" / f"verified-{COMMIT}.json").read_text())
    assert marker["repo"] == REPO and set(marker["checked"].values()) == {"hub"}
    hashed.clear()
    assert verify_download(cache.snapshot) is None and hashed == []  # recorded: nothing hashed again
    cache.corrupt("model.safetensors")  # a changed blob (new mtime) is checked again
    with pytest.raises(ModelIntegrityError, match="model.safetensors is corrupt"):
        verify_download(cache.snapshot)


def test_files_written_beside_the_weights_are_not_the_models(cache: FakeCache, hub: list[dict[str, Any]],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch backend writes its prepared-layout cache into the snapshot after the first check: later starts
    must still find the marker valid, and `dsocr verify` must not report it."""
    assert verify_download(cache.snapshot) is not None
    prepared = cache.snapshot / ".dsocr-prepared"
    prepared.mkdir()
    (prepared / "bfloat16.bin").write_bytes(b"prepared layout")
    (cache.snapshot / ".cache" / "huggingface").mkdir(parents=True)
    (cache.snapshot / ".cache" / "huggingface" / "config.json.metadata").write_text("{}")
    hashed: list[Path] = []
    digest = integrity.file_digest
    monkeypatch.setattr(integrity, "file_digest", lambda path, *args, **kwargs: hashed.append(path) or digest(
        path, *args, **kwargs))
    assert verify_download(cache.snapshot) is None and hashed == []
    assert [f.name for f in check_model(cache.snapshot).files] == ["config.json", "model.safetensors",
                                                                   "tokenizer.json"]


def test_unwritable_marker_still_starts(cache: FakeCache, hub: list[dict[str, Any]],
                                        caplog: pytest.LogCaptureFixture) -> None:
    (cache.repo_folder / ".dsocr").write_text("")  # a file where the marker's folder goes: the write fails
    with caplog.at_level("WARNING"):
        assert verify_download(cache.snapshot) is not None
    assert "runs again at the next start" in caplog.text


def test_resolve_model_checks_a_download(cache: FakeCache, hub: list[dict[str, Any]],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(cache.snapshot))
    assert resolve_model(REPO, show_progress=False) == cache.snapshot
    assert (cache.repo_folder / ".dsocr" / f"verified-{COMMIT}.json").is_file()
    cache.corrupt("model.safetensors")
    with pytest.raises(ModelNotFoundError, match="model.safetensors is corrupt"):  # the start fails, one line
        resolve_model(REPO, show_progress=False)
    assert resolve_model(REPO, show_progress=False, verify=False) == cache.snapshot


# ------------------------------------------------------------ dsocr verify


def test_cli_verify_ok(cache: FakeCache, hub: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["verify", "--model", REPO]) == 0
    out = capsys.readouterr().out
    assert f"{REPO}@{COMMIT}" in out and "  ok        model.safetensors  1.05 MB  sha256 " in out
    assert "3 files (0.00 GB) checked against the Hub's hashes" in out


def test_cli_verify_corrupted_exits_1(cache: FakeCache, hub: list[dict[str, Any]],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    cache.corrupt("model.safetensors")
    assert cli.main(["verify", "--model", REPO, "-q"]) == 1
    captured = capsys.readouterr()
    assert "1 do not match: model.safetensors" in captured.out
    assert captured.err.startswith("dsocr verify: error: ") and "model.safetensors is corrupt" in captured.err


def test_cli_verify_mismatch_unrecords_a_file_corrupted_in_place(cache: FakeCache, hub: list[dict[str, Any]],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Bit rot keeps a file's size and mtime, so the marker still matches: `dsocr verify` finds it and removes the
    marker, and the next start checks again and refuses the file."""
    assert verify_download(cache.snapshot) is not None
    blob = cache.blob("model.safetensors")
    times = (blob.stat().st_atime_ns, blob.stat().st_mtime_ns)
    cache.corrupt("model.safetensors")
    os.utime(blob, ns=times)
    assert verify_download(cache.snapshot) is None  # the marker still matches: a start does not hash
    assert cli.main(["verify", "--model", REPO, "-q"]) == 1
    assert not (cache.repo_folder / ".dsocr" / f"verified-{COMMIT}.json").exists()
    with pytest.raises(ModelIntegrityError, match="model.safetensors is corrupt"):
        verify_download(cache.snapshot)


def test_cli_verify_offline_and_environment(cache: FakeCache, no_hub: None, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSOCR_MODEL", REPO)  # the model the server would load
    monkeypatch.setenv("DSOCR_OFFLINE", "1")
    assert cli.main(["verify", "-q"]) == 0
    assert "checked against the hashes recorded at download" in capsys.readouterr().out


def test_cli_verify_not_downloaded_is_a_usage_error(cache: FakeCache, no_hub: None,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["verify", "--model", "acme/other-model"]) == 2
    err = capsys.readouterr().err
    assert "acme/other-model is not in the Hugging Face cache" in err and "--download" in err
    assert cli.main(["verify", "--model", "/no/such/folder"]) == 2
    assert cli.main(["verify", "--bogus"]) == 2


def test_cli_verify_download_then_check(cache: FakeCache, hub: list[dict[str, Any]],
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    snapshot = cache.snapshot.rename(cache.snapshot.with_name("f" * 40))  # "not cached" until the fake download
    (cache.repo_folder / "refs" / "main").unlink()
    downloads: list[str] = []

    def snapshot_download(repo_id: str, **kwargs: Any) -> str:
        downloads.append(repo_id)
        snapshot.rename(cache.snapshot)
        (cache.repo_folder / "refs" / "main").write_text(COMMIT)
        return str(cache.snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert cli.main(["verify", "--model", REPO, "--download", "-q"]) == 0
    assert downloads == [REPO] and len(hub) == 1  # hashed once, by verify (the download skipped its own check)


def test_cli_verify_folder_against_a_repo(cache: FakeCache, hub: list[dict[str, Any]], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "copy"
    folder.mkdir()
    for name, data in cache.files.items():
        (folder / name).write_bytes(data)
    assert cli.main(["verify", "--model", str(folder), "--repo", REPO, "--revision", "main", "-q"]) == 0
    assert hub[-1]["revision"] == "main" and "3 files" in capsys.readouterr().out
    (folder / "model.safetensors").write_bytes(b"truncated")
    assert cli.main(["verify", "--model", str(folder), "--repo", REPO]) == 1
