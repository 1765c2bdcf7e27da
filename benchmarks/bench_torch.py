"""Full-size benchmark of the torch backend with RANDOM weights at the real DeepSeek-OCR config's size.

The real weights cannot be downloaded here, so a random bfloat16 checkpoint with exactly the real tensor names
and shapes (6.67 GB, sharded) is written once and loaded through the normal loader. Shapes, FLOPs and bytes
equal the real model's. Routing does not: random weights send most of a prompt's tokens to a few experts, a
trained router spreads them, so prefill is timed under both (benchmarks/routing.py: uniform routing, seeded); a
decode step reads k routed + the shared experts per MoE layer either way.

Each configuration (device:dtype[:quantize]) runs in its own process so that peak RSS is its alone; `--isa avx2`
runs them with torch, oneDNN and MKL held to AVX2 (what a CPU without AVX-512 gets; fbgemm and the CPU's memory
are this machine's).

    nice python benchmarks/bench_torch.py                       # cpu float32 + bfloat16 (+ cuda bfloat16)
    python benchmarks/bench_torch.py --configs cpu:bfloat16 --decode-tokens 64
    python benchmarks/bench_torch.py --isa avx2 --configs cpu:float32,cpu:float32:bf16,cpu:float32:int8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REAL_CONFIG = ROOT / "tests" / "fixtures" / "deepseek-ocr" / "real_config.json"
REAL_SHAPES = ROOT / "tests" / "fixtures" / "deepseek-ocr" / "real_checkpoint_shapes.json"
GiB = 1024**3


# ---------------------------------------------------------------------------------------------- checkpoint
def write_random_checkpoint(
    folder: Path, shard_bytes: int = 2 * GiB, config: Path = REAL_CONFIG, shapes_file: Path = REAL_SHAPES
) -> None:
    """Random bf16 tensors named and shaped as the real checkpoint, as index + shards (skipped if present)."""
    import torch
    from safetensors.torch import save_file

    from dsocr_torch.weights.loader import INDEX_FILE

    if (folder / INDEX_FILE).is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(config.read_text())
    shapes = json.loads(shapes_file.read_text())["tensors"]
    generator = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, Any] = {}
    size, index = 0, 0

    def flush() -> None:
        nonlocal shard, size, index
        index += 1
        name = f"model-{index:05d}.safetensors"
        save_file(shard, str(folder / name))
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, shape in shapes.items():
        if name.endswith("position_ids"):
            tensor = torch.arange(shape[-1], dtype=torch.int64).view(shape)
        elif name.endswith(
            (
                "norm.weight",
                "norm1.weight",
                "norm2.weight",
                "layer_norm1.weight",
                "layer_norm2.weight",
                "pre_layrnorm.weight",
            )
        ):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard[name] = tensor
        size += tensor.numel() * tensor.element_size()
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# ---------------------------------------------------------------------------------------------- worker
def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


def measure_bandwidth(device: Any) -> float:
    """Bytes/s of a large tensor copy (read + write counted)."""
    import torch

    src = torch.ones(256 * 1024 * 1024 // 4, dtype=torch.float32, device=device)  # 256 MiB
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def measure_matmul_rate(device: Any, dtype: Any) -> float:
    import torch

    n = 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def sync(device: Any) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def decode_bytes_per_token(model: Any, context: int) -> float:
    """Weight + KV-cache bytes one decode step must read (k routed + shared experts per MoE layer)."""
    from dsocr_torch.cache import KVCache

    lm = model.config.language
    elem = model.dtype.itemsize
    # --quantize: the decoder's linear and expert weights at their stored size (+ one float32 scale per row of int8)
    stored = {"none": elem, "bf16": 2, "int8": 1}[model.weight_storage]
    scale_per_row = 4 if model.weight_storage == "int8" else 0
    kv_elem = KVCache.dtype_for(model.device, model.dtype).itemsize  # float32 cache for bf16 on CPU
    hidden, heads, head_dim = lm.hidden_size, lm.num_attention_heads, lm.head_dim
    attn = hidden * heads * head_dim * 2 + hidden * lm.num_key_value_heads * head_dim * 2
    attn_rows = heads * head_dim + 2 * lm.num_key_value_heads * head_dim + hidden
    linear, rows, other, kv_bytes = 0, 0, 0, 0
    for i in range(lm.num_hidden_layers):
        linear, rows, other = linear + attn, rows + attn_rows, other + 2 * hidden
        if lm.is_moe_layer(i):
            experts = lm.num_experts_per_tok + lm.n_shared_experts
            linear += 3 * hidden * lm.moe_intermediate_size * experts
            rows += (2 * lm.moe_intermediate_size + hidden) * experts
            other += lm.n_routed_experts * hidden  # the router
        else:
            linear += 3 * hidden * lm.intermediate_size
            rows += 2 * lm.intermediate_size + hidden
        kv_bytes += 2 * lm.num_key_value_heads * head_dim * context * kv_elem  # K and V read by attention
    linear, rows = linear + lm.vocab_size * hidden, rows + lm.vocab_size  # lm_head
    other += 2 * hidden  # final norm, one embedding row
    return float(linear * stored + rows * scale_per_row + other * elem + kv_bytes)


def vision_flops(model: Any, views: list[tuple[int, int]]) -> float:
    """FLOPs of the vision towers + projector, counted on the meta device (no compute)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dsocr_torch.weights.loader import build_meta_model

    meta = build_meta_model(model.config)
    total = 0.0
    for count, size in views:
        pixels = torch.empty(count, 3, size, size, device="meta")
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            meta.model.encode_views(pixels)
        total += counter.get_total_flops()
    return total


