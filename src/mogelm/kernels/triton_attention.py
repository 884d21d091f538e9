"""Split-KV (flash-decoding) attention over a paged KV pool, for decode rows of one query token.

    out_NHd = paged_decode_attention(q_NHd, k_pool, v_pool, tables_NM, lens_N, scale)

Twin: mogelm.kernels.attention.paged_decode_attention (same signature, same layout; read its
docstring for the pool layout and the legend). Reached through kernels/ops.py.

Grid (N rows, Hkv KV heads, S splits). One program takes one KV head of one row and the whole
query group of that head (G = H / Hkv query heads, padded to BLOCK_G >= 16 rows for tl.dot), so
every KV byte is read once per row however many query heads share it (Pangu: 40 over 8, G = 5).
It reads only the row's live keys: its length L comes from `lens`, and key t is found in block
tables[row, t // bs] at offset t % bs, BLOCK_N keys a step. The row's L keys are cut into S
contiguous chunks (a multiple of BLOCK_N each), one per split program, so short batches still fill
the GPU; each split writes its normalised partial output and log-sum-exp, and `_combine_kernel`
merges them (weights 2^(lse_s - max)). With S = 1 the first kernel writes the output directly.

Every shape is static and lengths and tables are read on the device: a launch can be captured in
a CUDA graph and replayed with new lengths and tables (static buffers). fp8 (e4m3) pools are
dequantised in registers with per-KV-head scales: keys and values are converted to fp16 (exact for
e4m3; q and the probabilities are rounded to fp16 for those dots), scores are multiplied by
k_scale[head] and the output by v_scale[head]. Softmax in base 2 (scores carry log2(e)); accumulation in fp32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton  # ImportError here when triton is missing: ops.py reads it as "no triton"
import triton.language as tl
from torch import Tensor

from mogelm.kernels.triton_common import INTERPRET, precision

LOG2E = 1.4426950408889634


@triton.jit
def _load_kv_tile(k_ptr, v_ptr, table_row, t0, end, kv_head, offs_d, stride_kp, stride_kt, stride_kh,
                  stride_vp, stride_vt, stride_vh, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys and values [BLOCK_N, hd] of positions t0.. of one row (masked past `end`; all masked
    when t0 >= end), with the mask."""
    offs_t = t0 + tl.arange(0, BLOCK_N)
    t_mask = offs_t < end
    block = tl.load(table_row + offs_t // PAGE, mask=t_mask, other=0).to(tl.int64)
    in_block = offs_t % PAGE
    k_rows = block * stride_kp + in_block * stride_kt + kv_head * stride_kh  # [BLOCK_N]
    k = tl.load(k_ptr + k_rows[:, None] + offs_d[None, :], mask=t_mask[:, None], other=0.0)
    v_rows = block * stride_vp + in_block * stride_vt + kv_head * stride_vh
    v = tl.load(v_ptr + v_rows[:, None] + offs_d[None, :], mask=t_mask[:, None], other=0.0)
    return k, v, t_mask


@triton.jit
def _attend_tile(q, k, v, t_mask, m_i, l_i, acc, scale, KV_SCALE: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):
    """One online-softmax step over a tile of keys/values; returns the new (m_i, l_i, acc)."""
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    elif KV_SCALE:
        k = k.to(tl.float16)
        v = v.to(tl.float16)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_G, BLOCK_N]
    s = tl.where(t_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every step holds >= 1 live key
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # [N, H, hd] queries, unit stride along hd
    k_ptr,  # [P, bs, Hkv, hd] key pool of this layer (bf16/fp16/fp32 or fp8 e4m3)
    v_ptr,  # [P, bs, Hkv, hd] value pool, same layout
    k_scale_ptr,  # [Hkv] fp32 per-head key scales (read only when KV_SCALE)
    v_scale_ptr,  # [Hkv] fp32 per-head value scales (read only when KV_SCALE)
    tables_ptr,  # [N, M] int32 block table of each row
    lens_ptr,  # [N] int32 live length of each row (0: empty row, output zeros)
    out_ptr,  # [N, H, hd] out, q's dtype (written when NUM_SPLITS == 1)
    part_o_ptr,  # [N, H, NUM_SPLITS, hd] fp32 out: each split's normalised partial output
    part_lse_ptr,  # [N, H, NUM_SPLITS] fp32 out: each split's log2-sum-exp2 (-inf: no keys)
    qk_scale,  # softmax scale * log2(e)
    stride_qn, stride_qh,  # q strides (row, head)
    stride_kp, stride_kt, stride_kh,  # key pool strides (block, token in block, head)
    stride_vp, stride_vt, stride_vh,  # value pool strides
    stride_tn,  # block-table row stride
    stride_on, stride_oh,  # out strides (row, head)
    G: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # G padded to a power of two >= 16 (tl.dot needs M >= 16)
    HEAD_DIM: tl.constexpr,  # hd (a power of two)
    PAGE: tl.constexpr,  # tokens per pool block (bs)
    BLOCK_N: tl.constexpr,  # keys per step
    NUM_SPLITS: tl.constexpr,  # S
    KV_SCALE: tl.constexpr,  # fp8 pool: apply the per-head scales
    UPCAST: tl.constexpr,  # interpreter: dots in fp32 (it mishandles bf16 tl.dot)
    PRECISION: tl.constexpr,  # tl.dot input_precision
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lens_ptr + row)
    # this split's chunk of the row's live keys: [start, end), a multiple of BLOCK_N long
    chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < G
    heads = kv_head * G + offs_g
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + row.to(tl.int64) * stride_qn + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)  # [BLOCK_G, hd]; padding rows are zeros
    if UPCAST:
        q = q.to(tl.float32)
    elif KV_SCALE:  # e4m3 -> fp16 is exact and one conversion; -> bf16 goes through fp32 (slow)
        q = q.to(tl.float16)
    scale = qk_scale
    if KV_SCALE:  # fp8 keys: the dot runs in q's dtype on the stored values, the scale comes after
        scale = scale * tl.load(k_scale_ptr + kv_head)

    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)  # running max (base-2 scores)
    l_i = tl.zeros((BLOCK_G,), tl.float32)  # running sum of 2^(s - m)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
    table_row = tables_ptr + row.to(tl.int64) * stride_tn
    for t0 in range(start, end, BLOCK_N):
        k, v, t_mask = _load_kv_tile(k_ptr, v_ptr, table_row, t0, end, kv_head, offs_d, stride_kp,
                                     stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, PAGE, BLOCK_N)
        m_i, l_i, acc = _attend_tile(q, k, v, t_mask, m_i, l_i, acc, scale, KV_SCALE, UPCAST, PRECISION)

    if KV_SCALE:
        acc = acc * tl.load(v_scale_ptr + kv_head)
    has_keys = l_i > 0.0
    o = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + row.to(tl.int64) * stride_on + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        base = (row.to(tl.int64) * (G * tl.num_programs(1)) + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(part_o_ptr + base[:, None] * HEAD_DIM + offs_d[None, :], o, mask=g_mask[:, None])
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + base, lse, mask=g_mask)


