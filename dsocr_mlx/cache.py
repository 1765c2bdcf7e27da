"""The decoder's KV cache in lanes, on MLX (mirrors dsocr_torch/cache.py).

Per layer, keys and values are [lanes, kv_heads, capacity, head_dim]; a lane holds one sequence. Both leading
sizes grow in steps as sequences need them (MLX memory is committed when allocated, so a cache sized for the
worst case up front would hold gigabytes for nothing). A forward pass sees the cache through per-layer views
with mlx-lm's cache interface (`offset`, `update_and_fetch`), so mlx-lm's attention module is used as it is:
a prefill chunk writes one lane from a start position, a decode step writes one position per lane at the
lane's own offset (an array: RoPE takes per-row offsets).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from common.model.config import LanguageConfig

GROW_POSITIONS = 256  # capacity grows in steps of this many positions (mlx-lm's KVCache step)


@dataclass
class LaneView:
    """One layer of the cache as mlx-lm's attention expects a cache for one forward pass."""

    cache: KVCache
    layer: int
    offset: int | mx.array
    lane: int | None  # prefill: the lane written; decode: None (lanes [0, batch))
    batch: int
    kv_length: int

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        stored_keys, stored_values = self.cache.keys[self.layer], self.cache.values[self.layer]
        if self.lane is not None:
            start = int(self.offset)  # type: ignore[arg-type]
            end = start + keys.shape[2]
            stored_keys[self.lane : self.lane + 1, :, start:end] = keys.astype(stored_keys.dtype)
            stored_values[self.lane : self.lane + 1, :, start:end] = values.astype(stored_values.dtype)
            return stored_keys[self.lane : self.lane + 1, :, :end], stored_values[self.lane : self.lane + 1, :, :end]
        lanes = mx.arange(self.batch)
        stored_keys[lanes, :, self.offset] = keys[:, :, 0].astype(stored_keys.dtype)
        stored_values[lanes, :, self.offset] = values[:, :, 0].astype(stored_values.dtype)
        return stored_keys[: self.batch, :, : self.kv_length], stored_values[: self.batch, :, : self.kv_length]


class KVCache:
    """Keys/values of every layer in lanes and how many positions of each lane are filled."""

    def __init__(self, cfg: LanguageConfig, lanes: int, capacity: int, dtype: mx.Dtype) -> None:
        self.max_lanes, self.max_capacity, self.dtype = lanes, capacity, dtype
        self.num_layers, self.kv_heads, self.head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []
        self.lanes = 0  # allocated lanes
        self.capacity = 0  # allocated positions per lane
        self.host_lengths: list[int] = [0] * lanes

    @staticmethod
    def bytes_per_position(cfg: LanguageConfig, dtype: mx.Dtype) -> int:
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype.size

    def reserve(self, lanes: int, positions: int) -> None:
        """Grows the cache (never shrinks it) so lanes [0, lanes) hold `positions` positions each."""
        if lanes > self.max_lanes or positions > self.max_capacity:
            raise ValueError(f"the KV cache holds {self.max_lanes} lanes of {self.max_capacity} positions")
        if lanes <= self.lanes and positions <= self.capacity:
            return
        new_lanes = max(self.lanes, lanes)
        steps = -(-max(self.capacity, positions) // GROW_POSITIONS)
        new_capacity = min(steps * GROW_POSITIONS, self.max_capacity)
        shape = (new_lanes, self.kv_heads, new_capacity, self.head_dim)
        for store in (self.keys, self.values):
            for layer in range(self.num_layers):
                grown = mx.zeros(shape, dtype=self.dtype)
                if self.lanes and self.capacity:
                    grown[: self.lanes, :, : self.capacity] = store[layer]
                if layer < len(store):
                    store[layer] = grown
                else:
                    store.append(grown)
        mx.eval(self.keys, self.values)
        self.lanes, self.capacity = new_lanes, new_capacity

    def release(self) -> None:
        """Frees every lane's memory (nothing is running)."""
        self.keys, self.values = [], []
        self.lanes = self.capacity = 0
        self.host_lengths = [0] * self.max_lanes

    def prefill_views(self, lane: int, start: int, length: int) -> list[LaneView]:
        self.reserve(lane + 1, start + length)
        return [LaneView(self, layer, start, lane, 1, start + length) for layer in range(self.num_layers)]

    def decode_views(self, batch: int) -> tuple[list[LaneView], mx.array, int]:
        """Views for one position per lane of [0, batch); returns them, the positions and the keys to read."""
        lengths = self.host_lengths[:batch]
        kv_length = max(lengths) + 1
        self.reserve(batch, kv_length)
        positions = mx.array(lengths, dtype=mx.int32)
        views = [LaneView(self, layer, positions, None, batch, kv_length) for layer in range(self.num_layers)]
        return views, positions, kv_length

    def move_lane(self, src: int, dst: int) -> None:
        length = self.host_lengths[src]
        if length:
            self.reserve(dst + 1, length)
            for store in (self.keys, self.values):
                for layer_store in store:
                    layer_store[dst, :, :length] = layer_store[src, :, :length]
        self.host_lengths[dst] = length
