"""Routing: which experts each token uses and with what gate weight, and the balancing losses.

Legend (shape suffixes): T tokens, E routed experts (N), G expert groups (M), K experts per
token, B sequences, S positions in a sequence.

Every router returns a `Routing`:
    weights_TK     fp32 gate weights of the chosen experts
    expert_ids_TK  int64 expert ids; for MoGE column block g*K'..(g+1)*K'-1 lies in group g
    probs_TE       fp32 global softmax over all experts (what the aux loss uses, paper Eq. 8)

The math is in pure functions (like torch.nn.functional); the layer holds a router *module* that
binds one of them to the config, built once by `build_router(cfg)`:
    moge_route           MoGERouter          paper Eq. 5-6: global softmax, top-K' inside every
                                             contiguous group, x router_scale, not renormalised
                                             (Pangu Pro MoE, PAPER.md §1.4)
    topk_route           TopKRouter          paper Eq. 2 baseline: softmax over the top-K logits
    softmax_topk_route   SoftmaxTopKRouter   the common variant: global softmax, then top-K
    group_limited_route  GroupLimitedRouter  DeepSeek-V3: the best `topk_groups` groups, then top-K

A router module holds no tensors: the learned `router_scale` [1, E] and the aux-loss-free
`expert_bias_E` buffer stay on the MoE layer, where the checkpoint names them (`mlp.router_scale`,
`mlp.expert_bias`), and the layer passes them in. Each router class answers one question for the
expert-parallel dispatchers: `balanced_groups`, True when every expert group receives exactly
T*K' rows for any batch (MoGE only), which is what lets them use fixed, equal-split collectives.

Ties break toward the lower expert id everywhere (stable sort), so every backend agrees.
`expert_bias_E` (aux-loss-free balancing) shifts *selection* only, never the gate weights.

Balancing losses: `batch_aux_loss_from_counts` is paper Eq. 8 from expert counts and mean
probabilities; the layer and the expert-parallel statistics hook (which swaps in global-batch
counts) both call it.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from mogelm.config import ModelConfig
from mogelm.kernels import ops


class Routing(NamedTuple):
    weights_TK: Tensor
    expert_ids_TK: Tensor
    probs_TE: Tensor


# Routing math ----------------------------------------------------------------------------------
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
    _, ids_TK = ops.topk_stable(scores, k)
    # Eq. 2 as written: a softmax over the K logits. Renormalising the global probabilities is
    # equal in exact arithmetic, not in floating point, so gate_weights(renormalize=True) is not used.
    weights_TK = torch.softmax(logits_f.gather(-1, ids_TK), dim=-1)
    return Routing(ops.apply_router_scale(weights_TK, ids_TK, router_scale_E), ids_TK, probs_TE)


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
    _, ids_TK = ops.topk_stable(scores, k)
    return Routing(ops.gate_weights(probs_TE, ids_TK, router_scale_E, renormalize), ids_TK, probs_TE)


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
    best2, _ = ops.topk_stable(scores_TGe, min(2, per_group))
    _, groups_TJ = ops.topk_stable(best2.sum(-1), topk_groups)
    keep_TG = torch.zeros(T, num_groups, dtype=torch.bool, device=logits_TE.device)
    keep_TG.scatter_(1, groups_TJ, True)
    masked_TE = scores_TE.masked_fill(~keep_TG.repeat_interleave(per_group, dim=1), float("-inf"))
    _, ids_TK = ops.topk_stable(masked_TE, k)
    return Routing(ops.gate_weights(probs_TE, ids_TK, router_scale_E, renormalize), ids_TK, probs_TE)


# Router modules --------------------------------------------------------------------------------
class Router(nn.Module):
    """logits_TE (+ the layer's router_scale and expert bias) -> Routing. Holds no tensors."""

    # Does every expert group receive exactly T*K' rows, for any batch of T tokens? The
    # expert-parallel dispatchers and EP checks ask this instead of comparing routing names.
    balanced_groups: ClassVar[bool] = False

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Router:
        raise NotImplementedError

    def forward(
        self, logits_TE: Tensor, router_scale_E: Tensor | None = None, expert_bias_E: Tensor | None = None
    ) -> Routing:
        raise NotImplementedError


class MoGERouter(Router):
    """Paper Eq. 5-6 (Pangu Pro MoE): the K' best experts inside every one of the G groups."""

    balanced_groups = True

    def __init__(self, num_groups: int, experts_per_group_per_tok: int = 1, renormalize: bool = False):
        super().__init__()
        self.num_groups, self.experts_per_group_per_tok, self.renormalize = (
            num_groups, experts_per_group_per_tok, renormalize
        )

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> MoGERouter:
        return cls(cfg.num_groups, cfg.experts_per_group_per_tok, cfg.renormalize)

    def forward(self, logits_TE, router_scale_E=None, expert_bias_E=None) -> Routing:
        return moge_route(
            logits_TE, self.num_groups, self.experts_per_group_per_tok, router_scale_E, self.renormalize,
            expert_bias_E,
        )

    def extra_repr(self) -> str:
        return (f"groups={self.num_groups}, k_per_group={self.experts_per_group_per_tok}, "
                f"renormalize={self.renormalize}")


class TopKRouter(Router):
    """Paper Eq. 2 baseline: top-K logits, gate weights a softmax over those K (always sum to 1)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> TopKRouter:
        return cls(cfg.num_experts_per_tok)

    def forward(self, logits_TE, router_scale_E=None, expert_bias_E=None) -> Routing:
        return topk_route(logits_TE, self.k, router_scale_E, expert_bias_E)

    def extra_repr(self) -> str:
        return f"k={self.k}"


class SoftmaxTopKRouter(Router):
    """Global softmax, then the top-K probabilities as gate weights (Mixtral/Qwen-MoE style)."""

    def __init__(self, k: int, renormalize: bool = False):
        super().__init__()
        self.k, self.renormalize = k, renormalize

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> SoftmaxTopKRouter:
        return cls(cfg.num_experts_per_tok, cfg.renormalize)

    def forward(self, logits_TE, router_scale_E=None, expert_bias_E=None) -> Routing:
        return softmax_topk_route(logits_TE, self.k, router_scale_E, self.renormalize, expert_bias_E)

    def extra_repr(self) -> str:
        return f"k={self.k}, renormalize={self.renormalize}"


class GroupLimitedRouter(Router):
    """DeepSeek-V3: keep the best `topk_groups` expert groups per token, then a global top-K."""

    def __init__(self, num_groups: int, topk_groups: int, k: int, renormalize: bool = False):
        super().__init__()
        self.num_groups, self.topk_groups, self.k, self.renormalize = num_groups, topk_groups, k, renormalize

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> GroupLimitedRouter:
        return cls(cfg.num_groups, cfg.topk_groups, cfg.num_experts_per_tok, cfg.renormalize)

    def forward(self, logits_TE, router_scale_E=None, expert_bias_E=None) -> Routing:
        return group_limited_route(
            logits_TE, self.num_groups, self.topk_groups, self.k, router_scale_E, self.renormalize,
            expert_bias_E,
        )

    def extra_repr(self) -> str:
        return (f"groups={self.num_groups}, topk_groups={self.topk_groups}, k={self.k}, "
                f"renormalize={self.renormalize}")


# ModelConfig.routing -> router class (config.ROUTINGS lists the same names).
ROUTERS: dict[str, type[Router]] = {
    "moge": MoGERouter,
    "topk": TopKRouter,
    "softmax_topk": SoftmaxTopKRouter,
    "group_limited": GroupLimitedRouter,
}


def build_router(cfg: ModelConfig) -> Router:
    """The router `cfg.routing` names, with its sizes from the config."""
    return ROUTERS[cfg.routing].from_config(cfg)


# Balancing losses ------------------------------------------------------------------------------
def batch_aux_loss_from_counts(counts_E: Tensor, probs_mean_E: Tensor, num_tokens: int, k: int) -> Tensor:
    """Paper Eq. 8 without alpha: sum_i f_i * p_i, f_i = N / (K*T) * count_i, p_i = mean over the
    T tokens of S_i (global softmax, before selection). counts_E may come from more tokens than
    probs_mean_E (the expert-parallel hook passes global counts and the global T); differentiable
    through probs_mean_E. Equals 1 when selection and probabilities are both uniform."""
    f_E = counts_E.to(probs_mean_E.dtype) * (probs_mean_E.shape[-1] / (k * num_tokens))
    return (f_E * probs_mean_E).sum()


def batch_aux_loss(probs_TE: Tensor, expert_ids_TK: Tensor) -> Tensor:
    """Eq. 8 of one batch from its routing: batch_aux_loss_from_counts of its own counts."""
    T, E = probs_TE.shape
    K = expert_ids_TK.shape[-1]
    return batch_aux_loss_from_counts(ops.expert_counts(expert_ids_TK, E), probs_TE.mean(0), T, K)


def sequence_aux_loss(probs_BSE: Tensor, expert_ids_BSK: Tensor) -> Tensor:
    """Sequence-level variant: Eq. 8 computed inside each sequence, averaged over sequences."""
    B, S, E = probs_BSE.shape
    K = expert_ids_BSK.shape[-1]
    ids_BX = expert_ids_BSK.reshape(B, S * K)
    counts_BE = torch.zeros(B, E, device=probs_BSE.device, dtype=probs_BSE.dtype)
    ones_BX = torch.ones(ids_BX.shape, device=probs_BSE.device, dtype=probs_BSE.dtype)
    counts_BE.scatter_add_(1, ids_BX, ones_BX)
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
