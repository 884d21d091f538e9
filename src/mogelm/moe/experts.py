"""Expert MLPs. Experts never route: they take the routing decision as input, so tests and the
expert-parallel dispatcher can hand them any routing (balanced, skewed, experts with no rows).
Fp8RoutedExperts is the inference twin of RoutedExperts with e4m3 weights (mogelm.quant swaps it
in from outside the model).

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


def keep_fp8_storage(module: nn.Module, fn, recurse: bool = True) -> nn.Module:
    """nn.Module._apply for modules holding e4m3 weights and fp32 scales: `fn` may move them
    (`.to(device)`, `.cuda()`, `to_empty`) but never change their dtype. `model.to(torch.bfloat16)`
    would otherwise cast the e4m3 codes to bf16 numbers and lose the scales' precision; the other
    tensors of the module (e.g. a bias) follow `fn` as usual."""
    keep = {name: t.dtype for name, t in module.named_parameters(recurse=False)
            if t.dtype == torch.float8_e4m3fn or "scale" in name}
    nn.Module._apply(module, fn, recurse)
    for name, dtype in keep.items():
        p = module._parameters[name]
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    return module


class Fp8RoutedExperts(nn.Module):
    """RoutedExperts for inference with e4m3 weights and fp32 per-output-channel scales:
        gate_up_EFD [E, 2F, D] e4m3,  gate_up_scale_EF [E, 2F] fp32   (w = q * scale[..., None])
        down_EDF    [E, D, F]  e4m3,  down_scale_ED    [E, D]  fp32
    Same forward contract as RoutedExperts. activations="bf16" is weight-only (activations keep x's
    dtype; the decode default: half the bytes of bf16 at the same launches), "fp8" is W8A8 (x and the
    SwiGLU output rounded to e4m3 per token: faster for prefill-sized batches on the GPU). No
    gradients: the tensors are parameters with requires_grad=False so that state_dict, `.to(device)`
    and parameter counts see them; `.to(dtype)` leaves them as they are (keep_fp8_storage)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 activations: str = "bf16", device=None):
        super().__init__()
        if activations not in ops.FP8_ACTIVATIONS:
            raise ValueError(f"activations must be one of {ops.FP8_ACTIVATIONS}, got {activations!r}")
        self.num_experts, self.activations = num_experts, activations
        E, F2, D = num_experts, 2 * intermediate_size, hidden_size

        def frozen(*shape, dtype):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.gate_up_EFD = frozen(E, F2, D, dtype=torch.float8_e4m3fn)
        self.gate_up_scale_EF = frozen(E, F2, dtype=torch.float32)
        self.down_EDF = frozen(E, D, F2 // 2, dtype=torch.float8_e4m3fn)
        self.down_scale_ED = frozen(E, D, dtype=torch.float32)

    @classmethod
    @torch.no_grad()
    def from_float(cls, experts: RoutedExperts, activations: str = "bf16") -> Fp8RoutedExperts:
        """Quantise a RoutedExperts' weights (per output row, amax / 448) on their device."""
        E, F2, D = experts.gate_up_EFD.shape
        out = cls(E, D, F2 // 2, activations, device="meta")
        guq, gus, dnq, dns = ops.quantize_experts_fp8(experts.gate_up_EFD, experts.down_EDF)
        for name, t in (("gate_up_EFD", guq), ("gate_up_scale_EF", gus), ("down_EDF", dnq),
                        ("down_scale_ED", dns)):
            setattr(out, name, nn.Parameter(t, requires_grad=False))
        return out

    def forward(self, x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor) -> Tensor:
        return ops.routed_experts_fp8(
            x_TD, weights_TK, expert_ids_TK, self.gate_up_EFD, self.gate_up_scale_EF, self.down_EDF,
            self.down_scale_ED, self.activations,
        )

    def _apply(self, fn, recurse=True):
        return keep_fp8_storage(self, fn, recurse)

    def reset_parameters(self, std: float, out_std: float) -> None:
        raise RuntimeError("Fp8RoutedExperts holds quantised weights: initialise a RoutedExperts and "
                           "quantise it (Fp8RoutedExperts.from_float / mogelm.quant.quantize_model)")

    def extra_repr(self) -> str:
        E, F2, D = self.gate_up_EFD.shape
        return f"num_experts={E}, hidden={D}, width={F2 // 2}, fp8 e4m3, activations={self.activations}"
