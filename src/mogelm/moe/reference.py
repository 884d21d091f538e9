"""The loop-over-experts oracle: the dumbest correct MoE, used only by tests.

It rebuilds each expert as plain matmuls from the stacked weights and adds every (token, expert)
contribution one expert at a time. No sorting, no offsets, no grouped GEMM: if a kernel and this
disagree, the kernel is wrong.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def reference_routed_experts(
    x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor, gate_up_EFD: Tensor, down_EDF: Tensor
) -> Tensor:
    """y[t] = sum_k weights[t,k] * expert_{ids[t,k]}(x[t])."""
    E = gate_up_EFD.shape[0]
    F_ = gate_up_EFD.shape[1] // 2
    y_TD = torch.zeros_like(x_TD)
    for e in range(E):
        token_idx, slot_idx = torch.nonzero(expert_ids_TK == e, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        x = x_TD[token_idx]
        gate = x @ gate_up_EFD[e, :F_].t()
        up = x @ gate_up_EFD[e, F_:].t()
        out = (F.silu(gate) * up) @ down_EDF[e].t()
        w = weights_TK[token_idx, slot_idx].unsqueeze(-1).to(out.dtype)
        y_TD = y_TD.index_add(0, token_idx, w * out)
    return y_TD


def reference_moge_route(
    logits_TE: Tensor, num_groups: int, k_per_group: int, router_scale_E: Tensor | None = None
):
    """MoGE routing written token by token, group by group (paper Eq. 5-6)."""
    T, E = logits_TE.shape
    per_group = E // num_groups
    probs = torch.softmax(logits_TE.double(), dim=-1)
    ids, weights = [], []
    for t in range(T):
        row_ids, row_w = [], []
        for g in range(num_groups):
            block = probs[t, g * per_group:(g + 1) * per_group].tolist()
            # highest first; equal values keep the lower expert id first
            order = sorted(range(per_group), key=lambda i: (-block[i], i))[:k_per_group]
            for i in order:
                e = g * per_group + i
                scale = 1.0 if router_scale_E is None else float(router_scale_E.reshape(-1)[e])
                row_ids.append(e)
                row_w.append(block[i] * scale)
        ids.append(row_ids)
        weights.append(row_w)
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(ids), probs