def synthetic_prompt(image: Any, mode: Any, bos: int, n_text: int = 10) -> Any:
    """A prompt of BOS, one image's tokens (in `mode`) and `n_text` random text ids, laid out as
    common.model.prompt lays out a request's."""
    import numpy as np

    from common.model.families import family_named
    from common.model.inputs import PreparedInputs
    from common.model.prompt import embedding_rows
    from common.model.tiling import image_token_count

    count = image_token_count(mode, image.crop_grid, image.has_crops)
    ids = np.random.default_rng(0).integers(3, 128000, size=1 + count + n_text).astype(np.int64)
    ids[0] = bos
    mask = np.zeros(ids.shape[0], dtype=bool)
    mask[1 : 1 + count] = True
    rows = embedding_rows(ids.shape[0], [image], [1], family_named(mode.family))
    return PreparedInputs(ids, mask, [image], embedding_rows=rows)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """As the CLI and the server run: the engine core's thread loads the model and does all its work (the timings
    below run there through `core.call`; torch's thread teams are per calling thread)."""
    import torch

    from common.engine.core import EngineCore
    from common.engine.sampling import SamplingParams
    from common.memory import keep_freed_heap
    from common.model.tokenizer import Tokenizer
    from dsocr_torch.backend import TorchBackend
    from dsocr_torch.weights.loader import load_model

    keep_freed_heap()  # as the CLI and the server run (freed memory reused, not mapped afresh each time)
    torch.manual_seed(0)
    config = f"{args.device}:{args.dtype}" + (f":{args.quantize}" if args.quantize != "none" else "")
    result: dict[str, Any] = {"config": config, "threads": torch.get_num_threads(),
                              "isa": torch.backends.cpu.get_cpu_capability()}

    def load() -> TorchBackend:
        start = time.perf_counter()
        model = load_model(args.checkpoint, device=args.device, dtype=args.dtype, pack=True, quantize=args.quantize)
        backend = TorchBackend(model, max_batch=1)  # packs bf16 CPU weights for oneDNN: part of loading
        result["load_s"] = time.perf_counter() - start
        return backend

    core = EngineCore(load, Tokenizer.from_dir(ROOT / "tests" / "fixtures" / "deepseek-ocr" / "model"))
    core.start().wait_ready()
    result["rss_after_load_gib"] = peak_rss_gib()
    prepared, length = core.call(lambda backend: measure(backend, args, result))
    model = core.call(lambda backend: backend.model)

    from benchmarks.routing import uniform_routing

    params = SamplingParams(max_new_tokens=args.decode_tokens, no_repeat_ngram_size=0, ignore_eos=True)
    # The same Base page through the engine core (vision + prefill + decode), as a request would run.
    with uniform_routing(model):  # the first token as a trained router would route the page
        result["ttft_uniform_s"] = core.submit(prepared, SamplingParams(max_new_tokens=1)).run().timings["ttft_s"]
    done = core.submit(prepared, params).run()
    core.close()
    result.update(engine_run(done))
    print(json.dumps(result), file=sys.stderr)

    device = model.device
    context = length + args.decode_tokens // 2
    result["bytes_per_token"] = decode_bytes_per_token(model, context)
    result["bandwidth_Bps"] = measure_bandwidth(device)
    result["matmul_flops"] = measure_matmul_rate(device, model.dtype)
    result["vision_flops_base"] = vision_flops(model, [(1, 1024)])
    result["vision_flops_gundam"] = vision_flops(model, [(1, 1024), (6, 640)])
    return result


def engine_run(done: Any) -> dict[str, Any]:
    """What one request through the engine core measured (a GenerationResult), and the process's peak RSS."""
    return {"ttft_s": done.timings["ttft_s"], "decode_tok_s": done.timings["decode_tokens_per_s"],
            "decode_tokens": done.completion_tokens, "peak_rss_gib": peak_rss_gib()}


