"""Cold start of a one-page run on the torch CPU backend: load, first and second page, whole process, peak memory.

What `dsocr page.png` costs end to end, on the full-size RANDOM-weight checkpoint of `bench_torch.py` (same
names, shapes and bytes as the real model), in Base mode. Every run is a fresh process that imports, loads the
model the way the CLI does (`Engine.load`), generates one page of exactly --tokens tokens (the one-page run:
its time from launch and its peak RSS are taken here), then a second, different page of the same size (its
time to first token is the warm reference).

Both sides run in the same session, interleaved: "before" is a `git worktree` of --base (default: e0f4db4, main
before the cold-start work), "after" is this checkout, with its prepared-layout cache (written by an untimed first load,
whose time is reported) and, for comparison, without it. The page cache holds the checkpoint (and the prepared
file) before every run, and the time to read the checkpoint's bytes from the page cache is measured here too:
the load target is relative to it, for the weights (the tokenizer, a 10 MB JSON parse, is shown apart).

    python benchmarks/bench_cold.py                              # bfloat16 and float32, one run each
    python benchmarks/bench_cold.py --dtypes bfloat16 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GiB = 1024**3
FIXTURE_MODEL = ROOT / "tests" / "fixtures" / "deepseek-ocr" / "model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
LAUNCH_ENV = "BENCH_COLD_LAUNCHED"  # time.monotonic() when the parent started the worker (system-wide clock)


# ---------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One fresh process on the checkout at args.root: load, page 1 (args.tokens tokens), page 2."""
    launched = float(os.environ[LAUNCH_ENV])
    sys.path.insert(0, str(args.root))
    import resource

    import torch
    from PIL import Image

    if args.threads:
        torch.set_num_threads(args.threads)
    from common.engine.engine import Engine
    from common.engine.sampling import SamplingParams
    from common.model.families import resolve_mode
    from common.model.prompt import task_prompt

    def peak_rss() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB

    result: dict[str, Any] = {"threads": torch.get_num_threads(), "imports_s": time.monotonic() - launched}
    start = time.perf_counter()
    engine = Engine.load(str(args.model_dir), backend="torch", device="cpu", dtype=args.dtype, offline=True,
                         max_batch=1, show_download_progress=False)
    result["load_s"] = time.perf_counter() - start
    for key, seconds in getattr(engine, "load_timings", {}).items():  # the before side may not have them
        result[f"load_{key}"] = seconds
    result["rss_after_load_gib"] = peak_rss()
    if args.load_only:
        return result
    mode = resolve_mode("base")
    prompt = task_prompt("markdown")
    for page, (image, tokens) in enumerate(((args.images[0], args.tokens), (args.images[1], 16)), 1):
        with Image.open(image) as im:
            prepared = engine.prepare(prompt, [im.convert("RGB")], mode)
        params = SamplingParams(max_new_tokens=tokens, no_repeat_ngram_size=0, ignore_eos=True)
        done = engine.generate(prepared, params)
        result[f"ttft{page}_s"] = done.timings["ttft_s"]
        result[f"total{page}_s"] = done.timings["total_s"]
        result[f"tokens{page}"] = done.completion_tokens
        result[f"decode{page}_tok_s"] = done.timings.get("decode_tokens_per_s", 0.0)
        if page == 1:  # everything a one-page run does, launch to last token
            result["whole_s"] = time.monotonic() - launched
            result["peak_rss_gib"] = peak_rss()
    result["prompt_tokens"] = int(prepared.input_ids.shape[0])
    engine.close()
    return result


