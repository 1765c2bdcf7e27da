"""common.engine.engine: stop strings, finish_reason, cancellation and usage, on a scripted fake backend."""

from __future__ import annotations

import numpy as np
import pytest

from common.engine.engine import Engine, Generation
from common.engine.sampling import SamplingParams
from common.model.config import load_config
from common.model.inputs import PreparedInputs
from common.model.tokenizer import Tokenizer
from tests.conftest import MODEL_DIR
from tests.fakes import ScriptedBackend


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(MODEL_DIR)


def make(tokenizer: Tokenizer, text: str, eos: bool = True) -> tuple[Engine, ScriptedBackend, PreparedInputs]:
    ids = tokenizer.encode(text) + ([tokenizer.eos_id] if eos else [])
    backend = ScriptedBackend(ids if eos else ids * 100, tokenizer.eos_id)
    backend.ids = ids  # type: ignore[attr-defined]
    engine = Engine(MODEL_DIR, tokenizer, load_config(MODEL_DIR), backend)
    prompt = np.array([tokenizer.bos_id] + tokenizer.encode("Free OCR."), dtype=np.int64)
    prepared = PreparedInputs(input_ids=prompt, images_seq_mask=np.zeros_like(prompt, dtype=bool), images=[])
    return engine, backend, prepared


def test_eos_stop_and_usage(tokenizer: Tokenizer) -> None:
    engine, backend, prepared = make(tokenizer, "你好，世界！ Invoice 🧾 total: 12.50")
    gen = engine.generate(prepared, SamplingParams(max_new_tokens=100))
    deltas = list(gen)
    result = gen.result
    assert result is not None
    assert "".join(deltas) == "你好，世界！ Invoice 🧾 total: 12.50"
    assert all("\ufffd" not in d for d in deltas)
    assert result.finish_reason == "stop"
    assert result.token_ids == backend.ids
    assert result.completion_tokens == len(backend.ids)
    assert result.prompt_tokens == prepared.prompt_tokens and result.image_tokens == 0
    assert result.raw_text == "你好，世界！ Invoice 🧾 total: 12.50"


def test_length(tokenizer: Tokenizer) -> None:
    engine, backend, prepared = make(tokenizer, "one two three four five six seven eight", eos=False)
    result = engine.generate(prepared, SamplingParams(max_new_tokens=3)).run()
    assert result.finish_reason == "length" and result.completion_tokens == 3
    assert result.raw_text == tokenizer.decode(backend.ids[:3]).strip()


def test_stop_string_is_cut_and_never_streamed(tokenizer: Tokenizer) -> None:
    engine, backend, prepared = make(tokenizer, "alpha beta</table> gamma delta")
    gen = engine.generate(prepared, SamplingParams(max_new_tokens=100, stop=("</table>",)))
    streamed = "".join(gen)
    assert streamed == "alpha beta"
    assert gen.result is not None and gen.result.finish_reason == "stop"
    assert gen.result.raw_text == "alpha beta"
    assert backend.steps < len(backend.ids) - 3  # nothing ran after the stop string


def test_cancel_stops_within_one_step(tokenizer: Tokenizer) -> None:
    engine, backend, prepared = make(tokenizer, " ".join(["word"] * 50), eos=False)
    gen: Generation = engine.generate(prepared, SamplingParams(max_new_tokens=100))
    it = iter(gen)
    next(it)
    steps_at_cancel = backend.steps
    gen.cancel()
    list(it)
    assert gen.cancelled and gen.result is not None and gen.result.finish_reason == "cancelled"
    assert backend.steps <= steps_at_cancel + 1
