"""dsocr command line: OCR images, PDFs and folders with DeepSeek-OCR on a local backend.

    dsocr report.pdf -o out/                 # Markdown per page + combined report.md
    dsocr scan.png                           # streams the text to the terminal
    dsocr scans/ -o out/ --json > all.jsonl  # a folder, resumable, one JSON object per page
    dsocr convert ...                        # MLX weight conversion (dsocr_mlx.convert)
    dsocr verify [--model ...]               # check the model's files against the Hub's hashes

`main(argv)` is the console script `dsocr`; it returns the exit code: 0 ok, 1 some item failed (or an internal
error), 2 a usage error (bad flag, missing file, no model ...), 130 interrupted with Ctrl-C.
The work itself (inputs, preparation, generation, outputs) is `common.documents.batch`; this file parses the command
line and shows progress.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.documents.batch import BatchOptions, Outcome, describe_error, emit_json, run_batch
from common.documents.cluster import check_ray_args
from common.documents.outputs import probe_writable
from common.documents.progress import Reporter, print_summary
from common.documents.render import configure_render_pool
from common.documents.workitems import (
    DEFAULT_DPI,
    DEFAULT_MAX_PAGES,
    WorkItem,
    expand_inputs,
    parse_page_ranges,
    prepared_items,
)
from common.engine.backend import lane_capacity
from common.engine.sampling import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS_BOUND, SamplingOptions, fit_max_tokens
from common.errors import DsocrError
from common.logs import setup_logging
from common.model.config import load_config
from common.model.families import ModeOptions
from common.model.prompt import IMAGE_TOKEN, extract_fields, task_prompt
from common.options.argtypes import finite_float, int_in_range, non_negative_int, positive_int
from common.options.flags import (
    add_model_arguments,
    add_ray_arguments,
    add_render_arguments,
    choices,
    model_options,
    read_environment,
    read_prompt_file,
    render_limits,
)
from common.options.version import VersionAction

PROG = "dsocr"


class UsageError(DsocrError):
    """A bad command line: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so every mistake is one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def usage_error(exc: DsocrError) -> UsageError:
    """A library error about an option, worded with the flag the user typed (image_size -> --image-size)."""
    message = str(exc)
    if exc.param and message.startswith(exc.param):
        message = "--" + exc.param.replace("_", "-") + message[len(exc.param) :]
    return UsageError(message)