# ---------------------------------------------------------------------------------------------- setup
def model_folder(checkpoint: Path, folder: Path) -> Path:
    """The random checkpoint (linked) with the fixture's tokenizer, so that Engine.load takes it as a model."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in [*checkpoint.glob("*.safetensors"), *checkpoint.glob("*.index.json"), checkpoint / "config.json"]:
        link = folder / source.name
        if not link.is_symlink():
            link.unlink(missing_ok=True)
            link.symlink_to(source.resolve())
    for name in TOKENIZER_FILES:
        shutil.copy(FIXTURE_MODEL / name, folder / name)
    return folder


def random_pages(folder: Path) -> list[Path]:
    import numpy as np
    from PIL import Image

    pages = []
    for seed in (1, 2):
        pixels = np.random.default_rng(seed).integers(0, 256, (1280, 1000, 3), dtype=np.uint8)
        path = folder / f"page{seed}.png"
        Image.fromarray(pixels).save(path)
        pages.append(path)
    return pages


def checkpoint_files(model_dir: Path) -> list[Path]:
    return sorted(p.resolve() for p in model_dir.glob("*.safetensors"))


def weight_bytes(model_dir: Path) -> int:
    import struct

    total = 0
    for file in checkpoint_files(model_dir):
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        total += sum(end - begin for name, info in header.items() if name != "__metadata__"
                     for begin, end in [info["data_offsets"]])
    return total


def read_files(files: list[Path], threads: int) -> float:
    """Seconds to read every byte of `files` on `threads` threads, each into its own reused 4 MiB buffer (small
    enough to stay in the CPU's caches: the fastest a reader gets the bytes out of the page cache)."""
    chunk = 4 << 20
    ranges = [(f, offset) for f in files for offset in range(0, f.stat().st_size, chunk)]
    local = threading.local()

    def read(item: tuple[Path, int]) -> None:
        if not hasattr(local, "buffer"):
            local.buffer = memoryview(bytearray(chunk))
        descriptor = os.open(item[0], os.O_RDONLY)
        try:
            os.preadv(descriptor, [local.buffer], item[1])
        finally:
            os.close(descriptor)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, ranges))
    return time.perf_counter() - start


def page_cache_read_s(files: list[Path], repeat: int = 3) -> dict[str, float]:
    """The best time to read the files from the page cache, on one thread and on one per core."""
    read_files(files, 1)  # into the page cache
    cores = os.cpu_count() or 1
    return {f"{t}": min(read_files(files, t) for _ in range(repeat)) for t in sorted({1, cores})}


def read_into_fresh_memory_s(files: list[Path]) -> float:
    """Seconds to read the files from the page cache into newly allocated memory, a file at a time: what a
    loader that copies the checkpoint into its own memory pays at least (every new page is a fault)."""
    import numpy as np

    start = time.perf_counter()
    for file in files:
        buffer = np.empty(file.stat().st_size, dtype=np.uint8)
        with file.open("rb", buffering=0) as handle:
            handle.readinto(memoryview(buffer))
        del buffer
    return time.perf_counter() - start


def available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GiB
    except OSError:
        pass
    return float("nan")


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def git(*command: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *command], check=True, capture_output=True, text=True).stdout.strip()