@triton.jit
def _combine_kernel(
    part_o_ptr,  # [N, H, NUM_SPLITS, hd] fp32 normalised partial outputs
    part_lse_ptr,  # [N, H, NUM_SPLITS] fp32 log2-sum-exp2 of each split (-inf: empty)
    out_ptr,  # [N, H, hd] out, q's dtype
    stride_on, stride_oh,  # out strides (row, head)
    H,  # query heads
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # NUM_SPLITS padded to a power of two
):
    # out = sum_s 2^(lse_s - m) * o_s / sum_s 2^(lse_s - m), m = max_s lse_s; all splits empty -> 0
    row = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < NUM_SPLITS
    base = (row.to(tl.int64) * H + head) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)  # 0 for empty splits
    offs_d = tl.arange(0, HEAD_DIM)
    o = tl.load(part_o_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_mask[:, None], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + row.to(tl.int64) * stride_on + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty))


@dataclass(frozen=True)
class DecodeAttentionConfig:
    block_n: int = 64  # keys per step
    num_warps: int = 4
    num_stages: int = 2
    target_programs: int = 0  # splits are chosen so that N * Hkv * S reaches this (0: 2 x SMs)


DEFAULT_CONFIG = DecodeAttentionConfig()
# e4m3 pools: half the bytes per key, so twice the keys per step keep as many bytes in flight.
# Measured on the H200 (2026-12-02, B=256, ctx 2048, benchmarks/sweep_decode_tiles.py): bf16 pool
# 64/4/2 at 102 % of its bytes floor; e4m3 with bf16 dots 64/4/2 42 %, 128/4/3 52 %; with fp16
# dots 128/4/2 55 %, 128/4/3 54 %. A register double buffer of the next tile ran at 13 % (spills).
# The e4m3 stream stays at about half of its floor: the conversion between load and dot keeps the
# loads out of the compiler's shared-memory pipeline (num_stages changes nothing).
DEFAULT_FP8_CONFIG = DecodeAttentionConfig(block_n=128, num_warps=4, num_stages=2)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits_for(num_rows: int, num_kv_heads: int, max_len: int, device: torch.device,
                   cfg: DecodeAttentionConfig = DEFAULT_CONFIG) -> int:
    """Splits per row: enough programs to fill the GPU twice, no more splits than BLOCK_N-key
    steps of the longest possible row. Depends only on static sizes (CUDA-graph safe)."""
    target = cfg.target_programs or 2 * _sm_count(device)
    want = -(-target // max(1, num_rows * num_kv_heads))
    return max(1, min(want, -(-max_len // cfg.block_n), 64))


def paged_decode_attention(
    q_NHd: Tensor, k_pool_PbHd: Tensor, v_pool_PbHd: Tensor, tables_NM: Tensor, lens_N: Tensor,
    scale: float, k_scale_H: Tensor | None = None, v_scale_H: Tensor | None = None,
    num_splits: int | None = None, cfg: DecodeAttentionConfig | None = None,
) -> Tensor:
    """Decode attention (see the module docstring); out [N, H, hd] in q's dtype. `num_splits`
    None picks one from the pool's capacity per row (tables width x block size)."""
    N, H, hd = q_NHd.shape
    P, bs, Hkv, hd_k = k_pool_PbHd.shape
    assert hd_k == hd and H % Hkv == 0 and hd == triton.next_power_of_2(hd), (q_NHd.shape, k_pool_PbHd.shape)
    assert k_pool_PbHd.stride(-1) == 1 and v_pool_PbHd.stride(-1) == 1
    if q_NHd.stride(-1) != 1:
        q_NHd = q_NHd.contiguous()
    assert tables_NM.dtype == torch.int32 and lens_N.dtype == torch.int32
    G = H // Hkv
    if cfg is None:
        cfg = DEFAULT_FP8_CONFIG if k_scale_H is not None else DEFAULT_CONFIG
    if num_splits is None:
        num_splits = num_splits_for(N, Hkv, tables_NM.shape[1] * bs, q_NHd.device, cfg)
    out = torch.empty(N, H, hd, dtype=q_NHd.dtype, device=q_NHd.device)
    if N == 0:
        return out
    if num_splits > 1:
        part_o = torch.empty(N, H, num_splits, hd, dtype=torch.float32, device=q_NHd.device)
        part_lse = torch.empty(N, H, num_splits, dtype=torch.float32, device=q_NHd.device)
    else:
        part_o = part_lse = out  # not touched
    kv_scale = k_scale_H is not None
    if kv_scale:
        assert v_scale_H is not None and k_scale_H.dtype == v_scale_H.dtype == torch.float32
    _paged_decode_kernel[(N, Hkv, num_splits)](
        q_NHd, k_pool_PbHd, v_pool_PbHd,
        k_scale_H if kv_scale else lens_N, v_scale_H if kv_scale else lens_N,
        tables_NM, lens_N, out, part_o, part_lse, scale * LOG2E,
        q_NHd.stride(0), q_NHd.stride(1),
        k_pool_PbHd.stride(0), k_pool_PbHd.stride(1), k_pool_PbHd.stride(2),
        v_pool_PbHd.stride(0), v_pool_PbHd.stride(1), v_pool_PbHd.stride(2),
        tables_NM.stride(0), out.stride(0), out.stride(1),
        G=G, BLOCK_G=max(16, triton.next_power_of_2(G)), HEAD_DIM=hd, PAGE=bs, BLOCK_N=cfg.block_n,
        NUM_SPLITS=num_splits, KV_SCALE=kv_scale, UPCAST=INTERPRET,
        PRECISION=precision(q_NHd.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if num_splits > 1:
        _combine_kernel[(N, H)](part_o, part_lse, out, out.stride(0), out.stride(1), H, HEAD_DIM=hd,
                                NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
                                num_warps=4)
    return out
