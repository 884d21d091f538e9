"""Expert parallelism applied to a built model from outside: shard the routed experts of every
MoGELayer to this EP rank's groups and swap in a collective dispatcher.

    from mogelm.parallel.expert_parallel import apply_expert_parallel
    apply_expert_parallel(model, ep_process_group)            # dispatcher "auto"
    apply_expert_parallel(model, ep_process_group, "moge_agrs")
    apply_expert_parallel(model, ep_process_group, comm_timer=timer)  # benchmarks: time collectives

EP rank r of P holds groups [r*M/P, (r+1)*M/P), i.e. experts [r*E/P, (r+1)*E/P) (DESIGN.md §4).
Sharded expert parameters are tagged (`is_expert_sharded`) so gradient sync, clipping and
checkpoints know that they are per-rank slices; everything else stays replicated and is
synchronised by data parallel (mogelm.parallel.context).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mogelm.config import ModelConfig
from mogelm.moe.routing import ROUTERS
from mogelm.parallel.dispatchers import CommTimer, make_dispatcher

EXPERT_ATTR = "_mogelm_expert_shard"  # on a Parameter: (ep_rank, ep_size, num_global_experts)


def validate_ep(cfg: ModelConfig, ep_size: int) -> None:
    """Refuse EP sizes the layout cannot hold; pure (no collective), so every rank raises alike."""
    if ep_size < 1:
        raise ValueError(f"EP size must be >= 1, got {ep_size}")
    if not cfg.is_moe:
        if ep_size > 1:
            raise ValueError("expert parallel needs an MoE model (ffn_type='moe'); got a dense model")
        return
    # A router that fills every group equally (MoGE) needs whole groups per rank: its dispatchers
    # send each rank the token's selections from that rank's groups.
    if ROUTERS[cfg.routing].balanced_groups and cfg.num_groups % ep_size:
        raise ValueError(
            f"EP size {ep_size} does not divide num_groups ({cfg.num_groups}): each EP rank must hold "
            f"whole expert groups (group g on rank g // (M / EP))"
        )
    if cfg.num_experts % ep_size:
        raise ValueError(f"EP size {ep_size} does not divide num_experts ({cfg.num_experts})")


def is_expert_sharded(p: torch.Tensor) -> bool:
    return getattr(p, EXPERT_ATTR, None) is not None


def shard_info(p: torch.Tensor) -> tuple[int, int, int] | None:
    """(ep_rank, ep_size, num_global_experts) for an expert-sharded parameter, else None."""
    return getattr(p, EXPERT_ATTR, None)


def apply_expert_parallel(
    model: nn.Module, ep_process_group, dispatcher: str = "auto", comm_timer: CommTimer | None = None
) -> nn.Module:
    """Shard experts of every MoGELayer in `model` over `ep_process_group`; returns `model`.

    Call on every rank of the group, after all ranks hold the same full weights (the shards are
    slices of them). With a group of size 1 nothing changes (the dispatcher stays local).
    `comm_timer` (begin(what) / end(what)) is called around every collective of the dispatchers."""
    layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    if not layers:
        return model
    ep_size = dist.get_world_size(ep_process_group)
    ep_rank = dist.get_rank(ep_process_group)
    cfg = layers[0].cfg
    validate_ep(cfg, ep_size)
    if ep_size == 1:
        return model
    for layer in layers:
        experts = layer.experts
        E = experts.num_experts
        assert E == cfg.num_experts, "experts already sharded?"
        E_loc = E // ep_size
        rows = slice(ep_rank * E_loc, (ep_rank + 1) * E_loc)
        for name in ("gate_up_EFD", "down_EDF"):
            full = getattr(experts, name)
            shard = nn.Parameter(full.detach()[rows].clone(), requires_grad=full.requires_grad)
            setattr(shard, EXPERT_ATTR, (ep_rank, ep_size, E))
            setattr(experts, name, shard)
        experts.num_experts = E_loc
        layer.dispatcher = make_dispatcher(
            dispatcher, ep_process_group, E, cfg.num_experts_per_tok, layer.router, comm_timer
        )
    return model
