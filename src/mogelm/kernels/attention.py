"""Attention over a paged KV pool in readable PyTorch: the twin of the Triton decode kernel
(kernels/triton_attention.py) and the prefill path for packed prompt chunks.

    out_NHd = paged_decode_attention(q_NHd, k_pool, v_pool, tables_NM, lens_N, scale)
    out_THd = paged_prefill_attention(q_THd, k_pool, v_pool, table_M, start, scale)

Layers call them through kernels/ops.py (which picks Triton on CUDA for the decode kernel).

Legend: N decode rows (one query token each), T query tokens of one prompt chunk, H query heads,
Hkv KV heads, G = H / Hkv query heads per KV head (GQA), hd head dim, P blocks in the pool,
bs tokens per block, M block-table width, L a row's live length (keys 0..L-1 are visible).

Pool layout (one pair per layer): k_pool_PbHd, v_pool_PbHd [P, bs, Hkv, hd]. Token t of a sequence
lives in block table[t // bs] at offset t % bs. With an fp8 (e4m3) pool, the stored value is
k / k_scale[head] and the real key is stored * k_scale[head] (per KV head fp32 scales, [Hkv]).

A decode row n attends to keys 0..lens[n]-1 of its own table row (its own live length; a row of
length 0 is empty and returns zeros). A prompt chunk of T tokens at positions start..start+T-1
attends causally: token i sees keys 0..start+i, i.e. the cached prefix and the chunk itself
(which the caller has already written into the pool).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right


def dequantize(x: Tensor, scale_H: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Pool values [..., Hkv, hd] in `dtype`; fp8 values are multiplied by their head's scale."""
    if scale_H is None:
        return x.to(dtype)
    return (x.float() * scale_H[:, None]).to(dtype)


def gather_blocks(pool_PbHd: Tensor, table_M: Tensor, length: int) -> Tensor:
    """The first `length` tokens of one sequence, gathered from its blocks: [length, Hkv, hd]."""
    bs = pool_PbHd.shape[1]
    return pool_PbHd[table_M[: -(-length // bs)].long()].flatten(0, 1)[:length]


def paged_decode_attention(
    q_NHd: Tensor, k_pool_PbHd: Tensor, v_pool_PbHd: Tensor, tables_NM: Tensor, lens_N: Tensor,
    scale: float, k_scale_H: Tensor | None = None, v_scale_H: Tensor | None = None,
) -> Tensor:
    """One query per row over that row's live keys; out [N, H, hd] in q's dtype.

    Gathers every block of each table row (M * bs keys) and masks keys beyond the row's length, so
    it has no host synchronisation and can be captured in a CUDA graph; the Triton kernel reads
    only the live blocks. Scores and softmax in fp32."""
    N, H, hd = q_NHd.shape
    _, bs, Hkv, _ = k_pool_PbHd.shape
    G = H // Hkv
    k_NLHd = dequantize(k_pool_PbHd[tables_NM.long()], k_scale_H, torch.float32).flatten(1, 2)
    v_NLHd = dequantize(v_pool_PbHd[tables_NM.long()], v_scale_H, torch.float32).flatten(1, 2)
    q_NHGd = q_NHd.float().view(N, Hkv, G, hd)
    scores_NHGL = torch.einsum("nhgd,nlhd->nhgl", q_NHGd, k_NLHd) * scale
    visible_NL = torch.arange(k_NLHd.shape[1], device=q_NHd.device) < lens_N[:, None]
    scores_NHGL = scores_NHGL.masked_fill(~visible_NL[:, None, None, :], float("-inf"))
    probs_NHGL = torch.softmax(scores_NHGL, dim=-1).nan_to_num(0.0)  # empty rows: all -inf -> 0
    out_NHGd = torch.einsum("nhgl,nlhd->nhgd", probs_NHGL, v_NLHd)
    return out_NHGd.reshape(N, H, hd).to(q_NHd.dtype)


def paged_prefill_attention(
    q_THd: Tensor, k_pool_PbHd: Tensor, v_pool_PbHd: Tensor, table_M: Tensor, start: int,
    scale: float, k_scale_H: Tensor | None = None, v_scale_H: Tensor | None = None,
) -> Tensor:
    """A prompt chunk at positions start..start+T-1 over its cached prefix and itself (causal);
    out [T, H, hd] in q's dtype. One SDPA call over the gathered blocks. The KV heads are expanded
    to the query heads and the causal mask is SDPA's lower-right CausalBias (never materialised), so
    the flash / memory-efficient backends apply on CUDA."""
    T, H, _ = q_THd.shape
    length = start + T
    k_LHd = dequantize(gather_blocks(k_pool_PbHd, table_M, length), k_scale_H, q_THd.dtype)
    v_LHd = dequantize(gather_blocks(v_pool_PbHd, table_M, length), v_scale_H, q_THd.dtype)
    G = H // k_LHd.shape[1]
    k_HLd = k_LHd.repeat_interleave(G, dim=1).transpose(0, 1)
    v_HLd = v_LHd.repeat_interleave(G, dim=1).transpose(0, 1)
    q_HTd = q_THd.transpose(0, 1)
    if start == 0:
        out = F.scaled_dot_product_attention(q_HTd, k_HLd, v_HLd, is_causal=True, scale=scale)
    else:  # query i (position start + i) sees keys 0..start+i: causal aligned to the bottom right
        out = F.scaled_dot_product_attention(q_HTd, k_HLd, v_HLd, attn_mask=causal_lower_right(T, length),
                                             scale=scale)
    return out.transpose(0, 1)
