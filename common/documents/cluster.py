"""Batch OCR on a Ray cluster (`dsocr INPUTS -o DIR --ray [ADDRESS]`): the local batch as a Ray Data pipeline.

One row per page flows through:

1. the driver: inputs expanded into work items, finished pages left out (`batch.BatchRun`, as a local run);
2. CPU tasks: decode / render the page and tile it (`workitems.prepare_item` with the weightless engine the
   driver loaded, so CPU nodes need no model files);
3. an actor pool: each actor holds one Engine, whose core runs the model on its own thread; Ray Data hands an
   actor up to --max-batch pages at once (concurrent calls), so they decode together, and each page's outputs
   are written to DIR the moment it finishes (`batch.finish_item`: the local run's atomic writes);
4. the driver again: one small result row per page gives progress, --json lines, `failed.jsonl` and the combined
   PDFNAME.md once all of a document's pages are in (`batch.BatchRun`).

Faults: a page that fails (bad input, generation or write error) becomes a failed result row, never an exception.
A killed actor is restarted by Ray and its pages retried (Ray Data's defaults: actors come back, their tasks are
retried); a retried page whose NAME.json an earlier attempt already wrote is not generated or written again. A
page whose task fails anyway (a bug) is recorded as failed instead of stopping the job.

Ray is an optional dependency (`pip install "dsocr[ray]"`), imported only here and only when --ray is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import pickle
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.documents.batch import (
    BatchOptions,
    BatchRun,
    Outcome,
    Progress,
    describe_error,
    finish_item,
)
from common.documents.outputs import atomic_write, output_paths, stored_record
from common.documents.workitems import Prepared, WorkItem, prepare_item
from common.engine.engine import Engine, ModelOptions
from common.engine.requests import RequestHandle
from common.errors import DsocrError
from common.model.inputs import ImageInput, PreparedInputs
from common.model.tiling import BF16_LUT

log = logging.getLogger("dsocr")

INSTALL_HINT = "--ray needs Ray Data: pip install 'dsocr[ray]' (or pip install 'ray[data]')"
FAILED_FILE = "failed.jsonl"  # this run's failed pages, in DIR
JOB_MARKER = ".dsocr-ray-job"  # with --overwrite: pages whose NAME.json is newer were written by this job
PREPARE_CPUS = 1  # CPUs of each decode / render / tile task
DEFAULT_CALLS = {True: 32, False: 8}  # pages handed to one actor at once without --max-batch (GPU / CPU)
NO_RESULT = "no result from the cluster for this page (its task failed; -v shows Ray's log)"


class ClusterError(DsocrError):
    """Ray missing, a cluster that cannot be reached, or a job Ray gave up on: one line, exit 2."""


@dataclass(frozen=True)
class RayOptions:
    address: str = "auto"  # "auto": a running cluster (RAY_ADDRESS, `ray start` here) or else a new local one
    actors: int | None = None  # generation actors (default: one per GPU, or 1 without GPUs)
    actor_cpus: float = 1.0  # CPUs each actor reserves (on CPU nodes: its torch threads)
    show_progress: bool = True  # Ray Data's progress bars


def check_ray_args(args: Any) -> None:
    """--ray's ADDRESS sorted out; -o DIR and Ray itself required unless it is a dry run (that prepares here)."""
    args.ray = ray_address(args.ray, args.inputs)
    if not args.dry_run:
        if args.output is None:
            raise ClusterError("--ray writes its outputs to -o DIR: add -o DIR (a folder every node can reach)")
        import_ray()


def ray_address(value: str, inputs: list[str]) -> str:
    """--ray's ADDRESS. Before the inputs (`--ray scans/`) argparse takes the first input for it: a value that is
    no address (auto, local, host:port) goes back to the front of `inputs`, and means auto."""
    if value in ("auto", "local") or ":" in value:
        return value
    inputs.insert(0, value)
    return "auto"


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the extra `ray[data]`, not bare ray
    except ImportError:
        raise ClusterError(INSTALL_HINT) from None
    return ray


# ------------------------------------------------------------------------------------------ wire format

# The views are bfloat16-rounded float32 made from 8-bit pixels through BF16_LUT, so each value is one of 256:
# shipping the byte that makes it (and looking it up on the actor) moves a quarter of the bytes between nodes.
_CODE_OF_BITS = np.full(1 << 16, 256, dtype=np.uint16)
_CODE_OF_BITS[BF16_LUT.view(np.uint32) >> 16] = np.arange(256, dtype=np.uint16)


