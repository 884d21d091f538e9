"""The align step of the Triton MoE pipeline: builds the block-aligned dispatch plan on the device.
Routed rows are sorted (stably) by expert and each expert is padded to BLOCK_M rows, so every
GEMM row block holds rows of one expert. No host sync, grids sized from S and E only
(CUDA-graph capturable). Readable twin: align_torch (same plan with sort/cumsum/searchsorted).

    plan = align(expert_ids_TK, E, block_m)     # DispatchPlan: sorted_ids_P, block_expert_NB, ...

Legend: S routed rows (flat s = t*K + k), E experts, P padded rows, NB = P / BLOCK_M blocks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton  # ImportError here when triton is missing: ops.py reads it as "no triton"
import triton.language as tl
from torch import Tensor

ALIGN_ONE_PROGRAM_ROWS = 256  # single-program align kernel up to this many routed rows


@triton.jit
def _store_padded_layout(
    counts, experts,  # [E_PAD] int32 rows per expert; expert index 0..E_PAD-1
    sorted_ids_ptr, block_expert_ptr, num_post_pad_ptr, counts_ptr,  # outputs, as in the align kernels
    S, E, NB_MAX,
    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, NB_CHUNK: tl.constexpr,
):
    """Everything of the padded layout that follows from the counts alone: store the counts and the
    padded total, fill each expert's padding slots (after its real rows, so disjoint from the
    slots the caller writes) with the marker S, and label every row block with its expert (block b
    belongs to the number of experts whose padded rows end at or before its first row).
    Returns each expert's first padded slot."""
    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    pad_start = pad_end - padded
    tl.store(counts_ptr + experts, counts, mask=experts < E)
    tl.store(num_post_pad_ptr, tl.sum(padded, axis=0))
    j = tl.arange(0, BLOCK_M)
    pad_pos = (pad_start + counts)[:, None] + j[None, :]
    pad_mask = (j[None, :] < (padded - counts)[:, None]) & (experts < E)[:, None]
    tl.store(sorted_ids_ptr + pad_pos, tl.zeros((E_PAD, BLOCK_M), tl.int32) + S, mask=pad_mask)
    for b0 in range(0, tl.cdiv(NB_MAX, NB_CHUNK)):
        blk = b0 * NB_CHUNK + tl.arange(0, NB_CHUNK)
        ended = (blk[:, None] * BLOCK_M >= pad_end[None, :]) & (experts < E)[None, :]
        owner = tl.sum(ended.to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blk, tl.minimum(owner, E - 1), mask=blk < NB_MAX)
    return pad_start


@triton.jit
def _align_kernel(
    ids_ptr,  # [S] int64 expert id of each routed row, flat order s = t*K + k
    sorted_ids_ptr,  # [P_max] int32 out: flat row s for each padded row; S marks padding
    block_expert_ptr,  # [NB_max] int32 out: expert of each BLOCK_M row block
    num_post_pad_ptr,  # [1] int32 out: padded rows in use (sum of round_up(count_e, BLOCK_M))
    counts_ptr,  # [E] int32 out: rows per expert
    S, E, NB_MAX,  # routed rows, experts, length of block_expert
    BLOCK_M: tl.constexpr,  # rows per GEMM block; every block holds rows of one expert
    E_PAD: tl.constexpr,  # next power of two >= E
    CHUNK: tl.constexpr,  # rows per step: a [CHUNK, E_PAD] one-hot tile lives in registers
    NB_CHUNK: tl.constexpr,  # row blocks per step when labelling blocks with their expert
):
    # One program: a stable counting sort of the S rows by expert, in two passes over one-hot
    # tiles (counts, then each row's rank among the earlier rows of its expert).
    experts = tl.arange(0, E_PAD)
    counts = tl.zeros((E_PAD,), tl.int32)
    for c in range(0, tl.cdiv(S, CHUNK)):
        offs = c * CHUNK + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < S, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    pad_start = _store_padded_layout(counts, experts, sorted_ids_ptr, block_expert_ptr, num_post_pad_ptr,
                                     counts_ptr, S, E, NB_MAX, BLOCK_M, E_PAD, NB_CHUNK)
    seen = tl.zeros((E_PAD,), tl.int32)  # rows of each expert placed by earlier chunks
    for c in range(0, tl.cdiv(S, CHUNK)):
        offs = c * CHUNK + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < S, other=-1).to(tl.int32)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [CHUNK, E_PAD]
        rank = tl.cumsum(onehot, axis=0) - onehot + seen[None, :]  # earlier rows of the same expert
        dest = tl.sum(onehot * (pad_start[None, :] + rank), axis=1)
        tl.store(sorted_ids_ptr + dest, offs, mask=offs < S)
        seen += tl.sum(onehot, axis=0)


