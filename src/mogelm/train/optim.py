"""AdamW with its two moments stored in bfloat16: half the optimizer memory of torch's AdamW.

    from mogelm.train.optim import AdamWBF16State
    opt = AdamWBF16State(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)

    mogelm train --optim-state-dtype bf16 ...          # what build_optimizer picks for it

The update is torch.optim.AdamW's (decoupled weight decay, bias correction, no amsgrad), computed
in fp32 from the stored moments; only the stored moments are rounded to bf16 after each step. So
a step's update is AdamW's to fp32 rounding when the moments are exact in bf16, and the moments
carry bf16's ~3 significant digits between steps (tests/test_fsdp.py compares it with AdamW).
Parameters stay in their own dtype (fp32 master weights).

Works on plain tensors and on DTensors (FSDP2-sharded parameters): each rank updates its local
shard; the moments are DTensors laid out like their parameter, so distributed checkpoints
(mogelm.parallel.checkpoint) reshard them like any other state.
"""

from __future__ import annotations

import math

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class AdamWBF16State(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"invalid AdamW settings lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                step = state["step"].item()
                param, grad = _local(p), _local(p.grad).float()
                m_bf16, v_bf16 = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
                m = m_bf16.float().lerp_(grad, 1 - beta1)
                v = v_bf16.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m_bf16.copy_(m)
                v_bf16.copy_(v)
                if wd:
                    param.mul_(1 - lr * wd)
                step_size = lr / (1 - beta1**step)
                denom = v.sqrt_().div_(math.sqrt(1 - beta2**step)).add_(eps)
                param.addcdiv_(m.to(param.dtype), denom.to(param.dtype), value=-step_size)
        return loss