def encode_views(views: np.ndarray) -> np.ndarray:
    """float32 views -> uint8 codes with BF16_LUT[codes] == views exactly; the array itself if that cannot be."""
    if views.dtype != np.float32:
        return views
    bits = np.ascontiguousarray(views).view(np.uint32)
    codes = _CODE_OF_BITS[bits >> 16]
    if (bits & 0xFFFF).any() or (codes > 255).any():
        return views
    return codes.astype(np.uint8)


def decode_views(views: np.ndarray) -> np.ndarray:
    return BF16_LUT[views] if views.dtype == np.uint8 else views


def _map_views(inputs: PreparedInputs, fn: Any) -> PreparedInputs:
    images = [
        ImageInput(fn(im.global_view), fn(im.local_views) if im.local_views is not None else None, im.crop_grid)
        for im in inputs.images
    ]
    return dataclasses.replace(inputs, images=images)


def pack_prepared(prepared: Prepared) -> bytes:
    """A prepared page for the trip to an actor: compact views, and the error as its message (always picklable)."""
    inputs = _map_views(prepared.inputs, encode_views) if prepared.inputs is not None else None
    error = describe_error(prepared.error) if prepared.error is not None else None
    return pickle.dumps((prepared.item, prepared.image, inputs, prepared.prepare_s, error),
                        protocol=pickle.HIGHEST_PROTOCOL)


def unpack_prepared(payload: bytes) -> tuple[Prepared, str | None]:
    item, image, inputs, prepare_s, error = pickle.loads(payload)
    inputs = _map_views(inputs, decode_views) if inputs is not None else None
    return Prepared(item, image, inputs, prepare_s), error


# ------------------------------------------------------------------------------------------ stages


class Preparer:
    """What the CPU tasks need of the driver's engine: its tokenizer and model family (an Engine holds locks, which
    do not pickle)."""

    prepare = Engine.prepare

    def __init__(self, engine: Any) -> None:
        self.tokenizer = engine.tokenizer
        self.family = engine.family


_engines: dict[bytes, Any] = {}  # per worker process: the driver's Preparer, by object id


def _weightless_engine(ref: Any) -> Any:
    """The Preparer behind `ref`, fetched once per worker process: rebuilding its tokenizer takes ~1 s."""
    key = ref.binary()
    if key not in _engines:
        import ray

        _engines.clear()  # an earlier job's
        _engines[key] = ray.get(ref)
    return _engines[key]


def prepare_rows(batch: dict[str, Any], *, engine_ref: Any, opts: BatchOptions) -> dict[str, Any]:
    """CPU stage: each row's page decoded / rendered and tiled (a failure travels on as the page's error)."""
    engine = _weightless_engine(engine_ref)
    payloads = [pack_prepared(prepare_item(engine, pickle.loads(raw), opts.prompt, opts.mode, opts.dpi))
                for raw in batch["item"]]
    return {"index": np.asarray(batch["index"]), "payload": np.array(payloads, dtype=object)}


class PageGenerator:
    """Generation actor: one Engine (its core runs on its own thread); each call generates and writes its pages.

    Calls arrive concurrently (up to --max-batch), so the pages of several calls are decoded in one batch.
    """

    def __init__(self, model: ModelOptions, opts: BatchOptions, job_started: float | None, verbose: int) -> None:
        from common.logs import setup_logging

        setup_logging(verbose)
        self.opts = opts
        self.job_started = job_started
        self.engine = model.load(weights=True, show_download_progress=False)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        pages = [unpack_prepared(payload) for payload in batch["payload"]]
        started = time.perf_counter()
        running = [(prepared, self._start(prepared, error)) for prepared, error in pages]
        results = [started_or_done if isinstance(started_or_done, Outcome)
                   else self._finish(prepared, started_or_done, started)
                   for prepared, started_or_done in running]
        rows = np.array([_result_json(o) for o in results], dtype=object)
        return {"index": np.asarray(batch["index"]), "result": rows}

    def _start(self, prepared: Prepared, error: str | None) -> Any:
        """The page's request handle, or its Outcome when there is nothing to generate."""
        item = prepared.item
        if error is not None:
            return Outcome(item, "failed", message=error)
        done = self._written_by_this_job(item)
        if done is not None:  # an earlier attempt (on a worker that died since) finished it
            log.info("%s: written by an earlier attempt", item.label)
            return Outcome(item, "ok", done.get("usage", {}).get("completion_tokens", 0), record=done)
        try:
            handle = self.engine.submit(prepared.inputs, self.opts.params)
        except Exception as exc:
            return Outcome(item, "failed", message=describe_error(exc))
        self._submitted(prepared, handle)
        return handle

    def _submitted(self, prepared: Prepared, handle: RequestHandle) -> None:
        """Called once a page is queued on the engine (tests hook in here)."""

    def _finish(self, prepared: Prepared, handle: RequestHandle, started: float) -> Outcome:
        while not handle.wait(1.0):
            core = self.engine.core
            if core is None or not core.ready:  # a bug: fail the task rather than wait forever
                raise RuntimeError("the engine core stopped")
        return self._complete(prepared, handle, started)

    def _complete(self, prepared: Prepared, handle: RequestHandle, started: float) -> Outcome:
        """The finished page's outputs written (the one place an actor writes)."""
        return finish_item(prepared, handle, self.opts, started)

    def _written_by_this_job(self, item: WorkItem) -> dict[str, Any] | None:
        out_dir = self.opts.out_dir
        stored = stored_record(out_dir, item) if out_dir is not None else None
        if stored is None or out_dir is None:
            return None
        if self.job_started is not None:  # --overwrite: only a NAME.json newer than the job counts
            try:
                if output_paths(out_dir, item)["json"].stat().st_mtime < self.job_started:
                    return None
            except OSError:
                return None
        return stored

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.close()


