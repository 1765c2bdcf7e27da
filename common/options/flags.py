"""The flags both programs share, and their DSOCR_* variables: every long flag of either parser reads the
variable named after it (--max-queue: DSOCR_MAX_QUEUE), parsed and checked by the flag's own type, the flag
winning over the variable. A bad value is a usage error naming the variable."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.documents.render import (
    DEFAULT_RENDER_MEMORY_GIB,
    DEFAULT_RENDER_TIMEOUT_S,
    DEFAULT_RENDER_WORKERS,
    RenderLimits,
)
from common.engine.backend import BACKENDS, DTYPES, QUANTIZE_CHOICES
from common.engine.engine import ModelOptions
from common.files import read_capped_text
from common.model.device import DEVICES
from common.model.families import all_mode_names
from common.model.prompt import TASKS
from common.options.argtypes import boolean, finite_float, int_in_range, positive_int

ENV_PREFIX = "DSOCR"
MAX_PROMPT_FILE_BYTES = 1 << 20
# Flags with no variable: what only makes sense typed for one run (or lists, which a variable cannot hold).
_NO_VARIABLE = (argparse._HelpAction, argparse._VersionAction, argparse._AppendAction)


def choices(option: str) -> tuple[str, ...]:
    """The values a user may give for `option` ("mode", "task", "backend", "device", "dtype")."""
    table = {
        "mode": all_mode_names(),  # every family's presets; the loaded model decides which are valid
        "task": tuple(TASKS),
        "backend": ("auto", *BACKENDS),
        "device": DEVICES,
        "dtype": DTYPES,
    }
    return table[option]


def variable_of(action: argparse.Action, prefix: str = ENV_PREFIX) -> str | None:
    """The environment variable of a flag (None for positionals and flags that have none)."""
    long = [o for o in action.option_strings if o.startswith("--")]
    if not long or isinstance(action, _NO_VARIABLE):
        return None
    return f"{prefix}_{long[0][2:].upper().replace('-', '_')}"


def _parse(action: argparse.Action, text: str) -> Any:
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction | argparse.BooleanOptionalAction):
        value = boolean(text)
        return value if not isinstance(action, argparse._StoreFalseAction) else not value
    if isinstance(action, argparse._CountAction):
        return int_in_range(0)(text)
    value = action.type(text) if callable(action.type) else text
    if action.choices is not None and value not in action.choices:
        allowed = ", ".join(map(str, action.choices))
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {allowed})")
    return value


def read_environment(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Makes each flag's DSOCR_* variable its default (and names it in --help)."""
    environ = os.environ if environ is None else environ
    for action in parser._actions:  # argparse offers no public way to walk a parser's flags
        name = variable_of(action)
        if name is None:
            continue
        if action.help and action.help != argparse.SUPPRESS:
            action.help += f" [${name}]"
        raw = environ.get(name, "")
        if raw == "":
            continue
        try:
            action.default = _parse(action, raw)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            parser.error(f"${name}: {exc}")


def add_model_arguments(group: Any) -> None:
    """--model, --revision, --offline, --backend, --device, --dtype and the engine's bounds."""
    group.add_argument("--model", metavar="DIR|REPO", default=None,
                       help="local model directory or Hugging Face repo id (default deepseek-ai/DeepSeek-OCR, "
                       "downloaded on first use)")
    group.add_argument("--revision", metavar="REV", default=None, help="Hub revision: branch, tag or commit")
    group.add_argument("--offline", action="store_true", help="never touch the network (use the Hugging Face cache)")
    for name, what in (("backend", "inference backend"), ("device", "device"),
                       ("dtype", "compute dtype; auto = bfloat16 where the device supports it")):
        group.add_argument(f"--{name}", choices=choices(name), default="auto", help=f"{what} (default auto)")
    group.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                       help="torch on a CPU: store the decoder's linear and expert weights as bf16 (half of "
                       "float32, same values for a bf16 checkpoint) or int8 (a quarter, per-channel scales), "
                       "computed in --dtype; the vision encoder keeps --dtype (default none; see docs/cpu.md)")
    group.add_argument("--max-batch", metavar="N", type=int_in_range(1, 1024), default=None,
                       help="most sequences decoded together (default 8 on CPUs and MLX, 32 on CUDA; bounded by "
                       "the KV cache)")
    group.add_argument("--kv-cache-gib", metavar="GIB", type=finite_float(0.0, exclusive=True), default=None,
                       help="memory for the KV cache, which bounds the sequences decoded together (default: CPU "
                       "half the RAM, committed as used; CUDA 60%% of free memory; MLX a quarter of the memory)")
    group.add_argument("--max-context", metavar="N", type=int_in_range(16), default=None,
                       help="positions per sequence, prompt + output (default: the model's context); smaller fits "
                       "more sequences")
    group.add_argument("--cuda-graphs", type=boolean, metavar="on|off", default=None,
                       help="capture decode steps as CUDA graphs (default on with CUDA)")


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


def add_render_arguments(group: Any) -> None:
    """--render-workers, --render-timeout, --render-memory-gb: the PDF render worker processes (both programs)."""
    group.add_argument("--render-workers", metavar="N", type=positive_int, default=DEFAULT_RENDER_WORKERS,
                       help=f"PDF pages rendered at once, each in a worker process (default {DEFAULT_RENDER_WORKERS})")
    group.add_argument("--render-timeout", metavar="S", type=finite_float(0.0, exclusive=True),
                       default=DEFAULT_RENDER_TIMEOUT_S,
                       help=f"seconds one PDF page may take to render; past it the worker is killed and the page "
                       f"refused (default {DEFAULT_RENDER_TIMEOUT_S:g})")
    group.add_argument("--render-memory-gb", metavar="GB", type=finite_float(0.0, exclusive=True),
                       default=DEFAULT_RENDER_MEMORY_GIB,
                       help=f"address space of one render worker in GiB; a page needing more is refused (default "
                       f"{DEFAULT_RENDER_MEMORY_GIB:g})")


def render_limits(args: argparse.Namespace) -> RenderLimits:
    return RenderLimits(args.render_workers, args.render_memory_gb, args.render_timeout)


def model_options(args: argparse.Namespace) -> ModelOptions:
    """The ModelOptions of parsed --model ... flags."""
    return ModelOptions(args.model, args.revision, args.offline, args.backend, args.device, args.dtype,
                        args.max_batch, args.kv_cache_gib, args.max_context, args.cuda_graphs, args.quantize)


def read_prompt_file(path: Path, max_bytes: int = MAX_PROMPT_FILE_BYTES) -> str:
    """A prompt file's text, read with a cap."""
    return read_capped_text(path, max_bytes, param="prompt_file", kind="a prompt")
