"""Token generation: prefill, then one-token decode steps on a preallocated KV cache.

Sampling runs on the model's device; the only host synchronisation per token is reading the chosen id.
The n-gram guard (common.ngram) is applied as a -inf logit mask before sampling, as Hugging Face's
`no_repeat_ngram_size` processor does before its warpers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from common.ngram import NGramGuard
from common.sampling import SamplingParams
from dsocr_torch.model import DeepseekOCRForCausalLM, ImageTensors


class Sampler:
    """Greedy / temperature / top-k / top-p choice from float32 logits [V], on device."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.greedy:
            return torch.argmax(logits, dim=-1, keepdim=True)
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, sorted_idx = torch.sort(logits, descending=False)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            # Drop the low-probability tail whose total mass is <= 1 - top_p; the top token always stays.
            drop_sorted = cumulative <= (1.0 - p.top_p)
            drop_sorted[-1] = False
            drop = torch.zeros_like(drop_sorted).scatter(0, sorted_idx, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)


def _apply_ban(logits: torch.Tensor, guard: NGramGuard) -> torch.Tensor:
    banned = guard.banned()
    if not banned:
        return logits
    index = torch.tensor(banned, dtype=torch.long).to(logits.device, non_blocking=True)
    return logits.index_fill(0, index, float("-inf"))


@torch.inference_mode()
def generate_ids(
    model: DeepseekOCRForCausalLM,
    input_ids: torch.Tensor,
    images_seq_mask: torch.Tensor | None,
    images: list[ImageTensors],
    params: SamplingParams,
    eos_token_id: int,
    *,
    inputs_embeds: torch.Tensor | None = None,
    raw_logits: list[torch.Tensor] | None = None,
) -> Iterator[int]:
    """Yields generated ids one at a time; stops after EOS (yielded) or `params.max_new_tokens` ids.

    Closing the generator stops it before the next decode step. `inputs_embeds` [1, L, hidden] replaces
    the embedding + vision stage (parity tests); `raw_logits`, when given, receives each step's logits.
    """
    prompt_len = int(input_ids.shape[0])
    model.pack_for_cpu_decode()  # once per model (a no-op afterwards); faster bf16 CPU decode
    cache = model.new_cache(prompt_len + params.max_new_tokens)
    guard = NGramGuard(params.no_repeat_ngram_size, params.ngram_window, params.ngram_whitelist)
    guard.reset(input_ids.tolist())
    sampler = Sampler(params, model.device)
    if inputs_embeds is not None:
        logits = model.prefill_embeds(inputs_embeds.to(model.device, model.dtype), cache)
    else:
        logits = model.prefill(input_ids.to(model.device), _on_device(images_seq_mask, model), images, cache)
    position = prompt_len
    for produced in range(params.max_new_tokens):
        if raw_logits is not None:
            raw_logits.append(logits)
        token = sampler(_apply_ban(logits, guard))
        token_id = int(token.item())  # the one host sync per token
        yield token_id
        if token_id == eos_token_id or produced + 1 == params.max_new_tokens:
            return
        guard.push(token_id)
        logits = model.step(token.view(1), cache, position)
        position += 1


def _on_device(mask: torch.Tensor | None, model: DeepseekOCRForCausalLM) -> torch.Tensor | None:
    return None if mask is None else mask.to(model.device)