def _result_json(outcome: Outcome) -> str:
    return json.dumps({"status": outcome.status, "tokens": outcome.tokens, "seconds": outcome.seconds,
                       "message": outcome.message, "record": outcome.record}, ensure_ascii=False)


# ------------------------------------------------------------------------------------------ driver


def run_on_ray(
    model: ModelOptions,
    engine: Any,
    items: list[WorkItem],
    opts: BatchOptions,
    options: RayOptions,
    progress: Progress,
    verbose: int = 0,
) -> list[Outcome]:
    """Runs the batch on a Ray cluster; `engine` is the driver's weightless Engine (tokenizer and config)."""
    ray = import_ray()
    if opts.out_dir is None:
        raise ClusterError("--ray writes its outputs to -o DIR; add -o DIR (a folder every node can reach)")
    run = BatchRun(items, opts, progress)
    if run.todo:
        with contextlib.redirect_stdout(_RayMessages(verbose)):
            owned = _connect(ray, options.address, verbose)
            try:
                _run_pipeline(ray, model, engine, run, opts, options, verbose)
            finally:
                if owned:
                    ray.shutdown()
    _write_failures(opts.out_dir, run.outcomes)
    return run.outcomes


def _connect(ray: Any, address: str, verbose: int) -> bool:
    """Joins the cluster at `address` (auto: a running one, else a new local one); True if this call did."""
    if ray.is_initialized():  # the caller's own connection (tests, a notebook): keep it
        return False
    quiet = {"logging_level": logging.INFO if verbose else logging.ERROR, "log_to_driver": verbose > 0}
    try:
        if address == "auto":
            try:
                ray.init(address="auto", **quiet)
            except ConnectionError:  # no cluster running here: a local one, for this job only
                ray.init(include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    except Exception as exc:
        raise ClusterError(f"cannot join the Ray cluster at {address}: {_first_line(exc)}") from None
    return True


def _run_pipeline(
    ray: Any,
    model: ModelOptions,
    engine: Any,
    run: BatchRun,
    opts: BatchOptions,
    options: RayOptions,
    verbose: int,
) -> None:
    assert opts.out_dir is not None
    gpu = _use_gpus(ray, model)
    actors = options.actors or (max(1, int(ray.cluster_resources().get("GPU", 0))) if gpu else 1)
    calls = model.max_batch or DEFAULT_CALLS[gpu]
    _check_resources(ray.cluster_resources(), actors, options.actor_cpus, gpu)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = options.show_progress
    ctx.enable_rich_progress_bars, ctx.use_ray_tqdm = True, False  # rich, drawn by this process
    ctx.print_on_execution_start = verbose > 0
    ctx.enable_auto_log_stats = False
    ctx.max_errored_blocks = -1  # a page whose task raised (a bug: page errors are result rows) is recorded below
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.CRITICAL)

    job_started = _mark_job(opts.out_dir) if opts.overwrite else None
    worker_opts = dataclasses.replace(opts, json_lines=False, stream_text=False, stdout=None)
    todo = run.todo
    rows = [{"index": i, "item": pickle.dumps(item)} for i, item in enumerate(todo)]
    # One page per block, so pages spread over the CPU tasks and the actors' concurrent calls.
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(prepare_rows, batch_size=1, num_cpus=PREPARE_CPUS,
                        fn_kwargs={"engine_ref": ray.put(Preparer(engine)), "opts": worker_opts})
    threads = str(max(1, int(options.actor_cpus)))
    ds = ds.map_batches(
        PageGenerator,
        batch_size=1,
        fn_constructor_kwargs={"model": model, "opts": worker_opts, "job_started": job_started, "verbose": verbose},
        compute=ray.data.ActorPoolStrategy(
            size=actors, max_concurrent_calls_per_actor=calls, max_tasks_in_flight_per_actor=calls + 2,
            enable_true_multi_threading=True,
        ),
        num_gpus=1 if gpu else 0,
        num_cpus=options.actor_cpus,
        # The actor's torch threads follow its CPU share. Its own runtime_env also keeps Ray Data from fusing
        # the two stages into one, which would decode and tile pages on the (GPU) actors.
        runtime_env={"env_vars": {"OMP_NUM_THREADS": threads}},
    )
    seen: set[int] = set()
    try:
        for row in ds.iter_rows():
            index = int(row["index"])
            if index in seen:  # Ray delivered a retried page twice: it was written once, report it once
                continue
            seen.add(index)
            result = json.loads(row["result"])
            run.item_done(Outcome(todo[index], result["status"], result["tokens"], result["seconds"],
                                  result["message"], record=result["record"]))
    except (KeyboardInterrupt, DsocrError):
        raise
    except Exception as exc:  # the job itself failed (e.g. no actor could load the model)
        if verbose:
            log.exception("the Ray job failed")
        raise ClusterError(f"the Ray job failed: {_first_line(exc)}") from None
    finally:
        if job_started is not None:
            with contextlib.suppress(OSError):
                (opts.out_dir / JOB_MARKER).unlink()
    for index, item in enumerate(todo):
        if index not in seen:
            run.item_done(Outcome(item, "failed", message=NO_RESULT))


