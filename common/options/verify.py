"""`dsocr verify`: checks a model's files against the hashes the Hugging Face Hub publishes.

    dsocr verify                                   # the model dsocr would load (--model, or DSOCR_MODEL)
    dsocr verify --model deepseek-ai/DeepSeek-OCR-2 --download     # fetch it first when it is not cached
    dsocr verify --model ~/models/ocr --repo deepseek-ai/DeepSeek-OCR   # a folder outside the Hugging Face cache

Every file is hashed again (the marker a start relies on is ignored, then rewritten). Exit codes: 0 every file
matches, or has no known hash (said on the summary line); 1 a file does not match; 2 a usage error (bad flag, no
such model, not downloaded). The check itself is common.model.integrity.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import DsocrError, ModelNotFoundError
from common.model.hub import DEFAULT_REPO, _cache_dir, _looks_like_repo_id, check_model_dir, resolve_model
from common.model.integrity import FileCheck, Report, cached_snapshot, check_model, record, snapshot_of
from common.options.flags import read_environment

PROG = "dsocr verify"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Check a model's files against the hashes the Hugging Face "
                                "Hub publishes (SHA-256 of each weight file).")
    p.add_argument("--model", metavar="DIR|REPO", default=None,
                   help=f"a Hub repo id (its cached snapshot) or a local folder (default {DEFAULT_REPO})")
    p.add_argument("--revision", metavar="REV", default=None, help="Hub revision: branch, tag or commit (default main)")
    p.add_argument("--offline", action="store_true",
                   help="do not ask the Hub: compare with the hashes the cache recorded at download")
    read_environment(p)  # DSOCR_MODEL, DSOCR_REVISION, DSOCR_OFFLINE: the model the server would load
    p.add_argument("--repo", metavar="REPO", default=None,
                   help="the Hub repo a folder outside the cache was downloaded from (its hashes at --revision)")
    p.add_argument("--download", action="store_true", help="download the model first when it is not in the cache")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary line and errors")
    return p


def locate(args: argparse.Namespace) -> Path:
    """The folder to check: a local one as given, else the repo's snapshot in the cache (downloaded with
    --download). ModelNotFoundError when there is none."""
    name = args.model or DEFAULT_REPO
    path = Path(name).expanduser()
    if path.exists() or not _looks_like_repo_id(name):
        return check_model_dir(path)
    found = cached_snapshot(name, args.revision)
    if found is not None:
        return check_model_dir(found)
    if not args.download:
        raise ModelNotFoundError(f"{name}{'@' + args.revision if args.revision else ''} is not in the Hugging Face "
                                 f"cache ({_cache_dir()}): nothing to check; add --download to fetch it first")
    return resolve_model(name, revision=args.revision, offline=args.offline, show_progress=not args.quiet,
                         verify=False)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def file_line(check: FileCheck) -> str:
    status = {"ok": "ok", "mismatch": "MISMATCH", "unknown": "unknown"}[check.status]
    line = f"  {status:<9} {check.name}  {_size(check.size)}"
    if check.expected is not None and check.actual is not None:
        what = "sha256" if check.expected.kind == "sha256" else "git blob"
        line += f"  {what} {check.actual[:16]}"
        if check.status == "mismatch":
            whose = "the Hub's" if check.expected.source == "hub" else "recorded at download"
            line += f" (expected {check.expected.value[:16]}, {whose})"
    return line


def print_report(report: Report, quiet: bool) -> None:
    if not quiet:
        print(f"{report.where} ({report.model_dir})")
        for check in report.files:
            print(file_line(check))
    print(report.summary(), flush=True)


def main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0), a bad flag (2, argparse printed why)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        model_dir = locate(args)
        snapshot = snapshot_of(model_dir)
        report = check_model(model_dir, repo_id=args.repo,
                             revision=args.revision if snapshot is None or args.repo else None,
                             offline=args.offline, show_progress=not args.quiet and sys.stderr.isatty())
    except DsocrError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:  # an unreadable file or folder
        print(f"{PROG}: error: cannot read {exc.filename or 'the model'}: {exc.strerror or exc}", file=sys.stderr,
              flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    print_report(report, args.quiet)
    if snapshot is not None and args.repo is None:
        record(snapshot, report)
    if not report.ok:
        print(f"{PROG}: error: {report.error()}", file=sys.stderr, flush=True)
        return 1
    return 0
