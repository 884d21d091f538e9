"""Fused inference kernels of the decode step (forward only, no autograd), each with its readable
twin in torch_impl.py and reached through kernels/ops.py:

    add_rms_norm    h = x + r; y = RMSNorm(h)            the block's residual add and the next norm
    qkv_bias_rope   (qkv + bias) -> q, k (RoPE), v        after one GEMM over concatenated q/k/v weights
    swiglu_halves   silu(x[:, :F]) * x[:, F:]             after one GEMM over concatenated gate/up weights
    paged_kv_write  keys and values into their pool slots   one launch for both (fp8 pools quantised)
    linear_fp8_wo   y = x @ (q * scale)^T (+ bias)        e4m3 weights, activations kept (weight-only),
                    [SwiGLU epilogue over gate|up rows]    for the small-M GEMMs of decode

Every kernel computes in fp32 and rounds once at its store (the twins round where PyTorch's bf16
ops round; the two agree to the last bf16 bit or so). Nothing reads a device value on the host:
all are CUDA-graph capturable. Tests: tests/test_infer_kernels.py (CPU through TRITON_INTERPRET=1
in fp32 against the twins; `gpu` in bf16 against fp64).

Importing raises ImportError when triton is missing (ops.py reads that as "no triton").

Legend: R rows (tokens), D hidden, N output columns, K reduction length, H query heads, Hkv KV
heads, hd head dim, C = (H + 2 Hkv) hd the fused q|k|v width, F a SwiGLU's width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton  # ImportError here when triton is missing
import triton.language as tl
from torch import Tensor

from mogelm.kernels.triton_common import (
    FP8,
    INTERPRET,
    fp16_dot,
    gate_up_accumulate,
    precision,
    weight_accumulate,
)


def _row_warps(block: int) -> int:
    return 1 if INTERPRET else min(16, max(1, block // 256))


# ----------------------------------------------------------------------------------------------
# Residual add + RMSNorm: h = x + r (rounded to x's dtype), y = round_x(h * rstd(h)) * w
# ----------------------------------------------------------------------------------------------


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,  # [R, D] the branch output (unit column stride)
    r_ptr,  # [R, D] the residual stream
    w_ptr,  # [D] norm weight
    h_ptr,  # [R, D] out: x + r, x's dtype, contiguous
    y_ptr,  # [R, D] out: RMSNorm(h) * w, contiguous
    D, stride_x, stride_r, eps,
    BLOCK_D: tl.constexpr,  # >= D, a power of two
    ROUND: tl.constexpr,  # 16-bit activations: round h and h * rstd to that dtype, as the twin does
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_r + cols, mask=m, other=0.0).to(tl.float32)
    h = x + r
    if ROUND:
        h = h.to(h_ptr.dtype.element_ty).to(tl.float32)
    tl.store(h_ptr + row * D + cols, h.to(h_ptr.dtype.element_ty), mask=m)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)
    xhat = h * rstd
    if ROUND:
        xhat = xhat.to(h_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, (xhat * w).to(y_ptr.dtype.element_ty), mask=m)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(h, y) = (x + residual, torch_impl.rms_norm(h, weight, eps)) in one pass over the rows."""
    D = x.shape[-1]
    x2, r2 = x.reshape(-1, D), residual.reshape(-1, D)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    R = x2.shape[0]
    dtype = torch.promote_types(x.dtype, residual.dtype)
    h = torch.empty(R, D, dtype=dtype, device=x.device)
    y = torch.empty(R, D, dtype=torch.promote_types(dtype, weight.dtype), device=x.device)
    block = triton.next_power_of_2(D)
    if R:
        _add_rms_norm_kernel[(R,)](x2, r2, weight, h, y, D, x2.stride(0), r2.stride(0), eps, BLOCK_D=block,
                                   ROUND=dtype in (torch.bfloat16, torch.float16),
                                   num_warps=_row_warps(block))
    shape = torch.broadcast_shapes(x.shape, residual.shape)
    return h.view(shape), y.view(shape)


