"""Fused memory-bound training ops in Triton, each with its autograd wrapper: RMSNorm (forward and
backward), rotary embedding of q and k together, SwiGLU's silu(g) * u, and the per-chunk softmax
cross-entropy of ops.linear_cross_entropy (loss and logit gradient in one pass over a chunk).

The op surface is kernels/ops.py (rms_norm, rope_qk, swiglu, linear_cross_entropy), which picks
this module, torch.compile of the twins, or the twins themselves (torch_impl.py) in one place.
Each kernel computes in fp32 and rounds once at its store, so on the GPU it is at least as
accurate as the unfused twin (which rounds after every bf16 op). Tests: tests/test_fused_ops.py
(CPU through TRITON_INTERPRET=1 in fp32 against the twins; `gpu` against fp64).

Importing raises ImportError when triton is missing (ops.py reads that as "no triton").

Legend: R rows (tokens), N row length (hidden), B batch, T positions, H heads, hd head dim,
V vocabulary.
"""

from __future__ import annotations

import torch
import triton  # ImportError here when triton is missing
import triton.language as tl
from torch import Tensor

from mogelm.kernels.triton_common import INTERPRET

# ----------------------------------------------------------------------------------------------
# RMSNorm: y = round_x(x * rsqrt(mean(x^2) + eps)) * w   (round_x: to x's dtype, as the twin does)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,  # [R, N] input rows (unit column stride)
    w_ptr,  # [N] weight
    y_ptr,  # [R, N] out, contiguous
    rstd_ptr,  # [R] fp32 out: 1 / sqrt(mean(x^2) + eps), for the backward
    N, stride_x, eps,
    BLOCK_N: tl.constexpr,  # >= N, a power of two
    ROUND_X: tl.constexpr,  # x is 16-bit: round x * rstd to x's dtype before the weight (the twin's .to)
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    m = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    xhat = x * rstd
    if ROUND_X:
        xhat = xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + cols, (xhat * w).to(y_ptr.dtype.element_ty), mask=m)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,  # [R, N] upstream gradient, contiguous
    x_ptr, w_ptr, rstd_ptr,  # the forward's input, weight and saved rstd
    dx_ptr,  # [R, N] out, contiguous
    dw_part_ptr,  # [NUM_PROGS, N] fp32 out: each program's share of dw (summed afterwards: no atomics)
    R, N, stride_x,
    ROWS_PER_PROG: tl.constexpr, BLOCK_N: tl.constexpr, ROUND_X: tl.constexpr,
):
    # dx = rstd * (dxh - xh * mean(dxh * xh)) with xh = x * rstd, dxh = dy * w (the rounding of
    # the forward passes gradients through unchanged, as autograd's .to does); dw = sum dy * xh'.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    m = cols < N
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), tl.float32)
    for i in range(0, ROWS_PER_PROG):
        row = pid * ROWS_PER_PROG + i
        if row < R:
            row64 = row.to(tl.int64)
            x = tl.load(x_ptr + row64 * stride_x + cols, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row64 * N + cols, mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xh = x * rstd
            if ROUND_X:
                dw += dy * xh.to(x_ptr.dtype.element_ty).to(tl.float32)
            else:
                dw += dy * xh
            dxh = dy * w
            dx = rstd * (dxh - xh * (tl.sum(dxh * xh, axis=0) / N))
            tl.store(dx_ptr + row64 * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(dw_part_ptr + pid.to(tl.int64) * N + cols, dw, mask=m)


def _row_warps(block: int) -> int:
    return 1 if INTERPRET else min(16, max(1, block // 256))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        N = x.shape[-1]
        x2 = x.reshape(-1, N)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        R = x2.shape[0]
        y = torch.empty(R, N, dtype=out_dtype, device=x.device)
        rstd = torch.empty(R, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(N)
        round_x = x.dtype in (torch.bfloat16, torch.float16)
        if R:
            _rms_norm_fwd_kernel[(R,)](x2, weight, y, rstd, N, x2.stride(0), eps, BLOCK_N=block,
                                       ROUND_X=round_x, num_warps=_row_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape, ctx.round_x = x.shape, round_x
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        R, N = x2.shape
        dy = dy.reshape(R, N).contiguous()
        dx = torch.empty(R, N, dtype=x2.dtype, device=x2.device)
        block = triton.next_power_of_2(N)
        rows = 4 if INTERPRET else 32
        progs = max(1, triton.cdiv(R, rows))
        dw_part = torch.empty(progs, N, dtype=torch.float32, device=x2.device)
        if R:
            _rms_norm_bwd_kernel[(progs,)](dy, x2, weight, rstd, dx, dw_part, R, N, x2.stride(0),
                                           ROWS_PER_PROG=rows, BLOCK_N=block, ROUND_X=ctx.round_x,
                                           num_warps=_row_warps(block))
        else:
            dw_part.zero_()
        return dx.view(ctx.shape), dw_part.sum(0).to(weight.dtype), None, None


def rms_norm(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
    """torch_impl.rms_norm in one pass each way, output in out_dtype (e.g. the autocast dtype,
    which every consumer of the norm would cast to anyway)."""
    return _RMSNorm.apply(x, weight, eps, out_dtype)


# ----------------------------------------------------------------------------------------------
# Rotary embedding of q and k in one launch (neox rotate-half, as model.apply_rope)
#   out1 = x1 c1 - x2 s1,  out2 = x2 c2 + x1 s2          (halves of the head dim)
#   backward: dx1 = d1 c1 + d2 s2,  dx2 = d2 c2 - d1 s1
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rope_heads(
    x_ptr, o_ptr, base_x, base_o, stride_xh, stride_oh, H, HALF,
    c1, c2, a, b,  # [BLOCK_D] fp32: out1 = x1 c1 + x2 a, out2 = x2 c2 + x1 b
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    m = (h < H)[:, None] & (d < HALF)[None, :]
    xp = x_ptr + base_x + h[:, None].to(tl.int64) * stride_xh + d[None, :]
    x1 = tl.load(xp, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=m, other=0.0).to(tl.float32)
    o1 = x1 * c1[None, :] + x2 * a[None, :]
    o2 = x2 * c2[None, :] + x1 * b[None, :]
    op = o_ptr + base_o + h[:, None].to(tl.int64) * stride_oh + d[None, :]
    tl.store(op, o1.to(o_ptr.dtype.element_ty), mask=m)
    tl.store(op + HALF, o2.to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr,  # [B, Hq, T, hd] and [B, Hk, T, hd] (any strides, unit last)
    qo_ptr, ko_ptr,  # outputs, same shapes (their own strides)
    cos_ptr, sin_ptr,  # [B, T, hd] fp32 (any strides, unit last; broadcast dims stride 0)
    T, HQ, HK, HALF,
    sqb, sqh, sqt, skb, skh, skt, soqb, soqh, soqt, sokb, sokh, sokt, scb, sct,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,  # apply the transposed rotation (the gradient)
):
    pid = tl.program_id(0)
    bb = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < HALF
    cp = cos_ptr + bb * scb + t * sct + d
    sp = sin_ptr + bb * scb + t * sct + d
    c1 = tl.load(cp, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(cp + HALF, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(sp, mask=dm, other=0.0).to(tl.float32)
    s2 = tl.load(sp + HALF, mask=dm, other=0.0).to(tl.float32)
    if BACKWARD:
        a = s2
        b = -s1
    else:
        a = -s1
        b = s2
    _rope_heads(q_ptr, qo_ptr, bb * sqb + t * sqt, bb * soqb + t * soqt, sqh, soqh, HQ, HALF, c1, c2, a, b,
                BLOCK_HQ, BLOCK_D)
    _rope_heads(k_ptr, ko_ptr, bb * skb + t * skt, bb * sokb + t * sokt, skh, sokh, HK, HALF, c1, c2, a, b,
                BLOCK_HK, BLOCK_D)


def _rope_launch(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> tuple[Tensor, Tensor]:
    B, HQ, T, hd = q.shape
    HK = k.shape[1]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if q.numel() == 0:
        return qo, ko
    block_d = triton.next_power_of_2(hd // 2)
    _rope_kernel[(B * T,)](
        q, k, qo, ko, cos, sin, T, HQ, HK, hd // 2,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        cos.stride(0), cos.stride(1),
        BLOCK_HQ=triton.next_power_of_2(HQ), BLOCK_HK=triton.next_power_of_2(HK), BLOCK_D=block_d,
        BACKWARD=backward, num_warps=1 if INTERPRET else 4,
    )
    return qo, ko


class _RopeQK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        B, _, T, hd = q.shape
        cos = cos.float().expand(B, T, hd)
        sin = sin.float().expand(B, T, hd)
        cos = cos if cos.stride(-1) == 1 else cos.contiguous()
        sin = sin if sin.stride(-1) == 1 else sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _rope_launch(dq, dk, cos, sin, backward=True)
        return dq, dk, None, None


def rope_qk(q_BHTd: Tensor, k_BHTd: Tensor, cos_BTd: Tensor, sin_BTd: Tensor) -> tuple[Tensor, Tensor]:
    """(apply_rope(q), apply_rope(k)) in one launch each way; cos/sin get no gradient."""
    return _RopeQK.apply(q_BHTd, k_BHTd, cos_BTd, sin_BTd)


# ----------------------------------------------------------------------------------------------
# SwiGLU: h = silu(g) * u;  dg = dh * u * sig(g) * (1 + g (1 - sig(g))),  du = dh * silu(g)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs, (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    dh = tl.load(dh_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(du_ptr + offs, (dh * silu).to(du_ptr.dtype.element_ty), mask=m)
    tl.store(dg_ptr + offs, (dh * u * (sig + silu * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=m)


_ELEMENTWISE_BLOCK = 1024


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        g, u = g.contiguous(), u.contiguous()
        h = torch.empty_like(g, dtype=torch.promote_types(g.dtype, u.dtype))
        n = g.numel()
        if n:
            _swiglu_fwd_kernel[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](
                g, u, h, n, BLOCK=_ELEMENTWISE_BLOCK, num_warps=1 if INTERPRET else 4)
        ctx.save_for_backward(g, u)
        return h

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        if n:
            _swiglu_bwd_kernel[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](
                dh, g, u, dg, du, n, BLOCK=_ELEMENTWISE_BLOCK, num_warps=1 if INTERPRET else 4)
        return dg, du


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up (same shapes) in one pass each way."""
    return _SwiGLU.apply(gate, up)


# ----------------------------------------------------------------------------------------------
# Cross-entropy of one chunk of logits: per-row loss and, in place, the logit gradient
#   loss_r = logsumexp(z_r) - z_r[y_r];   dz_r = (softmax(z_r) - onehot(y_r)) * scale   (0 if ignored)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ce_chunk_kernel(
    z_ptr,  # [R, V] logits of the chunk (bf16/fp32), row stride stride_z; overwritten by dz (WRITE_GRAD)
    y_ptr,  # [R] int64 targets
    loss_ptr,  # [R] fp32 out: loss per row (0 for ignored rows)
    scale_ptr,  # [1] fp32: the gradient scale (1 / number of counted rows), read on the device
    V, stride_z, ignore_index,
    BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    y = tl.load(y_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    m_vec = tl.full((BLOCK_V,), -1e38, tl.float32)  # running max per lane (finite: no inf - inf)
    s_vec = tl.zeros((BLOCK_V,), tl.float32)  # running sum of exp(z - m) per lane
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        inb = c < V
        z = tl.load(base + c, mask=inb, other=-1e38).to(tl.float32)
        m_new = tl.maximum(m_vec, z)
        s_vec = s_vec * tl.exp(m_vec - m_new) + tl.where(inb, tl.exp(z - m_new), 0.0)
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    lse = m + tl.log(tl.sum(s_vec * tl.exp(m_vec - m), axis=0))
    counted = y != ignore_index
    z_y = tl.load(base + tl.where(counted, y, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(counted, lse - z_y, 0.0))
    if WRITE_GRAD:
        scale = tl.where(counted, tl.load(scale_ptr), 0.0)
        for v0 in range(0, V, BLOCK_V):
            c = v0 + cols
            inb = c < V
            z = tl.load(base + c, mask=inb, other=0.0).to(tl.float32)
            g = (tl.exp(z - lse) - (c == y).to(tl.float32)) * scale
            tl.store(base + c, g.to(z_ptr.dtype.element_ty), mask=inb)


def ce_chunk(logits_RV: Tensor, targets_R: Tensor, ignore_index: int, scale: Tensor | None) -> Tensor:
    """Per-row loss (fp32 [R]); with `scale` (fp32 [1] on the device) the logits are overwritten
    with their gradient (softmax - onehot) * scale."""
    R, V = logits_RV.shape
    loss = torch.empty(R, dtype=torch.float32, device=logits_RV.device)
    if R:
        block = min(4096, triton.next_power_of_2(V)) if not INTERPRET else min(64, triton.next_power_of_2(V))
        _ce_chunk_kernel[(R,)](
            logits_RV, targets_R, loss, scale if scale is not None else loss, V, logits_RV.stride(0),
            ignore_index, BLOCK_V=block, WRITE_GRAD=scale is not None, num_warps=1 if INTERPRET else 8,
        )
    return loss
