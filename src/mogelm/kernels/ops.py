"""The one import surface for kernels (MoE and paged attention). Layers call these functions; the
backend is chosen here, once, and never at call sites.

Backends:
    "torch"   readable PyTorch (torch._grouped_mm for the expert GEMMs); default on CPU
    "loop"    PyTorch with one matmul pair per expert (slow; any dtype, any alignment)
    "triton"  fused Triton kernels (mogelm.kernels.triton_moe); default on CUDA when available

Choose with `use_backend("loop")` (a context manager, for tests and benchmarks),
`set_backend(...)`, or the environment variable MOGELM_KERNEL_BACKEND.

FP8 inference (e4m3 weights with per-output-channel fp32 scales): `routed_experts_fp8` (Triton
weight-only and W8A8 kernels) and `linear_fp8` (dense layers: torch._scaled_mm W8A8 on CUDA, or
dequantise-then-GEMM), each with a PyTorch twin that rounds where the fast path rounds.

Routing: `moge_route` has a fused Triton kernel and its PyTorch twin. The small helpers the other
routers are built from (`topk_stable`, `gate_weights`, `apply_router_scale`) and `expert_counts`
have one PyTorch implementation on every backend; they are exported here so that callers outside
kernels/ (moe/, analysis/) import nothing else.

Paged attention (the inference engine's KV pool, layout in kernels/attention.py):
`paged_decode_attention` has a split-KV Triton kernel (kernels/triton_attention.py) and its PyTorch
twin; `paged_prefill_attention` (a prompt chunk over its cached prefix) is PyTorch SDPA everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor

from mogelm.kernels import attention as torch_attention
from mogelm.kernels import torch_impl

BACKENDS = ("torch", "loop", "triton")
_override: str | None = None


@functools.cache
def _triton_module():
    """The Triton kernels module, or None when triton (or the module) is unavailable."""
    try:
        return importlib.import_module("mogelm.kernels.triton_moe")
    except ImportError:
        return None


@functools.cache
def _triton_attention_module():
    try:
        return importlib.import_module("mogelm.kernels.triton_attention")
    except ImportError:
        return None


def triton_available() -> bool:
    return _triton_module() is not None


def set_backend(name: str | None) -> None:
    """Force a backend for every call (None restores automatic choice)."""
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    if name == "triton" and not triton_available():
        raise ValueError("the triton backend needs the `triton` package (pip install 'mogelm[triton]')")
    _override = name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolve_backend(x: Tensor) -> str:
    """The backend a call on tensor `x` will use."""
    name = _override or os.environ.get("MOGELM_KERNEL_BACKEND") or None
    if name:
        return name
    if x.is_cuda and triton_available():
        return "triton"
    return "torch"


def routed_experts(
    x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor, gate_up_EFD: Tensor, down_EDF: Tensor
) -> Tensor:
    """Routed SwiGLU experts with gate weights applied and rows combined back to token order.
    x_TD [T, D]; weights_TK fp32 [T, K]; expert_ids_TK int64 [T, K] in [0, E);
    gate_up_EFD [E, 2F, D]; down_EDF [E, D, F]. Returns y_TD [T, D] in x's dtype. Differentiable."""
    backend = resolve_backend(x_TD)
    device_type = x_TD.device.type
    if torch.is_autocast_enabled(device_type):
        # Behave like nn.Linear under autocast: the expert GEMMs run in the autocast dtype (bf16
        # training with fp32 master weights), not in the fp32 of the parameters.
        dtype = torch.get_autocast_dtype(device_type)
        x_TD, gate_up_EFD, down_EDF = x_TD.to(dtype), gate_up_EFD.to(dtype), down_EDF.to(dtype)
    if backend == "triton":
        return _triton_module().routed_experts(x_TD, weights_TK, expert_ids_TK, gate_up_EFD, down_EDF)
    return torch_impl.routed_experts(
        x_TD, weights_TK, expert_ids_TK, gate_up_EFD, down_EDF, use_loop=backend == "loop"
    )