# ------------------------------------------------------------ arguments


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Run DeepSeek-OCR locally on images, PDFs and folders.",
                epilog=f"`{PROG} convert --help` converts weights for the MLX backend; `{PROG} verify --help` checks a "
                "model's files against the Hub's hashes.",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image files (PNG, JPEG, WebP, TIFF, BMP, GIF), PDFs, folders (recursive), or - for stdin")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an input image (repeatable; same as a positional input)")

    g = p.add_argument_group("prompt")
    g.add_argument("--task", choices=choices("task"), default=None,
                   help=f"prompt preset (default markdown): {', '.join(choices('task'))}")
    g.add_argument("--ref", default=None, metavar="TEXT", help="what to find, for --task locate")
    g.add_argument("--prompt", default=None,
                   help="custom prompt; put <image> where the image goes (a literal \\n is a newline)")
    g.add_argument("--prompt-file", type=Path, default=None, metavar="FILE", help="read the prompt from a file")

    g = p.add_argument_group("image mode")
    g.add_argument("--mode", choices=choices("mode"), default=None,
                   help="resolution preset of the model (default gundam: a 1024 global view + tiles, 640 px for "
                   "DeepSeek-OCR (presets tiny, small, base, large, gundam), 768 px for DeepSeek-OCR 2 (presets "
                   "gundam, base, small))")
    g.add_argument("--base-size", metavar="PX", type=positive_int, default=None,
                   help="global view size (overrides the mode)")
    g.add_argument("--image-size", metavar="PX", type=positive_int, default=None,
                   help="tile size (overrides the mode)")
    g.add_argument("--crop", action=argparse.BooleanOptionalAction, default=None,
                   help="cut the image into tiles (overrides the mode)")
    g.add_argument("--min-crops", metavar="N", type=positive_int, default=None, help="fewest tiles (default 2)")
    g.add_argument("--max-crops", metavar="N", type=positive_int, default=None,
                   help="most tiles (default 9 for DeepSeek-OCR, 6 for DeepSeek-OCR 2)")
    g.add_argument("--dpi", metavar="DPI", type=int_in_range(1, 2400), default=DEFAULT_DPI,
                   help=f"PDF render resolution (default {DEFAULT_DPI})")
    g.add_argument("--pages", default=None, metavar="RANGES",
                   help="pages of PDFs / multi-page TIFFs, e.g. 1-3,7 or 5- (default all)")
    g.add_argument("--max-pages", metavar="N", type=positive_int, default=DEFAULT_MAX_PAGES,
                   help=f"pages of one document; a longer one is refused before its pages are listed (default "
                   f"{DEFAULT_MAX_PAGES:,})")

    add_model_arguments(p.add_argument_group("model"))
    add_render_arguments(p.add_argument_group("PDF rendering"))

    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", metavar="N", type=int_in_range(1, MAX_NEW_TOKENS_BOUND),
                   default=None,
                   help="most tokens generated per page; with the page's prompt it must fit the context (default: "
                   f"{DEFAULT_MAX_NEW_TOKENS} as the official infer(), or what the context leaves)")
    g.add_argument("--temperature", metavar="T", type=finite_float(0), default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", metavar="P", type=finite_float(), default=1.0)
    g.add_argument("--top-k", metavar="K", type=non_negative_int, default=0, help="0 = off")
    g.add_argument("--seed", metavar="N", type=int_in_range(0), default=None)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string (repeatable, at most 4; empty ones are ignored)")
    g.add_argument("--no-repeat-ngram-size", metavar="N", type=non_negative_int, default=20,
                   help="ban repeating n-grams of this size (default 20 as the official infer(); 0 = off)")
    g.add_argument("--ngram-window", metavar="W", type=non_negative_int, default=0,
                   help="look back this many tokens for repeats (default 0 = the whole sequence)")

    g = p.add_argument_group("structured output")
    g.add_argument("--json-schema", type=Path, default=None, metavar="FILE",
                   help="the output is JSON matching this JSON schema (default prompt: --task extract)")
    g.add_argument("--json-object", action="store_true", help="the output is a JSON object (any keys)")

    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", type=Path, default=None, metavar="DIR",
                   help="write NAME.md, NAME.json, NAME_images/ and NAME.boxes.jpg per image or page")
    g.add_argument("--json", action="store_true", help="print one JSON object per image or page on stdout")
    g.add_argument("--overwrite", action="store_true", help="redo items whose outputs already exist in -o DIR")
    g.add_argument("--dry-run", action="store_true",
                   help="prepare the inputs and print token counts without loading the weights")
    g.add_argument("--prefetch", type=non_negative_int, default=2, metavar="N",
                   help="items prepared ahead while the model generates (default 2; 0 = no overlap)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    g.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug); tracebacks on errors")
    g.add_argument("--version", action=VersionAction)

    add_ray_arguments(p.add_argument_group("cluster (pip install 'dsocr[ray]')"))
    read_environment(p)
    return p


def resolve_json_spec(args: argparse.Namespace) -> Any:
    """The JsonSpec of --json-schema / --json-object, or None for free text."""
    if args.json_schema is not None and args.json_object:
        raise UsageError("--json-schema and --json-object cannot be used together; pick one")
    if args.json_object:
        from common.engine.structured import json_object_spec

        return json_object_spec()
    if args.json_schema is None:
        return None
    from common.engine.structured import json_schema_file_spec

    try:
        return json_schema_file_spec(args.json_schema)
    except DsocrError as exc:
        raise UsageError(f"--json-schema {exc}") from None


