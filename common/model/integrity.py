"""Model integrity: the files of a Hub download checked against the hashes the Hub publishes, once.

A download lands in the Hugging Face cache as `models--ORG--NAME/snapshots/COMMIT/FILE`, each file a link into
`blobs/`. Each file is hashed and compared with what the Hub lists for that commit: the SHA-256 of an LFS file
(the weights), the git blob id of a small one (config, tokenizer). Without the Hub (offline, unreachable) the blob's
own name serves: the cache stores each blob under the hash the Hub sent when it was downloaded. A file whose hash
nobody knows is reported, never failed.

After a download the check runs once: a marker beside the snapshot (`.dsocr/verified-COMMIT.json` in the repo's
cache folder, which the cache tools ignore) records the size and mtime of every blob it hashed, so later starts skip
the hashing until a file changes. `dsocr verify` hashes again regardless.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import ModelNotFoundError

log = logging.getLogger(__name__)

SHA256 = re.compile(r"[0-9a-f]{64}")
GIT_OID = re.compile(r"[0-9a-f]{40}")  # a git blob id (and a commit hash)
CHUNK_BYTES = 8 << 20
HUB_TIMEOUT_S = 10.0
MARKER_VERSION = 1

Progress = Callable[[int], None]  # bytes hashed since the last call


class ModelIntegrityError(ModelNotFoundError):
    """A model file does not match the hash published for it: the download is corrupt (or was changed)."""


class HashesUnavailable(Exception):
    """The Hub's list of hashes could not be read (offline, unreachable, unknown repo or revision)."""


@dataclass(frozen=True)
class Snapshot:
    """A model folder in the Hugging Face cache layout: the repo and commit it holds."""

    repo_id: str
    commit: str
    path: Path

    @property
    def marker(self) -> Path:
        return self.path.parent.parent / ".dsocr" / f"verified-{self.commit}.json"


def snapshot_of(model_dir: Path) -> Snapshot | None:
    """The Snapshot of a folder `.../models--ORG--NAME/snapshots/COMMIT`; None for any other folder."""
    path = Path(os.path.abspath(model_dir))
    repo_folder = path.parent.parent
    if path.parent.name != "snapshots" or not GIT_OID.fullmatch(path.name) or not repo_folder.name.startswith(
        "models--"
    ):
        return None
    return Snapshot(repo_folder.name.removeprefix("models--").replace("--", "/"), path.name, path)


@dataclass(frozen=True)
class Expected:
    """A file's hash as published: `kind` "sha256" (an LFS file) or "git" (git blob id: SHA-1 of "blob SIZE\\0" and
    the content); `source` "hub" (the Hub's list for the commit) or "download" (recorded in the cache)."""

    kind: str
    value: str
    source: str


def published_hashes(repo_id: str, revision: str | None) -> dict[str, Expected]:
    """The hashes the Hub lists for `revision` of `repo_id`, by file name; raises HashesUnavailable."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, timeout=HUB_TIMEOUT_S)
    except Exception as exc:  # offline mode, network, HTTP status: the check falls back, it never blocks a start
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise HashesUnavailable(f"the Hub's hashes for {repo_id} could not be read "
                                f"({type(exc).__name__}{': ' + reason if reason else ''})") from None
    hashes: dict[str, Expected] = {}
    for sibling in info.siblings or []:
        lfs = getattr(sibling, "lfs", None)
        sha256 = getattr(lfs, "sha256", None) if lfs is not None else None
        if sha256:
            hashes[sibling.rfilename] = Expected("sha256", sha256.lower(), "hub")
        elif sibling.blob_id:
            hashes[sibling.rfilename] = Expected("git", sibling.blob_id.lower(), "hub")
    return hashes


def recorded_hashes(model_dir: Path, names: list[str]) -> dict[str, Expected]:
    """The hashes a cache snapshot recorded at download: each link's blob is named after the Hub's ETag, the
    SHA-256 for an LFS file, the git blob id for the others."""
    hashes: dict[str, Expected] = {}
    for name in names:
        link = model_dir / name
        if not link.is_symlink():
            continue
        blob = Path(os.readlink(link)).name
        if SHA256.fullmatch(blob):
            hashes[name] = Expected("sha256", blob, "download")
        elif GIT_OID.fullmatch(blob):
            hashes[name] = Expected("git", blob, "download")
    return hashes


def model_files(model_dir: Path) -> list[str]:
    """Every file of the model folder (links followed), as names relative to it, less hidden files and folders:
    what tools keep beside a model (dsocr's prepared-layout cache `.dsocr-prepared/`, huggingface_hub's `.cache/`
    in a local_dir download) is not the model's, and would make every start hash again."""
    names = (p.relative_to(model_dir) for p in model_dir.rglob("*") if p.is_file())
    return sorted(name.as_posix() for name in names if not any(part.startswith(".") for part in name.parts))


