"""Functions over decode rows of the paged KV pool, replayed from CUDA graphs, one graph per bucketed
row count: the one mechanism behind the engine's decode/verify step (engine.CUDAGraphRunner) and
MTP drafting (spec_decode.MTPRunner).

    graphs = PagedGraphs(cache, decode_buckets(16), max_blocks, build, extra={"hidden": ((D,), dtype)})
    out = graphs(ids_R, pos_R, slots_R, tables_RW, lens_R, hidden=h_RD)    # R <= graphs.max_rows

`build(rows)` receives one bucket's static inputs (StaticRows: token ids and positions [1, b], a
PagedAttention whose pool slots [b], block tables [b, max_blocks] and live lengths [b] are static
buffers, with the decode kernel's split factor fixed for b, and the `extra` per-row buffers
[b, ...]) and returns the function to capture; what it returns (a tensor or a tuple of tensors,
first dimension b) are the graph's static outputs. A call copies the R live rows in (host or
device tensors) and pads the rest exactly alike for every user: token 0 at position 0, written to
the null block (slot 0) with length 0, so a padding row's attention output is zero; its extra
inputs are zero. Rows never mix (row-wise norms and GEMMs, per-token routing in a dropless MoE,
attention over each row's own blocks), so padding changes no live row. Then it replays the graph
of the smallest bucket >= R and returns the outputs' first R rows: VIEWS of the static outputs,
valid until the next call (copy what must outlive it).

On CUDA the graphs are captured by kernels.cuda_graphs.capture_cuda_graph, the largest bucket
first so the smaller ones reuse its memory pool (one pool per PagedGraphs: two users never share
scratch memory). On a CPU (tests; the engine captures graphs on CUDA only) each "graph" is an
EagerReplay: the function runs again on the same static buffers, so the bucketing, padding and
buffer handling are tested without a GPU.

Legend: b rows of a bucket, R live rows of a call, W block-table width of a call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mogelm.inference.block_manager import NULL_BLOCK
from mogelm.inference.paged import PagedAttention, PagedKVCache
from mogelm.kernels import ops
from mogelm.kernels.cuda_graphs import capture_cuda_graph


def decode_buckets(max_batch: int) -> list[int]:
    """Row counts with a captured graph: powers of two up to max_batch, and max_batch."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class EagerReplay:
    """Stands in for a captured CUDA graph on a CPU (tests of the runners' bucketing and padding):
    replay() runs the function again and copies its results into the same output tensors."""

    def __init__(self, fn: Callable[[], Tensor | tuple[Tensor, ...]]):
        self.fn, self.out = fn, fn()

    def replay(self) -> None:
        new = self.fn()
        for o, n in zip(*((x,) if isinstance(x, Tensor) else x for x in (self.out, new))):
            o.copy_(n)


@dataclass
class StaticRows:
    """The static inputs of one bucket of b rows (what a captured function reads)."""

    ids_1b: Tensor  # [1, b] int64 token ids
    pos_1b: Tensor  # [1, b] int64 positions
    state: PagedAttention  # slots [b] int64, tables [b, max_blocks] int32, lens [b] int32
    extra: dict[str, Tensor] = field(default_factory=dict)  # name -> [b, ...]


class PagedGraphs:
    """One graph per bucket of decode rows over the paged pool (module docstring).

    graphs[b] = (graph, ids [1, b], positions [1, b], PagedAttention, outputs); extras[b] = the
    bucket's extra input buffers by name."""

    def __init__(self, cache: PagedKVCache, buckets: list[int], max_blocks: int,
                 build: Callable[[StaticRows], Callable[[], Tensor | tuple[Tensor, ...]]],
                 extra: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None):
        """extra: name -> (shape of one row, dtype) of the per-row inputs beyond ids/positions."""
        self.buckets, self.graphs, self.extras = sorted(buckets), {}, {}
        device = cache.k[0].device
        pool = None
        for b in sorted(buckets, reverse=True):  # largest first, so smaller graphs reuse its memory pool
            splits = ops.decode_attention_splits(b, cache.num_kv_heads, max_blocks * cache.block_size, device)
            state = PagedAttention(cache, torch.zeros(b, dtype=torch.long, device=device),
                                   torch.zeros(b, max_blocks, dtype=torch.int32, device=device),
                                   torch.zeros(b, dtype=torch.int32, device=device), num_splits=splits)
            rows = StaticRows(torch.zeros(1, b, dtype=torch.long, device=device),
                              torch.zeros(1, b, dtype=torch.long, device=device), state,
                              {name: torch.zeros(b, *shape, dtype=dtype, device=device)
                               for name, (shape, dtype) in (extra or {}).items()})
            fn = build(rows)
            if device.type != "cuda":  # CPU (tests): the same static buffers, replayed eagerly
                graph = EagerReplay(fn)
                out = graph.out
            else:
                graph, out = capture_cuda_graph(fn, pool=pool)
                pool = graph.pool()
            self.graphs[b] = (graph, rows.ids_1b, rows.pos_1b, state, out)
            self.extras[b] = rows.extra

    @property
    def max_rows(self) -> int:
        """The largest bucket: calls with more rows must run eagerly."""
        return self.buckets[-1]

    def __call__(self, ids_R: Tensor, pos_R: Tensor, slots_R: Tensor, tables_RW: Tensor, lens_R: Tensor,
                 **extra_R: Tensor) -> Tensor | tuple[Tensor, ...]:
        """The outputs' first R rows (views of the static outputs) after copying the R live rows in,
        padding the rest and replaying the smallest bucket >= R."""
        R, W = tables_RW.shape
        b = next(s for s in self.buckets if s >= R)
        graph, ids, pos, state, out = self.graphs[b]
        extra = self.extras[b]
        ids[0, :R].copy_(ids_R)
        pos[0, :R].copy_(pos_R)
        state.slots_N[:R].copy_(slots_R)
        state.tables_RM[:R, :W].copy_(tables_RW)  # columns past W are stale but never read (lengths)
        state.lens_R[:R].copy_(lens_R)
        for name, x in extra_R.items():
            extra[name][:R].copy_(x)
        if R < b:
            ids[0, R:].zero_()
            pos[0, R:].zero_()
            state.slots_N[R:].fill_(NULL_BLOCK)  # slot 0 = offset 0 of the null block
            state.lens_R[R:].zero_()
            for x in extra.values():
                x[R:].zero_()
        graph.replay()
        if isinstance(out, Tensor):
            return out[:R]
        return tuple(o[:R] for o in out)
