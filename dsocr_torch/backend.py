"""The torch backend behind common.backend.Backend: load a model directory, generate token ids."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from common.backend import ImageInput, PreparedInputs, ProgressCallback
from common.errors import InputError
from common.sampling import SamplingParams
from dsocr_torch.generate import generate_ids
from dsocr_torch.loader import load_model
from dsocr_torch.model import DeepseekOCRForCausalLM, ImageTensors

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class TorchBackend:
    name = "torch"

    def __init__(self, model: DeepseekOCRForCausalLM) -> None:
        self.model: DeepseekOCRForCausalLM | None = model
        self.device = model.device.type
        self.dtype = _DTYPE_NAMES[model.dtype]
        self.eos_token_id = model.config.language.eos_token_id

    def image_tensors(self, image: ImageInput) -> ImageTensors:
        model = self._model()

        def convert(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(model.device, model.dtype)

        local = convert(image.local_views) if image.has_crops else None
        return ImageTensors(convert(image.global_view)[None], local, tuple(image.crop_grid))

    def generate(self, inputs: PreparedInputs, params: SamplingParams) -> Iterator[int]:
        model = self._model()
        if inputs.input_ids.ndim != 1 or inputs.input_ids.shape[0] == 0:
            raise InputError("the prompt must be a non-empty 1-D sequence of token ids")
        images = [self.image_tensors(img) for img in inputs.images]
        input_ids = torch.from_numpy(np.asarray(inputs.input_ids, dtype=np.int64))
        mask = torch.from_numpy(np.asarray(inputs.images_seq_mask, dtype=bool)) if images else None
        return generate_ids(model, input_ids, mask, images, params, self.eos_token_id)

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _model(self) -> DeepseekOCRForCausalLM:
        if self.model is None:
            raise RuntimeError("this backend was closed")
        return self.model


def load(
    model_dir: Path, *, device: str = "cpu", dtype: str = "auto", progress: ProgressCallback | None = None
) -> TorchBackend:
    return TorchBackend(load_model(model_dir, device=device, dtype=dtype, progress=progress))
