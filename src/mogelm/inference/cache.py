"""The slotted KV cache and the previous engine's method over it, kept as the reference the paged
engine is tested against (tests/test_engine_*.py) and timed beside (benchmarks/bench_engine.py,
"previous version"). The engine itself uses the paged pool (inference/paged.py).

    out = slotted_greedy(model, [prompt_ids, ...], max_tokens=32)    # token ids per prompt

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

Slots are handed out lowest-free-first, which keeps the decode range [0, n) short. A slot reserves
max_len tokens whether its sequence uses them or not, and the CUDA-graph decode attends to the
whole row (kv_len = L + 1): the two costs the paged engine removes.
"""

from __future__ import annotations

import heapq

import torch
from torch import Tensor

from mogelm.config import ModelConfig
from mogelm.kernels.cuda_graphs import capture_cuda_graph
from mogelm.model import KVCache, Transformer


class CacheRows(KVCache):
    """A view of rows [start, stop) of a SlotKVCache, in the shape the model expects (`.k[l]`, `.v[l]`).

    The views share storage with the cache, so the model's writes go straight into the slots."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], start: int, stop: int):
        self.k = [t[start:stop] for t in k]
        self.v = [t[start:stop] for t in v]
        self.max_len = k[0].shape[2]


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


def prefill(model: Transformer, rows: CacheRows, ids: list[int], start: int) -> Tensor:
    """Write tokens `ids` at positions start.. of a one-row cache view; logits of the last one [V]."""
    device = rows.k[0].device
    ids_1T = torch.tensor([ids], device=device)
    pos_1T = torch.arange(start, start + len(ids), device=device).unsqueeze(0)
    return model(ids_1T, positions_BT=pos_1T, kv_cache=rows, kv_len=start + len(ids),
                 last_token_only=True)[0, -1]


def decode_one_token(model: Transformer, rows: CacheRows, ids_B: Tensor, pos_B: Tensor,
                     kv_len: int) -> Tensor:
    """One token per cache row at its own position (row b of `rows` <- ids_B[b] at pos_B[b]);
    logits [B, V]."""
    return model(ids_B[:, None], positions_BT=pos_B[:, None], kv_cache=rows, kv_len=kv_len)[:, 0]


class SlotGraphDecoder:
    """The previous engine's CUDA-graph decode: one graph per batch size in `buckets`, each reading
    static ids/positions and cache rows [0, bucket) and attending to the whole row (kv_len = L + 1;
    masking hides keys beyond each row's position). Rows past the live batch get a dummy token at
    the scratch column."""

    def __init__(self, model: Transformer, cache: SlotKVCache, buckets: list[int]):
        self.cache, self.buckets, self.graphs = cache, sorted(buckets), {}
        device = cache.k[0].device
        pool = None
        for b in sorted(buckets, reverse=True):  # largest first, so smaller graphs reuse its memory pool
            ids = torch.zeros(b, dtype=torch.long, device=device)
            pos = torch.full((b,), cache.scratch_pos, dtype=torch.long, device=device)
            rows = cache.rows(0, b)

            def fwd(ids=ids, pos=pos, rows=rows):
                return decode_one_token(model, rows, ids, pos, kv_len=cache.max_len + 1)

            graph, logits = capture_cuda_graph(fwd, pool=pool)
            pool = graph.pool()
            self.graphs[b] = (graph, ids, pos, logits)

    def __call__(self, ids_n: Tensor, pos_n: Tensor) -> Tensor:
        n = ids_n.shape[0]
        b = next(s for s in self.buckets if s >= n)
        graph, ids, pos, logits = self.graphs[b]
        ids.zero_()
        pos.fill_(self.cache.scratch_pos)
        ids[:n].copy_(ids_n)
        pos[:n].copy_(pos_n)
        graph.replay()
        return logits[:n]


@torch.inference_mode()
def slotted_greedy(model: Transformer, prompts: list[list[int]], max_tokens: int, stop_id: int | None = None,
                   max_len: int | None = None) -> list[list[int]]:
    """Greedy decoding of every prompt at once the previous engine's way: each prompt prefilled
    alone into its slot, then one batched decode step per token over all slots."""
    device = next(model.parameters()).device
    max_len = max_len or max(len(p) for p in prompts) + max_tokens
    cache = SlotKVCache(model.cfg, len(prompts), max_len, device=device, dtype=next(model.parameters()).dtype)
    last = [int(prefill(model, cache.rows(s, s + 1), p, 0).argmax()) for s, p in enumerate(prompts)]
    outs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_tokens):
        for s, t in enumerate(last):
            if not done[s]:
                done[s] = t == stop_id
                if not done[s]:
                    outs[s].append(t)
        if all(done) or step == max_tokens - 1:
            break
        ids = torch.tensor(last, device=device)
        pos = torch.tensor([len(p) + step for p in prompts], device=device)
        last = decode_one_token(model, cache.rows(0, len(prompts)), ids, pos,
                                int(pos.max()) + 1).argmax(-1).tolist()
    return outs
