"""Full-size benchmark of the MLX backend with RANDOM weights at the real DeepSeek-OCR config's size.

Same table as bench_torch.py. A random bfloat16 MLX checkpoint with the real model's shapes (6.67 GB) is
written once (MLX's own init, sharded), and `dsocr_mlx.convert` makes the 8-bit and 4-bit checkpoints
from it; every configuration loads through the normal loader. Random weights route most of a prompt's tokens
to one expert, a trained router spreads them: prefill and time to first token are shown under the model's own
routing and under uniform routing (benchmarks/routing_mlx.py). The bytes one decode step reads do not depend on
it (k routed + the shared experts per layer).

Each configuration runs in its own process so that peak memory is that configuration's alone.

On a Mac (Apple Silicon, `pip install 'dsocr[mlx]'`), Metal is used automatically:

    python benchmarks/bench_mlx.py                               # bfloat16, float16, q8, q4 on Metal
    python benchmarks/bench_mlx.py --configs q4 --decode-tokens 64

On Linux, MLX runs on the CPU (slow; float32 is MLX-CPU's fast path, half-precision matmuls are not):

    python benchmarks/bench_mlx.py --device cpu --configs q4 --vision-size 512 --no-gundam --decode-tokens 8 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REAL_CONFIG = ROOT / "tests" / "fixtures" / "deepseek-ocr" / "real_config.json"
GiB = 1024**3
# name -> (checkpoint kind, compute dtype on metal, compute dtype on cpu)
CONFIGS = {
    "bfloat16": ("bf16", "bfloat16", "bfloat16"),
    "float16": ("bf16", "float16", "float16"),
    "float32": ("bf16", "float32", "float32"),
    "q8": ("q8", "bfloat16", "float32"),
    "q4": ("q4", "bfloat16", "float32"),
}


# ---------------------------------------------------------------------------------------------- checkpoints
def write_random_checkpoint(folder: Path) -> None:
    """Random weights with the real names and shapes as a sharded bf16 MLX checkpoint (skipped if present)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from common.model.config import load_config
    from dsocr_mlx.convert import SIDE_FILES, save_weights
    from dsocr_mlx.model import DeepseekOCRForCausalLM

    if (folder / "config.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    mx.random.seed(0)
    model = DeepseekOCRForCausalLM(load_config(REAL_CONFIG))  # lazy: nothing allocated yet
    weights = {
        k: v.astype(mx.bfloat16) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in tree_flatten(model.parameters())
    }
    save_weights(weights, folder, max_shard_bytes=2 * GiB)
    (folder / "config.json").write_text(REAL_CONFIG.read_text())
    fixture_model = ROOT / "tests" / "fixtures" / "deepseek-ocr" / "model"
    for name in SIDE_FILES:
        if (fixture_model / name).is_file():
            (folder / name).write_bytes((fixture_model / name).read_bytes())


def checkpoint_for(kind: str, root: Path) -> Path:
    from dsocr_mlx.convert import convert

    source = root / "bf16"
    write_random_checkpoint(source)
    if kind == "bf16":
        return source
    out = root / kind
    if not (out / "config.json").is_file():
        convert(source, out, bits=int(kind[1:]), group_size=64)
    return out


# ---------------------------------------------------------------------------------------------- worker
def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


def measure_bandwidth() -> float:
    """Bytes/s of a large array copy (read + write counted)."""
    import mlx.core as mx

    src = mx.ones((256 * 1024 * 1024 // 4,), dtype=mx.float32)
    mx.eval(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        mx.eval(src + 0)
        best = min(best, time.perf_counter() - start)
    return 2 * src.size * 4 / best


def measure_matmul_rate(dtype: Any) -> float:
    import mlx.core as mx

    n = 2048
    a = mx.random.normal((n, n)).astype(dtype)
    b = mx.random.normal((n, n)).astype(dtype)
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def decode_bytes_per_token(model: Any, context: int, kv_bytes: int) -> float:
    """Weight + KV-cache bytes one decode step reads (k routed + shared experts per MoE layer), measured
    from the loaded arrays so quantized weights count their packed size plus scales and biases."""
    from mlx.utils import tree_flatten

    lm = model.config.language
    total = 0.0
    for name, array in tree_flatten(model.parameters()):
        if name.startswith(("model.sam_model", "model.vision_model", "model.projector")):
            continue
        if name.startswith("model.embed_tokens"):
            total += array.nbytes / lm.vocab_size  # one row
        elif ".mlp.experts." in name:
            total += array.nbytes * lm.num_experts_per_tok / lm.n_routed_experts
        else:
            total += array.nbytes
    total += lm.num_hidden_layers * 2 * lm.num_key_value_heads * lm.head_dim * context * kv_bytes
    return total


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import mlx.core as mx
    import numpy as np

    from benchmarks.bench_torch import synthetic_prompt
    from benchmarks.routing_mlx import routing_spread, uniform_routing
    from common.engine.core import EngineCore
    from common.engine.sampling import SamplingParams
    from common.model.families import resolve_mode
    from common.model.inputs import ImageInput
    from common.model.tiling import image_token_count
    from common.model.tokenizer import Tokenizer
    from dsocr_mlx.backend import MlxBackend
    from dsocr_mlx.loader import DTYPES, load_model

    kind, metal_dtype, cpu_dtype = CONFIGS[args.config]
    dtype = metal_dtype if args.device == "metal" else cpu_dtype
    result: dict[str, Any] = {"config": f"{args.device}:{args.config}", "compute": dtype,
                              "vision_size": args.vision_size}
    loaded: dict[str, Any] = {}

    def load() -> MlxBackend:  # on the engine core's thread, which owns every MLX array from here on
        mx.set_default_device(mx.gpu if args.device == "metal" else mx.cpu)
        start = time.perf_counter()
        model, quantization = load_model(args.checkpoint, dtype)
        loaded.update(model=model, load_s=time.perf_counter() - start)
        return MlxBackend(model, args.device, dtype, quantization, max_batch=1)

    core = EngineCore(load, Tokenizer.from_dir(ROOT / "tests" / "fixtures" / "deepseek-ocr" / "model")).start()
    core.wait_ready()
    model = loaded["model"]
    result["load_s"] = loaded["load_s"]
    result["rss_after_load_gib"] = peak_rss_gib()

    def measure(backend: Any) -> Any:
        """Vision and prefill timings, on the core's thread; returns the Base prompt."""
        rng = np.random.default_rng(0)

        def views(count: int, size: int) -> np.ndarray:
            return (rng.random((count, 3, size, size), dtype=np.float32) * 2 - 1).astype(np.float32)

        base = ImageInput(views(1, args.vision_size)[0], None, (1, 1))
        gundam = ImageInput(views(1, 1024)[0], views(6, 640), (2, 3))

        def timed(fn: Any, repeat: int) -> tuple[float, Any]:
            best, out = float("inf"), None
            for _ in range(repeat):
                t0 = time.perf_counter()
                out = fn()
                mx.eval(out)
                best = min(best, time.perf_counter() - t0)
            return best, out

        def encode(image: ImageInput) -> list[Any]:
            """Every view of the image, one unit of work each (evaluated), as a PrefillJob runs them."""
            tiles = list(image.local_views) if image.has_crops else []
            return [backend.encode_view(view) for view in [image.global_view, *tiles]]

        result["vision_base_s"], base_views = timed(lambda: encode(base), args.repeat)
        family = model.config.family
        if args.gundam:
            result["vision_gundam_s"], _ = timed(lambda: encode(gundam), args.repeat)
            gundam_mode = resolve_mode("gundam", family=family)
            result["gundam_image_tokens"] = image_token_count(gundam_mode, gundam.crop_grid, True)
        mode = resolve_mode("base", family=family, base_size=args.vision_size)
        prepared = synthetic_prompt(base, mode, model.config.language.bos_token_id)
        result["prompt_tokens"] = prepared.prompt_tokens
        embeds = backend.embed_prompt(prepared, base_views)
        mx.eval(embeds)
        length = prepared.prompt_tokens
        with routing_spread() as spread:
            result["prefill_s"], _ = timed(lambda: backend.prefill(0, embeds, 0, length), args.repeat)
        result["top_expert_share"] = spread.top_share()
        with uniform_routing(), routing_spread() as spread:
            result["prefill_uniform_s"], _ = timed(lambda: backend.prefill(0, embeds, 0, length), args.repeat)
        result["top_expert_share_uniform"] = spread.top_share()
        return prepared

    prepared = core.call(measure)
    length = prepared.prompt_tokens
    # The same page through the engine core (vision + prefill + decode), as a request would run.
    params = SamplingParams(max_new_tokens=args.decode_tokens, no_repeat_ngram_size=0, ignore_eos=True)
    done = core.submit(prepared, params).run()
    result["ttft_s"] = done.timings["ttft_s"]
    with uniform_routing():  # the page's first token as a trained router would route it (random weights do not)
        first = core.submit(prepared, SamplingParams(max_new_tokens=1, no_repeat_ngram_size=0, ignore_eos=True)).run()
    result["ttft_uniform_s"] = first.timings["ttft_s"]
    result["decode_tok_s"] = done.timings["decode_tokens_per_s"]
    result["decode_tokens"] = done.completion_tokens
    result["peak_rss_gib"] = peak_rss_gib()
    result["peak_mlx_gib"] = mx.get_peak_memory() / GiB
    context = length + args.decode_tokens // 2
    kv_bytes = {mx.float32: 4, mx.bfloat16: 2, mx.float16: 2}[DTYPES[dtype]]
    result["bytes_per_token"] = decode_bytes_per_token(model, context, kv_bytes)
    result["disk_gib"] = sum(p.stat().st_size for p in Path(args.checkpoint).glob("*.safetensors")) / GiB
    result["bandwidth_Bps"] = measure_bandwidth()
    result["matmul_flops"] = measure_matmul_rate(DTYPES[dtype])
    core.close()
    return result


# ---------------------------------------------------------------------------------------------- table
def print_table(results: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dsocr mlx backend — real DeepSeek-OCR size, random weights")
    table.add_column("metric")
    for r in results:
        table.add_column(f"{r['config']} ({r['compute']})", justify="right")

    def row(label: str, fmt: Any) -> None:
        cells = [label]
        for r in results:
            try:
                cells.append(fmt(r))
            except KeyError:
                cells.append("-")
        table.add_row(*cells)

    row("weights on disk (GiB)", lambda r: f"{r['disk_gib']:.2f}")
    row("load (s)", lambda r: f"{r['load_s']:.1f}")
    row("vision, one global view (s)", lambda r: f"{r['vision_base_s']:.2f} ({r['vision_size']}²)")
    row("vision Gundam 1024²+2x3x640² (s)", lambda r: f"{r['vision_gundam_s']:.2f}")
    row("prefill, LM only (s): model's / uniform routing",
        lambda r: f"{r['prefill_s']:.2f} / {r['prefill_uniform_s']:.2f} ({r['prompt_tokens']} tok)")
    row("busiest expert's share of a prompt: model's / uniform",
        lambda r: f"{r['top_expert_share']:.0%} / {r['top_expert_share_uniform']:.0%}")
    row("time to first token (s): model's / uniform routing",
        lambda r: f"{r['ttft_s']:.2f} / {r['ttft_uniform_s']:.2f}")
    row("decode (tok/s)", lambda r: f"{r['decode_tok_s']:.1f} ({r['decode_tokens']} tok)")
    row("peak RSS (GiB)", lambda r: f"{r['peak_rss_gib']:.1f}")
    row("peak MLX memory (GiB)", lambda r: f"{r['peak_mlx_gib']:.1f}")
    row("bytes read / decoded token", lambda r: f"{r['bytes_per_token'] / GiB:.2f} GiB")
    row("measured bandwidth (copy)", lambda r: f"{r['bandwidth_Bps'] / 1e9:.1f} GB/s")
    row(
        "decode floor (tok/s) / reached",
        lambda r: f"{r['bandwidth_Bps'] / r['bytes_per_token']:.1f} / "
        f"{r['decode_tok_s'] * r['bytes_per_token'] / r['bandwidth_Bps']:.0%}",
    )
    row("measured matmul rate", lambda r: f"{r['matmul_flops'] / 1e9:.0f} GFLOP/s")
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, default=Path("/tmp/dsocr-bench-mlx"))
    parser.add_argument("--device", choices=("auto", "metal", "cpu"), default="auto")
    parser.add_argument("--configs", default="bfloat16,float16,q8,q4", help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2, help="best of N for vision and prefill timings")
    parser.add_argument("--no-gundam", dest="gundam", action="store_false", help="skip the Gundam vision row")
    parser.add_argument("--vision-size", type=int, default=1024,
                        help="global view size for the vision/prefill rows (1024 = Base; 512 = Tiny, for slow CPUs)")
    parser.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()

    import mlx.core as mx

    if args.device == "auto":
        args.device = "metal" if mx.metal.is_available() else "cpu"
    if args.worker:
        args.config = args.worker
        print(json.dumps(worker(args)))
        return

    results = []
    for config in [c for c in args.configs.split(",") if c]:
        if config not in CONFIGS:
            parser.error(f"unknown config {config!r}")
        start = time.perf_counter()
        checkpoint = checkpoint_for(CONFIGS[config][0], args.checkpoints)
        print(f"{config}: checkpoint {checkpoint} ready ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        command = [sys.executable, __file__, "--worker", config, "--checkpoint", str(checkpoint),
                   "--device", args.device, "--decode-tokens", str(args.decode_tokens),
                   "--repeat", str(args.repeat), "--vision-size", str(args.vision_size)]
        command += [] if args.gundam else ["--no-gundam"]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode != 0:
            print(f"{config} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if results:
        print_table(results)


if __name__ == "__main__":
    main()
