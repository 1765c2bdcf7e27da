"""The small interface every backend implements, and the inputs it receives.

The CLI and the server never import torch or mlx: they call `load_backend(...)`, hand it
`PreparedInputs` (made by `common.prompt.prepare_inputs`) and iterate the token ids it yields.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from common.errors import BackendUnavailableError
from common.sampling import SamplingParams


@dataclass
class ImageInput:
    """One image, preprocessed as the official `infer()` does.

    Pixel arrays are float32 CHW, normalised to [-1, 1] and rounded to bfloat16 values (infer() casts the
    pixels to bfloat16 before the vision tower; the values are exactly representable in float32).
    """

    global_view: np.ndarray  # [3, base_size, base_size]
    local_views: np.ndarray | None  # [n_tiles, 3, image_size, image_size], None without crops
    crop_grid: tuple[int, int]  # (width tiles, height tiles); (1, 1) without crops, as images_spatial_crop

    @property
    def has_crops(self) -> bool:
        return self.local_views is not None and len(self.local_views) > 0


@dataclass
class PreparedInputs:
    """Everything a backend needs for one request: prompt ids with expanded `<image>` runs and the views."""

    input_ids: np.ndarray  # int64 [L]; BOS first, every <image> expanded to its exact token count
    images_seq_mask: np.ndarray  # bool [L]; True where an image embedding goes
    images: list[ImageInput]
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # original (width, height) per image

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def image_tokens(self) -> int:
        return int(self.images_seq_mask.sum())


ProgressCallback = Callable[[str, int, int], None]  # (what, done, total), e.g. ("weights", 3, 12)


@runtime_checkable
class Backend(Protocol):
    """A loaded model on one device.

    `generate` yields generated token ids one at a time as they are produced: prefill, then one decode step
    per id. It stops after the EOS id (which it yields) or after `params.max_new_tokens` ids. It applies the
    n-gram guard and sampling of `params`; stop strings are the caller's job (it closes the generator).
    Closing the generator early (`.close()`) cancels generation before the next decode step.
    """

    name: str  # "torch" or "mlx"
    device: str  # "cpu", "cuda", "metal"
    dtype: str  # "float32", "bfloat16", "float16", or a quantization such as "q4"
    eos_token_id: int

    def generate(self, inputs: PreparedInputs, params: SamplingParams) -> Iterator[int]: ...

    def close(self) -> None: ...


BACKENDS = ("torch", "mlx")


def load_backend(
    name: str,
    model_dir: str | Path,
    device: str,
    dtype: str = "auto",
    progress: ProgressCallback | None = None,
) -> Backend:
    """Imports the named backend lazily (so `common` stays framework-free) and loads the model."""
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module_name = {"torch": "dsocr_torch.backend", "mlx": "dsocr_mlx.backend"}[name]
    framework = {"torch": "torch", "mlx": "mlx"}[name]
    try:
        importlib.import_module(framework)
    except ImportError:
        extra = {"torch": "torch", "mlx": "mlx"}[name]
        raise BackendUnavailableError(
            f"the {name} backend needs {framework}, which is not installed: pip install 'dsocr[{extra}]'"
        ) from None
    module = importlib.import_module(module_name)
    return module.load(Path(model_dir), device=device, dtype=dtype, progress=progress)
