"""MoGELayer: the MoE feed-forward block of Pangu Pro MoE, with top-k and group-limited baselines.

    x_TD ──► gate (Linear D->E, no bias) ──► logits_TE
               │                              │ router (built from cfg.routing, moe/routing.py):
               │                              │   MoGE | top-k | softmax-top-k | group-limited
               │                              ▼
               │                  weights_TK, expert_ids_TK, probs_TE ──► aux loss, z-loss, counts
               ▼
          dispatcher.dispatch ──► experts (stacked SwiGLU, grouped GEMM) ──► dispatcher.combine
               │                                                               │
               └──────────────► shared_expert (SwiGLU, weight 1) ─────────────(+)──► y_TD

Legend: B sequences, S positions, T = B*S tokens, D hidden, E experts, K experts per token.

Parameter names match the Pangu Pro MoE checkpoint under `model.layers.{l}.mlp.`: `gate.weight`,
`router_scale` [1, E], `shared_expert.{gate,up,down}_proj.weight`; the stacked routed experts are
split into `experts.{e}.*_proj.weight` by mogelm.checkpoint. That is why `router_scale` and the
aux-loss-free `expert_bias_E` buffer live here and are handed to the router (which holds none).

The dispatcher is LocalDispatcher by default; mogelm.parallel swaps in an expert-parallel one
(and shards `experts`) from outside, so this module never touches torch.distributed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from mogelm.config import ModelConfig
from mogelm.kernels import ops
from mogelm.moe import routing as R
from mogelm.moe.dispatch import Dispatcher, LocalDispatcher
from mogelm.moe.experts import RoutedExperts, SwiGLU, output_std


class MoEStats(NamedTuple):
    """What one MoE layer reports for one forward (all detached except the losses)."""

    counts_E: Tensor  # int64 [E] rows per expert in this batch
    aux_loss: Tensor  # scalar, alpha already applied (0 when disabled)
    z_loss: Tensor  # scalar, coefficient already applied (0 when disabled)
    expert_ids_TK: Tensor  # int64 [T, K] the selection, for load analyses
    probs_mean_E: Tensor  # fp32 [E] mean global-softmax probability (p_i of Eq. 8); differentiable


class MoGELayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.num_experts
        self.gate = nn.Linear(cfg.hidden_size, E, bias=False)
        self.router_scale = nn.Parameter(torch.ones(1, E)) if cfg.router_scale else None
        # Aux-loss-free balancing: selection-only bias, updated by the training loop (not autograd).
        self.register_buffer("expert_bias_E", torch.zeros(E) if cfg.aux_free_bias else None)
        self.router = R.build_router(cfg)
        self.experts = RoutedExperts(E, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_expert = (
            SwiGLU(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            if cfg.shared_expert_intermediate_size > 0
            else None
        )
        self.dispatcher: Dispatcher = LocalDispatcher()
        # Inference that needs no routing statistics (the engine on CUDA: inference/fuse.py) sets this
        # False: forward then returns (y, None) in eval mode, five small launches a layer fewer.
        self.record_stats = True

    def reset_parameters(self, std: float | None = None, out_std: float | None = None) -> None:
        std = self.cfg.init_std if std is None else std
        out_std = output_std(self.cfg.init_std, self.cfg.num_layers) if out_std is None else out_std
        nn.init.normal_(self.gate.weight, std=std)
        if self.router_scale is not None:
            nn.init.ones_(self.router_scale)
        if self.expert_bias_E is not None:
            self.expert_bias_E.zero_()
        self.experts.reset_parameters(std, out_std)
        if self.shared_expert is not None:
            self.shared_expert.reset_parameters(std, out_std)

    def forward(self, x: Tensor) -> tuple[Tensor, MoEStats | None]:
        """x [..., D] (e.g. [B, S, D]) -> (y of the same shape, MoEStats; None in eval mode with
        record_stats off)."""
        cfg = self.cfg
        lead = x.shape[:-1]
        x_TD = x.reshape(-1, x.shape[-1])

        logits_TE = self.gate(x_TD)
        routing = self.router(logits_TE, self.router_scale, self.expert_bias_E)

        x_RD, weights_RK, ids_RK, ctx = self.dispatcher.dispatch(
            x_TD, routing.weights_TK, routing.expert_ids_TK
        )
        y_RD = self.experts(x_RD, weights_RK, ids_RK)
        y_TD = self.dispatcher.combine(y_RD, ctx)
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD)
        if not (self.record_stats or self.training):
            return y_TD.reshape(*lead, -1), None

        ids_TK = routing.expert_ids_TK.detach()
        T, K = ids_TK.shape
        counts_E = ops.expert_counts(ids_TK, cfg.num_experts)
        probs_mean_E = routing.probs_TE.mean(0)
        zero = logits_TE.new_zeros((), dtype=torch.float32)
        aux = zero
        if self.training and cfg.aux_loss_alpha > 0 and cfg.aux_loss_type != "none":
            if cfg.aux_loss_type == "batch":
                aux = cfg.aux_loss_alpha * R.batch_aux_loss_from_counts(counts_E, probs_mean_E, T, K)
            else:
                seq_shape = (-1, lead[-1]) if len(lead) > 1 else (1, -1)
                aux = cfg.aux_loss_alpha * R.sequence_aux_loss(
                    routing.probs_TE.reshape(*seq_shape, cfg.num_experts),
                    ids_TK.reshape(*seq_shape, K),
                )
        z = cfg.z_loss_coef * R.router_z_loss(logits_TE) if self.training and cfg.z_loss_coef > 0 else zero
        return y_TD.reshape(*lead, -1), MoEStats(counts_E, aux, z, ids_TK, probs_mean_E)
