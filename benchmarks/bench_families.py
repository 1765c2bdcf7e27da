"""DeepSeek-OCR 2 next to DeepSeek-OCR on the torch backend, full size, RANDOM weights, in the same run.

For each family a random bfloat16 checkpoint with exactly the real tensor names and shapes is written once
(from tests/fixtures/<family>/real_config.json and real_checkpoint_shapes.json) and loaded through the normal
loader, each in its own process so that peak RSS is that model's alone. The page is the fixtures' letter-size
document (850x1100) prepared by common's preprocessing in each family's default mode (DeepSeek-OCR: gundam,
1024 global + 640 tiles; DeepSeek-OCR 2: gundam, 1024 global + 768 tiles). Ratios are OCR 2 / OCR. Random
weights send most of a page's tokens to one expert; time to first token is also shown with the routers' choice
replaced by uniform routing (benchmarks/routing.py), as a trained router spreads them.

    python benchmarks/bench_families.py                      # cpu bfloat16, 64 decoded tokens
    python benchmarks/bench_families.py --device cpu --dtype float32 --decode-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_torch import (  # noqa: E402
    engine_run,
    measure_matmul_rate,
    sync,
    vision_flops,
    write_random_checkpoint,
)

FIXTURES = ROOT / "tests" / "fixtures"
FAMILY_FIXTURES = {"deepseek-ocr": FIXTURES / "deepseek-ocr", "deepseek-ocr-2": FIXTURES / "deepseek-ocr-2"}
PAGE = FIXTURES / "deepseek-ocr-2" / "images" / "doc_text.png"
PROMPT = "<image>\n<|grounding|>Convert the document to markdown."


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from common.documents.images import load_image
    from common.model.families import resolve_mode
    from common.model.prompt import prepare_inputs
    from common.model.tokenizer import Tokenizer
    from dsocr_torch.backend import TorchBackend
    from dsocr_torch.weights.loader import load_model

    torch.manual_seed(0)
    start = time.perf_counter()
    model = load_model(args.checkpoint, device=args.device, dtype=args.dtype)
    backend = TorchBackend(model, max_batch=1)  # packs bf16 CPU weights for oneDNN: part of loading
    family = model.config.family
    result: dict[str, Any] = {"family": family.name, "title": family.title, "threads": torch.get_num_threads()}
    result["load_s"] = time.perf_counter() - start
    mode = resolve_mode(family=family)
    tokenizer = Tokenizer.from_dir(FIXTURES / "deepseek-ocr" / "model")  # the two families share it
    prepared = prepare_inputs(tokenizer, PROMPT, [load_image(PAGE)], mode)
    image = prepared.images[0]
    views = [image.global_view, *(image.local_views if image.has_crops else ())]
    result.update(mode=mode.name, tile=mode.image_size, crop_grid=list(image.crop_grid))
    result.update(prompt_tokens=prepared.prompt_tokens, image_tokens=prepared.image_tokens)

    def timed(fn: Any) -> float:
        best = float("inf")
        for _ in range(args.repeat):
            sync(model.device)
            t0 = time.perf_counter()
            fn()
            sync(model.device)
            best = min(best, time.perf_counter() - t0)
        return best

    def encode() -> list[Any]:
        """Every view of the page, one unit of work each, as a PrefillJob runs them."""
        return [backend.encode_view(view) for view in views]

    encode()  # warm-up (allocator, kernels, position tables)
    result["vision_s"] = timed(encode)

    from benchmarks.routing import uniform_routing
    from common.engine.core import EngineCore
    from common.engine.sampling import SamplingParams

    # The page through the engine core (vision + prefill + decode), as a request runs.
    params = SamplingParams(max_new_tokens=args.decode_tokens, no_repeat_ngram_size=0, ignore_eos=True)
    core = EngineCore(lambda: backend, tokenizer).start()
    core.wait_ready()
    with uniform_routing(model):  # the first token as a trained router would route the page (random weights do not)
        result["ttft_uniform_s"] = core.submit(prepared, SamplingParams(max_new_tokens=1)).run().timings["ttft_s"]
    done = core.submit(prepared, params).run()
    core.close()
    result.update(engine_run(done))
    # Machine-independent: the vision work counted on the meta device, and this machine's matmul rate.
    sizes = [(1, mode.global_size)] + ([(len(image.local_views), mode.image_size)] if image.has_crops else [])
    result["vision_flops"] = vision_flops(model, sizes)
    result["matmul_flops"] = measure_matmul_rate(model.device, model.dtype)
    return result


def print_table(results: list[dict[str, Any]], config: str) -> None:
    from rich.console import Console
    from rich.table import Table

    v1, v2 = (next(r for r in results if r["family"] == name) for name in FAMILY_FIXTURES)
    table = Table(title=f"DeepSeek-OCR vs DeepSeek-OCR 2, torch {config} ({v1['threads']} threads), full size, "
                  "random weights, one 850x1100 page in each default mode")
    for column in ("metric", v1["title"], v2["title"], "OCR 2 / OCR"):
        table.add_column(column, justify="left" if column == "metric" else "right")

    def row(label: str, key: str, fmt: str, ratio: bool = True) -> None:
        cells = [format(v1[key], fmt), format(v2[key], fmt)]
        table.add_row(label, *cells, f"{v2[key] / v1[key]:.2f}" if ratio else "")

    table.add_row("mode", f"{v1['mode']} ({v1['tile']} px tiles)", f"{v2['mode']} ({v2['tile']} px tiles)", "")
    table.add_row("crop grid (w x h)", "x".join(map(str, v1["crop_grid"])), "x".join(map(str, v2["crop_grid"])), "")
    row("image tokens / prompt tokens", "image_tokens", "d")
    row("load (s)", "load_s", ".1f")
    row("vision, default mode (s)", "vision_s", ".2f")
    table.add_row("vision GFLOPs (counted) / floor at the matmul rate (s)",
                  *(f"{r['vision_flops'] / 1e9:.0f} / {r['vision_flops'] / r['matmul_flops']:.2f}" for r in (v1, v2)),
                  f"{v2['vision_flops'] / v1['vision_flops']:.2f}")
    row("time to first token (s): random weights' routing", "ttft_s", ".2f")
    row("time to first token (s): uniform routing (as trained)", "ttft_uniform_s", ".2f")
    row("decode (tok/s)", "decode_tok_s", ".1f")
    row("peak RSS (GiB)", "peak_rss_gib", ".2f")
    Console(width=160).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, default=Path("/tmp/dsocr-bench-families"),
                        help="folder for the random checkpoints (one sub-folder per family, written once)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2, help="best of N for the vision timing")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()

    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        args.checkpoint = args.worker
        print(json.dumps(worker(args)))
        return

    results = []
    for name, fixtures in FAMILY_FIXTURES.items():
        folder = args.checkpoints / name
        start = time.perf_counter()
        write_random_checkpoint(
            folder, config=fixtures / "real_config.json", shapes_file=fixtures / "real_checkpoint_shapes.json"
        )
        print(f"{name}: random checkpoint ready in {folder} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        command = [sys.executable, __file__, "--worker", str(folder), "--device", args.device, "--dtype", args.dtype,
                   "--decode-tokens", str(args.decode_tokens), "--repeat", str(args.repeat),
                   "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode != 0:
            sys.exit(f"{name} failed (exit {done.returncode}; -9: killed, e.g. out of memory):\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print_table(results, f"{args.device} {args.dtype}")


if __name__ == "__main__":
    main()
