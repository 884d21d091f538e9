"""Expert-parallel dispatchers: the `mogelm.moe.dispatch.Dispatcher` interface over collectives.

    dispatch(x_TD, weights_TK, expert_ids_TK) -> (x_RD, weights_RK, local_ids_RK, ctx)
    combine(y_RD, ctx) -> y_TD

EP rank j of an expert-parallel process group of size P holds experts [j*E_loc, (j+1)*E_loc),
E_loc = E/P; for MoGE that is groups [j*M/P, (j+1)*M/P). Three dispatchers; `make_dispatcher`
picks one from the router's `balanced_groups` (does every expert group get exactly T*K' rows?):

  MoGEAllToAll      MoGE only (balanced groups). Every token has exactly Kr = K/P selections on
                    every rank (the MoGE column slice [:, j*Kr:(j+1)*Kr] lies in rank j's
                    groups), so each rank sends every token once to every rank with its Kr
                    (weight, local id) pairs:
                    equal-split all_to_all_single, fixed shapes [P*T, D], no count exchange, no
                    capacity factor, no dropped token, no host sync (CUDA-graph capturable).
  MoGEAllGather     MoGE only, the paper's inference layout (PAPER.md §6.1): all-gather tokens
                    and routing -> local experts on all P*T tokens -> reduce-scatter the partial
                    sums. Same bytes as the all-to-all (every token goes to every rank anyway);
                    also static and sync-free.
  TopKAllToAll      any routing (the top-k baseline). Count exchange (all_to_all of P counts,
                    then a host sync for the split sizes), then variable-split all_to_all of the
                    (token, rank) pairs a token actually uses, each sent once. Dropless.

Every dispatcher is differentiable: the collectives below are autograd Functions whose backward
is the adjoint collective (all_to_all <-> all_to_all with swapped splits, all_gather <->
reduce_scatter). All ranks of the process group must call dispatch/combine together; the MoGE
dispatchers also need the same T on every rank (pad decode batches, as vLLM-Ascend does).

Timing: every dispatcher takes an optional `comm_timer`, an object with begin(what) / end(what)
that is called around each of its collectives, backward ones included (benchmarks use it to
split communication from compute); None (the default) times nothing.

Legend: T tokens on this rank, D hidden, K experts per token, P EP ranks, Kr = K/P selections a
MoGE token has on each rank, R rows this rank's experts receive, A (token, expert) assignments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from mogelm.moe.routing import ROUTERS, Router

# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single and made the old
# names warn (a FutureWarning per call, on every rank); older torch (2.11 on the GPU machine) has
# only the old names. Same arguments, same semantics.
all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CollectiveError(RuntimeError):
    """A collective failed: a peer rank died, timed out, or disagrees on shapes."""


class CommTimer(Protocol):
    def begin(self, what: str) -> None: ...

    def end(self, what: str) -> None: ...


def describe_failure(e: BaseException) -> str:
    """One line for an exception that ended a distributed step: a CollectiveError's own message,
    or, for an error raised inside torch (FSDP2's all-gathers and reduce-scatters run in module
    hooks, outside our collectives), the same kind of message around the backend's first line."""
    if isinstance(e, CollectiveError):
        return str(e).splitlines()[0]
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    where = f"rank {dist.get_rank()}/{dist.get_world_size()}" if dist.is_initialized() else "this rank"
    if isinstance(e, (RuntimeError, dist.DistError)):
        return (f"a collective failed on {where}: a peer rank probably died, timed out or ran a different "
                f"step. Backend said: {first}")
    return f"{type(e).__name__} on {where}: {first}"


