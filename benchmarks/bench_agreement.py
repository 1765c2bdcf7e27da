"""How far `--quantize bf16|int8` moves the output from float32 weights: a table per model and input.

For each input the float32 run generates `--tokens` greedy tokens (EOS and the n-gram rule off, so every run is
as long) and keeps each step's logits. Each storage then runs twice: its own greedy tokens (agreement: the share
of positions equal to float32's, and the first that differs), and fed float32's tokens (teacher forcing), so
every step's logits are compared on the same context: the max |logit error| over the run (absolute, and over
float32's logit range) and the steps whose top-1 token is float32's.

Inputs: the reference fixtures' tiny models (both families, every case, the reference inputs_embeds) and the
real DeepSeek-OCR size with RANDOM weights (benchmarks/bench_torch.py's checkpoint) on a synthetic Base page and a
text-only prompt. Random weights make the real size's logits flat and its routing degenerate, so its rows say
how the storage behaves at that size, not how a trained model's text changes. Each storage of the real size runs
in its own process (float32 alone takes 13 GB).

    python benchmarks/bench_agreement.py                      # fixtures + the real size (minutes)
    python benchmarks/bench_agreement.py --skip-real-size --tokens 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STORAGES = ("bf16", "int8")


def run(backend: Any, inputs: Any, tokens: int, forced: list[int] | None = None) -> tuple[list[int], np.ndarray]:
    """Greedy ids and each step's logits (float32 [steps, V]); with `forced`, those ids are fed instead."""
    from common.engine.backend import StepControls
    from common.engine.prefill import PrefillJob

    job = PrefillJob(backend, 0, inputs, 8192)
    while not job.advance():
        pass
    logits, ids, steps = job.logits, [], []
    for step in range(tokens):
        steps.append(logits.float().cpu().numpy()[0])
        ids.append(int(backend.read(backend.sample(logits, StepControls.greedy(1)))[0]))
        if step + 1 < tokens:
            fed = ids[-1] if forced is None else forced[step]
            logits = backend.forward(1, np.array([fed], np.int64))
    return ids, np.stack(steps)


def compare(reference: tuple[list[int], np.ndarray], own: list[int], forced: np.ndarray) -> dict[str, Any]:
    ref_ids, ref_logits = reference
    same = [a == b for a, b in zip(ref_ids, own, strict=True)]
    error = np.abs(forced - ref_logits)
    spread = float(ref_logits.max(axis=-1).mean() - ref_logits.min(axis=-1).mean())
    return {
        "greedy_agreement": sum(same) / len(same),
        "first_difference": next((i for i, s in enumerate(same) if not s), None),
        "max_logit_error": float(error.max()),
        "max_logit_error_rel": float(error.max() / max(spread, 1e-12)),
        "top1_agreement": float(np.mean(forced.argmax(-1) == ref_logits.argmax(-1))),
    }


def load(model_dir: Path, storage: str) -> Any:
    from common.engine.backend import load_backend

    return load_backend("torch", model_dir, "cpu", "float32", max_batch=1, kv_cache_gib=1.0, quantize=storage)


def fixture_rows(tokens: int) -> list[dict[str, Any]]:
    from tests.helpers_backend import FAMILIES

    rows = []
    for family, fixtures in FAMILIES.items():
        backends = {storage: load(fixtures.model_dir, storage) for storage in ("none", *STORAGES)}
        for case_id in fixtures.case_ids():
            inputs = fixtures.from_embeds(case_id)
            reference = run(backends["none"], inputs, tokens)
            for storage in STORAGES:
                own, _ = run(backends[storage], inputs, tokens)
                _, forced = run(backends[storage], inputs, tokens, forced=reference[0])
                rows.append({"model": f"{family} tiny (fixtures)", "input": case_id, "storage": storage,
                             **compare(reference, own, forced)})
    return rows


def real_size_inputs(model: Any) -> dict[str, Any]:
    from benchmarks.bench_torch import synthetic_prompt
    from common.model.families import resolve_mode
    from common.model.inputs import ImageInput, PreparedInputs

    rng = np.random.default_rng(0)
    page = ImageInput((rng.random((3, 1024, 1024), dtype=np.float32) * 2 - 1), None, (1, 1))
    lm = model.config.language
    base = synthetic_prompt(page, resolve_mode("base", family=model.config.family), lm.bos_token_id)
    text_ids = np.concatenate([[lm.bos_token_id], rng.integers(1000, 30000, 40)]).astype(np.int64)
    return {"synthetic Base page": base, "text prompt (41 tok)": PreparedInputs(text_ids, np.zeros(41, bool), [])}


def real_size_worker(checkpoint: Path, storage: str, tokens: int, reference_file: Path) -> None:
    """One storage of the real size: float32 writes its ids and logits; the others read them and compare."""
    backend = load(checkpoint, storage)
    results = []
    saved = dict(np.load(reference_file)) if storage != "none" else {}
    for index, (name, inputs) in enumerate(real_size_inputs(backend.model).items()):
        if storage == "none":
            ids, logits = run(backend, inputs, tokens)
            saved[f"ids{index}"], saved[f"logits{index}"] = np.asarray(ids), logits
            continue
        reference = (saved[f"ids{index}"].tolist(), saved[f"logits{index}"])
        own, _ = run(backend, inputs, tokens)
        _, forced = run(backend, inputs, tokens, forced=reference[0])
        results.append({"model": f"{checkpoint.name} (full size)", "input": name, "storage": storage,
                        **compare(reference, own, forced)})
    if storage == "none":
        np.savez(reference_file, **saved)
    print(json.dumps(results))


def print_table(rows: list[dict[str, Any]], tokens: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"--quantize against float32 weights (float32 compute, {tokens} greedy tokens)")
    for column in ("model", "input", "storage", "greedy agreement", "first diff", "max |Δlogit|",
                   "  / logit range", "top-1 per step"):
        table.add_column(column, justify="left" if column in ("model", "input", "storage") else "right")
    for r in rows:
        first = "—" if r["first_difference"] is None else str(r["first_difference"])
        table.add_row(r["model"], r["input"], r["storage"], f"{r['greedy_agreement']:.1%}", first,
                      f"{r['max_logit_error']:.2e}", f"{r['max_logit_error_rel']:.2e}", f"{r['top1_agreement']:.1%}")
    Console(width=200).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/dsocr-bench-random-ckpt"),
                        help="a model folder (default: the random full-size checkpoint, written there if missing)")
    parser.add_argument("--skip-real-size", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--worker", nargs=2, metavar=("STORAGE", "REFERENCE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        real_size_worker(args.checkpoint, args.worker[0], args.tokens, Path(args.worker[1]))
        return
    rows = fixture_rows(args.tokens)
    if not args.skip_real_size:
        from benchmarks.bench_torch import write_random_checkpoint

        if not (args.checkpoint / "config.json").is_file():  # a model folder given is used as it is
            write_random_checkpoint(args.checkpoint)
        with tempfile.TemporaryDirectory() as folder:
            reference = Path(folder) / "float32.npz"
            for storage in ("none", *STORAGES):
                command = [sys.executable, __file__, "--worker", storage, str(reference), "--tokens",
                           str(args.tokens), "--checkpoint", str(args.checkpoint)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{storage} failed:\n{done.stderr[-3000:]}")
                rows += json.loads(done.stdout.strip().splitlines()[-1])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print_table(rows, args.tokens)


if __name__ == "__main__":
    main()
