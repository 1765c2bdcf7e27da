"""Model options shared by the command-line tools: the flags, their `DSOCR_*` variables, and loading the engine."""

from __future__ import annotations

import os
from typing import Any

from common.options.argtypes import boolean, finite_float, int_in_range, positive_int
from common.options.choices import choices


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


def add_ray_arguments(group: Any) -> None:
    """--ray, --ray-actors, --ray-actor-cpus (the CLI's; `common.documents.cluster.check_ray_args` checks them)."""
    group.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                       help="run the batch on a Ray cluster (Ray Data), writing to -o DIR (a folder every node can "
                       "reach); ADDRESS: the cluster's host:port, default auto = the running cluster "
                       "(RAY_ADDRESS, `ray start` here), else a local one for this job")
    group.add_argument("--ray-actors", metavar="N", type=positive_int, default=None,
                       help="generation actors, each holding the model (default: one per GPU, 1 without GPUs)")
    group.add_argument("--ray-actor-cpus", metavar="C", type=finite_float(0.0, exclusive=True), default=1.0,
                       help="CPUs each actor reserves; on CPU nodes also its torch threads (default 1)")