def _run(fn, what: str, process_group, timer: CommTimer | None = None) -> None:
    """Run one collective (inside timer.begin/end when a timer is given), turning backend errors
    into a message that names the cause."""
    try:
        if timer is None:
            fn()
        else:
            timer.begin(what)
            fn()
            timer.end(what)
    except CollectiveError:
        raise
    except (RuntimeError, dist.DistError) as e:
        rank, world = dist.get_rank(), dist.get_world_size()
        raise CollectiveError(
            f"expert-parallel {what} failed on rank {rank}/{world} (group size "
            f"{dist.get_world_size(process_group)}): a peer rank probably died, timed out or called with "
            f"different shapes. Backend said: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e


# Differentiable collectives ------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """all_to_all_single; splits None = equal. Backward: the same collective with splits swapped."""

    @staticmethod
    def forward(ctx, x, process_group, in_splits, out_splits, timer):
        ctx.process_group, ctx.timer = process_group, timer
        ctx.in_splits, ctx.out_splits = in_splits, out_splits
        x = x.contiguous()
        rows = x.shape[0] if out_splits is None else sum(out_splits)
        out = x.new_empty((rows, *x.shape[1:]))
        _run(lambda: dist.all_to_all_single(out, x, out_splits, in_splits, group=process_group), "all_to_all",
             process_group, timer)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_x = _AllToAll.apply(grad, ctx.process_group, ctx.out_splits, ctx.in_splits, ctx.timer)
        return grad_x, None, None, None, None


class _AllGather(torch.autograd.Function):
    """[T, ...] on each of P ranks -> [P*T, ...] (rank order). Backward: reduce-scatter (sum)."""

    @staticmethod
    def forward(ctx, x, process_group, timer):
        ctx.process_group, ctx.timer = process_group, timer
        P = dist.get_world_size(process_group)
        out = x.new_empty((P * x.shape[0], *x.shape[1:]))
        _run(lambda: all_gather_tensor(out, x.contiguous(), group=process_group), "all_gather",
             process_group, timer)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _ReduceScatter.apply(grad, ctx.process_group, ctx.timer), None, None


class _ReduceScatter(torch.autograd.Function):
    """[P*T, ...] -> sum over ranks of block `rank` [T, ...]. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, process_group, timer):
        ctx.process_group, ctx.timer = process_group, timer
        P = dist.get_world_size(process_group)
        out = x.new_empty((x.shape[0] // P, *x.shape[1:]))
        _run(lambda: reduce_scatter_tensor(out, x.contiguous(), group=process_group), "reduce_scatter",
             process_group, timer)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllGather.apply(grad, ctx.process_group, ctx.timer), None, None


def all_to_all(
    x: Tensor,
    process_group,
    in_splits: list[int] | None = None,
    out_splits: list[int] | None = None,
    timer: CommTimer | None = None,
) -> Tensor:
    return _AllToAll.apply(x, process_group, in_splits, out_splits, timer)


def all_gather(x: Tensor, process_group, timer: CommTimer | None = None) -> Tensor:
    return _AllGather.apply(x, process_group, timer)


def reduce_scatter(x: Tensor, process_group, timer: CommTimer | None = None) -> Tensor:
    return _ReduceScatter.apply(x, process_group, timer)


def _pack_routing(weights_TK: Tensor, local_ids_TK: Tensor) -> Tensor:
    """weights and (small, exact in fp32) local ids side by side: one collective instead of two."""
    dtype = torch.promote_types(weights_TK.dtype, torch.float32)
    return torch.cat([weights_TK.to(dtype), local_ids_TK.to(dtype)], dim=-1)


def _unpack_routing(meta_RK2: Tensor) -> tuple[Tensor, Tensor]:
    weights_RK, ids_RK = meta_RK2.chunk(2, dim=-1)
    return weights_RK, ids_RK.detach().round().long()


# MoGE: equal-split all-to-all ----------------------------------------------------------------------
@dataclass
class _MoGECtx:
    num_tokens: int


class MoGEAllToAll:
    """Fixed-shape MoGE dispatcher (equal-split all_to_all_single); see the module docstring."""

    def __init__(
        self, process_group, num_experts: int, num_experts_per_tok: int, comm_timer: CommTimer | None = None
    ):
        self.process_group, self.comm_timer = process_group, comm_timer
        self.ep_size = dist.get_world_size(process_group)
        assert num_experts % self.ep_size == 0 and num_experts_per_tok % self.ep_size == 0
        self.experts_per_rank = num_experts // self.ep_size
        self.k_per_rank = num_experts_per_tok // self.ep_size

    def _local_ids_PTK(self, expert_ids_TK: Tensor) -> Tensor:
        # Column block j holds rank j's groups; shift to rank j's local numbering.
        T = expert_ids_TK.shape[0]
        ids_PTK = expert_ids_TK.view(T, self.ep_size, self.k_per_rank).transpose(0, 1)
        rank_P11 = torch.arange(self.ep_size, device=expert_ids_TK.device).view(-1, 1, 1)
        base_P11 = rank_P11 * self.experts_per_rank
        return ids_PTK - base_P11

    def dispatch(self, x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor):
        T, D = x_TD.shape
        P, Kr = self.ep_size, self.k_per_rank
        weights_PTK = weights_TK.view(T, P, Kr).transpose(0, 1)
        meta_PTK2 = _pack_routing(weights_PTK, self._local_ids_PTK(expert_ids_TK))
        # Every token goes once to every rank: block j of the send buffer is for rank j.
        x_RD = all_to_all(x_TD.unsqueeze(0).expand(P, T, D).reshape(P * T, D), self.process_group,
                          timer=self.comm_timer)
        meta_RK2 = all_to_all(meta_PTK2.reshape(P * T, 2 * Kr), self.process_group, timer=self.comm_timer)
        weights_RK, local_ids_RK = _unpack_routing(meta_RK2)
        return x_RD, weights_RK, local_ids_RK, _MoGECtx(T)

    def combine(self, y_RD: Tensor, ctx: _MoGECtx) -> Tensor:
        # Block j of the result is rank j's partial sum over its Kr experts for our T tokens.
        P, T = self.ep_size, ctx.num_tokens
        y_PTD = all_to_all(y_RD, self.process_group, timer=self.comm_timer).view(P, T, -1)
        return y_PTD.sum(0)


class MoGEAllGather(MoGEAllToAll):
    """MoGE all-gather -> local experts -> reduce-scatter (the paper's inference layout)."""

    def dispatch(self, x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor):
        T, _ = x_TD.shape
        rank = dist.get_rank(self.process_group)
        cols = slice(rank * self.k_per_rank, (rank + 1) * self.k_per_rank)
        x_RD = all_gather(x_TD, self.process_group, self.comm_timer)  # [P*T, D], tokens of rank 0, 1, ...
        meta_RK2 = all_gather(_pack_routing(weights_TK, expert_ids_TK), self.process_group, self.comm_timer)
        K = expert_ids_TK.shape[1]
        # Keep our column block; the gradient flows back only through those columns.
        weights_RK = meta_RK2[:, cols]
        ids_RK = meta_RK2[:, K + cols.start : K + cols.stop].detach().round().long()
        local_ids_RK = ids_RK - rank * self.experts_per_rank
        return x_RD, weights_RK, local_ids_RK, _MoGECtx(T)

    def combine(self, y_RD: Tensor, ctx: _MoGECtx) -> Tensor:
        return reduce_scatter(y_RD, self.process_group, self.comm_timer)


# Top-k: count exchange + variable-split all-to-all -------------------------------------------------
@dataclass
class _TopKCtx:
    num_tokens: int
    send_token_S: Tensor  # token index of each sent row, rank-major order
    recv_row_A: Tensor  # received row of each local assignment
    num_recv: int
    in_splits: list[int]
    out_splits: list[int]


class TopKAllToAll:
    """Dropless variable-split dispatcher for any routing; see the module docstring.

    A token sends one row to each rank that holds at least one of its K experts; the receiver
    expands rows to (row, expert) assignments, so experts see R = A rows with K = 1."""

    def __init__(self, process_group, num_experts: int, comm_timer: CommTimer | None = None):
        self.process_group, self.comm_timer = process_group, comm_timer
        self.ep_size = dist.get_world_size(process_group)
        assert num_experts % self.ep_size == 0
        self.experts_per_rank = num_experts // self.ep_size

    def dispatch(self, x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor):
        T, K = expert_ids_TK.shape
        P, E_loc = self.ep_size, self.experts_per_rank
        dest_TK = expert_ids_TK // E_loc
        uses_PT = (dest_TK.unsqueeze(0) == torch.arange(P, device=x_TD.device).view(P, 1, 1)).any(-1)
        # Count exchange: how many rows each rank sends to each rank. The .tolist() is the host sync.
        send_counts_P = uses_PT.sum(1)
        recv_counts_P = torch.empty_like(send_counts_P)
        _run(
            lambda: dist.all_to_all_single(recv_counts_P, send_counts_P, group=self.process_group),
            "count exchange", self.process_group, self.comm_timer,
        )
        in_splits, out_splits = send_counts_P.tolist(), recv_counts_P.tolist()

        dest_S, token_S = uses_PT.nonzero(as_tuple=True)  # rank-major: rows for rank 0 first
        # Each row carries all K (weight, local id) pairs; slots for other ranks get id -1.
        on_dest_SK = dest_TK.index_select(0, token_S) == dest_S.unsqueeze(-1)
        shifted_SK = expert_ids_TK.index_select(0, token_S) - dest_S.unsqueeze(-1) * E_loc
        local_SK = torch.where(on_dest_SK, shifted_SK, -1)
        weights_SK = weights_TK.index_select(0, token_S) * on_dest_SK
        x_recv = all_to_all(
            x_TD.index_select(0, token_S), self.process_group, in_splits, out_splits, self.comm_timer
        )
        meta_recv = all_to_all(_pack_routing(weights_SK, local_SK), self.process_group, in_splits, out_splits,
                               self.comm_timer)
        weights_recv, ids_recv = _unpack_routing(meta_recv)

        row_A, slot_A = (ids_recv >= 0).nonzero(as_tuple=True)
        x_AD = x_recv.index_select(0, row_A)
        weights_A1 = weights_recv[row_A, slot_A].unsqueeze(-1)
        ids_A1 = ids_recv[row_A, slot_A].unsqueeze(-1)
        ctx = _TopKCtx(T, token_S, row_A, x_recv.shape[0], in_splits, out_splits)
        return x_AD, weights_A1, ids_A1, ctx

    def combine(self, y_AD: Tensor, ctx: _TopKCtx) -> Tensor:
        y_recv = y_AD.new_zeros(ctx.num_recv, y_AD.shape[1]).index_add(0, ctx.recv_row_A, y_AD)
        y_SD = all_to_all(y_recv, self.process_group, ctx.out_splits, ctx.in_splits, self.comm_timer)
        return y_SD.new_zeros(ctx.num_tokens, y_SD.shape[1]).index_add(0, ctx.send_token_S, y_SD)


DISPATCHERS = ("auto", "moge_a2a", "moge_agrs", "topk_a2a")


def make_dispatcher(
    kind: str,
    process_group,
    num_experts: int,
    num_experts_per_tok: int,
    router: Router | str,
    comm_timer: CommTimer | None = None,
):
    """Build a dispatcher by name for the layer's `router` (or its ModelConfig.routing name).
    Only the router's `balanced_groups` matters: "does every expert group receive exactly T*K'
    rows?" (MoGE). "auto" then picks moge_a2a, otherwise topk_a2a; the MoGE dispatchers are
    refused for a router without it."""
    balanced_groups = (ROUTERS[router] if isinstance(router, str) else router).balanced_groups
    if kind == "auto":
        kind = "moge_a2a" if balanced_groups else "topk_a2a"
    if kind in ("moge_a2a", "moge_agrs") and not balanced_groups:
        raise ValueError(
            f"dispatcher {kind!r} needs MoGE routing (every expert group receiving exactly T*K' rows); "
            "use topk_a2a"
        )
    if kind == "moge_a2a":
        return MoGEAllToAll(process_group, num_experts, num_experts_per_tok, comm_timer)
    if kind == "moge_agrs":
        return MoGEAllGather(process_group, num_experts, num_experts_per_tok, comm_timer)
    if kind == "topk_a2a":
        return TopKAllToAll(process_group, num_experts, comm_timer)
    raise ValueError(f"unknown dispatcher {kind!r}; choose one of {DISPATCHERS}")
