"""MLX backend for DeepSeek-OCR: SAM + CLIP vision encoders, projector and the DeepSeek-V2 MoE decoder.

Runs on Apple Silicon (Metal, unified memory) and, more slowly, on Linux CPU through `mlx[cpu]`.
Convolutions are channels-last (NHWC activations, OHWI weights); each model file's `sanitize` converts
the official PyTorch checkpoint tensors.
"""

from __future__ import annotations

import importlib.util
import sys


def _mlx_lm_without_its_init() -> None:
    """Makes `import mlx_lm.models.<x>` skip mlx-lm's package `__init__` until something needs it.

    That `__init__` imports its converter and generator, hence transformers and torch (seconds), while this
    backend only uses `mlx_lm.models.*`. The package is registered with its `__init__` not run; the first
    access to a name it would define (`mlx_lm.load`, `from mlx_lm import generate`) runs it in place, so other
    users of mlx-lm in the process see the whole package.
    """
    if "mlx_lm" in sys.modules:
        return
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not installed: the imports fail as they would have
    package = importlib.util.module_from_spec(spec)

    def run_init(name: str) -> object:
        if name.startswith("__") or package.__dict__.pop("__getattr__", None) is None:
            raise AttributeError(f"module 'mlx_lm' has no attribute {name!r}")
        spec.loader.exec_module(package)  # type: ignore[union-attr]
        return getattr(package, name)

    package.__getattr__ = run_init  # type: ignore[method-assign]
    sys.modules["mlx_lm"] = package


_mlx_lm_without_its_init()