def resolve_prompt(args: argparse.Namespace, json_spec: Any = None) -> str:
    given = [name for name, value in (("--prompt", args.prompt), ("--prompt-file", args.prompt_file),
                                      ("--task", args.task)) if value is not None]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} cannot be used together; pick one")
    if args.ref is not None and args.task != "locate":
        raise UsageError("--ref goes with --task locate")
    if args.prompt is not None:
        # Shells pass "\n" as two characters; the prompts of the official examples mean a newline.
        return args.prompt.replace("\\n", "\n")
    if args.prompt_file is not None:
        try:
            return read_prompt_file(args.prompt_file)
        except DsocrError as exc:
            raise UsageError(f"--prompt-file: {exc}") from None
    task = args.task or ("extract" if json_spec is not None else "markdown")
    if task == "locate" and not args.ref:
        raise UsageError("--task locate needs --ref TEXT (what to find)")
    if task == "extract":
        if json_spec is None:
            raise UsageError("--task extract needs --json-schema FILE (or --json-object): the fields to extract")
        return task_prompt(task, fields=extract_fields(json_spec.schema))
    return task_prompt(task, args.ref)


def resolve_sampling(args: argparse.Namespace, json_spec: Any = None) -> Any:
    """SamplingParams from the flags; UsageError naming the flag for a bad value."""
    try:
        return SamplingOptions(args.max_new_tokens, args.temperature, args.top_p,
                               args.top_k, args.seed, args.stop, args.no_repeat_ngram_size,
                               args.ngram_window, json_spec).resolve(DEFAULT_MAX_NEW_TOKENS)
    except DsocrError as exc:
        raise usage_error(exc) from None


def resolve_mode_flags(args: argparse.Namespace, family: Any = None) -> Any:
    """The Mode from the flags among `family`'s presets (the model's; None: DeepSeek-OCR); UsageError naming the
    flag for a bad value."""
    try:
        return ModeOptions(args.mode, args.base_size, args.image_size, args.crop, args.min_crops,
                           args.max_crops).resolve(family)
    except DsocrError as exc:
        raise usage_error(exc) from None


def model_family(args: argparse.Namespace) -> Any:
    """The family of --model, from its config.json (downloading the model on first use, as loading would);
    `args.model` becomes the local directory, so loading does not resolve it again."""
    model, family = model_options(args).resolved(show_download_progress=not args.quiet)
    args.model = model.model
    return family


# ------------------------------------------------------------ main


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def dry_run(engine: Any, items: list[WorkItem], opts: BatchOptions, max_context: int | None) -> int:
    """Prepares every item without weights and prints its token counts (and token budget, as the engine would
    fit it)."""
    failed = 0
    mode = opts.mode
    context = engine.config.language.max_position_embeddings
    capacity = lane_capacity(context, max_context)
    for prepared in prepared_items(engine, items, opts.prompt, mode, opts.dpi, opts.prefetch):
        item = prepared.item
        try:
            if prepared.error is not None:
                raise prepared.error
            budget = fit_max_tokens(prepared.inputs.prompt_tokens, opts.params, capacity, context)
        except Exception as exc:
            failed += 1
            message = describe_error(exc)
            _error(f"{item.label}: {message}")
            emit_json(opts, {"source": item.source, "page": item.page, "error": message})
            continue
        inputs = prepared.inputs
        grid = [int(v) for v in inputs.images[0].crop_grid] if inputs.images and inputs.images[0].has_crops else None
        image = prepared.image
        record = {
            "source": item.source, "page": item.page, "mode": mode.name, "base_size": mode.base_size,
            "image_size": mode.image_size, "crop_mode": mode.crop_mode, "prompt_tokens": inputs.prompt_tokens,
            "image_tokens": inputs.image_tokens, "crop_grid": grid,
            "tiles": int(len(inputs.images[0].local_views)) if grid else 0,
            "width": image.width if image is not None else None, "height": image.height if image is not None else None,
            "max_new_tokens": budget,
        }
        if opts.json_lines:
            emit_json(opts, record)
            continue
        grid_text = f"{grid[0]}x{grid[1]} tiles" if grid else "no tiles"
        opts.stdout.write(f"{item.label}: {record['prompt_tokens']} prompt tokens "
                          f"({record['image_tokens']} image tokens, {grid_text}), mode {mode.name}\n")
        opts.stdout.flush()
    return 1 if failed else 0


