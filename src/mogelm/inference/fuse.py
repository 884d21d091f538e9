"""Load-time fusions for inference: fewer, larger kernels in the decode step. Applied to a loaded
model from outside (as quantisation is); checkpoints keep their q_proj / k_proj / v_proj and
gate_proj / up_proj names because the fused modules exist only in memory.

    from mogelm.inference.fuse import fuse_for_inference
    fuse_for_inference(model)       # the Engine does this on CUDA; idempotent

What it does, per block:
  - q/k/v projections -> FusedQKV: one GEMM over the concatenated [q; k; v] weights (no bias),
    then ops.qkv_bias_rope (bias + rotate-half RoPE + split, one Triton launch on CUDA). The model's
    Attention calls `qkv_proj(x, cos, sin)` when it is set (model.py).
  - the shared expert (SwiGLU gate/up/down) -> FusedSwiGLU: one GEMM over [gate; up], then SwiGLU
    (with e4m3 weights: one Triton launch with SwiGLU in the epilogue, ops.linear_fp8_swiglu), then
    down. MoGELayer calls `shared_expert(x)` whatever it holds.
  - MoE layers skip their routing statistics in eval mode (MoGELayer.record_stats = False), unless
    fuse_for_inference(model, stats=True).
Both work with nn.Linear and with quant.Fp8Linear projections (concatenating e4m3 rows and their
per-row scales), so fusing after quantize_model keeps the fp8 weights. The residual add + RMSNorm
fusion needs no transform: Block calls ops.add_rms_norm, fused on CUDA.

Numerics: the concatenated GEMM computes the same dot products as the three separate ones; on CUDA
the fused epilogues round once (fp32 inside), so logits agree with the unfused model to bf16
rounding (tests/test_infer_kernels.py). Do not save a fused model: `save_pretrained` expects the
checkpoint's module names (unfuse first or save before fusing).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mogelm.kernels import ops
from mogelm.model import Attention, Transformer
from mogelm.moe.experts import SwiGLU
from mogelm.quant import Fp8Linear


def _concat_linears(linears: list[nn.Module]) -> tuple[nn.Module, Tensor | None]:
    """One projection (no bias) whose output rows are the given projections' rows in order, and
    their biases concatenated (None when none has one). nn.Linear or Fp8Linear, not mixed."""
    first = linears[0]
    biases = [m.bias for m in linears]
    ref = next((b for b in biases if b is not None), None)
    bias = None if ref is None else torch.cat([
        b.detach() if b is not None else torch.zeros(m.out_features, dtype=ref.dtype, device=ref.device)
        for m, b in zip(linears, biases)])
    out_features = sum(m.out_features for m in linears)
    if all(isinstance(m, Fp8Linear) for m in linears):
        if len({m.activations for m in linears}) != 1:
            raise ValueError("cannot fuse fp8 projections with different activation modes")
        fused = Fp8Linear(first.in_features, out_features, bias=False, activations=first.activations,
                          device="meta")
        fused.weight = nn.Parameter(torch.cat([m.weight for m in linears]), requires_grad=False)
        fused.weight_scale = nn.Parameter(torch.cat([m.weight_scale for m in linears]), requires_grad=False)
        return fused, bias
    if all(type(m) is nn.Linear for m in linears):
        w = first.weight
        fused = nn.Linear(first.in_features, out_features, bias=False, device="meta", dtype=w.dtype)
        fused.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]),
                                    requires_grad=w.requires_grad)
        return fused, bias
    raise ValueError(f"cannot fuse projections of types {sorted({type(m).__name__ for m in linears})}")


class FusedQKV(nn.Module):
    """q/k/v projections of one Attention as one GEMM + one bias/RoPE/split kernel:
    forward(x [B, T, D], cos, sin [B, T, hd]) -> q [B, H, T, hd], k, v [B, Hkv, T, hd] (RoPE on q, k).
    `proj` holds the [q; k; v] rows ([(H + 2 Hkv) hd, D], nn.Linear or Fp8Linear, no bias);
    `bias` [(H + 2 Hkv) hd] is added in the kernel."""

    def __init__(self, proj: nn.Module, bias: Tensor | None, num_heads: int, num_kv_heads: int):
        super().__init__()
        self.proj, self.num_heads, self.num_kv_heads = proj, num_heads, num_kv_heads
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_attention(cls, attn: Attention) -> FusedQKV:
        proj, bias = _concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        return cls(proj, bias, attn.num_heads, attn.num_kv_heads)

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        qkv_BTC = self.proj(x_BTD)
        return ops.qkv_bias_rope(qkv_BTC, self.bias, cos, sin, self.num_heads, self.num_kv_heads)


class FusedSwiGLU(nn.Module):
    """A SwiGLU MLP with gate and up in one projection: down(silu(x gate^T) * (x up^T)).
    `gate_up` holds [gate; up] rows ([2F, D], nn.Linear or Fp8Linear, no bias)."""

    def __init__(self, gate_up: nn.Module, down: nn.Module):
        super().__init__()
        self.gate_up, self.down_proj = gate_up, down

    @classmethod
    def from_swiglu(cls, mlp: SwiGLU) -> FusedSwiGLU:
        gate_up, _ = _concat_linears([mlp.gate_proj, mlp.up_proj])
        return cls(gate_up, mlp.down_proj)

    def forward(self, x: Tensor) -> Tensor:
        gu = self.gate_up
        rows = x.numel() // x.shape[-1]
        weight_only = isinstance(gu, Fp8Linear) and \
            ops.resolve_activations(gu.activations, rows, experts=False) == "bf16"
        if weight_only:
            h = ops.linear_fp8_swiglu(x, gu.weight, gu.weight_scale)  # SwiGLU in the GEMM's epilogue
        else:
            h = ops.swiglu_halves(gu(x))  # one kernel over both halves of the fused output
        return self.down_proj(h)


def fuse_qkv(model: Transformer) -> int:
    """Replace every Attention's q/k/v projections by a FusedQKV (in place). Returns how many."""
    n = 0
    for block in model.layers:
        attn = block.self_attn
        if attn.qkv_proj is None and hasattr(attn, "q_proj"):
            attn.qkv_proj = FusedQKV.from_attention(attn)
            del attn.q_proj, attn.k_proj, attn.v_proj
            n += 1
    return n


def fuse_shared_experts(model: Transformer) -> int:
    """Replace every MoE layer's shared expert (SwiGLU) by a FusedSwiGLU (in place)."""
    n = 0
    for layer in model.moe_layers():
        if isinstance(layer.shared_expert, SwiGLU):
            layer.shared_expert = FusedSwiGLU.from_swiglu(layer.shared_expert)
            n += 1
    return n


def fuse_for_inference(model: Transformer, stats: bool = False) -> Transformer:
    """Every fusion above, in place (idempotent); with stats=False the MoE layers also stop
    computing routing statistics in eval mode (MoGELayer.record_stats: the engine never reads them,
    and they cost five small launches a layer). Returns the model."""
    with torch.no_grad():
        fuse_qkv(model)
        fuse_shared_experts(model)
    for layer in model.moe_layers():
        layer.record_stats = stats
    return model


def is_fused(model: Transformer) -> bool:
    return any(b.self_attn.qkv_proj is not None for b in model.layers)