def _use_gpus(ray: Any, model: ModelOptions) -> bool:
    """One GPU per actor with --device cuda, or with --device auto on a cluster that has GPUs (not for MLX)."""
    if model.device == "cuda":
        return True
    if model.device != "auto" or model.backend == "mlx":
        return False
    return ray.cluster_resources().get("GPU", 0) > 0


def _check_resources(total: dict[str, float], actors: int, actor_cpus: float, gpu: bool) -> None:
    """Actors that cannot all start, or that leave no CPU to prepare pages, would stall the job: refuse them."""
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if gpu and actors > gpus:
        have = f"{gpus:g} GPU(s)" if gpus else "no GPU (use --device cpu)"
        raise ClusterError(f"{actors} generation actor(s) need a GPU each; the Ray cluster has {have}")
    if actors * actor_cpus + PREPARE_CPUS > cpus:
        raise ClusterError(
            f"{actors} generation actor(s) of {actor_cpus:g} CPU leave no CPU to prepare pages on this Ray cluster "
            f"of {cpus:g} CPUs: lower --ray-actors or --ray-actor-cpus"
        )


def _mark_job(out_dir: Path) -> float:
    """The job's start by the clock of DIR's file system (the clock its NAME.json times come from)."""
    marker = out_dir / JOB_MARKER
    atomic_write(marker, f"{os.getpid()}\n")
    return marker.stat().st_mtime


def _write_failures(out_dir: Path, outcomes: list[Outcome]) -> None:
    """DIR/failed.jsonl: one line per page that failed in this run; none (and no file) when all went well."""
    failed = [o for o in outcomes if o.status == "failed"]
    path = out_dir / FAILED_FILE
    if not failed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    lines = [json.dumps({"source": o.item.source, "page": o.item.page, "name": o.item.name, "error": o.message},
                        ensure_ascii=False) for o in failed]
    atomic_write(path, "\n".join(lines) + "\n")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(exc: BaseException) -> str:
    """One line for an error from Ray: a remote traceback's last line (the error itself), else the first line."""
    text = _ANSI.sub("", getattr(exc, "error_msg", None) or str(exc))  # a dead actor's message holds its traceback
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1] if any(line.startswith('File "') for line in lines) else lines[0]


class _RayMessages(io.TextIOBase):
    """Stdout while the job runs, for what Ray prints there itself (worker deaths, retries, their tracebacks):
    stderr with -v, dropped otherwise. Stdout keeps only --json lines (written to the stream the CLI captured)."""

    def __init__(self, verbose: int) -> None:
        self.verbose, self.stderr = verbose, sys.stderr

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.verbose:
            self.stderr.write(text)
        return len(text)

    def isatty(self) -> bool:  # Ray Data picks its progress display by this; it draws on stderr
        return self.stderr.isatty()