def load_engine(args: argparse.Namespace, weights: bool, reporter: Reporter | None) -> Any:
    """The model, loaded once (tests replace this to inject a fake backend)."""
    return model_options(args).load(weights=weights,
                                             progress=reporter.loading if reporter is not None else None,
                                             show_download_progress=not getattr(args, "quiet", False))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        return _convert(argv[1:])
    if argv and argv[0] == "verify":
        from common.options.verify import main as verify_main

        return verify_main(argv[1:])
    verbose = sum(a.count("v") for a in argv if re.fullmatch(r"-v+", a)) + argv.count("--verbose")
    try:
        return _main(argv)
    except KeyboardInterrupt:
        _error("interrupted; finished outputs are kept (run the same command again to resume)")
        return 130
    except DsocrError as exc:
        if verbose and not isinstance(exc, UsageError):
            traceback.print_exc()
        _error(str(exc))
        return 2
    except BrokenPipeError:  # e.g. `dsocr ... | head`
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 1
    except Exception as exc:  # a bug, not a user mistake
        if verbose:
            traceback.print_exc()
        _error(f"internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)")
        return 1


def _convert(argv: list[str]) -> int:
    try:
        from dsocr_mlx.convert import main as convert_main
    except ImportError as exc:
        _error(f"the convert command needs the mlx backend: pip install 'dsocr[mlx]' ({exc})")
        return 2
    try:
        return int(convert_main(argv) or 0)
    except SystemExit as exc:  # its argparse: --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except DsocrError as exc:
        _error(str(exc))
        return 2


def _items(args: argparse.Namespace, prompt: str) -> list[WorkItem]:
    sources = list(args.image) + list(args.inputs)
    if sources.count("-") > 1:
        raise UsageError("stdin ('-') can be given only once")
    if not sources:
        if IMAGE_TOKEN in prompt:
            raise UsageError(f"no input given: pass an image, PDF or folder (or a prompt without {IMAGE_TOKEN} "
                             "for text-only generation)")
        return [WorkItem("", "text", "text")]
    if IMAGE_TOKEN not in prompt:
        raise UsageError(f"the prompt has no {IMAGE_TOKEN} placeholder, so the input images would be ignored; "
                         f"add {IMAGE_TOKEN} where the image goes")
    pages = parse_page_ranges(args.pages) if args.pages is not None else None
    items = expand_inputs(sources, pages, exclude=args.output, max_pages=args.max_pages)
    if not items:
        raise UsageError("--pages selects no page of the inputs")
    return items


def _check_context(args: argparse.Namespace) -> None:
    """--max-new-tokens must leave room for a prompt in each sequence's context (the model's, or --max-context):
    refused here, before any page is prepared. Whether it fits a given page is the engine's to check."""
    if args.max_new_tokens is None:
        return
    context = load_config(args.model).language.max_position_embeddings
    capacity = lane_capacity(context, args.max_context)
    if args.max_new_tokens >= capacity:
        where = "--max-context" if capacity < context else "the model's context"
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} does not fit {where} of {capacity} tokens with "
                         "any prompt")