def measure(backend: Any, args: argparse.Namespace, result: dict[str, Any]) -> tuple[Any, int]:
    """Vision and prefill timings on the backend (on the engine core's thread); returns the Base prompt."""
    import numpy as np

    from common.model.families import resolve_mode
    from common.model.inputs import ImageInput
    from common.model.tiling import image_token_count

    model = backend.model
    device = model.device
    rng = np.random.default_rng(0)

    def views(count: int, size: int) -> np.ndarray:
        return (rng.random((count, 3, size, size), dtype=np.float32) * 2 - 1).astype(np.float32)

    base = ImageInput(views(1, 1024)[0], None, (1, 1))
    gundam = ImageInput(views(1, 1024)[0], views(6, 640), (2, 3))

    def timed(fn: Any, repeat: int = 1) -> tuple[float, Any]:
        best, out = float("inf"), None
        for _ in range(repeat):
            sync(device)
            t0 = time.perf_counter()
            out = fn()
            sync(device)
            best = min(best, time.perf_counter() - t0)
        return best, out

    def encode(image: ImageInput) -> list[Any]:
        """Every view of the image, one unit of work each, as a PrefillJob runs them."""
        tiles = list(image.local_views) if image.has_crops else []
        return [backend.encode_view(view) for view in [image.global_view, *tiles]]

    timed(lambda: encode(base))  # warm-up (allocator, kernels, position tables)
    result["vision_base_s"], base_views = timed(lambda: encode(base), args.repeat)
    result["vision_gundam_s"], _ = timed(lambda: encode(gundam), args.repeat)
    family = model.config.family
    prepared = synthetic_prompt(base, resolve_mode("base", family=family), model.config.language.bos_token_id)
    result["prompt_tokens"] = prepared.prompt_tokens
    result["gundam_image_tokens"] = image_token_count(resolve_mode("gundam", family=family), gundam.crop_grid, True)

    embeds = backend.embed_prompt(prepared, base_views)
    length = prepared.prompt_tokens

    def prefill() -> Any:
        return backend.prefill(0, embeds, 0, length)  # one chunk: the LM's share of the prompt

    from benchmarks.routing import describe, moe_time, routing_spread, uniform_routing

    prefill()
    with routing_spread(model) as spread:
        prefill()
    result["routing_model"] = describe(spread)
    with uniform_routing(model), routing_spread(model) as spread:
        prefill()
    result["routing_uniform"] = describe(spread)
    own, uniform, own_moe, uniform_moe = [], [], [], []
    for _ in range(args.repeat):  # interleaved: the model's routing, then tokens spread as a trained router would
        with moe_time(model) as moe:
            own.append(timed(prefill)[0])
        own_moe.append(moe.seconds)
        with uniform_routing(model), moe_time(model) as moe:
            uniform.append(timed(prefill)[0])
        uniform_moe.append(moe.seconds)
    result["prefill_s"], result["prefill_uniform_s"] = min(own), min(uniform)
    result["prefill_moe_s"], result["prefill_moe_uniform_s"] = min(own_moe), min(uniform_moe)
    result["prefill_moe_flops"] = moe.flops(model, length)
    return prepared, length


# ---------------------------------------------------------------------------------------------- table
REFERENCE = {  # the authors' code on this machine, 2 threads, Base mode
    "cpu:float32": {"vision_base_s": "8.4–9.5", "decode_tok_s": "≈7", "peak_rss_gib": "13.9"},
    "cpu:bfloat16": {"vision_base_s": "4–6.5", "decode_tok_s": "12.5–15.7", "peak_rss_gib": "7.4"},
}


