"""Dispatchers move routed rows to where their experts live and back.

    dispatch(x_TD, weights_TK, expert_ids_TK) -> (x_RD, weights_RK, local_ids_RK, ctx)
    combine(y_RD, ctx) -> y_TD

R is whatever the experts see: here the same T tokens; under expert parallel, the rows this rank
received (mogelm.parallel implements the same interface with collectives). Expert ids come out
in the local numbering of the experts this dispatcher's rank holds.

`LocalDispatcher` is the single-process case: every expert is local, nothing moves. The permute
into expert order happens inside the expert kernel (kernels/ops.routed_experts), where it can be
fused with the GEMMs.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor


class Dispatcher(Protocol):
    def dispatch(
        self, x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Any]: ...

    def combine(self, y_RD: Tensor, ctx: Any) -> Tensor: ...


class LocalDispatcher:
    """All experts on this process: identity dispatch and combine."""

    def dispatch(
        self, x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, None]:
        return x_TD, weights_TK, expert_ids_TK, None

    def combine(self, y_RD: Tensor, ctx: None) -> Tensor:
        return y_RD