def file_digest(path: Path, kind: str, progress: Progress | None = None) -> str:
    """The file's SHA-256, or its git blob id (kind "git")."""
    size = path.stat().st_size
    digest = hashlib.sha256() if kind == "sha256" else hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            if progress is not None:
                progress(n)
    return digest.hexdigest()


@dataclass
class FileCheck:
    """One file: what it should hash to (None: unknown) and what it does."""

    name: str
    size: int
    expected: Expected | None
    actual: str | None = None

    @property
    def status(self) -> str:
        if self.expected is None or self.actual is None:
            return "unknown"
        return "ok" if self.actual == self.expected.value else "mismatch"


@dataclass
class Report:
    """The outcome of one check: every file, and why hashes were missing (`note`), if they were."""

    model_dir: Path
    where: str  # "REPO@COMMIT" or the folder
    files: list[FileCheck] = field(default_factory=list)
    note: str | None = None
    seconds: float = 0.0

    def having(self, status: str) -> list[FileCheck]:
        return [f for f in self.files if f.status == status]

    @property
    def ok(self) -> bool:
        return not self.having("mismatch")

    def error(self) -> ModelIntegrityError:
        """The error naming each file that does not match, and how to fetch it again."""
        parts = []
        for check in self.having("mismatch"):
            assert check.expected is not None and check.actual is not None
            what = "SHA-256" if check.expected.kind == "sha256" else "git blob id"
            whose = "the Hub publishes" if check.expected.source == "hub" else "recorded at download"
            parts.append(f"{check.name} is corrupt: its {what} is {check.actual[:12]}…, {whose} "
                         f"{check.expected.value[:12]}…; delete {os.path.realpath(self.model_dir / check.name)} "
                         "and run again to download it again")
        return ModelIntegrityError(f"{self.where}: " + "; ".join(parts))

    def summary(self) -> str:
        checked = [f for f in self.files if f.status != "unknown"]
        size = sum(f.size for f in checked) / 1e9
        sources = {f.expected.source for f in checked if f.expected is not None}
        against = ("the Hub's hashes" if sources == {"hub"} else "the hashes recorded at download"
                   if sources == {"download"} else "the Hub's and the recorded hashes")
        text = f"{self.where}: {len(checked)} files ({size:.2f} GB) checked against {against} in {self.seconds:.1f} s"
        if not checked:
            return f"{self.where}: no file could be checked" + (f" ({self.note})" if self.note else "")
        if mismatched := self.having("mismatch"):
            text += f"; {len(mismatched)} do not match: {', '.join(f.name for f in mismatched)}"
        if unknown := self.having("unknown"):
            text += f"; no known hash for {', '.join(f.name for f in unknown)}"
        return text + (f" ({self.note})" if self.note else "")