# ---------------------------------------------------------------------------------------------- runs
def run_worker(args: argparse.Namespace, root: Path, dtype: str, env: dict[str, str], load_only: bool = False,
               ) -> dict[str, Any]:
    # Every run starts with the bytes it reads in the page cache: the checkpoint, or with the prepared-layout
    # cache that file and what the checkpoint still gives (nothing but an int64 buffer for float32).
    prepared = args.model_dir / ".dsocr-prepared" / f"{dtype}.bin"
    cached = env.get("DSOCR_PREPARED_CACHE") == "1" and prepared.is_file()
    files = [prepared] if cached else []
    if not (cached and dtype == "float32"):
        files += checkpoint_files(args.model_dir)
    read_files(files, 1)
    # A settled machine: the previous worker's gigabytes were just freed, and handing them back keeps the kernel
    # busy for a few seconds (on a VM that returns free memory to its host, longer).
    time.sleep(args.settle)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--root", str(root), "--dtype", dtype,
               "--model-dir", str(args.model_dir), "--tokens", str(args.tokens), "--threads", str(args.threads),
               "--images", *map(str, args.images)]
    if load_only:
        command.append("--load-only")
    env = {**os.environ, **env, LAUNCH_ENV: repr(time.monotonic())}
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=str(root))
    out, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"worker ({root}, {dtype}) failed:\n{err[-4000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["process_s"] = time.monotonic() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/dsocr-bench-random-ckpt"))
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/dsocr-bench-cold-model"),
                        help="where the checkpoint is linked with a tokenizer (and the prepared cache is written)")
    parser.add_argument("--base", default="e0f4db4", help="git revision for 'before' (default: main before the "
                        "cold-start work)")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated on the first page")
    parser.add_argument("--repeat", type=int, default=1, help="runs per (side, dtype), interleaved")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-cache-side", action=argparse.BooleanOptionalAction, default=True,
                        help="also run 'after' with DSOCR_PREPARED_CACHE=0")
    parser.add_argument("--keep-cache", action="store_true", help="keep the prepared-layout files (GBs) afterwards")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds of quiet before each run (default 5)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--table", type=Path, help="print the tables of results written by --json, run nothing")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--images", nargs="*", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.table:
        print_table(json.loads(args.table.read_text()))
        return

    from benchmarks.bench_torch import write_random_checkpoint

    if not any(args.checkpoint.glob("*.safetensors")):  # an existing model folder is used as it is
        write_random_checkpoint(args.checkpoint)
    model_folder(args.checkpoint, args.model_dir)
    base = args.base
    before_root = Path(tempfile.mkdtemp(prefix="dsocr-bench-cold-before-"))
    pages_dir = Path(tempfile.mkdtemp(prefix="dsocr-bench-cold-pages-"))
    git("worktree", "add", "--detach", str(before_root), base)
    try:
        args.images = random_pages(pages_dir)
        results = measure(args, base, before_root)
    finally:
        git("worktree", "remove", "--force", str(before_root))
        shutil.rmtree(pages_dir, ignore_errors=True)
        if not args.keep_cache:
            shutil.rmtree(args.model_dir / ".dsocr-prepared", ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print_table(results)


def measure(args: argparse.Namespace, base: str, before_root: Path) -> dict[str, Any]:
    dtypes = [d for d in args.dtypes.split(",") if d]
    sides = {"before": (before_root, {}), "after": (ROOT, {"DSOCR_PREPARED_CACHE": "1"})}
    if args.no_cache_side:
        sides["after, no cache"] = (ROOT, {"DSOCR_PREPARED_CACHE": "0"})
    info: dict[str, Any] = {
        "base": git("rev-parse", "--short", base), "head": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "weight_bytes": weight_bytes(args.model_dir), "load_average_start": load_average(),
    }
    info["read_s"] = page_cache_read_s(checkpoint_files(args.model_dir))
    info["read_fresh_s"] = read_into_fresh_memory_s(checkpoint_files(args.model_dir))
    log(f"checkpoint read from the page cache: {info['read_s']} s (threads: seconds); load average {load_average()}")
    prepare: dict[str, float] = {}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {d: {s: [] for s in sides} for d in dtypes}
    # One dtype at a time, its cache written just before its runs: float32's 13 GB between bfloat16 runs would
    # push the bfloat16 files out of the page cache and churn the machine's memory, which the next run would pay.
    for dtype in dtypes:
        (args.model_dir / ".dsocr-prepared" / f"{dtype}.bin").unlink(missing_ok=True)
        log(f"after {dtype}: first load, writing the prepared-layout cache ...")
        prepare[dtype] = run_worker(args, ROOT, dtype, {"DSOCR_PREPARED_CACHE": "1"}, load_only=True)["load_s"]
        for repeat in range(args.repeat):
            for side, (root, env) in sides.items():
                needed = 1.2 * info["weight_bytes"] / GiB * (2 if dtype == "float32" else 1)
                if available_gib() < needed:
                    log(f"warning: {available_gib():.1f} GiB of memory available, the run needs about {needed:.0f}")
                log(f"[{repeat + 1}/{args.repeat}] {side} {dtype} (load average {load_average()}) ...")
                runs[dtype][side].append(run_worker(args, root, dtype, env))
    info["load_average_end"] = load_average()
    return {"info": info, "prepare_s": prepare, "runs": runs}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- table
def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console

    info = results["info"]
    console = Console(width=200)
    for dtype, sides in results["runs"].items():
        console.print(dtype_table(dtype, sides, info))
        console.print(f"  first load of 'after' (writes the prepared-layout cache, once): "
                      f"{results['prepare_s'][dtype]:.1f} s")
    console.print(f"before = {info['base']}, after = {info['head']}{' + uncommitted changes' if info['dirty'] else ''};"
                  f" page-cache read of the checkpoint ({info['weight_bytes'] / 1e9:.2f} GB): "
                  + ", ".join(f"{s:.2f} s on {t} thread(s)" for t, s in info["read_s"].items())
                  + f" (into fresh memory: {info['read_fresh_s']:.2f} s)"
                  + f"; load average {info['load_average_start']} at start, {info['load_average_end']} at end")


def dtype_table(dtype: str, sides: dict[str, list[dict[str, Any]]], info: dict[str, Any]) -> Any:
    from rich.table import Table

    read_s = min(info["read_s"].values())
    weights_gib = info["weight_bytes"] / GiB
    table = Table(title=f"one Base page, torch CPU {dtype} — full-size random weights "
                        f"(median of {max(len(r) for r in sides.values())} fresh process(es) per column)")
    table.add_column("metric")
    for side in sides:
        table.add_column(side, justify="right")
    table.add_column("target (after)", justify="left")

    def med(side: str, key: str) -> float:
        values = sorted(r[key] for r in sides[side])
        return values[len(values) // 2]

    def has(side: str, key: str) -> bool:
        return all(key in r for r in sides[side])

    def row(label: str, key: str, fmt: str = "{:.2f}", target: str = "", per: float = 1.0) -> None:
        """Each side's median of `key` (divided by `per`), or "-" where a side does not report it."""
        table.add_row(label, *[fmt.format(med(side, key) / per) if has(side, key) else "-" for side in sides], target)

    def ttft_ratios(side: str) -> list[float]:  # each process's own first / second page: same machine state
        return sorted(r["ttft1_s"] / r["ttft2_s"] for r in sides[side])

    weights_ratio = med("after", "load_weights_s") / read_s
    ttft_ratio = ttft_ratios("after")[len(sides["after"]) // 2]
    rss_margin = med("after", "peak_rss_gib") - weights_gib
    row("imports (s)", "imports_s")
    row("load (s)", "load_s")
    row("  load / page-cache read", "load_s", "{:.2f}×", per=read_s)
    row("  of which tokenizer (s)", "load_tokenizer_s")
    row("  of which weights (s)", "load_weights_s",
        target=f"≤ 1.5 × read {read_s:.2f} s: {weights_ratio:.2f}× {_ok(weights_ratio <= 1.5)}")
    row("  weights / page-cache read", "load_weights_s", "{:.2f}×", per=read_s)
    row("first page TTFT (s)", "ttft1_s")
    row("second page TTFT (s)", "ttft2_s")
    table.add_row("  first / second TTFT, per process", *[" ".join(f"{x:.2f}" for x in ttft_ratios(s)) for s in sides],
                  f"≤ 1.15× (median): {ttft_ratio:.2f}× {_ok(ttft_ratio <= 1.15)}")
    row(f"first page total, {med('after', 'tokens1'):.0f} tokens (s)", "total1_s")
    row("decode, first page (tok/s)", "decode1_tok_s", "{:.1f}")
    row("whole process, launch to last token (s)", "whole_s")
    rss_target = f"≤ weights {weights_gib:.2f} + 0.5 GiB: {rss_margin:+.2f} {_ok(rss_margin <= 0.5)}"
    row("peak RSS, one-page run (GiB)", "peak_rss_gib", target=rss_target if dtype == "bfloat16" else "")
    row("RSS after load (GiB)", "rss_after_load_gib")
    return table


def _ok(passed: bool) -> str:
    return "[green]met[/green]" if passed else "[red]not met[/red]"


if __name__ == "__main__":
    main()
