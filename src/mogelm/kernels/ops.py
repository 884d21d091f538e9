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

Inference (issue 14): `add_rms_norm` (a block's residual add and the next norm), `qkv_bias_rope`
(after one q|k|v GEMM), `swiglu_halves` (after one gate|up GEMM), `paged_kv_write` (keys and values
into their pool slots) and the fp8 small-M paths of `linear_fp8` / `linear_fp8_swiglu` run as
Triton kernels (triton_infer.py) in inference on CUDA and as their twins (torch_impl.py) elsewhere;
training and the CPU keep the plain ops. fp8 "auto" activations pick weight-only or W8A8 per call
size (`resolve_activations`, thresholds movable by the decode benchmark's sweep).

Training (issue 17): `rms_norm`, `rope_qk`, `swiglu` (the model's memory-bound pieces) and
`linear_cross_entropy` (the LM head's loss without the whole batch's logits) run as Triton
kernels (triton_fused.py), `torch.compile` of their twins, or the twins themselves
(torch_impl.py, the default on CPU: CPU training is bit-identical to the plain model). Every
lever of the training step is one field of `TrainOptions`, set with `set_options(...)` or
`use_options(...)` (benchmarks/bench_train.py turns each off in turn); the fused backend also
reads $MOGELM_FUSED_BACKEND.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

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
        o = _options
        return _triton_module().routed_experts(x_TD, weights_TK, expert_ids_TK, gate_up_EFD, down_EDF,
                                               backward=o.expert_backward, variant=o.gemm_variant,
                                               save_activations=o.save_expert_activations)
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

# "bf16": weight-only (activations keep x's dtype); "fp8": W8A8; "auto": weight-only for decode-
# sized inputs and W8A8 for large ones (thresholds below: each is the faster there on the H200)
FP8_ACTIVATIONS = ("bf16", "fp8", "auto")
quantize_rows_fp8 = torch_impl.quantize_rows_fp8
dequantize_rows = torch_impl.dequantize_rows

# "auto" routed experts: W8A8 from this many routed rows (T * K) on; weight-only below. Measured on
# the H200 (2026-12-02): weight-only 1.49x bf16 at 8 rows against W8A8's 1.27x, equal at 64, W8A8
# ahead at 512 (1.79x vs 1.74x) and 2048 (1.55x vs 1.27x) and for prefill. `mogelm bench decode`
# measures both and may move it (set_fp8_auto_rows).
FP8_EXPERTS_W8A8_ROWS = 512


def set_fp8_auto_rows(experts: int | None = None, linear: int | None = None) -> None:
    """Move the "auto" thresholds: routed rows from which experts run W8A8, and the largest M of
    the weight-only small-M dense kernel (FP8_LINEAR_ROWS)."""
    global FP8_EXPERTS_W8A8_ROWS, FP8_LINEAR_ROWS
    if experts is not None:
        FP8_EXPERTS_W8A8_ROWS = int(experts)
    if linear is not None:
        FP8_LINEAR_ROWS = int(linear)


def _check_activations(activations: str) -> None:
    if activations not in FP8_ACTIVATIONS:
        raise ValueError(f"activations must be one of {FP8_ACTIVATIONS}, got {activations!r}")


def resolve_activations(activations: str, rows: int, experts: bool) -> str:
    """The concrete mode ("bf16" weight-only or "fp8" W8A8) of a call with `rows` input rows
    (routed rows T * K for experts, tokens for a dense layer)."""
    if activations != "auto":
        return activations
    if experts:
        return "fp8" if rows >= FP8_EXPERTS_W8A8_ROWS else "bf16"
    return "bf16" if rows <= FP8_LINEAR_ROWS else "fp8"


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
    is weight-only; "fp8" also quantises activations per token (W8A8); "auto" picks by the routed
    rows (resolve_activations). Triton kernels on the triton backend; the torch twin
    (torch_impl.routed_experts_fp8) rounds exactly where the kernels do."""
    _check_activations(activations)
    activations = resolve_activations(activations, expert_ids_TK.numel(), experts=True)
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


# Weight-only fp8 linears with at most this many rows run the Triton small-M kernel
# (triton_infer.linear_fp8_wo: 1 byte a weight read once); larger ones dequantise the weight in one
# launch and run a bf16 GEMM. The decode benchmark may move it (set_fp8_linear_rows).
FP8_LINEAR_ROWS = 256


def _fp8_small_m(x: Tensor, weight_q: Tensor) -> bool:
    """The Triton weight-only kernel applies: CUDA, triton backend, 16-bit x, few rows."""
    return (resolve_backend(x) == "triton" and x.is_cuda and _infer_module() is not None
            and x.dtype in (torch.bfloat16, torch.float16) and weight_q.stride(-1) == 1
            and x.numel() // max(x.shape[-1], 1) <= FP8_LINEAR_ROWS)


def linear_fp8(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Tensor | None = None,
               activations: str = "fp8") -> Tensor:
    """y = x @ (weight_q * weight_scale[:, None])^T + bias for an e4m3 weight [N, K] with fp32
    per-output-channel scales [N]. "fp8" (W8A8): on the triton backend (the CUDA default)
    torch._scaled_mm with per-token activation scales; "bf16" (weight-only): on the triton backend,
    up to FP8_LINEAR_ROWS rows the Triton small-M kernel (scales in the epilogue, fp32
    accumulation), beyond that the weight dequantised to x's dtype in one launch, then one GEMM.
    Elsewhere (CPU, the torch/loop backends, shapes _scaled_mm refuses) the twin
    torch_impl.linear_fp8 runs, which rounds where the large-M path rounds. "auto": weight-only up
    to FP8_LINEAR_ROWS rows, W8A8 beyond (resolve_activations)."""
    _check_activations(activations)
    activations = resolve_activations(activations, x.numel() // max(x.shape[-1], 1), experts=False)
    x = _autocast_input(x)
    if activations == "fp8" and resolve_backend(x) == "triton" and scaled_mm_ok(x, weight_q):
        return _linear_fp8_scaled_mm(x, weight_q, weight_scale, bias)
    if activations == "bf16" and resolve_backend(x) == "triton" and x.is_cuda and _infer_module() is not None:
        if _fp8_small_m(x, weight_q):
            return _infer_module().linear_fp8_wo(x, weight_q, weight_scale, bias)
        w = _infer_module().dequantize_rows(weight_q, weight_scale, x.dtype)
        return torch.nn.functional.linear(x, w, bias)
    return torch_impl.linear_fp8(x, weight_q, weight_scale, bias, activations)


def linear_fp8_swiglu(x: Tensor, weight_q: Tensor, weight_scale: Tensor) -> Tensor:
    """silu(x @ gate^T) * (x @ up^T) for an e4m3 weight [gate (F rows); up (F rows)] [2F, K] with
    per-row scales, weight-only: one Triton launch for decode-sized inputs (SwiGLU in the epilogue),
    else linear_fp8 then swiglu (torch_impl.linear_fp8_swiglu is the twin)."""
    x = _autocast_input(x)
    if _fp8_small_m(x, weight_q):
        return _infer_module().linear_fp8_wo(x, weight_q, weight_scale, swiglu=True)
    return swiglu_halves(linear_fp8(x, weight_q, weight_scale, None, "bf16"))


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


@functools.cache
def _infer_module():
    """triton_infer (the fused inference kernels), or None when triton is unavailable."""
    try:
        return importlib.import_module("mogelm.kernels.triton_infer")
    except ImportError:
        return None


def _inference_fast_path(*tensors: Tensor) -> bool:
    """The fused inference kernels apply: the fused backend is triton (CUDA by default), nothing
    needs a gradient and autocast is off (training and autocast keep the unfused ops)."""
    x = tensors[0]
    if fused_backend(x) != "triton" or _infer_module() is None or _autocast_dtype(x) is not None:
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(h, y) = (x + residual, rms_norm(h, weight, eps)): a block's residual add and the norm after
    it. One Triton pass in inference on CUDA; otherwise the two ops as the model wrote them (so CPU
    and training numerics are unchanged: torch_impl.add_rms_norm is the twin)."""
    if _inference_fast_path(x, residual, weight) and x.shape == residual.shape:
        return _infer_module().add_rms_norm(x, residual, weight, eps)
    h = x + residual
    return h, rms_norm(h, weight, eps)


def qkv_bias_rope(qkv_BTC: Tensor, bias_C: Tensor | None, cos_BTd: Tensor, sin_BTd: Tensor, num_heads: int,
                  num_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q|k|v of one fused projection [B, T, (H + 2 Hkv) hd] -> q [B, H, T, hd], k, v [B, Hkv, T, hd]
    with the bias added and RoPE on q and k: one Triton launch in inference on CUDA, else the twin
    (torch_impl.qkv_bias_rope)."""
    if _inference_fast_path(qkv_BTC, bias_C, cos_BTd, sin_BTd):
        return _infer_module().qkv_bias_rope(qkv_BTC, bias_C, cos_BTd, sin_BTd, num_heads, num_kv_heads)
    return torch_impl.qkv_bias_rope(qkv_BTC, bias_C, cos_BTd, sin_BTd, num_heads, num_kv_heads)


def paged_kv_write(k_pool: Tensor, v_pool: Tensor, slots_N: Tensor, k_NHd: Tensor, v_NHd: Tensor,
                   k_scale_H: Tensor | None = None, v_scale_H: Tensor | None = None) -> None:
    """Keys and values of N tokens into their slots of one layer's paged pools (fp8 pools quantised
    with per-head scales): one Triton launch for both on the triton backend (CUDA), else the twin
    torch_impl.paged_kv_write."""
    if resolve_backend(k_NHd) == "triton" and k_NHd.is_cuda and _infer_module() is not None:
        return _infer_module().paged_kv_write(k_pool, v_pool, slots_N, k_NHd, v_NHd, k_scale_H, v_scale_H)
    return torch_impl.paged_kv_write(k_pool, v_pool, slots_N, k_NHd, v_NHd, k_scale_H, v_scale_H)


def swiglu_halves(x: Tensor) -> Tensor:
    """silu(gate) * up of a fused [gate | up] projection x [..., 2F] -> [..., F]: one Triton launch
    in inference on CUDA (no copies of the halves), else the twin torch_impl.swiglu_halves."""
    if _inference_fast_path(x):
        return _infer_module().swiglu_halves(x)
    return torch_impl.swiglu_halves(x)


def decode_attention_splits(num_rows: int, num_kv_heads: int, max_len: int,
                            device: torch.device) -> int | None:
    """The split-KV factor the decode kernel would use for this many rows on `device`, from static
    sizes only (a CUDA graph fixes it per batch bucket); None where the PyTorch twin runs."""
    module = _triton_attention_module()
    if module is None or resolve_backend(torch.empty(0, device=device)) != "triton":
        return None
    return module.num_splits_for(num_rows, num_kv_heads, max_len, device)



# ----------------------------------------------------------------------------------------------
# Training speed (issue 17): the levers, the fused memory-bound ops, the chunked LM-head loss
# ----------------------------------------------------------------------------------------------

FUSED_BACKENDS = ("torch", "triton", "compile")
LOSSES = ("torch", "chunked")
EXPERT_BACKWARDS = ("triton", "torch")


@dataclass
class TrainOptions:
    """The levers of the training step, in one place. Defaults are the fast path; the "torch"
    value of each is the plain PyTorch of before (all of them together: the previous version)."""

    # routed experts on the triton backend: "triton" = Triton forward and backward over the
    # dispatch plan (triton_grouped.py); "torch" = Triton forward, PyTorch backward (before issue 17)
    expert_backward: str = "triton"
    # levers of those grouped GEMMs: "default" or a "+"-joined subset of persistent, tma, ws
    gemm_variant: str = "default"
    # keep the gate/up pre-activations from the forward (False: recompute them in the backward)
    save_expert_activations: bool = True
    # RMSNorm / RoPE / SwiGLU: "triton" | "compile" | "torch"; None: $MOGELM_FUSED_BACKEND, else
    # triton on CUDA and torch on CPU
    fused: str | None = None
    # LM-head loss: "chunked" | "torch"; None: chunked on CUDA, torch on CPU
    loss: str | None = None
    loss_chunk_rows: int = 0  # rows per chunk (0: about 1 GiB of fp32 logits per chunk)

    def validate(self) -> None:
        for name, allowed in (("expert_backward", EXPERT_BACKWARDS), ("fused", FUSED_BACKENDS + (None,)),
                              ("loss", LOSSES + (None,))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        parts = [p for p in self.gemm_variant.replace(",", "+").split("+") if p and p != "default"]
        if any(p not in ("persistent", "tma", "ws") for p in parts):
            raise ValueError(f"gemm_variant {self.gemm_variant!r}: use 'default' or a '+'-joined subset "
                             "of persistent, tma, ws")


_options = TrainOptions()


def options() -> TrainOptions:
    """The options in force (a copy)."""
    return dataclasses.replace(_options)


def set_options(**changes) -> None:
    """Change some TrainOptions fields for every later call."""
    global _options
    new = dataclasses.replace(_options, **changes)
    new.validate()
    _options = new


@contextlib.contextmanager
def use_options(**changes) -> Iterator[TrainOptions]:
    previous = _options
    set_options(**changes)
    try:
        yield options()
    finally:
        set_options(**dataclasses.asdict(previous))


@functools.cache
def _fused_module():
    """triton_fused, or None when triton is unavailable."""
    try:
        return importlib.import_module("mogelm.kernels.triton_fused")
    except ImportError:
        return None


def fused_backend(x: Tensor) -> str:
    """The backend of rms_norm / rope_qk / swiglu for a tensor like x."""
    name = _options.fused or os.environ.get("MOGELM_FUSED_BACKEND") or None
    if name:
        if name not in FUSED_BACKENDS:
            raise ValueError(f"MOGELM_FUSED_BACKEND={name!r}: choose one of {FUSED_BACKENDS}")
        return name
    return "triton" if x.is_cuda and _fused_module() is not None else "torch"


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _rms_norm_as(x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    return torch_impl.rms_norm(x, weight, eps).to(dtype)


@functools.cache
def _compiled(name: str):
    """torch.compile of a twin, made on first use (Inductor fuses each into one kernel a direction)."""
    fn = {"rms_norm": _rms_norm_as, "rope_qk": torch_impl.rope_qk, "swiglu": torch_impl.swiglu}[name]
    return torch.compile(fn, dynamic=False)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim (torch_impl.rms_norm). Fused backends return the autocast dtype
    under autocast (every consumer of a norm is a GEMM that would cast to it), else the twin's."""
    backend = fused_backend(x)
    if backend == "torch":
        return torch_impl.rms_norm(x, weight, eps)
    dtype = _autocast_dtype(x) or torch.promote_types(x.dtype, weight.dtype)
    if backend == "compile":
        return _compiled("rms_norm")(x, weight, eps, dtype)
    return _fused_module().rms_norm(x, weight, eps, dtype)


def rope_qk(q_BHTd: Tensor, k_BHTd: Tensor, cos_BTd: Tensor, sin_BTd: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q and k (torch_impl.apply_rope on each), fused into one launch."""
    backend = fused_backend(q_BHTd)
    if backend == "torch" or cos_BTd.requires_grad or sin_BTd.requires_grad:
        return torch_impl.rope_qk(q_BHTd, k_BHTd, cos_BTd, sin_BTd)
    if backend == "compile":
        return _compiled("rope_qk")(q_BHTd, k_BHTd, cos_BTd, sin_BTd)
    return _fused_module().rope_qk(q_BHTd, k_BHTd, cos_BTd, sin_BTd)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up."""
    backend = fused_backend(gate)
    if backend == "torch" or gate.shape != up.shape:
        return torch_impl.swiglu(gate, up)
    if backend == "compile":
        return _compiled("swiglu")(gate, up)
    return _fused_module().swiglu(gate, up)


def linear_cross_entropy(h_BTD: Tensor, weight_VD: Tensor, targets_BT: Tensor,
                         ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of the logits F.linear(h, W) against targets (rows equal to ignore_index
    do not count), the LM head and its loss in one op. "torch": the twin (fp32 logits of the whole
    batch); "chunked": kernels/chunked_loss.py (a chunk of logits at a time, no recomputation)."""
    mode = _options.loss or ("chunked" if h_BTD.is_cuda else "torch")
    if mode == "torch":
        return torch_impl.linear_cross_entropy(h_BTD, weight_VD, targets_BT, ignore_index)
    from mogelm.kernels.chunked_loss import ChunkedLinearCE, ce_chunk_torch

    dtype = _autocast_dtype(h_BTD) or torch.promote_types(h_BTD.dtype, weight_VD.dtype)
    V, D = weight_VD.shape
    h_ND, w_VD = h_BTD.reshape(-1, D).to(dtype), weight_VD.to(dtype)
    rows = _options.loss_chunk_rows or max(256, (1 << 28) // V // 256 * 256)
    fused = _fused_module()
    ce_chunk = fused.ce_chunk if (fused is not None and fused_backend(h_BTD) == "triton") else ce_chunk_torch
    want_grad = torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad)
    with torch.autocast(h_BTD.device.type, enabled=False):
        return ChunkedLinearCE.apply(h_ND, w_VD, targets_BT.reshape(-1), ignore_index, rows, ce_chunk,
                                     want_grad)