def check_model(model_dir: Path, *, repo_id: str | None = None, revision: str | None = None,
                offline: bool = False, show_progress: bool = False) -> Report:
    """Hashes every file of `model_dir` and compares it with the Hub's list (`repo_id` at `revision`, by default
    the snapshot's own repo and commit), else with the hashes the cache recorded. Consults no marker."""
    snapshot = snapshot_of(model_dir)
    names = model_files(model_dir)
    repo_id = repo_id or (snapshot.repo_id if snapshot else None)
    revision = revision or (snapshot.commit if snapshot else None)
    expected = recorded_hashes(model_dir, names) if snapshot is not None else {}
    report = Report(model_dir, f"{repo_id}@{revision or 'main'}" if repo_id else str(model_dir))
    if repo_id is None:
        report.note = "a folder outside the Hugging Face cache: pass --repo REPO to compare it with the Hub's hashes"
    elif offline or _offline_from_env():
        report.note = "offline: the Hub's hashes were not read"
    else:
        try:
            expected.update(published_hashes(repo_id, revision))  # the Hub's list wins over the recorded names
        except HashesUnavailable as exc:
            report.note = str(exc)
    report.files = [FileCheck(name, (model_dir / name).stat().st_size, expected.get(name)) for name in names]
    total = sum(f.size for f in report.files if f.expected is not None)
    t0 = time.perf_counter()
    with _progress_bar(total, show_progress) as progress:
        for check in report.files:
            if check.expected is not None:
                check.actual = file_digest(model_dir / check.name, check.expected.kind, progress)
    report.seconds = time.perf_counter() - t0
    return report


def _offline_from_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Progress | None]:
    if not enabled or total < (256 << 20):  # small models hash in a blink
        yield None
        return
    from tqdm.auto import tqdm  # a dependency of huggingface_hub

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="checking hashes", leave=False,
              mininterval=1.0) as bar:
        yield bar.update


# ------------------------------------------------------------ the marker: checked once per snapshot


def _blob_stats(model_dir: Path, names: list[str]) -> dict[str, list[int]]:
    stats = {}
    for name in names:
        st = (model_dir / name).stat()
        stats[name] = [st.st_size, st.st_mtime_ns]
    return stats


def is_recorded(snapshot: Snapshot) -> bool:
    """Whether the marker says every file of the snapshot was checked as it is now (same names, sizes, mtimes)."""
    try:
        marker = json.loads(snapshot.marker.read_text())
        names = model_files(snapshot.path)
        return marker.get("version") == MARKER_VERSION and marker.get("files") == _blob_stats(snapshot.path, names)
    except (OSError, ValueError, AttributeError):
        return False


def record(snapshot: Snapshot, report: Report) -> bool:
    """Writes the marker for a check with no mismatch; False (and a warning) where the cache is read-only. A check
    that found a mismatch removes the marker, so the next start hashes again (a file corrupted in place can keep
    its size and mtime)."""
    if not report.ok:
        with contextlib.suppress(OSError):
            snapshot.marker.unlink(missing_ok=True)
        return False
    marker = {"version": MARKER_VERSION, "repo": snapshot.repo_id, "commit": snapshot.commit,
              "files": _blob_stats(snapshot.path, [f.name for f in report.files]),
              "checked": {f.name: f.expected.source if f.expected and f.actual else None for f in report.files}}
    try:
        snapshot.marker.parent.mkdir(exist_ok=True)
        tmp = snapshot.marker.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(marker, indent=1))
        tmp.replace(snapshot.marker)
        return True
    except OSError as exc:
        log.warning("could not record the hash check in %s (%s): it runs again at the next start",
                    snapshot.marker, exc.strerror or exc)
        return False


def verify_download(model_dir: Path, *, offline: bool = False, show_progress: bool = False) -> Report | None:
    """After `resolve_model` fetched (or found) a Hub snapshot: checks it unless the marker says it was; raises
    ModelIntegrityError naming a file that does not match. None when nothing was checked (recorded already, or not
    a cache snapshot)."""
    snapshot = snapshot_of(model_dir)
    if snapshot is None or is_recorded(snapshot):
        return None
    log.info("checking the files of %s@%s against the Hub's hashes (once)", snapshot.repo_id, snapshot.commit[:12])
    report = check_model(model_dir, offline=offline, show_progress=show_progress)
    if not report.ok:
        raise report.error()
    if report.note or report.having("unknown"):
        log.warning("%s", report.summary())
    else:
        log.info("%s", report.summary())
    record(snapshot, report)
    return report


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot of `repo_id` at `revision` (a branch, tag or commit; default main), without the network;
    None when it is not in the cache."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision or "main")
    return Path(found).parent if isinstance(found, str) else None
