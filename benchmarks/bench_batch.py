"""Batch throughput of the CLI: pages/s on a 10-page PDF with and without the prefetch overlap.

    python benchmarks/bench_batch.py                       # tiny fixture model, torch on CPU, float32
    python benchmarks/bench_batch.py --backend mlx --pages 20 --max-new-tokens 32

The model is loaded once; each configuration runs the same pages through
`common.documents.batch.run_batch` (the code path of
`dsocr report.pdf -o out/`), writing outputs to a temporary folder. With prefetch, a background thread renders
and tiles page n+1 while page n generates, so the difference is the preparation time the overlap hides.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.documents.batch import BatchOptions, Outcome, run_batch  # noqa: E402
from common.documents.workitems import DEFAULT_DPI, WorkItem, expand_inputs, prepared_items  # noqa: E402
from common.engine.engine import Engine  # noqa: E402
from common.engine.sampling import SamplingParams  # noqa: E402
from common.model.families import resolve_mode
from common.model.prompt import task_prompt  # noqa: E402

MODEL_DIR = ROOT / "tests" / "fixtures" / "deepseek-ocr" / "model"


def make_pdf(path: Path, pages: int) -> Path:
    """US-letter pages (612x792 pt) of dense text, so rendering at 144 dpi gives 1224x1584 px like a scan."""
    font = ImageFont.load_default()
    images = []
    for number in range(1, pages + 1):
        page = Image.new("RGB", (612, 792), "white")
        draw = ImageDraw.Draw(page)
        draw.text((50, 40), f"Page {number}: quarterly report", fill="black", font=font)
        for line in range(60):
            draw.text(
                (50, 70 + line * 11),
                f"{line:02d} revenue {number * line * 37 % 1000:>4} units, "
                f"margin {(number + line) % 17}.{line % 10}% lorem ipsum dolor sit amet",
                fill="black",
                font=font,
            )
        images.append(page)
    images[0].save(path, "PDF", save_all=True, append_images=images[1:], resolution=72.0)
    return path


class Silent:
    """Progress that shows nothing (the table at the end is the output)."""

    def start(self, item: WorkItem) -> None:
        pass

    def token(self, live_tokens: int, live_seconds: float) -> None:
        pass

    def finish(self, item: WorkItem, status: str, tokens: int = 0, seconds: float = 0.0, message: str = "") -> None:
        pass


def run_once(engine: Engine, pdf: Path, prefetch: int, args: argparse.Namespace, out_dir: Path) -> float:
    items = expand_inputs([str(pdf)], None)
    opts = BatchOptions(
        prompt=task_prompt("markdown"),
        mode=resolve_mode(args.mode, family=engine.family),
        params=SamplingParams(max_new_tokens=args.max_new_tokens),
        out_dir=out_dir,
        overwrite=True,
        dpi=args.dpi,
        prefetch=prefetch,
    )
    t0 = time.perf_counter()
    outcomes: list[Outcome] = run_batch(engine, items, opts, Silent())
    seconds = time.perf_counter() - t0
    failed = [o for o in outcomes if o.status != "ok"]
    if failed:
        raise SystemExit(f"benchmark run failed: {failed[0].item.label}: {failed[0].message}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MODEL_DIR))
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--mode", default="tiny", help="tiny keeps the vision cost of the tiny model small")
    parser.add_argument("--pages", type=int, default=10)
    parser.add_argument("--dpi", type=int, default=DEFAULT_DPI)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (best and median reported)")
    parser.add_argument("--prefetch", type=int, default=2, help="prefetch depth of the overlapped run")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console()
    engine = Engine.load(args.model, backend=args.backend, device=args.device, dtype=args.dtype)
    with tempfile.TemporaryDirectory(prefix="dsocr-bench-") as tmp:
        pdf = make_pdf(Path(tmp) / "bench.pdf", args.pages)
        # Preparation alone, for reference: render + load + tile + tokenize, no generation.
        items = expand_inputs([str(pdf)], None)
        t0 = time.perf_counter()
        mode = resolve_mode(args.mode, family=engine.family)
        for prepared in prepared_items(engine, items, task_prompt("markdown"), mode, args.dpi, 0):
            assert prepared.error is None, prepared.error
        prepare_s = (time.perf_counter() - t0) / len(items)

        run_once(engine, pdf, 0, args, Path(tmp) / "warmup")  # first-call costs (allocations, caches)
        timings: dict[int, list[float]] = {0: [], args.prefetch: []}
        for _ in range(args.repeats):  # interleaved so drifting machine load hits both alike
            for prefetch in timings:
                timings[prefetch].append(run_once(engine, pdf, prefetch, args, Path(tmp) / f"out{prefetch}"))
    engine.close()

    # The best run is the least disturbed by other load on the machine; the median shows the spread.
    rates = {p: args.pages / min(ts) for p, ts in timings.items()}
    table = Table(
        title=f"dsocr batch: {args.pages}-page PDF at {args.dpi} dpi, mode {args.mode}, "
        f"{args.max_new_tokens} new tokens/page, {args.backend}/{args.device}/{args.dtype}"
    )
    table.add_column("configuration")
    table.add_column("pages/s (best)", justify="right")
    table.add_column("s/page (median)", justify="right")
    table.add_column("runs (s)", justify="right")
    table.add_column("vs no overlap", justify="right")
    for prefetch, ts in timings.items():
        name = "no overlap (--prefetch 0)" if prefetch == 0 else f"overlap (--prefetch {prefetch})"
        table.add_row(
            name,
            f"{rates[prefetch]:.2f}",
            f"{statistics.median(ts) / args.pages:.3f}",
            " ".join(f"{t:.2f}" for t in ts),
            f"{rates[prefetch] / rates[0]:.2f}x",
        )
    console.print(table)
    console.print(
        f"preparation alone (render + tile + tokenize): {prepare_s:.3f} s/page; the overlap can hide "
        f"at most this much per page."
    )


if __name__ == "__main__":
    main()