def moge_route(
    logits_TE: Tensor,
    num_groups: int,
    experts_per_group_per_tok: int,
    router_scale_E: Tensor | None = None,
    renormalize: bool = False,
    expert_bias_E: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """MoGE routing -> (weights_TK fp32, expert_ids_TK int64, probs_TE fp32). See torch_impl."""
    if resolve_backend(logits_TE) == "triton" and hasattr(_triton_module(), "moge_route"):
        return _triton_module().moge_route(
            logits_TE, num_groups, experts_per_group_per_tok, router_scale_E, renormalize, expert_bias_E
        )
    return torch_impl.moge_route(
        logits_TE, num_groups, experts_per_group_per_tok, router_scale_E, renormalize, expert_bias_E
    )


# One implementation on every backend (readable PyTorch, no host sync).
topk_stable = torch_impl.topk_stable
gate_weights = torch_impl.gate_weights
apply_router_scale = torch_impl.apply_router_scale
expert_counts = torch_impl.expert_counts


# ----------------------------------------------------------------------------------------------
# FP8 (e4m3) inference: per-output-channel weight scales; activations in x's dtype (weight-only,
# "bf16") or rounded to e4m3 per token (W8A8, "fp8"). Twins in torch_impl (same rounding).
# ----------------------------------------------------------------------------------------------

FP8_ACTIVATIONS = ("bf16", "fp8")  # "bf16": weight-only (activations keep x's dtype); "fp8": W8A8
quantize_rows_fp8 = torch_impl.quantize_rows_fp8
dequantize_rows = torch_impl.dequantize_rows


def _check_activations(activations: str) -> None:
    if activations not in FP8_ACTIVATIONS:
        raise ValueError(f"activations must be one of {FP8_ACTIVATIONS}, got {activations!r}")


def _autocast_input(x: Tensor) -> Tensor:
    # Like nn.Linear under autocast: the GEMMs run in the autocast dtype (e.g. bf16 evaluation).
    device_type = x.device.type
    return x.to(torch.get_autocast_dtype(device_type)) if torch.is_autocast_enabled(device_type) else x


def quantize_experts_fp8(gate_up_EFD: Tensor, down_EDF: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """e4m3 expert weights with per-output-channel fp32 scales (w ~= q * scale[..., None]):
    (gate_up_q [E, 2F, D], gate_up_scale [E, 2F], down_q [E, D, F], down_scale [E, D])."""
    return (*quantize_rows_fp8(gate_up_EFD), *quantize_rows_fp8(down_EDF))


def routed_experts_fp8(
    x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor, gate_up_q: Tensor, gate_up_scale: Tensor,
    down_q: Tensor, down_scale: Tensor, activations: str = "bf16",
) -> Tensor:
    """Inference-only routed experts with fp8 weights from quantize_experts_fp8. activations="bf16"
    is weight-only; "fp8" also quantises activations per token (W8A8). Triton kernels on the triton
    backend; the torch twin (torch_impl.routed_experts_fp8) rounds exactly where the kernels do."""
    _check_activations(activations)
    x_TD = _autocast_input(x_TD)
    if resolve_backend(x_TD) == "triton":
        return _triton_module().routed_experts_fp8(
            x_TD, weights_TK, expert_ids_TK, gate_up_q, gate_up_scale, down_q, down_scale, activations
        )
    return torch_impl.routed_experts_fp8(x_TD, weights_TK, expert_ids_TK, gate_up_q, gate_up_scale,
                                         down_q, down_scale, activations)


def scaled_mm_ok(x: Tensor, weight_q: Tensor) -> bool:
    """torch._scaled_mm can take this W8A8 product: CUDA, a 16-bit output, K and N multiples of 16."""
    N, K = weight_q.shape
    return (x.is_cuda and hasattr(torch, "_scaled_mm") and x.dtype in (torch.bfloat16, torch.float16)
            and K % 16 == 0 and N % 16 == 0)


def _linear_fp8_scaled_mm(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """W8A8 on the tensor cores: x quantised per token (one Triton launch when available), then
    torch._scaled_mm with row-wise scales (x: [M, 1], weight: [1, N]) and fp32 accumulation."""
    lead, K = x.shape[:-1], x.shape[-1]
    x_MK = x.reshape(-1, K)
    quant = _triton_module().quant_rows if triton_available() else quantize_rows_fp8
    x_q, x_scale = quant(x_MK)
    out = torch._scaled_mm(x_q, weight_q.t(), scale_a=x_scale.unsqueeze(-1),
                           scale_b=weight_scale.float().unsqueeze(0), out_dtype=x.dtype)
    out = out[0] if isinstance(out, tuple) else out  # older torch returned (out, amax)
    if bias is not None:
        out = out + bias
    return out.view(*lead, -1)


def linear_fp8(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Tensor | None = None,
               activations: str = "fp8") -> Tensor:
    """y = x @ (weight_q * weight_scale[:, None])^T + bias for an e4m3 weight [N, K] with fp32
    per-output-channel scales [N]. "fp8" (W8A8): on the triton backend (the CUDA default)
    torch._scaled_mm with per-token activation scales; "bf16" (weight-only): the weight is
    dequantised to x's dtype, then one GEMM. Elsewhere (CPU, the torch/loop backends, shapes
    _scaled_mm refuses) the twin torch_impl.linear_fp8 runs, with the same rounding."""
    _check_activations(activations)
    x = _autocast_input(x)
    if activations == "fp8" and resolve_backend(x) == "triton" and scaled_mm_ok(x, weight_q):
        return _linear_fp8_scaled_mm(x, weight_q, weight_scale, bias)
    return torch_impl.linear_fp8(x, weight_q, weight_scale, bias, activations)


def paged_decode_attention(
    q_NHd: Tensor, k_pool_PbHd: Tensor, v_pool_PbHd: Tensor, tables_NM: Tensor, lens_N: Tensor,
    scale: float, k_scale_H: Tensor | None = None, v_scale_H: Tensor | None = None,
    num_splits: int | None = None,
) -> Tensor:
    """One query token per row over its own live keys in a paged pool -> out [N, H, hd] (GQA,
    fp8 pools with per-head scales). tables_NM int32 [N, M], lens_N int32 [N]. `num_splits` (Triton
    only) fixes the split-KV factor, e.g. per CUDA-graph bucket; None picks one. See attention.py."""
    if resolve_backend(q_NHd) == "triton" and _triton_attention_module() is not None:
        return _triton_attention_module().paged_decode_attention(
            q_NHd, k_pool_PbHd, v_pool_PbHd, tables_NM, lens_N, scale, k_scale_H, v_scale_H, num_splits)
    return torch_attention.paged_decode_attention(q_NHd, k_pool_PbHd, v_pool_PbHd, tables_NM, lens_N, scale,
                                                  k_scale_H, v_scale_H)


# A prompt chunk over its cached prefix: PyTorch SDPA on every backend (kernels/attention.py).
paged_prefill_attention = torch_attention.paged_prefill_attention


def decode_attention_splits(num_rows: int, num_kv_heads: int, max_len: int,
                            device: torch.device) -> int | None:
    """The split-KV factor the decode kernel would use for this many rows on `device`, from static
    sizes only (a CUDA graph fixes it per batch bucket); None where the PyTorch twin runs."""
    module = _triton_attention_module()
    if module is None or resolve_backend(torch.empty(0, device=device)) != "triton":
        return None
    return module.num_splits_for(num_rows, num_kv_heads, max_len, device)
