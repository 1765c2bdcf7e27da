"""What a backend receives for one request: prompt ids with expanded `<image>` runs, and each image's views.

Made by `common.model.prompt.prepare_inputs`; read by every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
    # Where each position's embedding comes from (int64 [L], see common.engine.backend.Backend.embed_prompt):
    # text positions name themselves, image positions a row of their image's views or a layout embedding.
    # None for a prompt without images (then every position is text).
    embedding_rows: np.ndarray | None = None
    # Precomputed prompt embeddings, float32 [L, hidden]: the backend skips embedding and vision. Parity tests
    # feed the reference model's embeddings this way; None for every real request.
    inputs_embeds: np.ndarray | None = None

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def image_tokens(self) -> int:
        return int(self.images_seq_mask.sum())
