"""A slotted, preallocated KV cache for continuous batching.

Layout (one tensor pair per layer, allocated once):

    k[l], v[l]  [S, Hkv, L + 1, hd]     S = slots (max concurrent sequences), L = max_len

A running sequence owns one slot (a batch row) from admission to completion; the token at
position p of that sequence lives in column p of its row. Positions are explicit and the model
masks keys beyond a query's own position, so a freed slot is reused without clearing it: the
next sequence overwrites columns 0.. as it goes, and stale columns beyond its length are never
visible to it.

Column L (the last one) is a scratch column. A batched decode runs over a contiguous range of
rows [0, n); rows in that range that are not decoding (free slots, or sequences still being
prefilled in chunks) are fed a dummy token at position L, so their writes land in the scratch
column, which no real query (positions < L) ever sees.

Slots are handed out lowest-free-first, which keeps the decode range [0, n) short.
"""

from __future__ import annotations

import heapq

import torch

from mogelm.config import ModelConfig
from mogelm.model import KVCache


class CacheRows:
    """A view of rows [start, stop) of a SlotKVCache, in the shape the model expects (`.k[l]`, `.v[l]`).

    The views share storage with the cache, so the model's writes go straight into the slots."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], start: int, stop: int):
        self.k = [t[start:stop] for t in k]
        self.v = [t[start:stop] for t in v]
        self.max_len = k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]


class SlotKVCache:
    """Preallocated keys/values for `num_slots` sequences of up to `max_len` tokens each, plus a free list."""

    def __init__(self, cfg: ModelConfig, num_slots: int, max_len: int, device=None, dtype=torch.float32):
        if num_slots <= 0 or max_len <= 0:
            raise ValueError(f"num_slots ({num_slots}) and max_len ({max_len}) must be positive")
        self.num_slots, self.max_len = num_slots, max_len
        self.scratch_pos = max_len  # the extra column (see module docstring)
        self._kv = KVCache(cfg, num_slots, max_len + 1, device=device, dtype=dtype)
        self._free = list(range(num_slots))  # a min-heap of free slot ids

    @property
    def k(self) -> list[torch.Tensor]:
        return self._kv.k

    @property
    def v(self) -> list[torch.Tensor]:
        return self._kv.v

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        """The lowest free slot, or None when every slot is taken."""
        return heapq.heappop(self._free) if self._free else None

    def release(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots and slot not in self._free, f"slot {slot} is not in use"
        heapq.heappush(self._free, slot)

    def rows(self, start: int, stop: int) -> CacheRows:
        assert 0 <= start < stop <= self.num_slots
        return CacheRows(self.k, self.v, start, stop)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