# ----------------------------------------------------------------------------------------------
# Fused q|k|v: bias, rotate-half RoPE on q and k, split into three contiguous outputs
#   out1 = x1 c1 - x2 s1,  out2 = x2 c2 + x1 s2          (halves of the head dim; v unrotated)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _qkv_rope_kernel(
    qkv_ptr,  # [R, C] q|k|v projections of each token (unit column stride)
    bias_ptr,  # [C] q|k|v biases (read only when HAS_BIAS)
    cos_ptr, sin_ptr,  # [R, hd] fp32 rotary tables of each token's position (unit column stride)
    q_ptr,  # [R, H, hd] out, contiguous
    k_ptr,  # [R, Hkv, hd] out, contiguous
    v_ptr,  # [R, Hkv, hd] out, contiguous
    stride_row, stride_cs, H, HKV, HALF,
    HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr,  # >= H + 2 Hkv, a power of two
    BLOCK_D: tl.constexpr,  # >= hd / 2, a power of two
):
    row = tl.program_id(0).to(tl.int64)
    hd = 2 * HALF
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    dm = d < HALF
    m = (h < H + 2 * HKV)[:, None] & dm[None, :]
    col = h[:, None] * hd + d[None, :]  # first half of head h
    x1 = tl.load(qkv_ptr + row * stride_row + col, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(qkv_ptr + row * stride_row + col + HALF, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x1 += tl.load(bias_ptr + col, mask=m, other=0.0).to(tl.float32)
        x2 += tl.load(bias_ptr + col + HALF, mask=m, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + row * stride_cs + d, mask=dm, other=0.0)[None, :]
    c2 = tl.load(cos_ptr + row * stride_cs + d + HALF, mask=dm, other=0.0)[None, :]
    s1 = tl.load(sin_ptr + row * stride_cs + d, mask=dm, other=0.0)[None, :]
    s2 = tl.load(sin_ptr + row * stride_cs + d + HALF, mask=dm, other=0.0)[None, :]
    rot = (h < H + HKV)[:, None]  # q and k heads rotate, v heads pass through
    o1 = tl.where(rot, x1 * c1 - x2 * s1, x1)
    o2 = tl.where(rot, x2 * c2 + x1 * s2, x2)
    is_q = (h < H)[:, None] & m
    is_k = (h >= H)[:, None] & rot & m
    is_v = (h >= H + HKV)[:, None] & m
    q_off = row * H * hd + h[:, None] * hd + d[None, :]
    k_off = row * HKV * hd + (h[:, None] - H) * hd + d[None, :]
    v_off = row * HKV * hd + (h[:, None] - H - HKV) * hd + d[None, :]
    tl.store(q_ptr + q_off, o1.to(q_ptr.dtype.element_ty), mask=is_q)
    tl.store(q_ptr + q_off + HALF, o2.to(q_ptr.dtype.element_ty), mask=is_q)
    tl.store(k_ptr + k_off, o1.to(k_ptr.dtype.element_ty), mask=is_k)
    tl.store(k_ptr + k_off + HALF, o2.to(k_ptr.dtype.element_ty), mask=is_k)
    tl.store(v_ptr + v_off, o1.to(v_ptr.dtype.element_ty), mask=is_v)
    tl.store(v_ptr + v_off + HALF, o2.to(v_ptr.dtype.element_ty), mask=is_v)


def qkv_bias_rope(qkv: Tensor, bias: Tensor | None, cos: Tensor, sin: Tensor, num_heads: int,
                  num_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """qkv [B, T, C] -> q [B, H, T, hd], k and v [B, Hkv, T, hd] (transposed views of contiguous
    [B, T, heads, hd] tensors), RoPE applied to q and k with cos/sin [B, T, hd] (fp32)."""
    B, T, C = qkv.shape
    hd = C // (num_heads + 2 * num_kv_heads)
    x = qkv.reshape(B * T, C)
    x = x if x.stride(-1) == 1 else x.contiguous()
    cs = cos.expand(B, T, hd).reshape(B * T, hd).float().contiguous()
    sn = sin.expand(B, T, hd).reshape(B * T, hd).float().contiguous()
    q = torch.empty(B, T, num_heads, hd, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(B, T, num_kv_heads, hd, dtype=qkv.dtype, device=qkv.device)
    v = torch.empty_like(k)
    if B * T:
        heads = num_heads + 2 * num_kv_heads
        _qkv_rope_kernel[(B * T,)](
            x, bias if bias is not None else x, cs, sn, q, k, v, x.stride(0), cs.stride(0), num_heads,
            num_kv_heads, hd // 2, HAS_BIAS=bias is not None, BLOCK_H=triton.next_power_of_2(heads),
            BLOCK_D=triton.next_power_of_2(hd // 2), num_warps=1 if INTERPRET else 4,
        )
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Paged KV write: this step's keys and values into their pool slots, quantised for an fp8 pool
# ----------------------------------------------------------------------------------------------


@triton.jit
def _kv_write_kernel(
    k_ptr, v_ptr,  # [N, Hkv, hd] this call's keys / values (unit stride along hd)
    kp_ptr, vp_ptr,  # [P * bs, Hkv, hd] the layer's pools (contiguous; bf16/fp16/fp32 or e4m3)
    slots_ptr,  # [N] int64 pool slot of each token
    ks_ptr, vs_ptr,  # [Hkv] fp32 per-head scales (read only when SCALE)
    stride_kn, stride_kh, stride_vn, stride_vh, HKV,
    HD: tl.constexpr, BLOCK_H: tl.constexpr,
    SCALE: tl.constexpr,  # fp8 pool: store x / scale[head], clamped to +-FP8_MAX
    FP8_MAX: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + n).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HD)
    m = (h < HKV)[:, None]
    dst = slot * HKV * HD + h[:, None] * HD + d[None, :]
    k = tl.load(k_ptr + n * stride_kn + h[:, None] * stride_kh + d[None, :], mask=m, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + n * stride_vn + h[:, None] * stride_vh + d[None, :], mask=m, other=0.0).to(tl.float32)
    if SCALE:
        k = k / tl.load(ks_ptr + h, mask=h < HKV, other=1.0)[:, None]
        v = v / tl.load(vs_ptr + h, mask=h < HKV, other=1.0)[:, None]
        k = tl.minimum(tl.maximum(k, -FP8_MAX), FP8_MAX)
        v = tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX)
    tl.store(kp_ptr + dst, k.to(kp_ptr.dtype.element_ty), mask=m)
    tl.store(vp_ptr + dst, v.to(vp_ptr.dtype.element_ty), mask=m)


def paged_kv_write(k_pool: Tensor, v_pool: Tensor, slots_N: Tensor, k_NHd: Tensor, v_NHd: Tensor,
                   k_scale_H: Tensor | None = None, v_scale_H: Tensor | None = None) -> None:
    """torch_impl.paged_kv_write in one launch for keys and values together. Under the interpreter
    an fp8 pool takes the twin (the interpreter rounds fp32 -> e4m3 wrongly near powers of two)."""
    from mogelm.kernels import torch_impl

    N, Hkv, hd = k_NHd.shape
    if N == 0:
        return
    if (INTERPRET and k_pool.dtype == FP8) or k_NHd.stride(-1) != 1 or v_NHd.stride(-1) != 1 \
            or hd != triton.next_power_of_2(hd):
        torch_impl.paged_kv_write(k_pool, v_pool, slots_N, k_NHd, v_NHd, k_scale_H, v_scale_H)
        return
    scale = k_scale_H is not None
    _kv_write_kernel[(N,)](
        k_NHd, v_NHd, k_pool, v_pool, slots_N,
        k_scale_H if scale else slots_N, v_scale_H if scale else slots_N,
        k_NHd.stride(0), k_NHd.stride(1), v_NHd.stride(0), v_NHd.stride(1), Hkv, HD=hd,
        BLOCK_H=triton.next_power_of_2(Hkv), SCALE=scale, FP8_MAX=448.0, num_warps=1 if INTERPRET else 4,
    )


# ----------------------------------------------------------------------------------------------
# SwiGLU of a fused [gate | up] projection: h = silu(x[:, :F]) * x[:, F:] (no copies of the halves)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _swiglu_halves_kernel(
    x_ptr,  # [R, 2F] gate | up, unit column stride
    h_ptr,  # [R, F] out, contiguous
    F, stride_x,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < F
    g = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + F + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(h_ptr + row * F + cols, (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty), mask=m)


def swiglu_halves(x: Tensor) -> Tensor:
    """silu(gate) * up of x [..., 2F] = [gate | up] -> [..., F] in one launch."""
    lead, F2 = x.shape[:-1], x.shape[-1]
    F = F2 // 2
    x2 = x.reshape(-1, F2)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    h = torch.empty(x2.shape[0], F, dtype=x.dtype, device=x.device)
    block = 1024 if not INTERPRET else 64
    if x2.shape[0]:
        _swiglu_halves_kernel[(x2.shape[0], triton.cdiv(F, block))](x2, h, F, x2.stride(0), BLOCK=block,
                                                                   num_warps=1 if INTERPRET else 4)
    return h.view(*lead, F)


# ----------------------------------------------------------------------------------------------
# fp8 weight-only linear for decode-sized M: e4m3 tiles converted in registers, scales and bias in
# the epilogue; optional SwiGLU over a [gate | up] weight (the shared expert's gate_up in one GEMM)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearConfig:
    """Tiles of one fp8 weight-only linear launch (grid: N tiles x M tiles)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _fp8_linear_kernel(
    x_ptr,  # [M, K] activations (bf16/fp16/fp32), unit column stride
    w_ptr,  # [N_W, K] e4m3 weight rows (N_W = N, or 2N with SWIGLU: gate rows then up rows)
    s_ptr,  # [N_W] fp32 per-output-row scales
    b_ptr,  # [N] bias (read only when HAS_BIAS)
    y_ptr,  # [M, N] out, x's dtype, contiguous
    M, N, K, stride_xm, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks in the reduction loop
    SWIGLU: tl.constexpr,  # y = silu(x @ gate^T) * (x @ up^T), gate row n and up row N + n
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter: dot in fp32
    FP16_DOT: tl.constexpr,  # 16-bit x: dot in fp16 (e4m3 -> fp16 is exact)
    PRECISION: tl.constexpr,
):
    # Decode shapes have few rows and long rows of weights: the grid walks the weight (N tiles
    # first, so one M tile's programs stream disjoint rows at once), each program reads its
    # BLOCK_N weight rows once for BLOCK_M activation rows. Rows past M wrap to in-bounds rows
    # (loads need no row mask) and are not stored.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    g_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK, BN] (transposed)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if SWIGLU:
        u_ptrs = g_ptrs + N * stride_wn
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc, acc_u = gate_up_accumulate(a_ptrs, g_ptrs, u_ptrs, acc, acc_u, offs_k, K, BLOCK_K, EVEN_K,
                                        UPCAST, True, FP16_DOT, PRECISION)
        g = acc * tl.load(s_ptr + offs_n)[None, :]
        u = acc_u * tl.load(s_ptr + N + offs_n)[None, :]
        out = g * tl.sigmoid(g) * u
    else:
        acc = weight_accumulate(a_ptrs, g_ptrs, acc, offs_k, K, BLOCK_K, EVEN_K, UPCAST, True, FP16_DOT,
                                PRECISION)
        out = acc * tl.load(s_ptr + offs_n)[None, :]
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n)[None, :].to(tl.float32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


def default_linear_config(M: int) -> LinearConfig:
    """Tiles by row count: 16-row tiles with long K steps for decode (every SM streams weight rows),
    wider row tiles as M grows (each weight tile then serves more rows)."""
    if M <= 16:
        return LinearConfig(16, 32, 256, 4, 4)
    if M <= 32:
        return LinearConfig(32, 64, 256, 4, 3)
    if M <= 64:
        return LinearConfig(64, 64, 128, 4, 4)
    return LinearConfig(64, 128, 128, 8, 3)


_LINEAR_CONFIGS: dict[int, LinearConfig] = {}  # max rows -> tiles (set by the benchmark's sweep)


def set_linear_configs(table: dict[int, LinearConfig] | None) -> None:
    """Use these tiles (smallest key >= M) instead of default_linear_config; None restores it."""
    _LINEAR_CONFIGS.clear()
    _LINEAR_CONFIGS.update(table or {})


def linear_config(M: int) -> LinearConfig:
    for rows in sorted(_LINEAR_CONFIGS):
        if M <= rows:
            return _LINEAR_CONFIGS[rows]
    return default_linear_config(M)


def linear_fp8_wo(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Tensor | None = None,
                  swiglu: bool = False, cfg: LinearConfig | None = None) -> Tensor:
    """x [..., K] @ (weight_q [N_W, K] e4m3 * weight_scale [N_W])^T (+ bias) in x's dtype; with
    swiglu, weight rows are [gate (F); up (F)] and the result is silu(gate) * up [..., F]."""
    lead, K = x.shape[:-1], x.shape[-1]
    NW = weight_q.shape[0]
    N = NW // 2 if swiglu else NW
    assert weight_q.dtype == FP8 and weight_q.shape[1] == K and weight_q.stride(-1) == 1
    assert not (swiglu and bias is not None), "the SwiGLU form has no bias"
    x2 = x.reshape(-1, K)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*lead, N)
    cfg = cfg or linear_config(M)
    if INTERPRET:
        cfg = LinearConfig(16, 16, 16, 1, 1)
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m))
    _fp8_linear_kernel[grid](
        x2, weight_q, weight_scale, bias if bias is not None else weight_scale, y,
        M, N, K, x2.stride(0), weight_q.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=K % cfg.block_k == 0,
        SWIGLU=swiglu, HAS_BIAS=bias is not None, UPCAST=INTERPRET, FP16_DOT=fp16_dot(x2, weight_q),
        PRECISION=precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y.view(*lead, N)


@triton.jit
def _dequant_rows_kernel(
    q_ptr,  # [N, K] e4m3, contiguous
    s_ptr,  # [N] fp32 scales
    w_ptr,  # [N, K] out: q * scale rounded to the output dtype, contiguous
    N, K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = (rows < N)[:, None] & (cols < K)[None, :]
    off = rows[:, None].to(tl.int64) * K + cols[None, :]
    q = tl.load(q_ptr + off, mask=m, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + rows, mask=rows < N, other=0.0)
    tl.store(w_ptr + off, (q * s[:, None]).to(w_ptr.dtype.element_ty), mask=m)


def dequantize_rows(weight_q: Tensor, weight_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """torch_impl.dequantize_rows in one launch (1 byte read, 2 written per weight): the weight of a
    large-M weight-only GEMM, which then runs on the tensor cores in `dtype`."""
    N, K = weight_q.shape
    q = weight_q.contiguous()
    w = torch.empty(N, K, dtype=dtype, device=q.device)
    if N and K:
        _dequant_rows_kernel[(triton.cdiv(N, 32), triton.cdiv(K, 256))](q, weight_scale, w, N, K, BLOCK_N=32,
                                                                        BLOCK_K=256, num_warps=4)
    return w
