"""The LM head's cross-entropy without the whole batch's logits: ops.linear_cross_entropy on the
"chunked" path. Rows go through the head a chunk at a time (a few thousand rows, about 1 GiB of
fp32 logits at most); each chunk's logits live only while its loss and its gradients are made.

Because the loss is a scalar, its gradient is known up to the upstream scale during the forward,
so each chunk's logit gradient (softmax - onehot) / rows is turned into dh and dW at once and the
backward only scales them: the head's GEMMs run 3 times per step, not 4 (no recomputation), and
the peak memory is one chunk. The twin is torch_impl.linear_cross_entropy (tests compare loss and
gradients: tests/test_fused_ops.py).

    loss = ChunkedLinearCE.apply(h_ND, w_VD, targets_N, ignore_index, chunk_rows, ce_chunk, want_grad)

`ce_chunk(logits_RV, targets_R, ignore_index, scale)` returns the rows' losses and, with a scale,
overwrites the logits with their gradient: triton_fused.ce_chunk (one pass) or ce_chunk_torch.

Legend: N rows (tokens), D hidden, V vocabulary, R rows of one chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ce_chunk_torch(logits_RV: Tensor, targets_R: Tensor, ignore_index: int, scale: Tensor | None) -> Tensor:
    """Readable per-chunk cross-entropy (same contract as triton_fused.ce_chunk)."""
    z = logits_RV.float()
    counted = targets_R != ignore_index
    safe = targets_R.clamp_min(0).unsqueeze(1)
    lse = torch.logsumexp(z, dim=-1)
    loss = torch.where(counted, lse - z.gather(1, safe).squeeze(1), torch.zeros_like(lse))
    if scale is not None:
        g = torch.exp(z - lse.unsqueeze(1))
        g.scatter_add_(1, safe, -counted.float().unsqueeze(1))
        g *= torch.where(counted, scale.float(), torch.zeros_like(lse)).unsqueeze(1)
        logits_RV.copy_(g)
    return loss


class ChunkedLinearCE(torch.autograd.Function):
    """mean over counted rows of CE(h @ W^T, targets), chunk by chunk, gradients made in forward."""

    @staticmethod
    def forward(ctx, h_ND: Tensor, w_VD: Tensor, targets_N: Tensor, ignore_index: int, chunk_rows: int,
                ce_chunk, want_grad: bool) -> Tensor:
        N = h_ND.shape[0]
        need_dh, need_dw = want_grad and ctx.needs_input_grad[0], want_grad and ctx.needs_input_grad[1]
        counted = (targets_N != ignore_index).sum().float()  # stays on the device: no host sync
        scale = (1.0 / counted).reshape(1) if (need_dh or need_dw) else None
        losses = torch.empty(N, dtype=torch.float32, device=h_ND.device)
        dh = torch.empty_like(h_ND) if need_dh else None
        dw = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if need_dw else None
        for r0 in range(0, N, chunk_rows):
            h_c = h_ND[r0:r0 + chunk_rows]
            logits = h_c @ w_VD.t()  # [R, V] in the compute dtype (bf16 under autocast)
            losses[r0:r0 + chunk_rows] = ce_chunk(logits, targets_N[r0:r0 + chunk_rows], ignore_index, scale)
            if need_dh:  # logits now hold d loss / d logits
                torch.mm(logits, w_VD, out=dh[r0:r0 + chunk_rows])
            if need_dw:
                dw += logits.t() @ h_c
        ctx.save_for_backward(*(t for t in (dh, dw) if t is not None))
        ctx.has = (need_dh, need_dw)
        ctx.w_dtype = w_VD.dtype
        return losses.sum() / counted

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        saved = iter(ctx.saved_tensors)
        g = grad_loss.float()  # a 0-dim fp32 scale: products keep the tensors' dtypes
        dh = next(saved) * g if ctx.has[0] else None
        dw = (next(saved) * g).to(ctx.w_dtype) if ctx.has[1] else None
        return dh, dw, None, None, None, None, None
