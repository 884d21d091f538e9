"""Grouped GEMMs of the routed experts for training, forward and backward, over the block-aligned
dispatch plan of triton_align (rows sorted by expert, each expert padded to BLOCK_M rows, one
expert per row block). The autograd wrapper is triton_moe._RoutedExperts; the readable twin of
the whole thing is torch_impl.routed_experts and the oracle moe/reference.py (forward and
gradients: tests/test_expert_backward.py, CPU through TRITON_INTERPRET=1 in fp32; `gpu` tests
against fp64).

Legend: T tokens, D hidden, F expert width, E experts, K experts per token, S = T*K routed rows
(flat s = t*K + k), P padded rows of the plan, w_s the gate weight of row s, e(p) the expert of
padded row p, t(p) its token.

    forward   hw_PF, gu_P2F = gate_up(x)          _gate_up_kernel   x rows gathered by token;
                                                                     hw = w_s * SiLU(g) * u in the
                                                                     epilogue; g|u kept for the
                                                                     backward
              y_SD = down(hw)                      _down_kernel      rows stored in flat order
              y_TD = y_SD.view(T, K, D).sum(1)                       (a gather: no scatter)
    backward  da_PF = dy_t(p) @ down_e            _down_dgrad_kernel dy gathered by token (the
              dw_s = <da, silu(g)*u>                                 combine's backward); SwiGLU
              dgu_P2F = swiglu_bwd(w_s * da, g, u)                   backward and dw in the
                                                                     epilogue (dw as per-tile
                                                                     partial sums, no atomics)
              dx_SD = dgu_P2F @ gate_up_e          _dx_kernel        rows stored in flat order,
              dx_TD = dx_SD.view(T, K, D).sum(1)                     summed over K (no index_add)
              d_down_e = dy_e^T @ hw_e             _wgrad_kernel     one expert per tile, the
              d_gate_up_e = dgu_e^T @ x_e                            reduction over its rows

The gate weight is folded into the activation the down GEMM reads (hw, zero on padding rows), so
neither the down GEMM nor its weight gradient scales rows inside its loop: both operands of every
reduction are plain loads (y = w * down(h) = down(w * h), d down = sum dy^T (w h)).

Nothing reads a device value on the host. Variants (GemmVariant) are compile-time switches of the
same kernels, measured by benchmarks/bench_train.py:
    persistent  one program per SM walking the tiles; the tile count is read from the plan on the
                device, so grids stay sized from S and E
    tma         weight tiles (and the contiguous padded-row operands) through host-made TMA tensor
                descriptors (triton.tools.tensor_descriptor); gathered rows keep ordinary loads
    ws          warp specialisation of the reduction loop (tl.range(warp_specialize=True))
A variant that fails to compile on this GPU/triton falls back to the plain kernels with one
warning (`broken_variants()` lists them).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
import triton  # ImportError here when triton is missing: ops.py reads it as "no triton"
import triton.language as tl
from torch import Tensor

from mogelm.kernels.triton_align import DispatchPlan, align, align_torch
from mogelm.kernels.triton_common import (
    INTERPRET,
    GemmConfig,
    descriptor,
    device_limit,
    fit_gemm,
    precision,
    tile_ids,
    tma_ok,
)

# ----------------------------------------------------------------------------------------------
# Level 1: raw kernels (one jit tile function per GEMM; the kernel runs it once or, persistent,
# for every tile of a stride over the tile space)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gate_up_tile(
    tile, num_pid_m,  # this tile; row blocks of the swizzle
    x_ptr,  # [T, D] activations in token order; rows gathered here
    w,  # [E, 2F, D] gate rows then up rows: a pointer, or with W_DESC a descriptor of [E*2F, D]
    h_ptr,  # [P, F] out: silu(g) * u per padded row (times the row's gate weight with SCALE_H)
    gu_ptr,  # [P, 2F] out (STORE_GU): the pre-activations g | u, for the backward
    route_w_ptr,  # [S] fp32 gate weight of each flat routed row (read with SCALE_H)
    sorted_ids_ptr, block_expert_ptr,  # the plan: flat row per padded row (S = padding); expert per block
    S, F, D,  # routed rows, expert width, hidden
    stride_xt, stride_we, stride_wn, stride_hp, stride_gp,  # x row, weight expert/row, h row, gu row
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,  # EVEN_K: D % BLOCK_K == 0 (no masks in the loop)
    STORE_GU: tl.constexpr, SCALE_H: tl.constexpr, W_DESC: tl.constexpr, WARP_SPEC: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,  # interpreter: dot in fp32; tl.dot precision
):
    pid_m, pid_n = tile_ids(tile, num_pid_m, tl.cdiv(F, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    flat = tl.load(sorted_ids_ptr + offs_m)
    # padding rows read token 0 (a real row) so the loop needs no row mask; never used downstream
    tok = tl.where(flat < S, flat // TOP_K, 0).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]
    if not W_DESC:
        offs_n = (n0 + tl.arange(0, BLOCK_N)) % F  # wrap: in-bounds loads, masked store
        g_ptrs = w + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    row_g = expert * (2 * F) + n0  # descriptor row of the gate tile; the up tile is F rows further
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in tl.range(0, tl.cdiv(D, BLOCK_K), warp_specialize=WARP_SPEC):
        kk = k * BLOCK_K
        if EVEN_K:
            a = tl.load(a_ptrs + kk)
        else:
            a = tl.load(a_ptrs + kk, mask=offs_k[None, :] < D - kk, other=0.0)
        if W_DESC:  # [BN, BK] tiles, zeros past D; rows past F belong to masked output columns
            bg = w.load([row_g, kk]).T
            bu = w.load([row_g + F, kk]).T
        elif EVEN_K:
            bg = tl.load(g_ptrs + kk)
            bu = tl.load(g_ptrs + F * stride_wn + kk)
        else:
            kin = offs_k[:, None] < D - kk
            bg = tl.load(g_ptrs + kk, mask=kin, other=0.0)
            bu = tl.load(g_ptrs + F * stride_wn + kk, mask=kin, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
    out_n = n0 + tl.arange(0, BLOCK_N)
    nmask = (out_n < F)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # SiLU(gate) * up in fp32
    if SCALE_H:  # hw = w_s * h; padding rows (w = 0) become exact zeros
        h = h * tl.load(route_w_ptr + flat, mask=flat < S, other=0.0)[:, None]
    tl.store(h_ptr + rows * stride_hp + out_n[None, :], h.to(h_ptr.dtype.element_ty), mask=nmask)
    if STORE_GU:
        gu_ptrs = gu_ptr + rows * stride_gp + out_n[None, :]
        tl.store(gu_ptrs, acc_g.to(gu_ptr.dtype.element_ty), mask=nmask)
        tl.store(gu_ptrs + F, acc_u.to(gu_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _gate_up_kernel(
    x_ptr, w, h_ptr, gu_ptr, route_w_ptr, sorted_ids_ptr, block_expert_ptr,
    num_post_pad_ptr,  # [1] int32 padded rows in use: blocks past it have no work
    S, F, D, NUM_PID_M,  # NUM_PID_M: row blocks in the grid (the plan's maximum)
    stride_xt, stride_we, stride_wn, stride_hp, stride_gp,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, STORE_GU: tl.constexpr, SCALE_H: tl.constexpr,
    PERSISTENT: tl.constexpr, W_DESC: tl.constexpr, WARP_SPEC: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    num_pid_n = tl.cdiv(F, BLOCK_N)
    if PERSISTENT:
        num_pid_m = tl.cdiv(tl.load(num_post_pad_ptr), BLOCK_M)
        for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0)):
            _gate_up_tile(tile, num_pid_m, x_ptr, w, h_ptr, gu_ptr, route_w_ptr, sorted_ids_ptr,
                          block_expert_ptr, S, F, D, stride_xt, stride_we, stride_wn, stride_hp, stride_gp,
                          TOP_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EVEN_K, STORE_GU, SCALE_H, W_DESC,
                          WARP_SPEC, UPCAST, PRECISION)
    else:
        pid_m, _ = tile_ids(tl.program_id(0), NUM_PID_M, num_pid_n, GROUP_M)
        if pid_m * BLOCK_M < tl.load(num_post_pad_ptr):
            _gate_up_tile(tl.program_id(0), NUM_PID_M, x_ptr, w, h_ptr, gu_ptr, route_w_ptr, sorted_ids_ptr,
                          block_expert_ptr, S, F, D, stride_xt, stride_we, stride_wn, stride_hp, stride_gp,
                          TOP_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EVEN_K, STORE_GU, SCALE_H, W_DESC,
                          WARP_SPEC, UPCAST, PRECISION)


@triton.jit
def _down_tile(
    tile, num_pid_m,
    h,  # [P, F] SwiGLU activations (hw): a pointer, or with A_DESC a descriptor (block [BM, BK])
    w,  # [E, D, F] down projection: a pointer, or with W_DESC a descriptor of [E*D, F] (block [BN, BK])
    route_w_ptr,  # [S] fp32 gate weight of each flat routed row (read with ROUTE_W)
    y_ptr,  # [S, D] out: (weighted) expert output per flat row
    sorted_ids_ptr, block_expert_ptr,
    S, D, F, stride_hp, stride_we, stride_wn, stride_ys,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # F % BLOCK_K == 0
    ROUTE_W: tl.constexpr,  # multiply by the gate weight here (False: h already holds it)
    A_DESC: tl.constexpr, W_DESC: tl.constexpr, WARP_SPEC: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_n = tile_ids(tile, num_pid_m, tl.cdiv(D, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    flat = tl.load(sorted_ids_ptr + offs_m)
    valid = flat < S
    n0 = pid_n * BLOCK_N
    offs_k = tl.arange(0, BLOCK_K)
    if not A_DESC:
        a_ptrs = h + offs_m[:, None].to(tl.int64) * stride_hp + offs_k[None, :]
    if not W_DESC:
        offs_n = (n0 + tl.arange(0, BLOCK_N)) % D
        b_ptrs = w + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in tl.range(0, tl.cdiv(F, BLOCK_K), warp_specialize=WARP_SPEC):
        kk = k * BLOCK_K
        if A_DESC:
            a = h.load([m0, kk])
        elif EVEN_K:
            a = tl.load(a_ptrs + kk)
        else:
            a = tl.load(a_ptrs + kk, mask=offs_k[None, :] < F - kk, other=0.0)
        if W_DESC:
            b = w.load([expert * D + n0, kk]).T
        elif EVEN_K:
            b = tl.load(b_ptrs + kk)
        else:
            b = tl.load(b_ptrs + kk, mask=offs_k[:, None] < F - kk, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if ROUTE_W:
        acc = acc * tl.load(route_w_ptr + flat, mask=valid, other=0.0)[:, None]
    out_n = n0 + tl.arange(0, BLOCK_N)
    y_ptrs = y_ptr + flat[:, None].to(tl.int64) * stride_ys + out_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & (out_n < D)[None, :])


@triton.jit
def _down_kernel(
    h, w, route_w_ptr, y_ptr, sorted_ids_ptr, block_expert_ptr, num_post_pad_ptr,
    S, D, F, NUM_PID_M, stride_hp, stride_we, stride_wn, stride_ys,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, ROUTE_W: tl.constexpr, PERSISTENT: tl.constexpr, A_DESC: tl.constexpr,
    W_DESC: tl.constexpr, WARP_SPEC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    num_pid_n = tl.cdiv(D, BLOCK_N)
    if PERSISTENT:
        num_pid_m = tl.cdiv(tl.load(num_post_pad_ptr), BLOCK_M)
        for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0)):
            _down_tile(tile, num_pid_m, h, w, route_w_ptr, y_ptr, sorted_ids_ptr, block_expert_ptr,
                       S, D, F, stride_hp, stride_we, stride_wn, stride_ys, BLOCK_M, BLOCK_N, BLOCK_K,
                       GROUP_M, EVEN_K, ROUTE_W, A_DESC, W_DESC, WARP_SPEC, UPCAST, PRECISION)
    else:
        pid_m, _ = tile_ids(tl.program_id(0), NUM_PID_M, num_pid_n, GROUP_M)
        if pid_m * BLOCK_M < tl.load(num_post_pad_ptr):
            _down_tile(tl.program_id(0), NUM_PID_M, h, w, route_w_ptr, y_ptr, sorted_ids_ptr,
                       block_expert_ptr, S, D, F, stride_hp, stride_we, stride_wn, stride_ys, BLOCK_M,
                       BLOCK_N, BLOCK_K, GROUP_M, EVEN_K, ROUTE_W, A_DESC, W_DESC, WARP_SPEC, UPCAST,
                       PRECISION)


@triton.jit
def _down_dgrad_tile(
    tile, num_pid_m,
    dy_ptr,  # [T, D] upstream gradient in token order; rows gathered here (the combine's backward)
    w,  # [E, D, F] down projection read as [D, F] per expert: a pointer, or with W_DESC a
    #     descriptor of [E*D, F] (block [BK, BN])
    gu_ptr,  # [P, 2F] forward pre-activations g | u
    route_w_ptr,  # [S] fp32 gate weights
    dgu_ptr,  # [P, 2F] out: d g | d u (zeros on padding rows)
    dw_part_ptr,  # [cdiv(F, BN), S] fp32 out: each F tile's share of d w_s
    sorted_ids_ptr, block_expert_ptr,
    S, F, D, stride_dyt, stride_we, stride_wd, stride_gp, stride_dp,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,  # D % BLOCK_K == 0
    W_DESC: tl.constexpr, WARP_SPEC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    num_pid_n = tl.cdiv(F, BLOCK_N)
    pid_m, pid_n = tile_ids(tile, num_pid_m, num_pid_n, GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    flat = tl.load(sorted_ids_ptr + offs_m)
    valid = flat < S
    tok = tl.where(valid, flat // TOP_K, 0).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = dy_ptr + tok[:, None] * stride_dyt + offs_k[None, :]
    if not W_DESC:
        offs_n = (n0 + tl.arange(0, BLOCK_N)) % F
        b_ptrs = w + expert.to(tl.int64) * stride_we + offs_k[:, None] * stride_wd + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in tl.range(0, tl.cdiv(D, BLOCK_K), warp_specialize=WARP_SPEC):
        kk = k * BLOCK_K
        if EVEN_K:
            a = tl.load(a_ptrs + kk)
        else:
            a = tl.load(a_ptrs + kk, mask=offs_k[None, :] < D - kk, other=0.0)
        if W_DESC:  # rows past D belong to the next expert but meet zero columns of a
            b = w.load([expert * D + kk, n0])
        elif EVEN_K:
            b = tl.load(b_ptrs + kk * stride_wd)
        else:
            b = tl.load(b_ptrs + kk * stride_wd, mask=offs_k[:, None] < D - kk, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)  # da_raw = dy @ down_e  [BM, BN]
    # Epilogue: SwiGLU backward. a = silu(g) * u; y = w * down(a), so
    #   d w = <da_raw, a>,  da = w * da_raw,  dg = da * u * sig(g) * (1 + g (1 - sig(g))),  du = da * silu(g)
    out_n = n0 + tl.arange(0, BLOCK_N)
    nmask = (out_n < F)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    g = tl.load(gu_ptr + rows * stride_gp + out_n[None, :], mask=nmask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + rows * stride_gp + F + out_n[None, :], mask=nmask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dw = tl.sum(acc * (silu * u), axis=1)  # masked columns hold g = u = 0
    tl.store(dw_part_ptr + pid_n.to(tl.int64) * S + flat, dw, mask=valid)
    da = acc * tl.load(route_w_ptr + flat, mask=valid, other=0.0)[:, None]  # padding rows: exactly 0
    d_ptrs = dgu_ptr + rows * stride_dp + out_n[None, :]
    tl.store(d_ptrs + F, (da * silu).to(dgu_ptr.dtype.element_ty), mask=nmask)  # du (first: frees silu)
    dg = da * u * (sig + silu * (1.0 - sig))  # = da * u * sig * (1 + g (1 - sig))
    tl.store(d_ptrs, dg.to(dgu_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _down_dgrad_kernel(
    dy_ptr, w, gu_ptr, route_w_ptr, dgu_ptr, dw_part_ptr, sorted_ids_ptr, block_expert_ptr,
    num_post_pad_ptr, S, F, D, NUM_PID_M, stride_dyt, stride_we, stride_wd, stride_gp, stride_dp,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, PERSISTENT: tl.constexpr, W_DESC: tl.constexpr,
    WARP_SPEC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    num_pid_n = tl.cdiv(F, BLOCK_N)
    if PERSISTENT:
        num_pid_m = tl.cdiv(tl.load(num_post_pad_ptr), BLOCK_M)
        for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0)):
            _down_dgrad_tile(tile, num_pid_m, dy_ptr, w, gu_ptr, route_w_ptr, dgu_ptr, dw_part_ptr,
                             sorted_ids_ptr, block_expert_ptr, S, F, D, stride_dyt, stride_we, stride_wd,
                             stride_gp, stride_dp, TOP_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EVEN_K,
                             W_DESC, WARP_SPEC, UPCAST, PRECISION)
    else:
        pid_m, _ = tile_ids(tl.program_id(0), NUM_PID_M, num_pid_n, GROUP_M)
        if pid_m * BLOCK_M < tl.load(num_post_pad_ptr):
            _down_dgrad_tile(tl.program_id(0), NUM_PID_M, dy_ptr, w, gu_ptr, route_w_ptr, dgu_ptr,
                             dw_part_ptr, sorted_ids_ptr, block_expert_ptr, S, F, D, stride_dyt, stride_we,
                             stride_wd, stride_gp, stride_dp, TOP_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                             EVEN_K, W_DESC, WARP_SPEC, UPCAST, PRECISION)


@triton.jit
def _dx_tile(
    tile, num_pid_m,
    dgu,  # [P, 2F] d g | d u: a pointer, or with A_DESC a descriptor (block [BM, BK])
    w,  # [E, 2F, D] gate_up read as [2F, D] per expert: a pointer, or with W_DESC a descriptor
    #     of [E*2F, D] (block [BK, BN])
    dx_ptr,  # [S, D] out: each flat row's input gradient (summed over its K slots afterwards)
    sorted_ids_ptr, block_expert_ptr,
    S, F2, D, stride_dp, stride_we, stride_wk, stride_xs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # 2F % BLOCK_K == 0
    A_DESC: tl.constexpr, W_DESC: tl.constexpr, WARP_SPEC: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_n = tile_ids(tile, num_pid_m, tl.cdiv(D, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    flat = tl.load(sorted_ids_ptr + offs_m)
    valid = flat < S
    n0 = pid_n * BLOCK_N
    offs_k = tl.arange(0, BLOCK_K)
    if not A_DESC:
        a_ptrs = dgu + offs_m[:, None].to(tl.int64) * stride_dp + offs_k[None, :]
    if not W_DESC:
        offs_n = (n0 + tl.arange(0, BLOCK_N)) % D
        b_ptrs = w + expert.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in tl.range(0, tl.cdiv(F2, BLOCK_K), warp_specialize=WARP_SPEC):
        kk = k * BLOCK_K
        if A_DESC:
            a = dgu.load([m0, kk])
        elif EVEN_K:
            a = tl.load(a_ptrs + kk)
        else:
            a = tl.load(a_ptrs + kk, mask=offs_k[None, :] < F2 - kk, other=0.0)
        if W_DESC:  # rows past 2F belong to the next expert but meet zero columns of a
            b = w.load([expert * F2 + kk, n0])
        elif EVEN_K:
            b = tl.load(b_ptrs + kk * stride_wk)
        else:
            b = tl.load(b_ptrs + kk * stride_wk, mask=offs_k[:, None] < F2 - kk, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    out_n = n0 + tl.arange(0, BLOCK_N)
    dx_ptrs = dx_ptr + flat[:, None].to(tl.int64) * stride_xs + out_n[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=valid[:, None] & (out_n < D)[None, :])


@triton.jit
def _dx_kernel(
    dgu, w, dx_ptr, sorted_ids_ptr, block_expert_ptr, num_post_pad_ptr,
    S, F2, D, NUM_PID_M, stride_dp, stride_we, stride_wk, stride_xs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, PERSISTENT: tl.constexpr, A_DESC: tl.constexpr, W_DESC: tl.constexpr,
    WARP_SPEC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    num_pid_n = tl.cdiv(D, BLOCK_N)
    if PERSISTENT:
        num_pid_m = tl.cdiv(tl.load(num_post_pad_ptr), BLOCK_M)
        for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0)):
            _dx_tile(tile, num_pid_m, dgu, w, dx_ptr, sorted_ids_ptr, block_expert_ptr, S, F2, D,
                     stride_dp, stride_we, stride_wk, stride_xs, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                     EVEN_K, A_DESC, W_DESC, WARP_SPEC, UPCAST, PRECISION)
    else:
        pid_m, _ = tile_ids(tl.program_id(0), NUM_PID_M, num_pid_n, GROUP_M)
        if pid_m * BLOCK_M < tl.load(num_post_pad_ptr):
            _dx_tile(tl.program_id(0), NUM_PID_M, dgu, w, dx_ptr, sorted_ids_ptr, block_expert_ptr,
                     S, F2, D, stride_dp, stride_we, stride_wk, stride_xs, BLOCK_M, BLOCK_N, BLOCK_K,
                     GROUP_M, EVEN_K, A_DESC, W_DESC, WARP_SPEC, UPCAST, PRECISION)


@triton.jit
def _wgrad_tile(
    tile,
    a_src,  # A operand rows: [T, M] gathered by token (A_GATHER), else [P, M] padded rows (a
    #         pointer, or with A_DESC a descriptor, block [BK, BM])
    b_src,  # B operand rows, the same choices with N columns (B_GATHER / B_DESC, block [BK, BN])
    out_ptr,  # [E, M, N] out: sum over the expert's rows r of a[r]^T b[r]
    sorted_ids_ptr,  # [P] flat routed row per padded row (S = padding)
    seg_start_ptr, seg_end_ptr,  # [E] int32 first / past-last padded row of each expert
    S, M, N, stride_a, stride_b, stride_oe, stride_om,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr,
    A_DESC: tl.constexpr, B_DESC: tl.constexpr, WARP_SPEC: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # Tiles of one expert are consecutive: they read the same rows, which stay in L2.
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_expert = tl.cdiv(M, BLOCK_M) * num_pid_n
    expert = tile // per_expert
    pid_m = (tile % per_expert) // num_pid_n
    pid_n = tile % num_pid_n
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    offs_m = (m0 + tl.arange(0, BLOCK_M)) % M  # wrap: in-bounds loads, masked store
    offs_n = (n0 + tl.arange(0, BLOCK_N)) % N
    start = tl.load(seg_start_ptr + expert)
    end = tl.load(seg_end_ptr + expert)  # segments are whole plan blocks; BLOCK_K divides block_m
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in tl.range(start, end, BLOCK_K, warp_specialize=WARP_SPEC):
        rows = r0 + tl.arange(0, BLOCK_K)
        flat = tl.load(sorted_ids_ptr + rows)
        valid = flat < S
        tok = tl.where(valid, flat // TOP_K, 0).to(tl.int64)
        # Padding rows read zeros from the gathered operand, so their product is 0 whatever the
        # padded-row operand holds there.
        if A_GATHER:
            a = tl.load(a_src + tok[:, None] * stride_a + offs_m[None, :], mask=valid[:, None], other=0.0)
        elif A_DESC:
            a = a_src.load([r0, m0])
        else:
            a = tl.load(a_src + rows[:, None].to(tl.int64) * stride_a + offs_m[None, :],
                        mask=valid[:, None], other=0.0)
        if B_GATHER:
            b = tl.load(b_src + tok[:, None] * stride_b + offs_n[None, :], mask=valid[:, None], other=0.0)
        elif B_DESC:
            b = b_src.load([r0, n0])
        else:
            b = tl.load(b_src + rows[:, None].to(tl.int64) * stride_b + offs_n[None, :],
                        mask=valid[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)  # [BM, BK] @ [BK, BN]
    out_m = m0 + tl.arange(0, BLOCK_M)
    out_n = n0 + tl.arange(0, BLOCK_N)
    o_ptrs = (out_ptr + expert.to(tl.int64) * stride_oe + out_m[:, None].to(tl.int64) * stride_om
              + out_n[None, :])
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(out_m < M)[:, None] & (out_n < N)[None, :])


@triton.jit
def _wgrad_kernel(
    a_src, b_src, out_ptr, sorted_ids_ptr, seg_start_ptr, seg_end_ptr,
    S, M, N, E, stride_a, stride_b, stride_oe, stride_om,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, PERSISTENT: tl.constexpr,
    A_DESC: tl.constexpr, B_DESC: tl.constexpr, WARP_SPEC: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    if PERSISTENT:
        num_tiles = E * tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _wgrad_tile(tile, a_src, b_src, out_ptr, sorted_ids_ptr, seg_start_ptr, seg_end_ptr,
                        S, M, N, stride_a, stride_b, stride_oe, stride_om, TOP_K, BLOCK_M, BLOCK_N, BLOCK_K,
                        A_GATHER, B_GATHER, A_DESC, B_DESC, WARP_SPEC, UPCAST, PRECISION)
    else:
        _wgrad_tile(tl.program_id(0), a_src, b_src, out_ptr, sorted_ids_ptr, seg_start_ptr,
                    seg_end_ptr, S, M, N, stride_a, stride_b, stride_oe, stride_om, TOP_K, BLOCK_M, BLOCK_N,
                    BLOCK_K, A_GATHER, B_GATHER, A_DESC, B_DESC, WARP_SPEC, UPCAST, PRECISION)


# ----------------------------------------------------------------------------------------------
# Level 2: configs, variants, launchers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmVariant:
    """Compile-time levers of the grouped GEMMs (see the module docstring). Parse with
    GemmVariant.parse("persistent+tma"); "default" is all off."""

    persistent: bool = False
    tma: bool = False
    ws: bool = False

    NAMES = ("persistent", "tma", "ws")

    @classmethod
    def parse(cls, text: str) -> GemmVariant:
        parts = [p for p in text.replace(",", "+").split("+") if p and p != "default"]
        unknown = [p for p in parts if p not in cls.NAMES]
        if unknown:
            raise ValueError(f"unknown GEMM variant part(s) {unknown}; use 'default' or a '+'-joined "
                             f"subset of {cls.NAMES}")
        return cls(**{p: True for p in parts})

    def __str__(self) -> str:
        on = [n for n in self.NAMES if getattr(self, n)]
        return "+".join(on) if on else "default"


@dataclass(frozen=True)
class TrainConfigs:
    """Tiles of the six training GEMMs. The four row-block GEMMs share block_m (the plan's block);
    for the two wgrads block_m x block_n is the output tile and block_k the rows per step (it
    must divide the plan's block_m)."""

    gate_up: GemmConfig
    down: GemmConfig
    down_dgrad: GemmConfig
    dx: GemmConfig
    wgrad_down: GemmConfig
    wgrad_gate_up: GemmConfig

    def __post_init__(self):
        bm = self.gate_up.block_m
        for name in ("down", "down_dgrad", "dx"):
            assert getattr(self, name).block_m == bm, f"{name} must share block_m {bm} with gate_up"
        for name in ("wgrad_down", "wgrad_gate_up"):
            assert bm % getattr(self, name).block_k == 0, f"{name}.block_k must divide block_m {bm}"

    @property
    def block_m(self) -> int:
        return self.gate_up.block_m


# The interpreter runs programs one by one with numpy: 32-wide tiles halve the CPU tests' time and
# still leave masked tails and several tiles at the tests' shapes.
_INTERPRET_ROW = GemmConfig(16, 32, 32, 1, 1, 1)
_INTERPRET_WGRAD = GemmConfig(32, 32, 16, 1, 1, 1)


def heuristic_train_configs(gate_up: GemmConfig, down: GemmConfig) -> TrainConfigs:
    """Backward tiles derived from the forward's (whose block_m fixes the plan): 128-wide tiles
    with 8 warps for training-sized row blocks, 64-wide with 4 warps for small ones."""
    if INTERPRET:
        r, w = _INTERPRET_ROW, _INTERPRET_WGRAD
        return TrainConfigs(r, r, r, r, w, w)
    bm = gate_up.block_m
    big = bm >= 64
    row = GemmConfig(bm, 128 if big else 64, 64, 8, 8 if bm >= 128 else 4, 3)
    # the SwiGLU-backward epilogue holds ~6 fp32 tiles: half the columns keep it out of local memory
    dgrad = dataclasses.replace(row, block_n=64)
    wgrad = GemmConfig(128, 128, min(64, bm), 1, 8, 3)
    return TrainConfigs(gate_up, down, dgrad, row, wgrad, wgrad)


def _fit(cfg: TrainConfigs, x: Tensor, w: Tensor) -> TrainConfigs:
    """Every config shrunk (stages, then block_k) until its staged tiles fit shared memory."""
    if not x.is_cuda:
        return cfg
    limit, a, b = device_limit(x), x.element_size(), w.element_size()
    fitted = {
        "gate_up": fit_gemm(cfg.gate_up, a, b, 2, limit), "down": fit_gemm(cfg.down, a, b, 1, limit),
        "down_dgrad": fit_gemm(cfg.down_dgrad, a, b, 1, limit), "dx": fit_gemm(cfg.dx, a, b, 1, limit),
        "wgrad_down": fit_gemm(cfg.wgrad_down, a, a, 1, limit),
        "wgrad_gate_up": fit_gemm(cfg.wgrad_gate_up, a, a, 1, limit),
    }
    return TrainConfigs(**fitted)


_BROKEN: dict[str, str] = {}  # variant -> first error, for variants that failed to compile here


def broken_variants() -> dict[str, str]:
    """Variants that failed on this machine (and now run as the default kernels), with the error."""
    return dict(_BROKEN)


def _num_sms(x: Tensor) -> int:
    if not x.is_cuda:
        return 3  # the interpreter: a few programs, each walking several tiles
    return torch.cuda.get_device_properties(x.device).multi_processor_count


def _grid(x: Tensor, variant: GemmVariant, tiles: int) -> tuple[int]:
    return (max(1, min(tiles, _num_sms(x))),) if variant.persistent else (max(1, tiles),)


def _w_desc(variant: GemmVariant, w3: Tensor, block: list[int]):
    """A descriptor over the stacked weights viewed [E*rows, cols], or the tensor itself."""
    w2 = w3.reshape(-1, w3.shape[-1])
    if variant.tma and tma_ok(w3) and w3.is_contiguous():
        return descriptor(w2, block), True
    return w3, False


def _a_desc(variant: GemmVariant, t: Tensor, block: list[int]):
    if variant.tma and tma_ok(t):
        return descriptor(t, block), True
    return t, False


def _common(x: Tensor, variant: GemmVariant, cfg: GemmConfig) -> dict:
    return dict(WARP_SPEC=variant.ws, UPCAST=INTERPRET, PRECISION=precision(x.dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def launch_gate_up(x_TD: Tensor, gate_up_EFD: Tensor, plan: DispatchPlan, top_k: int, cfg: GemmConfig,
                   variant: GemmVariant, store_gu: bool, w_S: Tensor | None = None
                   ) -> tuple[Tensor, Tensor | None]:
    """h_PF = silu(g) * u, times the rows' gate weights w_S when given (then zero on padding rows,
    else garbage there), and gu_P2F when store_gu, for every padded row."""
    T, D = x_TD.shape
    E, F2, _ = gate_up_EFD.shape
    F = F2 // 2
    P = plan.sorted_ids_P.numel()
    h = torch.empty(P, F, dtype=x_TD.dtype, device=x_TD.device)
    gu = torch.empty(P, F2, dtype=x_TD.dtype, device=x_TD.device) if store_gu else h
    w, w_is_desc = _w_desc(variant, gate_up_EFD, [cfg.block_n, cfg.block_k])
    tiles = plan.num_blocks * triton.cdiv(F, cfg.block_n)
    _gate_up_kernel[_grid(x_TD, variant, tiles)](
        x_TD, w, h, gu, w_S if w_S is not None else plan.sorted_ids_P, plan.sorted_ids_P,
        plan.block_expert_NB, plan.num_post_pad,
        T * top_k, F, D, plan.num_blocks, x_TD.stride(0), gate_up_EFD.stride(0), gate_up_EFD.stride(1),
        h.stride(0), gu.stride(0),
        TOP_K=top_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        EVEN_K=D % cfg.block_k == 0, STORE_GU=store_gu, SCALE_H=w_S is not None,
        PERSISTENT=variant.persistent, W_DESC=w_is_desc, **_common(x_TD, variant, cfg),
    )
    return h, (gu if store_gu else None)


def launch_down(h_PF: Tensor, down_EDF: Tensor, w_S: Tensor | None, plan: DispatchPlan, S: int,
                cfg: GemmConfig, variant: GemmVariant) -> Tensor:
    """y_SD[s] = down_e(h[row of s]) in flat (token, slot) order, times w_s when w_S is given."""
    E, D, F = down_EDF.shape
    y = torch.empty(S, D, dtype=h_PF.dtype, device=h_PF.device)
    a, a_is_desc = _a_desc(variant, h_PF, [cfg.block_m, cfg.block_k])
    w, w_is_desc = _w_desc(variant, down_EDF, [cfg.block_n, cfg.block_k])
    tiles = plan.num_blocks * triton.cdiv(D, cfg.block_n)
    _down_kernel[_grid(h_PF, variant, tiles)](
        a, w, w_S if w_S is not None else plan.sorted_ids_P, y, plan.sorted_ids_P, plan.block_expert_NB,
        plan.num_post_pad,
        S, D, F, plan.num_blocks, h_PF.stride(0), down_EDF.stride(0), down_EDF.stride(1), y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        EVEN_K=F % cfg.block_k == 0, ROUTE_W=w_S is not None, PERSISTENT=variant.persistent,
        A_DESC=a_is_desc, W_DESC=w_is_desc, **_common(h_PF, variant, cfg),
    )
    return y


def launch_down_dgrad(dy_TD: Tensor, down_EDF: Tensor, gu_P2F: Tensor, w_S: Tensor, plan: DispatchPlan,
                      top_k: int, cfg: GemmConfig, variant: GemmVariant) -> tuple[Tensor, Tensor]:
    """(dgu_P2F, dweights_S fp32): the gradient through down and the SwiGLU, and of the gate weights."""
    T, D = dy_TD.shape
    E, _, F = down_EDF.shape
    S = T * top_k
    P = plan.sorted_ids_P.numel()
    dgu = torch.empty(P, 2 * F, dtype=dy_TD.dtype, device=dy_TD.device)
    num_pid_n = triton.cdiv(F, cfg.block_n)
    dw_part = torch.empty(num_pid_n, S, dtype=torch.float32, device=dy_TD.device)
    w, w_is_desc = _w_desc(variant, down_EDF, [cfg.block_k, cfg.block_n])
    tiles = plan.num_blocks * num_pid_n
    _down_dgrad_kernel[_grid(dy_TD, variant, tiles)](
        dy_TD, w, gu_P2F, w_S, dgu, dw_part, plan.sorted_ids_P, plan.block_expert_NB, plan.num_post_pad,
        S, F, D, plan.num_blocks, dy_TD.stride(0), down_EDF.stride(0), down_EDF.stride(1), gu_P2F.stride(0),
        dgu.stride(0),
        TOP_K=top_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        EVEN_K=D % cfg.block_k == 0, PERSISTENT=variant.persistent, W_DESC=w_is_desc,
        **_common(dy_TD, variant, cfg),
    )
    return dgu, dw_part.sum(0)


def launch_dx(dgu_P2F: Tensor, gate_up_EFD: Tensor, plan: DispatchPlan, S: int, cfg: GemmConfig,
              variant: GemmVariant) -> Tensor:
    """dx_SD[s] = dgu[row of s] @ gate_up_e in flat order."""
    E, F2, D = gate_up_EFD.shape
    dx = torch.empty(S, D, dtype=dgu_P2F.dtype, device=dgu_P2F.device)
    a, a_is_desc = _a_desc(variant, dgu_P2F, [cfg.block_m, cfg.block_k])
    w, w_is_desc = _w_desc(variant, gate_up_EFD, [cfg.block_k, cfg.block_n])
    tiles = plan.num_blocks * triton.cdiv(D, cfg.block_n)
    _dx_kernel[_grid(dgu_P2F, variant, tiles)](
        a, w, dx, plan.sorted_ids_P, plan.block_expert_NB, plan.num_post_pad,
        S, F2, D, plan.num_blocks, dgu_P2F.stride(0), gate_up_EFD.stride(0), gate_up_EFD.stride(1),
        dx.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        EVEN_K=F2 % cfg.block_k == 0, PERSISTENT=variant.persistent, A_DESC=a_is_desc, W_DESC=w_is_desc,
        **_common(dgu_P2F, variant, cfg),
    )
    return dx


def segments(plan: DispatchPlan, E: int) -> tuple[Tensor, Tensor]:
    """(start_E, end_E) int32: each expert's padded rows in the plan (device ops, no sync)."""
    bm = plan.block_m
    padded = (plan.counts_E.long() + bm - 1) // bm * bm
    end = torch.cumsum(padded, 0)
    return (end - padded).to(torch.int32), end.to(torch.int32)


def launch_wgrad(a: Tensor, a_gather: bool, b: Tensor, b_gather: bool, plan: DispatchPlan, seg: tuple,
                 S: int, top_k: int, E: int, cfg: GemmConfig, variant: GemmVariant, out_dtype: torch.dtype
                 ) -> Tensor:
    """out[e] = sum over expert e's rows r of a[r]^T b[r] -> [E, M, N]; a gathered operand reads
    row r from its token's row (zeros on padding rows), the other operand is in padded-row order."""
    M, N = a.shape[1], b.shape[1]
    out = torch.empty(E, M, N, dtype=out_dtype, device=a.device)
    a_src, a_is_desc = (a, False) if a_gather else _a_desc(variant, a, [cfg.block_k, cfg.block_m])
    b_src, b_is_desc = (b, False) if b_gather else _a_desc(variant, b, [cfg.block_k, cfg.block_n])
    tiles = E * triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    _wgrad_kernel[_grid(a, variant, tiles)](
        a_src, b_src, out, plan.sorted_ids_P, seg[0], seg[1], S, M, N, E, a.stride(0), b.stride(0),
        out.stride(0), out.stride(1), TOP_K=top_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, A_GATHER=a_gather, B_GATHER=b_gather, PERSISTENT=variant.persistent,
        A_DESC=a_is_desc, B_DESC=b_is_desc, **_common(a, variant, cfg),
    )
    return out


# ----------------------------------------------------------------------------------------------
# Level 3: the training forward and backward (called by triton_moe._RoutedExperts)
# ----------------------------------------------------------------------------------------------


@dataclass
class Saved:
    """What the forward keeps for the backward: the plan and the expert activations."""

    plan: DispatchPlan
    h_PF: Tensor  # w_s * silu(g) * u (0 on padding rows), the down GEMM's input
    gu_P2F: Tensor | None  # g | u pre-activations (None: recomputed in the backward)


def make_plan(expert_ids_TK: Tensor, E: int, block_m: int) -> DispatchPlan:
    """The dispatch plan with per-expert counts (align's one-token layout has none: use the twin)."""
    if expert_ids_TK.shape[0] == 1:
        return align_torch(expert_ids_TK.reshape(-1), E, block_m)
    return align(expert_ids_TK, E, block_m)


def _run(variant: GemmVariant, fn):
    """fn(variant); if a non-default variant fails to compile, warn once and use the default."""
    key = str(variant)
    if key in _BROKEN:
        return fn(GemmVariant())
    try:
        return fn(variant)
    except Exception as exc:  # noqa: BLE001 - compile/launch failure of an optional lever
        if variant == GemmVariant():
            raise
        _BROKEN[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        warnings.warn(f"grouped GEMM variant {key!r} failed here ({_BROKEN[key]}); using the default kernels",
                      stacklevel=2)
        return fn(GemmVariant())


def forward(x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor, gate_up_EFD: Tensor, down_EDF: Tensor,
            cfg: TrainConfigs, variant: GemmVariant = GemmVariant(), save_gu: bool = True
            ) -> tuple[Tensor, Saved]:
    """y_TD and what the backward needs. T >= 1."""
    T, D = x_TD.shape
    K = expert_ids_TK.shape[-1]
    E = gate_up_EFD.shape[0]
    S = T * K
    cfg = _fit(cfg, x_TD, gate_up_EFD)
    x_TD = x_TD.contiguous()
    plan = make_plan(expert_ids_TK, E, cfg.block_m)
    w_S = weights_TK.reshape(-1).float().contiguous()

    def run(v: GemmVariant):
        hw, gu = launch_gate_up(x_TD, gate_up_EFD, plan, K, cfg.gate_up, v, save_gu, w_S)
        return hw, gu, launch_down(hw, down_EDF, None, plan, S, cfg.down, v)

    h, gu, y_SD = _run(variant, run)
    y_TD = y_SD.view(T, K, D).sum(1) if K > 1 else y_SD.view(T, D)
    return y_TD, Saved(plan, h, gu)


def backward(dy_TD: Tensor, x_TD: Tensor, weights_TK: Tensor, gate_up_EFD: Tensor, down_EDF: Tensor,
             saved: Saved, cfg: TrainConfigs, variant: GemmVariant = GemmVariant()
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx_TD, dweights_TK fp32, d_gate_up_EFD, d_down_EDF) for y_TD = forward(...)."""
    T, D = x_TD.shape
    K = weights_TK.shape[-1]
    E, F2, _ = gate_up_EFD.shape
    S = T * K
    cfg = _fit(cfg, x_TD, gate_up_EFD)
    x_TD = x_TD.contiguous()
    dy_TD = dy_TD.to(x_TD.dtype).contiguous()
    plan = saved.plan
    w_S = weights_TK.reshape(-1).float().contiguous()
    seg = segments(plan, E)

    def run(v: GemmVariant):
        hw, gu = saved.h_PF, saved.gu_P2F
        if gu is None:  # recompute the pre-activations (activation memory traded for a GEMM)
            hw, gu = launch_gate_up(x_TD, gate_up_EFD, plan, K, cfg.gate_up, v, True, w_S)
        dgu, dw_S = launch_down_dgrad(dy_TD, down_EDF, gu, w_S, plan, K, cfg.down_dgrad, v)
        dx_SD = launch_dx(dgu, gate_up_EFD, plan, S, cfg.dx, v)
        d_down = launch_wgrad(dy_TD, True, hw, False, plan, seg, S, K, E, cfg.wgrad_down, v, down_EDF.dtype)
        d_gate_up = launch_wgrad(dgu, False, x_TD, True, plan, seg, S, K, E, cfg.wgrad_gate_up, v,
                                 gate_up_EFD.dtype)
        return dx_SD, dw_S, d_gate_up, d_down

    dx_SD, dw_S, d_gate_up, d_down = _run(variant, run)
    dx_TD = dx_SD.view(T, K, D).sum(1) if K > 1 else dx_SD.view(T, D)
    return dx_TD, dw_S.view(T, K), d_gate_up, d_down

