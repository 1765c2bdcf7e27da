"""Ray throughput: pages/s of `dsocr PDF -o DIR --ray` with 1 generation actor against 2 (or more), same run.

    python benchmarks/bench_ray.py                                  # tiny fixture model, torch CPU float32
    python benchmarks/bench_ray.py --pages 48 --actors 1,2,4 --cpus 8 --actor-cpus 2

A local Ray cluster (`--cpus` logical CPUs) starts once; each configuration runs the same PDF through
`common.documents.cluster.run_on_ray` (the code path of `--ray`) into a fresh folder, with a fresh actor pool.
`wall` counts
from the job's start (actors loading the model included) to its last page; `steady` counts from the first page
to the last, which is what a long job sees. Ratios are against the first configuration, measured in this run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_batch import MODEL_DIR, make_pdf  # noqa: E402

from common.documents.batch import BatchOptions  # noqa: E402
from common.documents.cluster import RayOptions, run_on_ray  # noqa: E402
from common.documents.workitems import WorkItem, expand_inputs  # noqa: E402
from common.engine.engine import (
    Engine,  # noqa: E402
    ModelOptions,
)
from common.engine.sampling import SamplingParams  # noqa: E402
from common.model.families import resolve_mode
from common.model.prompt import task_prompt  # noqa: E402


class Clock:
    """Progress that records when each page finishes."""

    def __init__(self) -> None:
        self.finished: list[float] = []

    def start(self, item: WorkItem) -> None:
        pass

    def token(self, live_tokens: int, live_seconds: float) -> None:
        pass

    def finish(self, item: WorkItem, status: str, tokens: int = 0, seconds: float = 0.0, message: str = "") -> None:
        if status != "ok":
            raise SystemExit(f"benchmark run failed: {item.label}: {message}")
        self.finished.append(time.perf_counter())


def run_once(engine: Engine, pdf: Path, actors: int, args: argparse.Namespace, out_dir: Path) -> tuple[float, float]:
    """(wall s, steady s) of one job."""
    model = ModelOptions(args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                         max_batch=args.max_batch)
    opts = BatchOptions(prompt=task_prompt("markdown"), mode=resolve_mode(args.mode),
                        params=SamplingParams(max_new_tokens=args.max_new_tokens), out_dir=out_dir,
                        overwrite=True, dpi=args.dpi)
    clock = Clock()
    options = RayOptions(actors=actors, actor_cpus=args.actor_cpus, show_progress=False)
    t0 = time.perf_counter()
    run_on_ray(model, engine, expand_inputs([str(pdf)], None), opts, options, clock)
    return clock.finished[-1] - t0, clock.finished[-1] - clock.finished[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MODEL_DIR))
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--mode", default="tiny")
    parser.add_argument("--pages", type=int, default=24)
    parser.add_argument("--dpi", type=int, default=72)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=None, help="pages each actor decodes together")
    parser.add_argument("--actors", default="1,2", help="actor counts to compare (the first is the baseline)")
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--actor-cpus", type=float, default=0.5,
                        help="CPUs each actor reserves (its torch threads: at least 1); leave room for preparing")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration, interleaved")
    args = parser.parse_args()

    import ray
    from rich.console import Console
    from rich.table import Table

    counts = [int(n) for n in args.actors.split(",")]
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    engine = Engine.load(args.model, weights=False)  # the driver's tokenizer; actors load the weights
    timings: dict[int, list[tuple[float, float]]] = {n: [] for n in counts}
    try:
        with tempfile.TemporaryDirectory(prefix="dsocr-bench-ray-") as tmp:
            pdf = make_pdf(Path(tmp) / "bench.pdf", args.pages)
            for _ in range(args.repeats):  # interleaved so drifting machine load hits every configuration
                for n in counts:
                    timings[n].append(run_once(engine, pdf, n, args, Path(tmp) / f"out{n}"))
    finally:
        ray.shutdown()

    table = Table(title=f"dsocr --ray: {args.pages}-page PDF, mode {args.mode}, {args.max_new_tokens} new tokens/page, "
                  f"{args.backend}/{args.device}/{args.dtype}, local cluster of {args.cpus} CPUs, "
                  f"{args.actor_cpus:g} CPU per actor")
    for column in ("actors", "wall pages/s (best)", "steady pages/s (best)", "runs wall/steady (s)",
                   f"steady vs {counts[0]} actor(s)"):
        table.add_column(column, justify="right")
    steady = {n: (args.pages - 1) / min(s for _, s in runs) for n, runs in timings.items()}
    for n, runs in timings.items():
        table.add_row(str(n), f"{args.pages / min(w for w, _ in runs):.2f}", f"{steady[n]:.2f}",
                      "  ".join(f"{w:.1f}/{s:.1f}" for w, s in runs), f"{steady[n] / steady[counts[0]]:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
