"""Resolution modes: a model family's presets (common.model.families) and validated custom settings.

`base_size` is the side of the global view, `image_size` the side of each local tile. Without crop mode the
official code only uses `image_size` (the global view is image_size x image_size), so a resolved non-crop Mode
always has base_size == image_size. A Mode names the family it was resolved for, so the views and token
counts made from it follow that family's rules.
"""

from __future__ import annotations

from dataclasses import dataclass

# SAM downsamples by 16 (patches) then 4 (net_2, net_3): a multiple of 64 gives a whole token grid.
SIZE_MULTIPLE = 64
MAX_SIDE = 4096  # far above the largest preset; keeps a typo from allocating a giant view
MAX_TILES = 64


@dataclass(frozen=True)
class Mode:
    name: str
    base_size: int
    image_size: int
    crop_mode: bool
    min_crops: int = 2  # dynamic_preprocess defaults in the authors' v1 HF code (their vLLM config uses max 6)
    max_crops: int = 9
    family: str = "deepseek-ocr"  # common.model.families name

    @property
    def global_size(self) -> int:
        """Side of the global view: base_size with crops, else image_size (as the official code reads them)."""
        return self.base_size if self.crop_mode else self.image_size