@triton.jit
def _align_hist_kernel(
    ids_ptr,  # [S] int64 expert id of each routed row
    hist_ptr,  # [NUM_CHUNKS, E_PAD] int32 out: rows per expert in each chunk of CHUNK rows
    S,  # routed rows
    E_PAD: tl.constexpr, CHUNK: tl.constexpr,
):
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < S, other=-1).to(tl.int32)
    experts = tl.arange(0, E_PAD)
    tl.store(hist_ptr + c * E_PAD + experts, tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0))


@triton.jit
def _align_plan_kernel(
    hist_ptr,  # [NUM_CHUNKS, E_PAD] int32 per-chunk expert histograms
    base_ptr,  # [NUM_CHUNKS, E_PAD] int32 out: first padded slot of each (chunk, expert) run
    sorted_ids_ptr,  # [P_max] int32 out: padding slots only (S); the scatter kernel writes the rest
    block_expert_ptr,  # [NB_max] int32 out
    num_post_pad_ptr,  # [1] int32 out
    counts_ptr,  # [E] int32 out
    S, E, NB_MAX, NUM_CHUNKS,  # routed rows, experts, row blocks, histogram rows
    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr,
    ROWS: tl.constexpr,  # histogram rows per step
    NB_CHUNK: tl.constexpr,  # row blocks per step when labelling blocks
):
    # One program: counts -> padded expert offsets -> each chunk's base slot per expert
    # (an exclusive scan over chunks keeps the sort stable), then padding and block labels.
    experts = tl.arange(0, E_PAD)
    counts = tl.zeros((E_PAD,), tl.int32)
    for r0 in range(0, tl.cdiv(NUM_CHUNKS, ROWS)):
        rows = r0 * ROWS + tl.arange(0, ROWS)
        h = tl.load(hist_ptr + rows[:, None] * E_PAD + experts[None, :], mask=(rows < NUM_CHUNKS)[:, None],
                    other=0)
        counts += tl.sum(h, axis=0)
    pad_start = _store_padded_layout(counts, experts, sorted_ids_ptr, block_expert_ptr, num_post_pad_ptr,
                                     counts_ptr, S, E, NB_MAX, BLOCK_M, E_PAD, NB_CHUNK)
    running = pad_start
    for r0 in range(0, tl.cdiv(NUM_CHUNKS, ROWS)):
        rows = r0 * ROWS + tl.arange(0, ROWS)
        m = (rows < NUM_CHUNKS)[:, None]
        h = tl.load(hist_ptr + rows[:, None] * E_PAD + experts[None, :], mask=m, other=0)
        base = tl.cumsum(h, axis=0) - h + running[None, :]
        tl.store(base_ptr + rows[:, None] * E_PAD + experts[None, :], base, mask=m)
        running += tl.sum(h, axis=0)


@triton.jit
def _align_scatter_kernel(
    ids_ptr,  # [S] int64 expert id of each routed row
    base_ptr,  # [NUM_CHUNKS, E_PAD] int32 first slot of each (chunk, expert) run
    sorted_ids_ptr,  # [P_max] int32 out: flat routed row of each real slot
    S,
    E_PAD: tl.constexpr, CHUNK: tl.constexpr,
):
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < S, other=-1).to(tl.int32)
    experts = tl.arange(0, E_PAD)
    onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
    base = tl.load(base_ptr + c * E_PAD + experts)
    rank = tl.cumsum(onehot, axis=0) - onehot + base[None, :]
    tl.store(sorted_ids_ptr + tl.sum(onehot * rank, axis=1), offs, mask=offs < S)


@dataclass
class DispatchPlan:
    """Rows sorted by expert and padded to block_m; all device tensors, sizes from S, E only."""

    sorted_ids_P: Tensor  # int32 [P_max] flat routed row per padded row, S = padding
    block_expert_NB: Tensor  # int32 [NB_max]
    num_post_pad: Tensor  # int32 [1]
    counts_E: Tensor | None  # int32 [E] (None for the one-token layout)
    block_m: int

    @property
    def num_blocks(self) -> int:
        return self.block_expert_NB.numel()


