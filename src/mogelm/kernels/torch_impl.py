"""Readable PyTorch implementations of every kernel in `ops`: the twins the Triton kernels are
tested against, and the backends used on CPU.

Legend: T tokens, D hidden, F expert width, E experts, K experts per token, G expert groups,
S = T*K routed rows (token copies sorted by expert).

Weight layout (same as nn.Linear, [out, in], stacked over experts):
    gate_up_EFD  [E, 2F, D]   rows 0..F-1 are gate_proj, rows F..2F-1 are up_proj
    down_EDF     [E, D, F]
Expert e computes  down_e( silu(gate_e x) * up_e x ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def topk_stable(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k along the last dim; equal scores keep the lower index first (so backends agree)."""
    if k == 1:  # argmax returns the first maximal index: tie-stable and cheaper than a sort
        idx = scores.argmax(dim=-1, keepdim=True)
        return scores.gather(-1, idx), idx
    _, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    idx = idx[..., :k]
    return scores.gather(-1, idx), idx


def moge_route(
    logits_TE: Tensor,
    num_groups: int,
    experts_per_group_per_tok: int,
    router_scale_E: Tensor | None,
    renormalize: bool,
    expert_bias_E: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """MoGE routing: fp32 global softmax, top-K' inside each contiguous group, gate = prob
    (optionally renormalised over the K kept) x router_scale[expert]. Returns
    (weights_TK fp32, expert_ids_TK int64, probs_TE fp32); ids are ordered group by group."""
    T, E = logits_TE.shape
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    scores_TE = probs_TE if expert_bias_E is None else probs_TE + expert_bias_E.float()
    per_group = E // num_groups
    _, local_TGk = topk_stable(scores_TE.view(T, num_groups, per_group), experts_per_group_per_tok)
    base_G1 = torch.arange(num_groups, device=logits_TE.device).unsqueeze(-1) * per_group
    ids_TK = (local_TGk + base_G1).reshape(T, num_groups * experts_per_group_per_tok)
    return gate_weights(probs_TE, ids_TK, router_scale_E, renormalize), ids_TK, probs_TE


def gate_weights(
    probs_TE: Tensor, ids_TK: Tensor, router_scale_E: Tensor | None, renormalize: bool
) -> Tensor:
    """Gate weights of the chosen experts: their probabilities, optionally renormalised over the
    K kept, times router_scale[expert] when present (fp32 [T, K])."""
    weights_TK = probs_TE.gather(-1, ids_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    return apply_router_scale(weights_TK, ids_TK, router_scale_E)


def apply_router_scale(weights_TK: Tensor, ids_TK: Tensor, router_scale_E: Tensor | None) -> Tensor:
    """Gate weights times the learned per-expert router_scale[expert] ([1, E] or [E]); unchanged
    when there is none. Every router scales its gate weights here, whatever made them."""
    if router_scale_E is None:
        return weights_TK
    return weights_TK * router_scale_E.float().reshape(-1)[ids_TK]


def expert_counts(expert_ids_TK: Tensor, num_experts: int) -> Tensor:
    """Rows per expert, int64 [E], without a host sync (bincount would sync on CUDA)."""
    flat = expert_ids_TK.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )


def permute(expert_ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sort the T*K (token, slot) pairs by expert. Returns
    order_S (flat index t*K+k of each sorted row), counts_E, offsets_E (int32 cumulative ends)."""
    flat = expert_ids_TK.reshape(-1)
    order_S = torch.argsort(flat, stable=True)
    counts_E = expert_counts(expert_ids_TK, num_experts)
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    return order_S, counts_E, offsets_E


def _grouped_mm_ok(x: Tensor, *weights: Tensor) -> bool:
    # torch._grouped_mm needs 16-byte aligned strides and a floating dtype it supports.
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if x.is_cuda and x.dtype != torch.bfloat16:  # the CUDA kernel takes bf16 only (CPU: any float)
        return False
    align = 16 // x.element_size()
    return all(w.shape[-1] % align == 0 and w.shape[-2] % align == 0 for w in weights)


def grouped_swiglu(x_SD: Tensor, gate_up_EFD: Tensor, down_EDF: Tensor, offsets_E: Tensor) -> Tensor:
    """Expert MLPs over rows already sorted by expert (rows offsets[e-1]..offsets[e]-1 go to e)."""
    if _grouped_mm_ok(x_SD, gate_up_EFD, down_EDF):
        h_S2F = torch._grouped_mm(x_SD, gate_up_EFD.transpose(-2, -1), offs=offsets_E)
        gate_SF, up_SF = h_S2F.chunk(2, dim=-1)
        h_SF = (F.silu(gate_SF) * up_SF).contiguous()
        return torch._grouped_mm(h_SF, down_EDF.transpose(-2, -1), offs=offsets_E)
    return loop_swiglu(x_SD, gate_up_EFD, down_EDF, offsets_E)


def loop_swiglu(x_SD: Tensor, gate_up_EFD: Tensor, down_EDF: Tensor, offsets_E: Tensor) -> Tensor:
    """Same contract as grouped_swiglu, one matmul pair per expert (any dtype, any alignment)."""
    ends = offsets_E.tolist()
    outs, start = [], 0
    for e, end in enumerate(ends):
        gate_SF, up_SF = (x_SD[start:end] @ gate_up_EFD[e].t()).chunk(2, dim=-1)
        outs.append((F.silu(gate_SF) * up_SF) @ down_EDF[e].t())
        start = end
    return torch.cat(outs, 0) if outs else x_SD.new_zeros(0, down_EDF.shape[1])


def routed_experts(
    x_TD: Tensor,
    weights_TK: Tensor,
    expert_ids_TK: Tensor,
    gate_up_EFD: Tensor,
    down_EDF: Tensor,
    *,
    use_loop: bool = False,
) -> Tensor:
    """y[t] = sum_k weights[t,k] * expert_{ids[t,k]}(x[t]), by permute -> grouped GEMMs -> combine."""
    T, D = x_TD.shape
    K = expert_ids_TK.shape[-1]
    E = gate_up_EFD.shape[0]
    order_S, _, offsets_E = permute(expert_ids_TK, E)
    x_SD = x_TD.index_select(0, order_S // K)
    mlp = loop_swiglu if use_loop else grouped_swiglu
    y_SD = mlp(x_SD, gate_up_EFD, down_EDF, offsets_E)
    # Combine with a gather back to (token, slot) order and a weighted sum over the K slots in
    # at least fp32: no atomics, deterministic, and cheaper than a scatter-add of T*K rows.
    y_TKD = y_SD.index_select(0, torch.argsort(order_S)).view(T, K, D)
    acc = torch.promote_types(y_SD.dtype, torch.float32)  # fp32 for bf16/fp16, fp64 stays fp64
    return (y_TKD.to(acc) * weights_TK.unsqueeze(-1).to(acc)).sum(1).to(y_SD.dtype)


# ----------------------------------------------------------------------------------------------
# FP8 (e4m3) inference twins: per-row quantisation, fp8 routed experts, fp8 dense linear
# ----------------------------------------------------------------------------------------------

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value


def quantize_rows_fp8(x_RC: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row e4m3: (q [R, C] fp8, scale [R] fp32) with x ~= q * scale[:, None].
    Works on any leading shape (rows are the last dim's slices). A zero row keeps a tiny scale."""
    amax = x_RC.float().abs().amax(-1).clamp_min(1e-12)
    scale = amax / FP8_MAX
    q = (x_RC.float() / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_rows(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """q * scale[..., None] computed in fp32, then cast to `dtype`."""
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


def fake_quantize_rows(x: Tensor) -> Tensor:
    """x rounded to e4m3 per row and back, in fp32: what a W8A8 kernel multiplies."""
    q, scale = quantize_rows_fp8(x)
    return dequantize_rows(q, scale, torch.float32)


def routed_experts_fp8(
    x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor, gate_up_q: Tensor, gate_up_scale: Tensor,
    down_q: Tensor, down_scale: Tensor, activations: str,
) -> Tensor:
    """Twin of triton_moe.routed_experts_fp8. "bf16" (weight-only): dequantised weights, activations
    in x's dtype. "fp8" (W8A8): like the kernels, x and the SwiGLU output h are rounded to e4m3 per
    row before each GEMM, products accumulate in fp32, and h is stored in x's dtype in between."""
    if activations == "bf16":
        gate_up = dequantize_rows(gate_up_q, gate_up_scale, x_TD.dtype)
        down = dequantize_rows(down_q, down_scale, x_TD.dtype)
        return routed_experts(x_TD, weights_TK, expert_ids_TK, gate_up, down)
    T, D = x_TD.shape
    K = expert_ids_TK.shape[-1]
    E, F2, _ = gate_up_q.shape
    order_S, _, offsets_E = permute(expert_ids_TK, E)
    x_SD = fake_quantize_rows(x_TD).index_select(0, order_S // K)
    y_SD = x_SD.new_empty(T * K, D)
    start = 0
    for e, end in enumerate(offsets_E.tolist()):  # one expert at a time: readable, CPU only
        if end > start:
            gate_up_2FD = dequantize_rows(gate_up_q[e], gate_up_scale[e], torch.float32)
            gate_SF, up_SF = (x_SD[start:end] @ gate_up_2FD.t()).chunk(2, dim=-1)
            h_SF = (F.silu(gate_SF) * up_SF).to(x_TD.dtype)
            down_DF = dequantize_rows(down_q[e], down_scale[e], torch.float32)
            y_SD[start:end] = fake_quantize_rows(h_SF) @ down_DF.t()
        start = end
    y_TKD = y_SD.index_select(0, torch.argsort(order_S)).view(T, K, D)
    return (y_TKD * weights_TK.unsqueeze(-1).float()).sum(1).to(x_TD.dtype)


def linear_fp8(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Tensor | None,
               activations: str) -> Tensor:
    """y = x @ W^T + b with W = weight_q [N, K] e4m3 * weight_scale [N] (per output channel).
    "bf16" (weight-only): W dequantised to x's dtype, then one GEMM. "fp8" (W8A8): x rounded to
    e4m3 per token first and the product taken in fp32, as torch._scaled_mm does with row-wise
    scales."""
    if activations == "bf16":
        return F.linear(x, dequantize_rows(weight_q, weight_scale, x.dtype), bias)
    y = fake_quantize_rows(x) @ dequantize_rows(weight_q, weight_scale, torch.float32).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)

# Training ops (issue 17): the readable twins of kernels/triton_fused.py and of the chunked loss.
# They are the model's own code of before, so CPU training stays bit-identical.
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x^2) + eps) in fp32, back to x's dtype, times the weight."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def apply_rope(x_BHTd: Tensor, cos_BTd: Tensor, sin_BTd: Tensor) -> Tensor:
    """Neox-style (rotate-half) rotary embedding over the full head dim."""
    x1, x2 = x_BHTd.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos_BTd.unsqueeze(1).to(x_BHTd.dtype), sin_BTd.unsqueeze(1).to(x_BHTd.dtype)
    return x_BHTd * cos + rotated * sin


def rope_qk(q_BHTd: Tensor, k_BHTd: Tensor, cos_BTd: Tensor, sin_BTd: Tensor) -> tuple[Tensor, Tensor]:
    return apply_rope(q_BHTd, cos_BTd, sin_BTd), apply_rope(k_BHTd, cos_BTd, sin_BTd)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def linear_cross_entropy(h_BTD: Tensor, weight_VD: Tensor, targets_BT: Tensor,
                         ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of the LM head's logits F.linear(h, W) (in fp32), the loop's loss of before."""
    logits = F.linear(h_BTD, weight_VD)
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets_BT.reshape(-1),
                           ignore_index=ignore_index)


# Inference ops (issue 14): the readable twins of kernels/triton_infer.py.
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(h, y): the residual add h = x + residual, then y = rms_norm(h) (the block's own code)."""
    h = x + residual
    return h, rms_norm(h, weight, eps)


def qkv_bias_rope(qkv_BTC: Tensor, bias_C: Tensor | None, cos_BTd: Tensor, sin_BTd: Tensor, num_heads: int,
                  num_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q|k|v of one fused projection [B, T, (H + 2 Hkv) hd] -> q [B, H, T, hd] and k, v
    [B, Hkv, T, hd]: the bias added, RoPE applied to q and k (as the unfused Attention does)."""
    B, T, C = qkv_BTC.shape
    hd = C // (num_heads + 2 * num_kv_heads)
    x = qkv_BTC + bias_C if bias_C is not None else qkv_BTC
    q, k, v = x.split([num_heads * hd, num_kv_heads * hd, num_kv_heads * hd], dim=-1)
    q = q.reshape(B, T, num_heads, hd).transpose(1, 2)
    k = k.reshape(B, T, num_kv_heads, hd).transpose(1, 2)
    v = v.reshape(B, T, num_kv_heads, hd).transpose(1, 2)
    q, k = rope_qk(q, k, cos_BTd, sin_BTd)
    return q, k, v


def paged_kv_write(k_pool: Tensor, v_pool: Tensor, slots_N: Tensor, k_NHd: Tensor, v_NHd: Tensor,
                   k_scale_H: Tensor | None = None, v_scale_H: Tensor | None = None) -> None:
    """Store keys/values of N tokens [N, Hkv, hd] at pool slots `slots_N` (int64) of one layer's
    pools [P, bs, Hkv, hd]; an fp8 pool stores x / scale[head] clamped to the e4m3 range."""
    for pool, x, scale in ((k_pool, k_NHd, k_scale_H), (v_pool, v_NHd, v_scale_H)):
        flat = pool.view(-1, *pool.shape[2:])
        if scale is None:
            flat.index_copy_(0, slots_N, x.to(pool.dtype))
        else:  # quantise with the head's scale, copy the bytes (no fp8 index_copy_ everywhere)
            q = (x.float() / scale[:, None]).clamp(-448.0, 448.0).to(pool.dtype)
            flat.view(torch.uint8).index_copy_(0, slots_N, q.view(torch.uint8))


def swiglu_halves(x: Tensor) -> Tensor:
    """silu(gate) * up for x [..., 2F] = [gate | up] (a fused gate/up projection's output)."""
    gate, up = x.chunk(2, dim=-1)
    return swiglu(gate, up)


def linear_fp8_swiglu(x: Tensor, weight_q: Tensor, weight_scale: Tensor) -> Tensor:
    """silu(x @ gate^T) * (x @ up^T) for an e4m3 [gate (F rows); up (F rows)] weight, weight-only."""
    gate, up = linear_fp8(x, weight_q, weight_scale, None, "bf16").chunk(2, dim=-1)
    return swiglu(gate, up)