def _main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    setup_logging(args.verbose)
    configure_render_pool(render_limits(args))
    if args.ray is not None:
        check_ray_args(args)
    json_spec = resolve_json_spec(args)
    prompt = resolve_prompt(args, json_spec)
    params = resolve_sampling(args, json_spec)
    items = _items(args, prompt)
    mode = resolve_mode_flags(args, model_family(args))  # the model's presets, checked before its weights load
    _check_context(args)
    out_dir: Path | None = args.output
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"-o {out_dir} exists and is not a folder")
        if not args.dry_run:
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"cannot create -o {out_dir}: {exc.strerror or exc}") from None
            try:  # a read-only mount would fail every page's outputs after generating it
                probe_writable(out_dir)
            except OSError as exc:
                raise UsageError(f"cannot write to -o {out_dir}: {exc.strerror or exc}") from None

    stream_text = out_dir is None and not args.json and not args.dry_run
    live = not args.quiet and sys.stderr.isatty() and not stream_text
    opts = BatchOptions(prompt=prompt, mode=mode, params=params, out_dir=out_dir, json_lines=args.json,
                        stream_text=stream_text, overwrite=args.overwrite, dpi=args.dpi, prefetch=args.prefetch,
                        verbose=args.verbose)
    if args.dry_run:
        engine = load_engine(args, weights=False, reporter=None)
        return dry_run(engine, items, opts, args.max_context)
    if args.ray is not None:
        return _run_on_ray(args, items, opts, live)

    # Streaming text to this terminal: progress lines would interleave with it, so only failures are reported.
    reporter = Reporter(len(items), quiet=args.quiet or stream_text, live=live)
    try:
        engine = load_engine(args, weights=True, reporter=reporter)
        try:
            _check_json_spec(engine, params)
            opts.max_batch = engine.core.max_batch  # pages generated together, as the engine allows (--max-batch)
            t0 = time.perf_counter()
            outcomes = run_batch(engine, items, opts, reporter)
        finally:
            engine.close()
    finally:
        reporter.close()
    return _conclude(outcomes, args, live, time.perf_counter() - t0)


def _check_json_spec(engine: Any, params: Any) -> None:
    if params.json_spec is not None:  # the grammar compiles once, before any page is prepared
        try:
            engine.compile_json_spec(params.json_spec)
        except DsocrError as exc:
            raise UsageError(f"--json-schema: {exc}") from None


def _conclude(outcomes: list[Outcome], args: argparse.Namespace, live: bool, elapsed: float) -> int:
    """The summary table (or a single item's error line) and the exit code."""
    failed = [o for o in outcomes if o.status == "failed"]
    if len(outcomes) > 1 and not args.quiet:
        print_summary(outcomes, args.output, sys.stderr, live, elapsed)
    elif failed and len(outcomes) == 1:
        _error(f"{failed[0].item.label}: {failed[0].message}")
        if failed[0].refused:  # the only request was refused before it ran (e.g. it does not fit): a usage error
            return 2
    return 1 if failed else 0


def _run_on_ray(args: argparse.Namespace, items: list[WorkItem], opts: BatchOptions, live: bool) -> int:
    """The batch as a Ray Data job (common.documents.cluster); the driver needs only the tokenizer and config."""
    from common.documents.cluster import RayOptions, run_on_ray

    engine = load_engine(args, weights=False, reporter=None)
    _check_json_spec(engine, opts.params)  # here, so a bad schema is a usage error before the job starts
    # On a terminal Ray Data draws the progress bars and the reporter prints only failures; elsewhere plain lines.
    reporter = Reporter(len(items), quiet=args.quiet or live, live=False)
    options = RayOptions(args.ray, args.ray_actors, args.ray_actor_cpus, show_progress=live)
    t0 = time.perf_counter()
    outcomes = run_on_ray(model_options(args), engine, items, opts, options, reporter, args.verbose)
    return _conclude(outcomes, args, live, time.perf_counter() - t0)


if __name__ == "__main__":
    sys.exit(main())
