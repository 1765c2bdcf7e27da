"""Model options shared by the command-line tools: the flags, their `DSOCR_*` variables, and loading the engine."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from common.argtypes import boolean, finite_float, int_in_range
from common.families import ModelFamily, family_of_model_dir
from common.options import choices

ProgressCallback = Callable[[str, int, int], None]


def env_default(name: str, default: Any) -> Any:
    """The value of environment variable `name` (parsed later by the flag's type), else `default`."""
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def add_model_arguments(group: Any, env_prefix: str | None = None) -> None:
    """--model, --revision, --offline, --backend, --device, --dtype; with `env_prefix`, each reads PREFIX_NAME too."""

    def default(name: str, value: Any) -> Any:
        return env_default(f"{env_prefix}_{name}", value) if env_prefix else value

    def env_note(name: str) -> str:
        return f"; ${env_prefix}_{name}" if env_prefix else ""

    group.add_argument(
        "--model",
        metavar="DIR|REPO",
        default=default("MODEL", None),
        help="local model directory or Hugging Face repo id (default deepseek-ai/DeepSeek-OCR, downloaded on "
        f"first use{env_note('MODEL')})",
    )
    group.add_argument("--revision", metavar="REV", default=default("REVISION", None),
                       help=f"Hub revision: branch, tag or commit{env_note('REVISION')}")
    offline = default("OFFLINE", "")
    group.add_argument("--offline", action="store_true", default=str(offline).lower() in ("1", "true", "yes", "on"),
                       help=f"never touch the network (use the Hugging Face cache){env_note('OFFLINE')}=1")
    for name, what in (("backend", "inference backend"), ("device", "device"),
                       ("dtype", "compute dtype; auto = bfloat16 where the device supports it")):
        group.add_argument(f"--{name}", choices=choices(name), default=default(name.upper(), "auto"),
                           help=f"{what} (default auto{env_note(name.upper())})")
    group.add_argument(
        "--max-batch", metavar="N", type=int_in_range(1, 1024), default=default("MAX_BATCH", None),
        help="most sequences decoded together (default 8 on CPUs and MLX, 32 on CUDA; bounded by the KV cache)"
        f"{env_note('MAX_BATCH')}",
    )
    group.add_argument(
        "--kv-cache-gib", metavar="GIB", type=finite_float(0.0, exclusive=True), default=default("KV_CACHE_GIB", None),
        help="memory for the KV cache, which bounds the sequences decoded together (default: CPU half the RAM, "
        f"committed as used; CUDA 60%% of free memory; MLX a quarter of the memory){env_note('KV_CACHE_GIB')}",
    )
    group.add_argument(
        "--max-context", metavar="N", type=int_in_range(16), default=default("MAX_CONTEXT", None),
        help="positions per sequence, prompt + output (default: the model's context); smaller fits more sequences"
        f"{env_note('MAX_CONTEXT')}",
    )
    group.add_argument(
        "--cuda-graphs", type=boolean, metavar="on|off", default=default("CUDA_GRAPHS", None),
        help=f"capture decode steps as CUDA graphs (default on with CUDA){env_note('CUDA_GRAPHS')}",
    )


@dataclass(frozen=True)
class ModelOptions:
    model: str | None = None
    revision: str | None = None
    offline: bool = False
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int | None = None
    kv_cache_gib: float | None = None
    max_context: int | None = None
    cuda_graphs: bool | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelOptions:
        # argparse runs a flag's type on a string default too, so DSOCR_* values arrive parsed and checked.
        return cls(
            args.model, args.revision, args.offline, args.backend, args.device, args.dtype,
            args.max_batch, args.kv_cache_gib, args.max_context, args.cuda_graphs,
        )

    def resolved(self, show_download_progress: bool = True) -> tuple[ModelOptions, ModelFamily]:
        """These options with `model` as a local directory (downloading it on first use, as loading would) and
        the model's family, read from its config.json: what decides the valid modes before the weights load."""
        from common.hub import resolve_model

        model_dir = resolve_model(self.model, revision=self.revision, offline=self.offline,
                                  show_progress=show_download_progress)
        return replace(self, model=str(model_dir)), family_of_model_dir(model_dir)

    def load(self, *, weights: bool = True, progress: ProgressCallback | None = None,
             show_download_progress: bool = True) -> Any:
        """The Engine (tokenizer and config; the weights on the chosen backend unless `weights=False`)."""
        from common.engine import Engine

        return Engine.load(
            self.model,
            backend=self.backend,
            device=self.device,
            dtype=self.dtype,
            revision=self.revision,
            offline=self.offline,
            weights=weights,
            progress=progress,
            show_download_progress=show_download_progress,
            max_batch=self.max_batch,
            kv_cache_gib=self.kv_cache_gib,
            max_context=self.max_context,
            cuda_graphs=self.cuda_graphs,
        )
