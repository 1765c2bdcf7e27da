"""The decoder's KV cache in lanes, on torch, and where one forward pass writes into it.

Mirrors dsocr_mlx/cache.py: a lane holds one sequence; a prefill chunk writes positions of one lane from a
start position, a decode step writes one position per lane of [0, B) at the lane's own length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.model.config import LanguageConfig


@dataclass
class KVCache:
    """Keys/values for every layer in lanes: [layers, lanes, kv_heads, capacity, head_dim] each.

    Allocated once, written in place; shapes never change. A lane holds one sequence; `lengths[l]` is the
    number of positions filled in lane l (device tensor, so a decode step reads its positions without a host
    sync) and `host_lengths` mirrors it for the host-side choices (how far a decode step has to read).

    A batched step reads every lane up to the longest lane's end. Positions past a lane's own end get softmax
    weight 0, but 0 x NaN is NaN, so whatever is read must be finite; the buffers are allocated empty (untouched
    pages cost no memory), so `clean_to` zeroes each lane ahead of its reads, a block at a time, and `clean`
    records how far each lane is known to be finite.
    """

    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor  # int64 [lanes]
    host_lengths: list[int]
    clean: list[int] = field(default_factory=list)  # per lane: positions [0, clean) hold finite values

    CLEAN_BLOCK = 256  # positions zeroed at once, past what a step needs

    @classmethod
    def allocate(
        cls, cfg: LanguageConfig, lanes: int, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        shape = (cfg.num_hidden_layers, lanes, cfg.num_key_value_heads, capacity, cfg.head_dim)
        return cls(
            torch.empty(shape, device=device, dtype=dtype),
            torch.empty(shape, device=device, dtype=dtype),
            torch.zeros(lanes, device=device, dtype=torch.int64),
            [0] * lanes,
            [0] * lanes,
        )

    @staticmethod
    def bytes_per_position(cfg: LanguageConfig, dtype: torch.dtype) -> int:
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize

    @staticmethod
    def dtype_for(device: torch.device, compute_dtype: torch.dtype) -> torch.dtype:
        """The cache dtype for a compute dtype: float32 for bfloat16 on CPU, else the compute dtype.

        torch's CPU attention for one query is several times slower per byte in bfloat16 than in float32,
        so a float32 cache costs twice the cache memory but makes decode attention faster; it also stores
        the bf16 k/v exactly.
        """
        if device.type == "cpu" and compute_dtype == torch.bfloat16:
            return torch.float32
        return compute_dtype

    @property
    def lanes(self) -> int:
        return int(self.keys.shape[1])

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[3])

    def set_length(self, lane: int, length: int) -> None:
        self.host_lengths[lane] = length
        self.lengths[lane] = length

    def clean_to(self, lanes: int, end: int) -> None:
        """Makes positions [0, end) of lanes [0, lanes) finite before a step reads them: a lane's own positions
        are written; what lies past them is zeroed here unless an earlier call or sequence made it finite."""
        for lane in range(lanes):
            if self.clean[lane] < end:
                start = max(self.clean[lane], self.host_lengths[lane])
                stop = min(self.capacity, max(end, start) + self.CLEAN_BLOCK)
                self.keys[:, lane, :, start:stop].zero_()
                self.values[:, lane, :, start:stop].zero_()
                self.clean[lane] = stop

    def move_lane(self, src: int, dst: int) -> None:
        """Copies lane `src`'s filled positions (every layer) into lane `dst`."""
        length = self.host_lengths[src]
        self.keys[:, dst, :, :length] = self.keys[:, src, :, :length]
        self.values[:, dst, :, :length] = self.values[:, src, :, :length]
        self.set_length(dst, length)


@dataclass
class CacheWrite:
    """Where a forward pass writes and what it reads in the KV cache.

    Prefill (`lane` set): T new positions of one lane from `start`. Decode (`positions` set): one new position
    per lane of [0, B), at the lane's own position; keys are read up to `kv_length` with `mask` hiding what
    lies past a lane's end (None when every lane ends at `kv_length`).
    """

    start: int = 0
    lane: int | None = 0
    positions: torch.Tensor | None = None  # int64 [B]
    kv_length: int = 0
    mask: torch.Tensor | None = None  # bool [B, 1, 1, kv_length]

    @property
    def is_decode(self) -> bool:
        return self.positions is not None
