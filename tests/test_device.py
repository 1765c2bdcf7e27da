"""common.model.device: autodetection order and clear errors for impossible combinations."""

from __future__ import annotations

import pytest

import common.model.device as device
from common.errors import BackendUnavailableError


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    def setup(metal: bool, cuda: bool, torch: bool = True, mlx: bool = True) -> None:
        monkeypatch.setattr(device, "metal_available", lambda: metal)
        monkeypatch.setattr(device, "cuda_available", lambda: cuda)
        monkeypatch.setattr(device, "_installed", lambda m: {"torch": torch, "mlx": mlx}.get(m, False))

    return setup


def test_autodetect_order(fake) -> None:
    fake(metal=True, cuda=False)
    assert device.select_backend() == ("mlx", "metal")
    fake(metal=False, cuda=True)
    assert device.select_backend() == ("torch", "cuda")
    fake(metal=False, cuda=False)
    assert device.select_backend(None, "auto") == ("torch", "cpu")
    fake(metal=False, cuda=False, torch=False)
    assert device.select_backend() == ("mlx", "cpu")


def test_overrides(fake) -> None:
    fake(metal=True, cuda=True)
    assert device.select_backend("torch", None) == ("torch", "cuda")
    assert device.select_backend("mlx", "cpu") == ("mlx", "cpu")
    assert device.select_backend(None, "metal") == ("mlx", "metal")
    assert device.select_backend(None, "cpu") == ("torch", "cpu")
    with pytest.raises(BackendUnavailableError, match="mlx backend cannot use CUDA"):
        device.select_backend("mlx", "cuda")
    with pytest.raises(BackendUnavailableError, match="mlx backend"):
        device.select_backend("torch", "metal")
    with pytest.raises(BackendUnavailableError, match="unknown device"):
        device.select_backend(None, "tpu")


def test_missing_hardware(fake) -> None:
    fake(metal=False, cuda=False)
    with pytest.raises(BackendUnavailableError, match="no CUDA device"):
        device.select_backend(None, "cuda")
    with pytest.raises(BackendUnavailableError, match="Apple Silicon"):
        device.select_backend(None, "metal")


def test_real_machine_has_an_answer() -> None:
    backend, dev = device.select_backend()
    assert backend in ("torch", "mlx") and dev in ("cpu", "cuda", "metal")
