"""Release packaging: SHA256SUMS (.ci/sha256sums.py, checked with coreutils' `sha256sum -c`, the tool users run),
`dsocr --version`, and the wheel's contents (every file the packages read at run time is declared). The built wheel
itself is exercised by .ci/wheel_smoke.sh."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

import cli
from common.options import version
from common.options.flags import variable_of
from tests.conftest import ROOT

PACKAGES = ("common", "dsocr_torch", "dsocr_mlx")


def load_sha256sums() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sha256sums", ROOT / ".ci" / "sha256sums.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def dist(tmp_path: Path) -> Path:
    folder = tmp_path / "dist"
    folder.mkdir()
    (folder / "dsocr-0.1.0-py3-none-any.whl").write_bytes(b"PK\x03\x04 a wheel")
    (folder / "dsocr-0.1.0.tar.gz").write_bytes(bytes(range(256)) * 300)
    (folder / ".DS_Store").write_bytes(b"hidden")
    (folder / "sub").mkdir()
    return folder


def test_sha256sums_lists_each_artifact_as_sha256sum_does(dist: Path) -> None:
    sums = load_sha256sums()
    target = sums.write_sums(dist)
    lines = target.read_text().splitlines()
    assert lines == [f"{hashlib.sha256((dist / name).read_bytes()).hexdigest()}  {name}"
                     for name in ("dsocr-0.1.0-py3-none-any.whl", "dsocr-0.1.0.tar.gz")]
    assert subprocess.run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=dist, capture_output=True,
                          text=True).returncode == 0
    (dist / "dsocr-0.1.0.tar.gz").write_bytes(b"tampered")
    check = subprocess.run(["sha256sum", "--check", "SHA256SUMS"], cwd=dist, capture_output=True, text=True)
    assert check.returncode == 1 and "dsocr-0.1.0.tar.gz: FAILED" in check.stdout


def test_sha256sums_rewrites_an_old_file_and_never_lists_itself(dist: Path) -> None:
    sums = load_sha256sums()
    (dist / "SHA256SUMS").write_text("0" * 64 + "  gone.whl\n")
    sums.write_sums(dist)
    text = (dist / "SHA256SUMS").read_text()
    assert "gone.whl" not in text and "SHA256SUMS" not in text and len(text.splitlines()) == 2
    assert not list(dist.glob(".SHA256SUMS*"))  # the temporary file was renamed


def test_sha256sums_cli(dist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sums = load_sha256sums()
    assert sums.main([str(dist)]) == 0
    assert capsys.readouterr().out == (dist / "SHA256SUMS").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sums.main([str(empty)]) == 2
    assert sums.main([str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


# ------------------------------------------------------------ dsocr --version


def test_version_reports_package_python_backends_and_device(capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(version, "select_backend", lambda: ("torch", "cpu"))
    assert cli.main(["--version"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("dsocr ") and lines[1].startswith("python 3.")
    assert lines[2].startswith("torch " if importlib.util.find_spec("torch") else "torch not installed")
    assert lines[3].startswith("mlx")
    assert lines[4] == "device: cpu with the torch backend (what --device auto picks here)"


def test_version_without_backends_says_how_to_install_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(version, "installed_version", lambda name: "1.2.3" if name == "dsocr" else None)
    lines = version.version_report().splitlines()
    assert lines[0] == "dsocr 1.2.3"
    assert lines[2:4] == ["torch not installed", "mlx not installed"]
    assert lines[4].startswith("device: none (install a backend: pip install 'dsocr[torch]'")


def test_version_survives_a_failing_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> tuple[str, str]:
        raise RuntimeError("driver mismatch")

    monkeypatch.setattr(version, "select_backend", broken)
    monkeypatch.setattr(version, "installed_version", lambda name: "2.0" if name in ("dsocr", "mlx") else None)
    assert version.version_report().splitlines()[-1] == "device: unknown (RuntimeError: driver mismatch)"


def test_version_has_no_environment_variable() -> None:
    """A DSOCR_VERSION variable would make every run print the report and exit."""
    [action] = [a for a in cli.build_parser()._actions if "--version" in a.option_strings]
    assert variable_of(action) is None and "DSOCR_VERSION" not in (action.help or "")


# ------------------------------------------------------------ the wheel's contents


def test_every_file_the_packages_read_at_run_time_is_in_the_wheel() -> None:
    """Setuptools puts only .py files of the packages in the wheel unless package data is declared: a template or
    data file added under a package must be declared in pyproject.toml, or the installed program cannot find it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = config["tool"]["setuptools"].get("package-data", {})
    undeclared = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*")):
            if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            top = path.relative_to(ROOT).parts[0]
            patterns = declared.get(top, []) + declared.get("*", [])
            if not any(path.relative_to(ROOT / top).match(pattern) for pattern in patterns):
                undeclared.append(str(path.relative_to(ROOT)))
    assert undeclared == [], "declare these in [tool.setuptools.package-data] of pyproject.toml"
    found = config["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {name.rstrip("*") for name in found} == set(PACKAGES)
    assert set(config["tool"]["setuptools"]["py-modules"]) == {"cli", "server"}
    assert config["project"]["scripts"] == {"dsocr": "cli:main", "dsocr-server": "server:main"}


def test_every_package_folder_is_a_package() -> None:
    """A folder of modules without __init__.py is left out of the wheel by find: (it is found only as a namespace)."""
    missing = [str(folder.relative_to(ROOT)) for package in PACKAGES for folder in [ROOT / package,
               *(ROOT / package).rglob("*")]
               if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py"))
               and not (folder / "__init__.py").is_file()]
    assert missing == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell script")
def test_wheel_smoke_script_is_valid_bash() -> None:
    assert subprocess.run(["bash", "-n", str(ROOT / ".ci" / "wheel_smoke.sh")]).returncode == 0
