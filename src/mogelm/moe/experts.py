"""Expert MLPs. Experts never route: they take the routing decision as input, so tests and the
expert-parallel dispatcher can hand them any routing (balanced, skewed, experts with no rows).

Legend: T tokens, D hidden, F expert width, E experts (local experts under expert parallel),
K experts per token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mogelm.kernels import ops


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases. Used for the shared expert and the dense baseline.
    Parameter names follow the Pangu/HF checkpoint (gate_proj, up_proj, down_proj)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))  # silu(g) * u

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.gate_proj.weight, std=std)
        nn.init.normal_(self.up_proj.weight, std=std)
        nn.init.normal_(self.down_proj.weight, std=out_std)


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as stacked tensors ([out, in] per expert, like nn.Linear):
        gate_up_EFD [E, 2F, D]  (gate rows first, then up rows)
        down_EDF    [E, D, F]
    forward(x_TD, weights_TK, expert_ids_TK) -> y_TD with expert ids in [0, E)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_EFD = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_EDF = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor) -> Tensor:
        return ops.routed_experts(x_TD, weights_TK, expert_ids_TK, self.gate_up_EFD, self.down_EDF)

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.gate_up_EFD, std=std)
        nn.init.normal_(self.down_EDF, std=out_std)

    def extra_repr(self) -> str:
        E, F2, D = self.gate_up_EFD.shape
        return f"num_experts={E}, hidden={D}, width={F2 // 2}"


def output_std(std: float, num_layers: int) -> float:
    """GPT-2 style: residual-branch output projections start smaller with depth."""
    return std / math.sqrt(2 * num_layers)
