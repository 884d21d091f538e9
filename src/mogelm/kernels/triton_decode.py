"""EXPERIMENTAL small-T decode path: one Triton program per (expert-width slice, routed row),
no sort, gate/up -> SwiGLU -> down in one launch plus a deterministic partial sum. Correct
(tests/test_triton_kernels.py) but measured slower than align -> gate_up -> down on the H200
(benchmarks/notes_kernels.md), so it runs only where a config table names a "decode" entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton  # ImportError here when triton is missing: ops.py reads it as "no triton"
import triton.language as tl
from torch import Tensor

from mogelm.kernels.triton_common import INTERPRET, fp16_dot, gate_up_accumulate, precision


@triton.jit
def _decode_kernel(
    x_ptr,  # [T, D] activations (bf16/fp32), row stride stride_xt
    w1_ptr,  # [E, 2F, D] gate rows then up rows (bf16/fp32 or fp8 e4m3)
    w1_scale_ptr,  # [E, 2F] fp32 per-channel scales (read only when W_SCALE)
    w2_ptr,  # [E, D, F] down projection
    w2_scale_ptr,  # [E, D] fp32 per-channel scales (read only when W_SCALE)
    ids_ptr,  # [S] int64 expert of each flat routed row s = t*K + k
    route_w_ptr,  # [S] fp32 gate weight of each routed row
    part_ptr,  # [NUM_PID_F, S, D] fp32 out: each F slice's share of each routed row's output
    S, F, D,  # routed rows, expert width, hidden
    stride_xt, stride_w1e, stride_w1n, stride_w2e, stride_w2n,  # row/expert strides (unit last dims)
    TOP_K: tl.constexpr,  # K: token of routed row s is s // K
    BLOCK_F: tl.constexpr,  # expert-width slice per program (gate, up and down columns of it)
    BLOCK_K: tl.constexpr,  # D step of the gate/up reduction
    BLOCK_D: tl.constexpr,  # D step of the down projection
    W_SCALE: tl.constexpr, UPCAST: tl.constexpr, W_TO_X: tl.constexpr, FP16_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # EXPERIMENTAL, opt-in through a config table's "decode" entry: on the H200 (2026-11-28) it ran
    # 1.3-2x slower than align -> gate_up -> down at T=1 (benchmarks/notes_kernels.md), so no
    # shipped table selects it; kept because it is correct (tests) and the idea is sound.
    # Small-T decode: one program per (F slice, routed row), no sort. It streams its slice of the
    # expert's gate/up rows, forms h = silu(g) * u * gate_weight for that slice, then streams the
    # matching down columns and writes h_slice @ down_slice^T; partials are summed afterwards
    # (deterministic, no atomics). Every weight byte of the routed experts is read once from HBM
    # (rows that share an expert run next to each other and share the slice through L2).
    pid = tl.program_id(0)
    s = pid % S
    pid_f = pid // S
    expert = tl.load(ids_ptr + s)
    tok = (s // TOP_K).to(tl.int64)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = offs_f < F
    offs_fc = tl.where(fmask, offs_f, 0)  # in-bounds loads; h is zeroed on the masked columns
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.arange(0, 16)  # tl.dot needs M >= 16: all 16 rows hold the same token, row 0 is kept
    a_ptrs = x_ptr + tok * stride_xt + rows[:, None] * 0 + offs_k[None, :]
    g_ptrs = w1_ptr + expert * stride_w1e + offs_fc[None, :] * stride_w1n + offs_k[:, None]  # [BK, BF]
    u_ptrs = g_ptrs + F * stride_w1n
    acc_g = tl.zeros((16, BLOCK_F), tl.float32)
    acc_u = tl.zeros((16, BLOCK_F), tl.float32)
    # EVEN_K False: every step masks its D tail (as this kernel always did)
    acc_g, acc_u = gate_up_accumulate(a_ptrs, g_ptrs, u_ptrs, acc_g, acc_u, offs_k, D, BLOCK_K, False,
                                      UPCAST, W_TO_X, FP16_DOT, PRECISION)
    if W_SCALE:
        s_base = w1_scale_ptr + expert * 2 * F
        acc_g = acc_g * tl.load(s_base + offs_fc)[None, :]
        acc_u = acc_u * tl.load(s_base + F + offs_fc)[None, :]
    h = acc_g * tl.sigmoid(acc_g) * acc_u * tl.load(route_w_ptr + s)
    h = tl.where(fmask[None, :], h, 0.0)
    if UPCAST:
        h = h.to(tl.float32)
    elif FP16_DOT:
        h = h.to(tl.float16)
    else:
        h = h.to(x_ptr.dtype.element_ty)
    keep = (rows == 0)[:, None]
    # down columns f of rows d: F-contiguous runs of BLOCK_F; offs_f (not the clamped copy) keeps
    # the contiguity the compiler needs for wide loads
    offs_fv = tl.max_contiguous(tl.multiple_of(offs_f, BLOCK_F), BLOCK_F)
    for d in range(0, tl.cdiv(D, BLOCK_D)):
        offs_d = d * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        b = tl.load(w2_ptr + expert * stride_w2e + offs_d[None, :] * stride_w2n + offs_fv[:, None],
                    mask=fmask[:, None] & dmask[None, :], other=0.0)  # [BF, BD]
        if UPCAST:
            b = b.to(tl.float32)
        elif W_TO_X:
            b = b.to(h.dtype)
        out = tl.dot(h, b, input_precision=PRECISION)  # [16, BD], identical rows
        if W_SCALE:
            out = out * tl.load(w2_scale_ptr + expert * D + offs_d, mask=dmask, other=0.0)[None, :]
        row = tl.sum(tl.where(keep, out, 0.0), axis=0)
        tl.store(part_ptr + (pid_f * S + s).to(tl.int64) * D + offs_d, row, mask=dmask)


@triton.jit
def _sum_parts_kernel(
    part_ptr,  # [NUM_PARTS, T * K, D] fp32 partial outputs (F slices x routed rows)
    y_ptr,  # [T, D] out, x's dtype
    T, D, NUM_PARTS,  # tokens, hidden, F slices
    TOP_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # y[t] = sum over F slices p and slots k of part[p, t*K + k], in fp32, in a fixed order
    t = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for p in range(0, NUM_PARTS):
        for k in tl.static_range(TOP_K):
            row = (p * T * TOP_K + t * TOP_K + k).to(tl.int64)
            acc += tl.load(part_ptr + row * D + offs_d, mask=dmask, other=0.0)
    tl.store(y_ptr + t.to(tl.int64) * D + offs_d, acc.to(y_ptr.dtype.element_ty), mask=dmask)


@dataclass(frozen=True)
class DecodeConfig:
    block_f: int = 32
    block_k: int = 128
    block_d: int = 128
    num_warps: int = 4
    num_stages: int = 4


def decode(
    x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor, w1_EFD: Tensor, w2_EDF: Tensor,
    cfg: DecodeConfig, w1_scale_EF: Tensor | None = None, w2_scale_ED: Tensor | None = None,
) -> Tensor:
    """Small-T routed experts in two launches (_decode_kernel, _sum_parts_kernel); y_TD in x's dtype."""
    T, D = x_TD.shape
    K = expert_ids_TK.shape[-1]
    E, F2, _ = w1_EFD.shape
    F = F2 // 2
    S = T * K
    num_pid_f = triton.cdiv(F, cfg.block_f)
    part = torch.empty(num_pid_f, S, D, dtype=torch.float32, device=x_TD.device)
    dummy = part
    _decode_kernel[(num_pid_f * S,)](
        x_TD, w1_EFD, w1_scale_EF if w1_scale_EF is not None else dummy, w2_EDF,
        w2_scale_ED if w2_scale_ED is not None else dummy, expert_ids_TK.reshape(-1),
        weights_TK.reshape(-1).float().contiguous(), part, S, F, D,
        x_TD.stride(0), w1_EFD.stride(0), w1_EFD.stride(1), w2_EDF.stride(0), w2_EDF.stride(1),
        TOP_K=K, BLOCK_F=cfg.block_f, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d,
        W_SCALE=w1_scale_EF is not None,
        UPCAST=INTERPRET, W_TO_X=w1_EFD.dtype != x_TD.dtype, FP16_DOT=fp16_dot(x_TD, w1_EFD),
        PRECISION=precision(x_TD.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    y = torch.empty(T, D, dtype=x_TD.dtype, device=x_TD.device)
    block_d = min(1024, triton.next_power_of_2(D))
    _sum_parts_kernel[(T, triton.cdiv(D, block_d))](part, y, T, D, num_pid_f, TOP_K=K, BLOCK_D=block_d,
                                                    num_warps=4)
    return y
