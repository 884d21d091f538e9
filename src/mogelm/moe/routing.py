"""Routing: which experts each token uses and with what gate weight. Pure functions.

Legend (shape suffixes): T tokens, E routed experts (N), G expert groups (M), K experts per
token, B sequences, S positions in a sequence.

Every router returns a `Routing`:
    weights_TK     fp32 gate weights of the chosen experts
    expert_ids_TK  int64 expert ids; for MoGE column block g*K'..(g+1)*K'-1 lies in group g
    probs_TE       fp32 global softmax over all experts (what the aux loss uses, paper Eq. 8)

Routers:
    moge_route           paper Eq. 5-6: global softmax, top-K' inside every contiguous group,
                         x router_scale, not renormalised (Pangu Pro MoE, PAPER.md §1.4)
    topk_route           paper Eq. 2 baseline: softmax over the top-K logits (renormalised)
    softmax_topk_route   the common variant: global softmax, then top-K of the probabilities
    group_limited_route  DeepSeek-V3: keep the best `topk_groups` groups, then global top-K

Ties break toward the lower expert id everywhere (stable sort), so every backend agrees.
`expert_bias_E` (aux-loss-free balancing) shifts *selection* only, never the gate weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mogelm.kernels import ops
from mogelm.kernels.torch_impl import expert_counts as _expert_counts
from mogelm.kernels.torch_impl import gate_weights as _gate_weights
from mogelm.kernels.torch_impl import topk_stable as _topk_stable


class Routing(NamedTuple):
    weights_TK: Tensor
    expert_ids_TK: Tensor
    probs_TE: Tensor


def moge_route(
    logits_TE: Tensor,
    num_groups: int,
    experts_per_group_per_tok: int = 1,
    router_scale_E: Tensor | None = None,
    renormalize: bool = False,
    expert_bias_E: Tensor | None = None,
) -> Routing:
    """MoGE: one global softmax, then the K' best experts inside each of the G groups.
    The math lives in kernels (torch_impl.moge_route is the readable twin of the fused kernel)."""
    return Routing(*ops.moge_route(
        logits_TE, num_groups, experts_per_group_per_tok, router_scale_E, renormalize, expert_bias_E
    ))


def topk_route(
    logits_TE: Tensor,
    k: int,
    router_scale_E: Tensor | None = None,
    expert_bias_E: Tensor | None = None,
) -> Routing:
    """Paper Eq. 2: G(h) = Softmax(TopK(W^T h, K)), i.e. the gate weights of the K chosen experts
    are a softmax over their logits only (they sum to 1). probs_TE is still the global softmax."""
    logits_f = logits_TE.float()
    probs_TE = torch.softmax(logits_f, dim=-1)
    scores = logits_f if expert_bias_E is None else probs_TE + expert_bias_E.float()
    _, ids_TK = _topk_stable(scores, k)
    weights_TK = torch.softmax(logits_f.gather(-1, ids_TK), dim=-1)
    if router_scale_E is not None:
        weights_TK = weights_TK * router_scale_E.float().reshape(-1)[ids_TK]
    return Routing(weights_TK, ids_TK, probs_TE)


def softmax_topk_route(
    logits_TE: Tensor,
    k: int,
    router_scale_E: Tensor | None = None,
    renormalize: bool = False,
    expert_bias_E: Tensor | None = None,
) -> Routing:
    """Global softmax then top-K of the probabilities (Mixtral/Qwen-MoE style)."""
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    scores = probs_TE if expert_bias_E is None else probs_TE + expert_bias_E.float()
    _, ids_TK = _topk_stable(scores, k)
    return Routing(_gate_weights(probs_TE, ids_TK, router_scale_E, renormalize), ids_TK, probs_TE)


def group_limited_route(
    logits_TE: Tensor,
    num_groups: int,
    topk_groups: int,
    k: int,
    router_scale_E: Tensor | None = None,
    renormalize: bool = False,
    expert_bias_E: Tensor | None = None,
) -> Routing:
    """DeepSeek-V3 group-limited routing: score each group by the sum of its top-2 expert scores
    (its max when a group has one expert), keep the best `topk_groups` groups, then take a global
    top-K among their experts. Unlike MoGE, a token may put all K experts in one group."""
    T, E = logits_TE.shape
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    scores_TE = probs_TE if expert_bias_E is None else probs_TE + expert_bias_E.float()
    per_group = E // num_groups
    scores_TGe = scores_TE.view(T, num_groups, per_group)
    best2, _ = _topk_stable(scores_TGe, min(2, per_group))
    _, groups_TJ = _topk_stable(best2.sum(-1), topk_groups)
    keep_TG = torch.zeros(T, num_groups, dtype=torch.bool, device=logits_TE.device)
    keep_TG.scatter_(1, groups_TJ, True)
    masked_TE = scores_TE.masked_fill(~keep_TG.repeat_interleave(per_group, dim=1), float("-inf"))
    _, ids_TK = _topk_stable(masked_TE, k)
    return Routing(_gate_weights(probs_TE, ids_TK, router_scale_E, renormalize), ids_TK, probs_TE)


# Balancing losses ------------------------------------------------------------------------------
def expert_counts(expert_ids_TK: Tensor, num_experts: int) -> Tensor:
    """How many (token, expert) assignments each expert received. int64 [E], no host sync."""
    return _expert_counts(expert_ids_TK, num_experts)


def batch_aux_loss(probs_TE: Tensor, expert_ids_TK: Tensor) -> Tensor:
    """Paper Eq. 8 without alpha: sum_i f_i * p_i over the whole batch, where
    f_i = N / (K*T) * count_i and p_i = mean_t S_{i,t} (global softmax, before selection).
    Equals 1 when selection and probabilities are both uniform."""
    T, E = probs_TE.shape
    K = expert_ids_TK.shape[-1]
    f_E = expert_counts(expert_ids_TK, E).to(probs_TE.dtype) * (E / (K * T))
    p_E = probs_TE.mean(0)
    return (f_E * p_E).sum()


def sequence_aux_loss(probs_BSE: Tensor, expert_ids_BSK: Tensor) -> Tensor:
    """Sequence-level variant: Eq. 8 computed inside each sequence, averaged over sequences."""
    B, S, E = probs_BSE.shape
    K = expert_ids_BSK.shape[-1]
    ids_BX = expert_ids_BSK.reshape(B, S * K)
    counts_BE = torch.zeros(B, E, device=probs_BSE.device, dtype=probs_BSE.dtype)
    counts_BE.scatter_add_(1, ids_BX, torch.ones(ids_BX.shape, device=probs_BSE.device, dtype=probs_BSE.dtype))
    f_BE = counts_BE * (E / (K * S))
    p_BE = probs_BSE.mean(1)
    return (f_BE * p_BE).sum(-1).mean()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (keeps logits small)."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


@torch.no_grad()
def update_expert_bias(expert_bias_E: Tensor, counts_E: Tensor, rate: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3): nudge each expert's selection bias toward the mean
    load, in place. Called by the training loop after the optimizer step, never inside forward."""
    counts = counts_E.float()
    expert_bias_E.add_(rate * torch.sign(counts.mean() - counts))