def _max_padded_rows(S: int, E: int, block_m: int) -> int:
    # each non-empty expert (at most min(E, S)) adds at most block_m - 1 padding rows
    return triton.cdiv(S + min(E, S) * (block_m - 1), block_m) * block_m


def align_torch(ids_S: Tensor, E: int, block_m: int) -> DispatchPlan:
    """The readable twin of align(): the same plan with sort/cumsum/searchsorted; no host sync."""
    S = ids_S.numel()
    dev = ids_S.device
    p_max = _max_padded_rows(S, E, block_m)
    counts = torch.zeros(E, dtype=torch.int64, device=dev).scatter_add_(0, ids_S, torch.ones_like(ids_S))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(ids_S, stable=True)
    sorted_e = ids_S[order]
    dest = (pad_end - padded)[sorted_e] + torch.arange(S, device=dev) - start[sorted_e]
    sorted_ids = torch.full((p_max,), S, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    blocks = torch.arange(p_max // block_m, device=dev) * block_m
    block_expert = torch.searchsorted(pad_end, blocks, right=True).clamp_(max=E - 1).to(torch.int32)
    return DispatchPlan(sorted_ids, block_expert, pad_end[-1:].to(torch.int32), counts.to(torch.int32),
                        block_m)


@functools.cache
def _one_token_layout(S: int, block_m: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Block k holds routed row k then padding; made once per (S, block_m, device), with device
    ops only (also inside a CUDA-graph capture), and read-only afterwards."""
    sorted_ids = torch.full((S * block_m,), S, dtype=torch.int32, device=device)
    sorted_ids[::block_m] = torch.arange(S, dtype=torch.int32, device=device)
    return sorted_ids, torch.full((1,), S * block_m, dtype=torch.int32, device=device)


def align(expert_ids_TK: Tensor, E: int, block_m: int) -> DispatchPlan:
    """Sort routed rows by expert (stable) and pad each expert to block_m rows, on the device:
    one program for small S, else histogram -> plan -> scatter over chunks of rows. A single
    token needs no launch: block_expert is the ids themselves (the GEMMs read it as int64)."""
    ids_S = expert_ids_TK.reshape(-1)
    S = ids_S.numel()
    dev = ids_S.device
    if expert_ids_TK.shape[0] == 1:  # one token: its K experts are distinct, so one block per slot, no sort
        sorted_ids, num_post_pad = _one_token_layout(S, block_m, dev)
        return DispatchPlan(sorted_ids, ids_S, num_post_pad, None, block_m)
    p_max = _max_padded_rows(S, E, block_m)
    nb_max = p_max // block_m
    sorted_ids = torch.empty(p_max, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nb_max, dtype=torch.int32, device=dev)
    num_post_pad = torch.empty(1, dtype=torch.int32, device=dev)
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    e_pad = triton.next_power_of_2(E)
    chunk = max(16, 16384 // e_pad)  # one-hot tile of chunk x e_pad in registers
    nb_chunk = max(16, 8192 // e_pad)
    if S <= ALIGN_ONE_PROGRAM_ROWS:
        _align_kernel[(1,)](
            ids_S, sorted_ids, block_expert, num_post_pad, counts, S, E, nb_max,
            BLOCK_M=block_m, E_PAD=e_pad, CHUNK=min(chunk, max(16, triton.next_power_of_2(S))),
            NB_CHUNK=nb_chunk, num_warps=8,
        )
    else:
        num_chunks = triton.cdiv(S, chunk)
        hist = torch.empty(num_chunks, e_pad, dtype=torch.int32, device=dev)
        base = torch.empty_like(hist)
        _align_hist_kernel[(num_chunks,)](ids_S, hist, S, E_PAD=e_pad, CHUNK=chunk, num_warps=8)
        _align_plan_kernel[(1,)](
            hist, base, sorted_ids, block_expert, num_post_pad, counts, S, E, nb_max, num_chunks,
            BLOCK_M=block_m, E_PAD=e_pad, ROWS=chunk, NB_CHUNK=nb_chunk, num_warps=8,
        )
        _align_scatter_kernel[(num_chunks,)](ids_S, base, sorted_ids, S, E_PAD=e_pad, CHUNK=chunk,
                                             num_warps=8)
    return DispatchPlan(sorted_ids, block_expert, num_post_pad, counts, block_m)