def print_table(results: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dsocr torch backend — real DeepSeek-OCR size, random weights")
    table.add_column("metric")
    for r in results:
        table.add_column(f"{r['config']} ({r['threads']} thr)", justify="right")
        if r["config"] in REFERENCE:
            table.add_column("authors' code", justify="right", style="dim")

    def row(label: str, fmt: Any, key: str | None = None) -> None:
        cells = [label]
        for r in results:
            cells.append(fmt(r))
            if r["config"] in REFERENCE:
                cells.append(REFERENCE[r["config"]].get(key or "", ""))
        table.add_row(*cells)

    row("load (s)", lambda r: f"{r['load_s']:.1f}")
    row("vision Base 1024² (s)", lambda r: f"{r['vision_base_s']:.2f}", "vision_base_s")
    row("vision Gundam 1024²+2x3x640² (s)", lambda r: f"{r['vision_gundam_s']:.2f}")
    row(
        "prefill Base, LM only (s), random weights' routing",
        lambda r: f"{r['prefill_s']:.2f} ({r['prompt_tokens']} tok; busiest expert "
        f"{r['routing_model']['top_expert_share']:.0%}, idle {r['routing_model']['unused_experts_share']:.0%})",
    )
    row(
        "prefill Base, LM only (s), uniform routing",
        lambda r: f"{r['prefill_uniform_s']:.2f} ({r['prefill_uniform_s'] / r['prefill_s']:.2f}x; busiest "
        f"{r['routing_uniform']['top_expert_share']:.0%}, idle {r['routing_uniform']['unused_experts_share']:.0%})",
    )
    row(
        "prefill MoE layers (s): model's routing / uniform; FLOP floor (s)",
        lambda r: f"{r['prefill_moe_s']:.2f} / {r['prefill_moe_uniform_s']:.2f}; "
        f"{r['prefill_moe_flops'] / r['matmul_flops']:.2f} ({r['prefill_moe_flops'] / 1e9:.0f} GFLOP)",
    )
    row("time to first token, Base (s): model's routing / uniform",
        lambda r: f"{r['ttft_s']:.2f} / {r['ttft_uniform_s']:.2f}")
    row("decode (tok/s)", lambda r: f"{r['decode_tok_s']:.1f} ({r['decode_tokens']} tok)", "decode_tok_s")
    row("peak RSS (GiB)", lambda r: f"{r['peak_rss_gib']:.1f}", "peak_rss_gib")
    row("bytes read / decoded token", lambda r: f"{r['bytes_per_token'] / GiB:.2f} GiB")
    row("measured bandwidth (copy)", lambda r: f"{r['bandwidth_Bps'] / 1e9:.1f} GB/s")
    row(
        "decode floor (tok/s) / reached",
        lambda r: (
            f"{r['bandwidth_Bps'] / r['bytes_per_token']:.1f} / "
            f"{r['decode_tok_s'] * r['bytes_per_token'] / r['bandwidth_Bps']:.0%}"
        ),
    )
    row("measured matmul rate", lambda r: f"{r['matmul_flops'] / 1e9:.0f} GFLOP/s")
    row(
        "vision Base FLOPs / floor (s) / reached",
        lambda r: (
            f"{r['vision_flops_base'] / 1e9:.0f} G / {r['vision_flops_base'] / r['matmul_flops']:.2f} / "
            f"{r['vision_flops_base'] / r['matmul_flops'] / r['vision_base_s']:.0%}"
        ),
    )
    row(
        "vision Gundam FLOPs / floor (s) / reached",
        lambda r: (
            f"{r['vision_flops_gundam'] / 1e9:.0f} G / {r['vision_flops_gundam'] / r['matmul_flops']:.2f} / "
            f"{r['vision_flops_gundam'] / r['matmul_flops'] / r['vision_gundam_s']:.0%}"
        ),
    )
    Console(width=180).print(table)


def isa_env(isa: str) -> dict[str, str]:
    """The workers' environment; `avx2` holds torch, oneDNN and MKL to AVX2."""
    env = os.environ.copy()
    if isa == "avx2":
        env.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")
        # Inductor's cache does not key its kernels by this override: the AVX2 kernels get a folder of their own.
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "torchinductor-dsocr-avx2"))
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/dsocr-bench-random-ckpt"))
    parser.add_argument(
        "--configs",
        default="",
        help="comma list of device:dtype (default: cpu:float32,cpu:bfloat16 and cuda:bfloat16 when CUDA is present)",
    )
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2, help="best of N for vision and prefill timings")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--worker", nargs=3, metavar=("DEVICE", "DTYPE", "QUANTIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--isa", choices=("native", "avx2"), default="native",
                        help="avx2: hold torch, oneDNN and MKL to AVX2 in the workers")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()

    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        args.device, args.dtype, args.quantize = args.worker
        print(json.dumps(worker(args)))
        return

    import torch

    configs = [c for c in args.configs.split(",") if c] or (
        ["cpu:float32", "cpu:bfloat16"] + (["cuda:bfloat16"] if torch.cuda.is_available() else [])
    )
    start = time.perf_counter()
    write_random_checkpoint(args.checkpoint)
    print(f"random checkpoint ready in {args.checkpoint} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    results = []
    env = isa_env(args.isa)
    for config in configs:
        device, dtype, *quantize = config.split(":")
        command = [
            sys.executable,
            __file__,
            "--worker",
            device,
            dtype,
            quantize[0] if quantize else "none",
            "--checkpoint",
            str(args.checkpoint),
            "--decode-tokens",
            str(args.decode_tokens),
            "--repeat",
            str(args.repeat),
            "--threads",
            str(args.threads),
        ]
        print(f"running {config} ...", file=sys.stderr)
        done = subprocess.run(command, capture_output=True, text=True, env=env)
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
