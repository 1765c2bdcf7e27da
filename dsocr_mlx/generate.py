"""Token generation on MLX: chunked prefill into the KV cache, then pipelined one-token decode steps.

The decode loop queues the forward pass for step n+1 (`mx.async_eval`) before it reads token n back to
the host, so the device works while the host hands token n out and updates the n-gram guard. The guard's
ban for step n+1 needs token n, so only the cheap mask + sampling wait for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_k, apply_top_p

from common.backend import PreparedInputs
from common.ngram import NGramGuard
from common.sampling import SamplingParams
from dsocr_mlx.language import make_cache
from dsocr_mlx.model import DeepseekOCRForCausalLM

PREFILL_CHUNK = 512

Sampler = Callable[[mx.array], mx.array]


def make_sampler(params: SamplingParams, vocab_size: int) -> Sampler:
    """Greedy (argmax) at temperature 0; else temperature -> top-k -> top-p -> categorical (HF's order)."""
    if params.greedy:
        return lambda logits: mx.argmax(logits, axis=-1)
    key = [mx.random.key(params.seed)] if params.seed is not None else None
    top_k = params.top_k if 0 < params.top_k < vocab_size else 0

    def sample(logits: mx.array) -> mx.array:
        scaled = logits / params.temperature
        logprobs = scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)
        if top_k:
            logprobs = apply_top_k(logprobs, top_k)
        if params.top_p < 1.0:
            logprobs = apply_top_p(logprobs, params.top_p)
        if key is None:
            return mx.random.categorical(logprobs, axis=-1)
        key[0], step_key = mx.random.split(key[0])
        return mx.random.categorical(logprobs, axis=-1, key=step_key)

    return sample


def mask_banned(logits: mx.array, banned: list[int]) -> mx.array:
    if not banned:
        return logits
    logits[..., mx.array(banned, dtype=mx.int32)] = -mx.inf
    return logits


def prefill(
    model: DeepseekOCRForCausalLM, inputs_embeds: mx.array, cache: list, chunk: int = PREFILL_CHUNK
) -> mx.array:
    """Runs the prompt through the decoder in chunks; returns the last position's logits [B, vocab]."""
    length = inputs_embeds.shape[1]
    start = 0
    while length - start > chunk:
        model.hidden_states(inputs_embeds[:, start : start + chunk], cache)
        mx.eval([c.state for c in cache])
        start += chunk
    return model(inputs_embeds[:, start:], cache)


def generate_tokens(
    model: DeepseekOCRForCausalLM,
    inputs: PreparedInputs,
    params: SamplingParams,
    eos_token_id: int,
    prefill_chunk: int = PREFILL_CHUNK,
    inputs_embeds: mx.array | None = None,
) -> Iterator[int]:
    """Yields generated token ids: stops after EOS (yielded) or `params.max_new_tokens` ids.

    `inputs_embeds` [1, L, H] replaces the vision + embedding step when given (parity tests feed the
    reference embeddings). Closing the generator stops it before the next decode step is queued.
    """
    prompt_ids = [int(t) for t in inputs.input_ids]
    if inputs_embeds is None:
        inputs_embeds = model.embed_inputs(inputs.input_ids, inputs.images_seq_mask, inputs.images)
    cache = make_cache(len(model.layers))
    sample = make_sampler(params, model.config.language.vocab_size)
    guard = NGramGuard(params.no_repeat_ngram_size, params.ngram_window, params.ngram_whitelist)
    guard.reset(prompt_ids)
    embed_tokens = model.model.embed_tokens

    logits = prefill(model, inputs_embeds, cache, prefill_chunk)
    token = sample(mask_banned(logits, guard.banned()))
    mx.async_eval(token)
    for step in range(params.max_new_tokens):
        next_logits = None
        if step + 1 < params.max_new_tokens:
            next_logits = model(embed_tokens(token[:, None]), cache)
            mx.async_eval(next_logits)
        token_id = int(token.item())
        guard.push(token_id)
        yield token_id
        if token_id == eos_token_id or next_logits is None:
            return
        token = sample(mask_banned(next_logits, guard.banned()))
        mx.async_eval(token)


def step_logits(
    model: DeepseekOCRForCausalLM,
    inputs: PreparedInputs,
    max_new_tokens: int,
    forced_ids: list[int] | None = None,
    inputs_embeds: mx.array | None = None,
) -> tuple[list[int], list[mx.array]]:
    """Greedy ids and each step's raw logits; with `forced_ids` the model is fed those ids instead
    (teacher forcing), so per-step agreement with another model's path can be measured."""
    if inputs_embeds is None:
        inputs_embeds = model.embed_inputs(inputs.input_ids, inputs.images_seq_mask, inputs.images)
    cache = make_cache(len(model.layers))
    logits = prefill(model, inputs_embeds, cache)
    ids: list[int] = []
    steps: list[mx.array] = []
    for step in range(max_new_tokens):
        mx.eval(logits)
        steps.append(logits[0])
        ids.append(int(mx.argmax(logits, axis=-1).item()))
        fed = forced_ids[step] if forced_ids is not None else ids[-1]
        if step + 1 < max_new_tokens:
            logits = model(model.model.embed_tokens(mx.array([[fed]])), cache)
    return ids, steps
