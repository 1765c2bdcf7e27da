"""CUDA graphs for the decode step: one captured graph per (batch bucket, key-length bucket).

A decode step launches hundreds of small kernels; replaying a captured graph launches them as one. Shapes are
made static by rounding the batch up to a bucket (padded rows decode token 0 on lanes nobody reads, their
lengths are not advanced) and reading keys up to a key-length bucket with a length mask. Graphs are captured on
first use. Each new graph is checked once against the eager step on the same inputs; a mismatch or a capture
failure turns graphs off for this backend (with a warning) rather than produce wrong tokens.
"""

from __future__ import annotations

import logging

import torch

from dsocr_torch.cache import KVCache
from dsocr_torch.model import DeepseekOCRForCausalLM

log = logging.getLogger(__name__)

KV_BUCKET_MIN = 256
CHECK_TOLERANCE = 1e-2  # relative: graph and eager run the same kernels; only reduction order may differ


def buckets_up_to(limit: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8 up to `limit` (a padded row costs little; a graph costs memory)."""
    sizes = [b for b in (1, 2, 4) if b < limit]
    sizes.extend(range(8, limit, 8))
    sizes.append(limit)
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, model: DeepseekOCRForCausalLM, cache: KVCache, lanes: int) -> None:
        self.model, self.cache = model, cache
        self.batch_buckets = buckets_up_to(lanes)
        self.enabled = True
        device = model.device
        self.tokens = torch.zeros(lanes, dtype=torch.int64, device=device)
        self.active = torch.zeros(lanes, dtype=torch.int64, device=device)  # 1 for real rows, 0 for padding
        self.pool: object | None = None
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def kv_bucket(self, needed: int) -> int:
        bucket = KV_BUCKET_MIN
        while bucket < needed:
            bucket *= 2
        return min(bucket, self.cache.capacity)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decode step for lanes [0, B) -> float32 logits [B, V], through a graph when possible."""
        batch = tokens.shape[0]
        cache = self.cache
        if not self.enabled:
            return self.model.decode_step(tokens, cache)
        bucket = next(b for b in self.batch_buckets if b >= batch)
        kv_length = self.kv_bucket(max(cache.host_lengths[:batch]) + 1)
        cache.clean_to(min(bucket, cache.lanes), kv_length)  # the graph reads the padding lanes too
        self.tokens[:batch].copy_(tokens)
        self.tokens[batch:bucket].zero_()
        self.active[:batch].fill_(1)
        self.active[batch:bucket].zero_()
        key = (bucket, kv_length)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(bucket, kv_length, batch)
            if entry is None:
                return self.model.decode_step(tokens, cache)
        graph, logits = entry
        graph.replay()
        for lane in range(batch):
            cache.host_lengths[lane] += 1
        return logits[:batch]

    def _body(self, bucket: int, kv_length: int) -> torch.Tensor:
        model, cache = self.model, self.cache
        embeds = model.model.embed_tokens(self.tokens[:bucket]).unsqueeze(1)
        hidden = model.model.decode_static(embeds, cache, kv_length, masked=True)
        cache.lengths[:bucket] += self.active[:bucket]
        return model.logits(hidden[:, 0])

    def _capture(self, bucket: int, kv_length: int, batch: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        cache = self.cache
        lengths = cache.lengths.clone()
        try:
            eager = self._body(bucket, kv_length).clone()  # also creates every cached index/table before capture
            cache.lengths.copy_(lengths)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._body(bucket, kv_length)
                cache.lengths.copy_(lengths)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self._body(bucket, kv_length)
            self.pool = graph.pool()
            cache.lengths.copy_(lengths)
            graph.replay()
            scale = float(eager[:batch].abs().max()) or 1.0
            error = float((logits[:batch] - eager[:batch]).abs().max()) / scale
            cache.lengths.copy_(lengths)
        except Exception:  # capture is an optimisation: never a reason to fail a request
            log.warning("CUDA graph capture failed; decoding without graphs", exc_info=True)
            cache.lengths.copy_(lengths)
            self.enabled = False
            return None
        if error > CHECK_TOLERANCE:
            log.warning("CUDA graph output differs from eager (%.2e); decoding without graphs", error)
            self.enabled = False
            return None
        log.debug("captured decode graph batch %d, keys %d", bucket, kv_length)
        self.graphs[(bucket, kv_length)] = (graph, logits)
        return graph, logits
