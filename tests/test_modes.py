"""Resolution presets and custom mode validation."""

from __future__ import annotations

import pytest

from common.errors import InputError
from common.model.families import DEEPSEEK_OCR, resolve_mode
from common.model.modes import Mode
from tests.conftest import cases_manifest


def test_presets_match_official() -> None:
    official = cases_manifest()["modes"]
    assert set(DEEPSEEK_OCR.modes) == set(official)
    for name, preset in official.items():
        mode = resolve_mode(name)
        assert (mode.base_size, mode.image_size, mode.crop_mode) == (
            preset["base_size"],
            preset["image_size"],
            preset["crop_mode"],
        )
        assert (mode.min_crops, mode.max_crops) == (2, 9)
        assert mode.name == name
    assert resolve_mode() == DEEPSEEK_OCR.modes["gundam"] == Mode("gundam", 1024, 640, True, 2, 9)
    assert resolve_mode(" Base ") == DEEPSEEK_OCR.modes["base"]


def test_custom_overrides() -> None:
    mode = resolve_mode("gundam", max_crops=6)
    assert (mode.base_size, mode.image_size, mode.crop_mode, mode.min_crops, mode.max_crops) == (
        1024,
        640,
        True,
        2,
        6,
    )
    assert mode.name == "gundam-custom"
    assert resolve_mode("gundam", max_crops=9) == DEEPSEEK_OCR.modes["gundam"]  # unchanged values stay the preset
    assert resolve_mode("gundam", base_size=1280, image_size=768).image_size == 768
    # Without crops the only size is image_size: whichever side the caller set wins.
    assert resolve_mode("base", base_size=768) == Mode("base-custom", 768, 768, False)
    assert resolve_mode("base", image_size=832) == Mode("base-custom", 832, 832, False)
    assert resolve_mode("gundam", crop_mode=False) == Mode("gundam-custom", 640, 640, False)
    assert resolve_mode("base", crop_mode=True).crop_mode is True


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_size": 1000},
        {"base_size": 0},
        {"base_size": -64},
        {"image_size": 100},
        {"image_size": 1 << 20},
        {"min_crops": 0},
        {"max_crops": 0},
        {"min_crops": 5, "max_crops": 4},
        {"max_crops": 1000},
        {"base_size": 1024.0},
        {"base_size": 768, "image_size": 1024, "crop_mode": False},
    ],
)
def test_bad_values_raise(kwargs: dict) -> None:
    with pytest.raises(InputError):
        resolve_mode("gundam", **kwargs)


def test_unknown_mode() -> None:
    with pytest.raises(InputError, match="tiny, small, base, large, gundam"):
        resolve_mode("huge")
