"""Fused MoGE routing in one Triton launch: fp32 global softmax -> per-group top-K' (ties to the
lower id) -> optional renormalisation -> x router_scale, plus per-expert counts for dispatch.
Readable twin: torch_impl.moge_route. Legend as in triton_moe.py (T tokens, E experts, K = G*K').
"""

from __future__ import annotations

import torch
import triton  # ImportError here when triton is missing: ops.py reads it as "no triton"
import triton.language as tl
from torch import Tensor

from mogelm.kernels import torch_impl
from mogelm.kernels.triton_common import INTERPRET


@triton.jit
def _moge_route_kernel(
    logits_ptr,  # [T, E] router logits, any float dtype, row stride stride_lt, unit column stride
    scale_ptr,  # [E] router_scale (read only when HAS_SCALE)
    bias_ptr,  # [E] expert bias for selection only (read only when HAS_BIAS)
    weights_ptr,  # [T, K] fp32 out: gate weights
    ids_ptr,  # [T, K] int64 out: expert ids, group by group
    probs_ptr,  # [T, E] fp32 out: global softmax
    counts_ptr,  # [E] int32 out (atomic adds, zeroed by the caller; only when COUNT)
    T, E, stride_lt,  # sizes and the logits row stride
    NUM_GROUPS: tl.constexpr,  # G contiguous expert groups
    K_PER_GROUP: tl.constexpr,  # K' experts kept per group; K = G * K'
    K_PAD: tl.constexpr,  # next power of two >= K
    E_PAD: tl.constexpr,  # next power of two >= E
    BLOCK_T: tl.constexpr,  # tokens per program
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, COUNT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    cols = tl.arange(0, E_PAD)  # [EP]
    rmask = rows < T
    cmask = cols < E
    m2 = rmask[:, None] & cmask[None, :]
    logit = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :], mask=m2, other=-float("inf"))
    logit = logit.to(tl.float32)
    logit = tl.where(cmask[None, :], logit, -float("inf"))
    row_max = tl.max(logit, axis=1)
    row_max = tl.where(rmask, row_max, 0.0)  # padded rows: keep exp finite
    p = tl.exp(logit - row_max[:, None])
    p = tl.where(cmask[None, :], p, 0.0)
    p = p / tl.where(rmask, tl.sum(p, axis=1), 1.0)[:, None]  # [BT, EP] fp32 global softmax
    tl.store(probs_ptr + rows[:, None] * E + cols[None, :], p, mask=m2)

    score = p
    if HAS_BIAS:
        score = score + tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    score = tl.where(cmask[None, :], score, -float("inf"))
    per_group = E // NUM_GROUPS
    group_of_col = cols // per_group
    kcols = tl.arange(0, K_PAD)
    w_tile = tl.zeros((BLOCK_T, K_PAD), tl.float32)
    id_tile = tl.zeros((BLOCK_T, K_PAD), tl.int32)
    for g in tl.static_range(NUM_GROUPS):
        s_g = tl.where((group_of_col == g)[None, :], score, -float("inf"))
        for k in tl.static_range(K_PER_GROUP):
            best = tl.max(s_g, axis=1)
            # lowest expert id among equal scores (ties break toward the lower id, like torch_impl)
            idx = tl.min(tl.where(s_g == best[:, None], cols[None, :], E_PAD), axis=1)
            hit = cols[None, :] == idx[:, None]
            w = tl.sum(tl.where(hit, p, 0.0), axis=1)  # weight is the prob, not the biased score
            slot = (kcols == g * K_PER_GROUP + k)[None, :]
            w_tile = tl.where(slot, w[:, None], w_tile)
            id_tile = tl.where(slot, idx[:, None], id_tile)
            s_g = tl.where(hit, -float("inf"), s_g)
    kmask = rmask[:, None] & (kcols < NUM_GROUPS * K_PER_GROUP)[None, :]
    if RENORM:
        w_tile = w_tile / tl.maximum(tl.sum(w_tile, axis=1), 1e-20)[:, None]
    if HAS_SCALE:
        w_tile = w_tile * tl.load(scale_ptr + id_tile, mask=kmask, other=1.0).to(tl.float32)
    out = rows[:, None] * (NUM_GROUPS * K_PER_GROUP) + kcols[None, :]
    tl.store(weights_ptr + out, w_tile, mask=kmask)
    tl.store(ids_ptr + out, id_tile.to(tl.int64), mask=kmask)
    if COUNT:
        tl.atomic_add(counts_ptr + id_tile, tl.full((BLOCK_T, K_PAD), 1, tl.int32), mask=kmask)


def moge_route_with_counts(
    logits_TE: Tensor, num_groups: int, experts_per_group_per_tok: int, router_scale_E: Tensor | None = None,
    renormalize: bool = False, expert_bias_E: Tensor | None = None, count: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Fused MoGE routing in one launch: (weights_TK fp32, ids_TK int64, probs_TE fp32, counts_E int32)."""
    T, E = logits_TE.shape
    if E % num_groups:
        raise ValueError(f"num_experts ({E}) must be divisible by num_groups ({num_groups})")
    K = num_groups * experts_per_group_per_tok
    dev = logits_TE.device
    logits_TE = logits_TE if logits_TE.stride(-1) == 1 else logits_TE.contiguous()
    weights = torch.empty(T, K, dtype=torch.float32, device=dev)
    ids = torch.empty(T, K, dtype=torch.int64, device=dev)
    probs = torch.empty(T, E, dtype=torch.float32, device=dev)
    counts = torch.zeros(E, dtype=torch.int32, device=dev) if count else None
    scale = router_scale_E.reshape(-1) if router_scale_E is not None else probs
    bias = expert_bias_E.reshape(-1) if expert_bias_E is not None else probs
    block_t = 16 if INTERPRET else max(1, min(64, 4096 // triton.next_power_of_2(E)))
    _moge_route_kernel[(triton.cdiv(T, block_t),)](
        logits_TE, scale, bias, weights, ids, probs, counts if count else probs, T, E, logits_TE.stride(0),
        NUM_GROUPS=num_groups, K_PER_GROUP=experts_per_group_per_tok, K_PAD=triton.next_power_of_2(K),
        E_PAD=triton.next_power_of_2(E), BLOCK_T=block_t, HAS_SCALE=router_scale_E is not None,
        HAS_BIAS=expert_bias_E is not None, RENORM=renormalize, COUNT=count, num_warps=4,
    )
    return weights, ids, probs, counts


def moge_route(
    logits_TE: Tensor, num_groups: int, experts_per_group_per_tok: int, router_scale_E: Tensor | None = None,
    renormalize: bool = False, expert_bias_E: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """ops.moge_route on the Triton backend (same contract as torch_impl.moge_route). No gradient
    flows through it (router_scale / logits gradients need the torch backend)."""
    if logits_TE.requires_grad or (router_scale_E is not None and router_scale_E.requires_grad):
        return torch_impl.moge_route(
            logits_TE, num_groups, experts_per_group_per_tok, router_scale_E, renormalize, expert_bias_E
        )
    w, ids, probs, _ = moge_route_with_counts(
        logits_TE, num_groups, experts_per_group_per_tok, router_scale_E, renormalize, expert_bias_E,
        count=False
    )
    return w, ids, probs
