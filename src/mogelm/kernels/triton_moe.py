"""Triton kernels for the MoGE layer's routed experts: grouped SwiGLU GEMMs over block-aligned
rows (bf16 / fp32, fp8 e4m3 weight-only and W8A8), tuned configs, and the autograd wrapper
`routed_experts`. The op surface (ops.py) imports this module only; it re-exports the routing
(triton_route.py), align (triton_align.py) and experimental decode (triton_decode.py) pieces.

Importing raises ImportError when triton is missing (ops.py reads that as "no triton"). The
readable twins are in torch_impl.py; the oracle is moe/reference.py. CPU tests run the same
kernels through TRITON_INTERPRET=1 in fp32 (tests/test_triton_kernels.py).

Legend: T tokens, D hidden, F expert width, E experts, K experts per token, G expert groups,
S = T*K routed (token, slot) rows, flat index s = t*K + k; P padded rows (each expert's rows
rounded up to BLOCK_M), NB = P / BLOCK_M row blocks.

Pipeline (one expert per BLOCK_M row block, as in every sorted/padded fused-MoE kernel):

    logits_TE --_moge_route_kernel--> weights_TK, ids_TK (+ counts_E)                [triton_route]
    ids_TK --align (1 program, or hist -> plan -> scatter)--> sorted_ids_P, block_expert_NB  [triton_align]
    x_TD --_gate_up_kernel (gathers rows of x, SiLU(gate)*up in the epilogue)--> h_PF
    h_PF --_down_kernel (routed weight in the epilogue, rows written to slot order)--> y_SD
    y_SD.view(T, K, D).sum(1) --> y_TD      (a view when K == 1)

Nothing here reads a device value on the host, so the forward is CUDA-graph capturable; every
launch grid is sized from S, E and the block size alone (programs past the used rows return).
Training (_RoutedExperts) runs forward and backward through triton_grouped.py (dgrad through the
same sorted layout with the SwiGLU backward in an epilogue, wgrad as a grouped GEMM per expert,
no scatter); the previous PyTorch backward stays as the "torch" lever (_torch_backward).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F_
import triton  # ImportError here when triton is missing: ops.py reads it as "no triton"
import triton.language as tl
from torch import Tensor

from mogelm.kernels import torch_impl, triton_grouped
from mogelm.kernels.triton_align import DispatchPlan, align
from mogelm.kernels.triton_common import (
    FP8,
    FP8_MAX,
    INTERPRET,
    GemmConfig,
    device_limit,
    fit_gemm,
    fp16_dot,
    gate_up_accumulate,
    precision,
    weight_accumulate,
)
from mogelm.kernels.triton_common import tile_ids as _tile_ids
from mogelm.kernels.triton_decode import DecodeConfig, decode
from mogelm.kernels.triton_route import moge_route, moge_route_with_counts

__all__ = [  # what ops.py, the benchmark and the tests use (routing and align live in their own modules)
    "DecodeConfig", "DispatchPlan", "GemmConfig", "MoEConfig", "align", "decode", "down",
    "gate_up", "get_config", "moge_route", "moge_route_with_counts", "quant_rows", "quantize_rows_fp8",
    "routed_experts", "routed_experts_forward", "routed_experts_fp8", "use_config_table",
]


# ----------------------------------------------------------------------------------------------
# Level 1: raw kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, D] activations in token order (bf16/fp32, or fp8 for W8A8); rows gathered here
    x_scale_ptr,  # [T] fp32 per-token activation scales (read only when X_SCALE)
    w_ptr,  # [E, 2F, D] gate rows 0..F-1 then up rows F..2F-1 (bf16/fp32 or fp8 e4m3)
    w_scale_ptr,  # [E, 2F] fp32 per-output-channel weight scales (read only when W_SCALE)
    h_ptr,  # [P_max, F] out: silu(gate) * up in padded-sorted row order
    sorted_ids_ptr,  # [P_max] int32 flat routed row s per padded row (S = padding)
    block_expert_ptr,  # [NB_max] int32 expert of each row block
    num_post_pad_ptr,  # [1] int32 padded rows in use; blocks past it return at once
    S, F, D, NUM_PID_M,  # routed rows, expert width, hidden, row blocks in the grid
    stride_xt, stride_we, stride_wn, stride_hp,  # x row, weight expert/row, h row strides (unit last dims)
    TOP_K: tl.constexpr,  # K: token of flat row s is s // K
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # D % BLOCK_K == 0: no masks in the reduction loop
    X_SCALE: tl.constexpr, W_SCALE: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter: dot in fp32 (it mishandles bf16 tl.dot)
    W_TO_X: tl.constexpr,  # weight-only fp8: convert weight tiles to the activation dtype before the dot
    FP16_DOT: tl.constexpr,  # with W_TO_X and 16-bit activations: dot in fp16 (e4m3 -> fp16 is one
    # instruction per pair and exact; bf16 activations lose no range below 65504)
    PRECISION: tl.constexpr,  # tl.dot input_precision ("ieee" for fp32 tests, "tf32" otherwise)
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), NUM_PID_M, tl.cdiv(F, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_post_pad_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    flat = tl.load(sorted_ids_ptr + offs_m)
    valid = flat < S
    # padding rows read token 0 (a real row) so the hot loop needs no row mask; never stored downstream
    tok = tl.where(valid, flat // TOP_K, 0).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % F  # wrap: in-bounds loads, masked store
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]
    w_base = w_ptr + expert * stride_we
    g_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BK, BN] gate tile (transposed view)
    u_ptrs = g_ptrs + F * stride_wn  # up rows follow the gate rows
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_g, acc_u = gate_up_accumulate(a_ptrs, g_ptrs, u_ptrs, acc_g, acc_u, offs_k, D, BLOCK_K, EVEN_K,
                                      UPCAST, W_TO_X, FP16_DOT, PRECISION)
    if W_SCALE:
        s_base = w_scale_ptr + expert * 2 * F
        acc_g = acc_g * tl.load(s_base + offs_n)[None, :]
        acc_u = acc_u * tl.load(s_base + F + offs_n)[None, :]
    if X_SCALE:
        xs = tl.load(x_scale_ptr + tok)[:, None]
        acc_g = acc_g * xs
        acc_u = acc_u * xs
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # SiLU(gate) * up, fp32
    out_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hp + out_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=(out_n < F)[None, :])


@triton.jit
def _down_kernel(
    h_ptr,  # [P_max, F] SwiGLU activations in padded-sorted row order (bf16/fp32, or fp8 for W8A8)
    h_scale_ptr,  # [P_max] fp32 per-row activation scales (read only when X_SCALE)
    w_ptr,  # [E, D, F] down projection (bf16/fp32 or fp8 e4m3)
    w_scale_ptr,  # [E, D] fp32 per-output-channel weight scales (read only when W_SCALE)
    route_w_ptr,  # [S] fp32 gate weight of each flat routed row (weights_TK flattened)
    y_ptr,  # [S, D] out: weighted expert output of each routed row, flat (token, slot) order
    sorted_ids_ptr,  # [P_max] int32 flat routed row per padded row (S = padding, not stored)
    block_expert_ptr,  # [NB_max] int32 expert of each row block
    num_post_pad_ptr,  # [1] int32 padded rows in use
    S, D, F, NUM_PID_M,  # routed rows, hidden, expert width, row blocks in the grid
    stride_hp, stride_we, stride_wn, stride_ys,  # h row, weight expert/row, y row strides
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # F % BLOCK_K == 0
    X_SCALE: tl.constexpr, W_SCALE: tl.constexpr, UPCAST: tl.constexpr, W_TO_X: tl.constexpr,
    FP16_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), NUM_PID_M, tl.cdiv(D, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_post_pad_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    flat = tl.load(sorted_ids_ptr + offs_m)
    valid = flat < S
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % D
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hp + offs_k[None, :]
    b_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc = weight_accumulate(a_ptrs, b_ptrs, acc, offs_k, F, BLOCK_K, EVEN_K, UPCAST, W_TO_X, FP16_DOT,
                            PRECISION)
    if W_SCALE:
        acc = acc * tl.load(w_scale_ptr + expert * D + offs_n)[None, :]
    if X_SCALE:
        acc = acc * tl.load(h_scale_ptr + offs_m)[:, None]
    rw = tl.load(route_w_ptr + flat, mask=valid, other=0.0)
    acc = acc * rw[:, None]
    out_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y_ptrs = y_ptr + flat[:, None].to(tl.int64) * stride_ys + out_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & (out_n < D)[None, :])


@triton.jit
def _quant_rows_kernel(
    x_ptr,  # [R, C] input rows (bf16/fp32), row stride stride_x, unit column stride
    q_ptr,  # [R, C] out: e4m3 rows, contiguous
    scale_ptr,  # [R] fp32 out: amax / FP8_MAX per row (x ~= q * scale)
    R, C, stride_x,  # rows, columns, input row stride
    FP8_MAX: tl.constexpr,  # 448, the largest finite e4m3 value
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # two passes over each row block: amax, then scale-and-round (same arithmetic as quantize_rows_fp8)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    amax = tl.zeros((BLOCK_R,), tl.float32)
    for c in range(0, tl.cdiv(C, BLOCK_C)):
        cols = c * BLOCK_C + tl.arange(0, BLOCK_C)
        m = rmask[:, None] & (cols < C)[None, :]
        v = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=m, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(v.to(tl.float32)), axis=1))
    scale = tl.maximum(amax, 1e-12) / FP8_MAX
    tl.store(scale_ptr + rows, scale, mask=rmask)
    for c in range(0, tl.cdiv(C, BLOCK_C)):
        cols = c * BLOCK_C + tl.arange(0, BLOCK_C)
        m = rmask[:, None] & (cols < C)[None, :]
        v = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=m, other=0.0)
        q = tl.minimum(tl.maximum(v.to(tl.float32) / scale[:, None], -FP8_MAX), FP8_MAX)
        tl.store(q_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# Level 2: launchers (shapes, configs, dispatch plan)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoEConfig:
    """Tile sizes for one (shape, T) point. gate_up and down share block_m: h rows are laid out
    by the dispatch plan, whose blocks are block_m rows of one expert. With `decode` set, the
    small-T path (_decode_kernel, no sort) runs instead of align -> gate_up -> down."""

    gate_up: GemmConfig
    down: GemmConfig
    decode: DecodeConfig | None = None

    def __post_init__(self):
        assert self.gate_up.block_m == self.down.block_m, "gate_up and down must share block_m"


_CONFIG_DIR = Path(__file__).with_name("configs")


@functools.cache
def _config_table(device_name: str) -> dict:
    """Tuned configs kept as data: configs/<device>.json =
    {"bf16"|"fp8"|"w8a8": {"E=..,F=..,D=..": {"<max routed rows S>": {"gate_up": {...}, "down": {...}}}}}.
    An H100 (same SM count class, same Hopper SM) reads the H200 table when it has none of its own."""
    override = os.environ.get("MOGELM_MOE_CONFIGS")  # a table to try (the tuning run sets it)
    if override:
        return json.loads(Path(override).read_text())
    slug = device_name.lower().replace("nvidia ", "").split()[0] if device_name != "cpu" else "cpu"
    for name in (f"{slug}.json", "h200.json" if slug.startswith("h100") else ""):
        path = _CONFIG_DIR / name
        if name and path.exists():
            return json.loads(path.read_text())
    return {}


_TABLE_OVERRIDE: dict = {}  # entries measured in this process (`mogelm bench decode --sections tune`)


def use_config_table(table: dict | None) -> None:
    """Take tiles from `table` (the configs/<device>.json schema) before the shipped table: its
    S buckets are merged into the shipped ones per kind and shape, its entries winning ties. None
    (or {}) restores the shipped table alone."""
    _TABLE_OVERRIDE.clear()
    _TABLE_OVERRIDE.update(table or {})


def _shape_table(kind: str, shape: str, device_name: str) -> dict:
    shipped = _config_table(device_name).get(kind, {}).get(shape) or {}
    return {**shipped, **(_TABLE_OVERRIDE.get(kind, {}).get(shape) or {})}


def _device_name(x: Tensor) -> str:
    return torch.cuda.get_device_name(x.device) if x.is_cuda else "cpu"


def _heuristic_config(num_rows: int, D: int, F: int, E: int, kind: str = "bf16") -> MoEConfig:
    """Defaults when the table has no entry. Decode (few rows per expert): BLOCK_M 16 and long
    K steps so every SM streams weights; prefill: 128-row tiles for the tensor cores. group_m 8
    puts the row blocks of one expert next to each other, so its weight tiles come from L2."""
    rows_per_expert = num_rows / max(1, E)
    wide_k = 2 if kind != "bf16" else 1  # one byte per weight: twice the K per stage
    if rows_per_expert <= 12:
        gu = GemmConfig(16, 64, 128 * wide_k, 8, 4, 4)
        dn = GemmConfig(16, 64, 128 * wide_k, 8, 4, 4)
    elif rows_per_expert <= 48:
        gu = dn = GemmConfig(32, 64, 128, 8, 4, 4)
    elif rows_per_expert <= 256:
        gu = dn = GemmConfig(64, 128, 64, 8, 4, 4)
    else:
        gu = dn = GemmConfig(128, 128, 64 * wide_k, 8, 8, 3)
    return MoEConfig(gu, dn)  # the decode kernel is opt-in (a table entry): it measured slower, see below


def _table_entry(kind: str, num_rows: int, D: int, F: int, E: int, device_name: str) -> dict | None:
    """The tuned entry with the smallest S bucket at or above num_rows (None: no entry, or far
    outside the tuned range)."""
    table = _shape_table(kind, f"E={E},F={F},D={D}", device_name)
    buckets = sorted(int(k) for k in table) if table else []
    if buckets and buckets[0] <= 4 * num_rows <= 16 * buckets[-1]:  # far outside the tuned range: heuristic
        return table[str(next((b for b in buckets if b >= num_rows), buckets[-1]))]
    return None


def get_config(num_rows: int, D: int, F: int, E: int, device_name: str, kind: str = "bf16") -> MoEConfig:
    """Config for S = num_rows routed rows: the tuned entry with the smallest S bucket at or above
    num_rows, else the heuristic."""
    entry = _table_entry(kind, num_rows, D, F, E, device_name)
    if entry is not None:
        dec = DecodeConfig(**entry["decode"]) if entry.get("decode") else None
        return MoEConfig(GemmConfig(**entry["gate_up"]), GemmConfig(**entry["down"]), dec)
    return _heuristic_config(num_rows, D, F, E, kind)


def fit_shared_memory(cfg: MoEConfig, x: Tensor, w_gate_up: Tensor, w_down: Tensor) -> MoEConfig:
    """The config with tiles that fit this device's shared memory for these dtypes."""
    if not x.is_cuda:
        return cfg
    limit = device_limit(x)
    gu = fit_gemm(cfg.gate_up, x.element_size(), w_gate_up.element_size(), 2, limit)
    dn = fit_gemm(cfg.down, x.element_size(), w_down.element_size(), 1, limit)
    return dataclasses.replace(cfg, gate_up=gu, down=dn)


def _interpret_config(cfg: MoEConfig) -> MoEConfig:
    # the interpreter runs programs one by one: small tiles keep CPU tests quick
    gu = GemmConfig(16, 16, 16, 1, 1, 1)
    return MoEConfig(gu, gu, DecodeConfig(16, 16, 16, 1, 1) if cfg.decode else None) if INTERPRET else cfg


def gate_up(
    x_TD: Tensor, w_EFD: Tensor, plan: DispatchPlan, top_k: int, cfg: GemmConfig,
    w_scale_EF: Tensor | None = None, x_scale_T: Tensor | None = None, out_dtype: torch.dtype | None = None,
) -> Tensor:
    """h_PF = silu(x_s @ gate_e^T) * (x_s @ up_e^T) for every padded row (garbage on padding rows)."""
    T, D = x_TD.shape
    E, F2, _ = w_EFD.shape
    F = F2 // 2
    S = T * top_k
    out_dtype = out_dtype or x_TD.dtype
    h = torch.empty(plan.sorted_ids_P.numel(), F, dtype=out_dtype, device=x_TD.device)
    num_pid_m = plan.num_blocks
    grid = (num_pid_m * triton.cdiv(F, cfg.block_n),)
    dummy = plan.sorted_ids_P  # stands in for the scale pointers a launch does not read
    _gate_up_kernel[grid](
        x_TD, x_scale_T if x_scale_T is not None else dummy,
        w_EFD, w_scale_EF if w_scale_EF is not None else dummy,
        h, plan.sorted_ids_P, plan.block_expert_NB, plan.num_post_pad,
        S, F, D, num_pid_m, x_TD.stride(0), w_EFD.stride(0), w_EFD.stride(1), h.stride(0),
        TOP_K=top_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        EVEN_K=D % cfg.block_k == 0, X_SCALE=x_scale_T is not None, W_SCALE=w_scale_EF is not None,
        UPCAST=INTERPRET, W_TO_X=w_EFD.dtype != x_TD.dtype, FP16_DOT=fp16_dot(x_TD, w_EFD),
        PRECISION=precision(x_TD.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return h


def down(
    h_PF: Tensor, w_EDF: Tensor, weights_S: Tensor, plan: DispatchPlan, S: int, cfg: GemmConfig,
    out_dtype: torch.dtype, w_scale_ED: Tensor | None = None, h_scale_P: Tensor | None = None,
) -> Tensor:
    """y_SD[s] = weights[s] * down_e(h[row of s]) in flat (token, slot) order."""
    E, D, F = w_EDF.shape
    y = torch.empty(S, D, dtype=out_dtype, device=h_PF.device)
    num_pid_m = plan.num_blocks
    grid = (num_pid_m * triton.cdiv(D, cfg.block_n),)
    dummy = plan.sorted_ids_P  # stands in for the scale pointers a launch does not read
    _down_kernel[grid](
        h_PF, h_scale_P if h_scale_P is not None else dummy,
        w_EDF, w_scale_ED if w_scale_ED is not None else dummy,
        weights_S, y, plan.sorted_ids_P, plan.block_expert_NB, plan.num_post_pad,
        S, D, F, num_pid_m, h_PF.stride(0), w_EDF.stride(0), w_EDF.stride(1), y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        EVEN_K=F % cfg.block_k == 0, X_SCALE=h_scale_P is not None, W_SCALE=w_scale_ED is not None,
        UPCAST=INTERPRET, W_TO_X=w_EDF.dtype != h_PF.dtype, FP16_DOT=fp16_dot(h_PF, w_EDF),
        PRECISION=precision(out_dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def routed_experts_forward(
    x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor, gate_up_EFD: Tensor, down_EDF: Tensor,
    cfg: MoEConfig | None = None,
) -> Tensor:
    """Forward only (no autograd bookkeeping): align -> gate_up -> down -> sum over slots."""
    T, D = x_TD.shape
    K = expert_ids_TK.shape[-1]
    E, F2, _ = gate_up_EFD.shape
    S = T * K
    if S == 0:
        return x_TD.new_zeros(T, D)
    cfg = _interpret_config(cfg or get_config(S, D, F2 // 2, E, _device_name(x_TD)))
    cfg = fit_shared_memory(cfg, x_TD, gate_up_EFD, down_EDF)
    x_TD = x_TD.contiguous()
    if cfg.decode is not None:
        return decode(x_TD, weights_TK, expert_ids_TK, gate_up_EFD, down_EDF, cfg.decode)
    plan = align(expert_ids_TK, E, cfg.gate_up.block_m)
    h = gate_up(x_TD, gate_up_EFD, plan, K, cfg.gate_up)
    y_SD = down(h, down_EDF, weights_TK.reshape(-1).float().contiguous(), plan, S, cfg.down, x_TD.dtype)
    return y_SD.view(T, K, D).sum(1) if K > 1 else y_SD.view(T, D)


# ----------------------------------------------------------------------------------------------
# Level 3: autograd
# ----------------------------------------------------------------------------------------------


def _grouped_mm(a_SK: Tensor, b_EKN: Tensor, offsets_E: Tensor) -> Tensor:
    """out[s] = a[s] @ b[expert of s] for rows sorted by expert (torch._grouped_mm, loop fallback)."""
    if torch_impl._grouped_mm_ok(a_SK, b_EKN) and (a_SK.dtype == torch.bfloat16 or not a_SK.is_cuda):
        return torch._grouped_mm(a_SK, b_EKN, offs=offsets_E)
    outs, start = [], 0
    for e, end in enumerate(offsets_E.tolist()):
        outs.append(a_SK[start:end] @ b_EKN[e])
        start = end
    return torch.cat(outs, 0)


def _grouped_wgrad(a_SM: Tensor, b_SN: Tensor, offsets_E: Tensor, E: int) -> Tensor:
    """dW[e] = a[rows of e]^T @ b[rows of e] -> [E, M, N] (one matmul per expert; syncs once)."""
    out = a_SM.new_zeros(E, a_SM.shape[1], b_SN.shape[1])
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        if end > start:
            out[e] = a_SM[start:end].t() @ b_SN[start:end]
        start = end
    return out


def _torch_backward(dy_TD, x_TD, weights_TK, ids_TK, gate_up_EFD, down_EDF):
    """The previous backward (before issue 17; kept as the "torch" lever and as a reference):
    PyTorch over rows sorted by expert, dgrad with grouped GEMMs, wgrad one matmul per expert,
    the gate/up activations recomputed, dx scattered back with index_add."""
    T, K = ids_TK.shape
    E, F2, D = gate_up_EFD.shape
    order_S, _, offsets_E = torch_impl.permute(ids_TK, E)
    token_S = order_S // K
    x_SD = x_TD.index_select(0, token_S)
    dy_SD = dy_TD.index_select(0, token_S).to(x_TD.dtype)
    w_S = weights_TK.reshape(-1).index_select(0, order_S)
    gu_S2F = _grouped_mm(x_SD, gate_up_EFD.transpose(-2, -1), offsets_E)  # recompute
    g_SF, u_SF = gu_S2F.float().chunk(2, dim=-1)
    a_SF = F_.silu(g_SF) * u_SF
    da_raw_SF = _grouped_mm(dy_SD, down_EDF, offsets_E).float()  # dy @ down_e, before the gate weight
    dweights_S = (da_raw_SF * a_SF).sum(-1)  # d y / d w = <dy, down_e a> = <dy @ down_e, a>
    da_SF = da_raw_SF * w_S.unsqueeze(-1)
    sig = torch.sigmoid(g_SF)
    dg_SF = da_SF * u_SF * sig * (1 + g_SF * (1 - sig))
    du_SF = da_SF * g_SF * sig
    dgu_S2F = torch.cat([dg_SF, du_SF], -1).to(x_TD.dtype)
    dx_SD = _grouped_mm(dgu_S2F, gate_up_EFD, offsets_E)
    dx_TD = torch.zeros_like(x_TD).index_add_(0, token_S, dx_SD)
    dweights_TK = torch.zeros_like(weights_TK).reshape(-1)
    dweights_TK = dweights_TK.index_copy(0, order_S, dweights_S.to(weights_TK.dtype)).view(T, K)
    dy_w_SD = (dy_SD.float() * w_S.unsqueeze(-1)).to(x_TD.dtype)
    d_down = _grouped_wgrad(dy_w_SD, a_SF.to(x_TD.dtype), offsets_E, E)  # [E, D, F]
    d_gate_up = _grouped_wgrad(dgu_S2F, x_SD, offsets_E, E)  # [E, 2F, D]
    return dx_TD, dweights_TK, d_gate_up, d_down


def train_configs(num_rows: int, D: int, F: int, E: int, device_name: str) -> triton_grouped.TrainConfigs:
    """Tiles of the training GEMMs for S = num_rows routed rows: a tuned "train" entry of the config
    table (same buckets as get_config), else the forward's tiles plus heuristic backward tiles."""
    entry = _table_entry("train", num_rows, D, F, E, device_name)
    if entry is not None and not INTERPRET:
        return triton_grouped.TrainConfigs(**{k: GemmConfig(**v) for k, v in entry.items() if k != "ms"})
    fwd = get_config(num_rows, D, F, E, device_name)
    return triton_grouped.heuristic_train_configs(fwd.gate_up, fwd.down)


class _RoutedExperts(torch.autograd.Function):
    """Training path of ops.routed_experts on the triton backend. backward="triton": forward and
    backward through triton_grouped (the plan and the expert activations are saved; nothing is
    scattered); "torch": the inference forward and the previous PyTorch backward."""

    @staticmethod
    def forward(ctx, x_TD, weights_TK, expert_ids_TK, gate_up_EFD, down_EDF, backward, variant, save_gu):
        ctx.mode = backward if x_TD.shape[0] > 0 else "torch"  # no rows: the twin's all-zero grads
        if ctx.mode == "torch":
            ctx.save_for_backward(x_TD, weights_TK, expert_ids_TK, gate_up_EFD, down_EDF)
            return routed_experts_forward(x_TD, weights_TK, expert_ids_TK, gate_up_EFD, down_EDF)
        T, D = x_TD.shape
        E, F2, _ = gate_up_EFD.shape
        cfg = train_configs(T * expert_ids_TK.shape[1], D, F2 // 2, E, _device_name(x_TD))
        ctx.cfg, ctx.variant = cfg, triton_grouped.GemmVariant.parse(variant)
        y, saved = triton_grouped.forward(x_TD, weights_TK, expert_ids_TK, gate_up_EFD, down_EDF, cfg,
                                          ctx.variant, save_gu)
        plan = saved.plan
        ctx.block_m, ctx.has_gu = plan.block_m, saved.gu_P2F is not None
        # every tensor through save_for_backward, so activation checkpointing can drop and recompute them
        ctx.save_for_backward(x_TD, weights_TK, gate_up_EFD, down_EDF, plan.sorted_ids_P,
                              plan.block_expert_NB, plan.num_post_pad, plan.counts_E, saved.h_PF,
                              saved.gu_P2F if ctx.has_gu else saved.h_PF)
        return y

    @staticmethod
    def backward(ctx, dy_TD):
        if ctx.mode == "torch":
            x_TD, weights_TK, ids_TK, gate_up_EFD, down_EDF = ctx.saved_tensors
            dx, dw, dgu, ddn = _torch_backward(dy_TD, x_TD, weights_TK, ids_TK, gate_up_EFD, down_EDF)
            return dx, dw, None, dgu, ddn, None, None, None
        x_TD, weights_TK, gate_up_EFD, down_EDF, sorted_ids, block_expert, num_post_pad, counts, h, gu = \
            ctx.saved_tensors
        plan = DispatchPlan(sorted_ids, block_expert, num_post_pad, counts, ctx.block_m)
        saved = triton_grouped.Saved(plan, h, gu if ctx.has_gu else None)
        dx, dw, dgu, ddn = triton_grouped.backward(dy_TD, x_TD, weights_TK, gate_up_EFD, down_EDF, saved,
                                                   ctx.cfg, ctx.variant)
        return dx, dw.to(weights_TK.dtype), None, dgu, ddn, None, None, None


def routed_experts(x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor, gate_up_EFD: Tensor,
                   down_EDF: Tensor, *, backward: str = "triton", variant: str = "default",
                   save_activations: bool = True) -> Tensor:
    """ops.routed_experts on the Triton backend. Differentiable in x, weights, gate_up and down.
    backward / variant / save_activations: the training levers (ops.TrainOptions)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, weights_TK, gate_up_EFD, down_EDF)):
        return _RoutedExperts.apply(x_TD, weights_TK, expert_ids_TK, gate_up_EFD, down_EDF, backward, variant,
                                    save_activations)
    return routed_experts_forward(x_TD, weights_TK, expert_ids_TK, gate_up_EFD, down_EDF)


# ----------------------------------------------------------------------------------------------
# FP8 (e4m3) inference: weight-only (bf16 activations) and W8A8 (per-token activation scales)
# ----------------------------------------------------------------------------------------------


def quantize_rows_fp8(x_RC: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric e4m3 quantisation: (q [R, C] fp8, scale [R] fp32) with x ~= q * scale."""
    amax = x_RC.float().abs().amax(-1).clamp_min(1e-12)
    scale = amax / FP8_MAX
    q = (x_RC.float() / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def quant_rows(x_RC: Tensor) -> tuple[Tensor, Tensor]:
    """quantize_rows_fp8 in one Triton launch. Under the interpreter it is quantize_rows_fp8 itself:
    the interpreter rounds fp32 -> e4m3 wrongly next to powers of two (7.84 -> 4, not 8; seen
    with triton 3.9), so the kernel is checked on the GPU only."""
    if INTERPRET:
        return quantize_rows_fp8(x_RC)
    R, C = x_RC.shape
    x_RC = x_RC if x_RC.stride(-1) == 1 else x_RC.contiguous()
    q = torch.empty(R, C, dtype=FP8, device=x_RC.device)
    scale = torch.empty(R, dtype=torch.float32, device=x_RC.device)
    _quant_rows_kernel[(triton.cdiv(R, 8),)](
        x_RC, q, scale, R, C, x_RC.stride(0), FP8_MAX=FP8_MAX, BLOCK_R=8,
        BLOCK_C=min(1024, triton.next_power_of_2(C)), num_warps=4,
    )
    return q, scale


def routed_experts_fp8(
    x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor, gate_up_q: Tensor, gate_up_scale: Tensor,
    down_q: Tensor, down_scale: Tensor, activations: str = "bf16", cfg: MoEConfig | None = None,
) -> Tensor:
    """Inference forward with e4m3 expert weights and per-output-channel fp32 scales
    (gate_up_scale [E, 2F], down_scale [E, D]). activations="bf16": weight-only (weights are
    converted to x's dtype in registers); "fp8": W8A8 with per-token scales for x and for h."""
    if activations not in ("bf16", "fp8"):
        raise ValueError(f"activations must be 'bf16' or 'fp8', got {activations!r}")
    T, D = x_TD.shape
    K = expert_ids_TK.shape[-1]
    E, F2, _ = gate_up_q.shape
    S = T * K
    if S == 0:
        return x_TD.new_zeros(T, D)
    kind = "fp8" if activations == "bf16" else "w8a8"
    cfg = _interpret_config(cfg or get_config(S, D, F2 // 2, E, _device_name(x_TD), kind))
    if cfg.decode is not None and activations == "bf16":
        return decode(x_TD.contiguous(), weights_TK, expert_ids_TK, gate_up_q, down_q, cfg.decode,
                      gate_up_scale, down_scale)
    plan = align(expert_ids_TK, E, cfg.gate_up.block_m)
    w_S = weights_TK.reshape(-1).float().contiguous()
    if activations == "bf16":
        h = gate_up(x_TD.contiguous(), gate_up_q, plan, K, cfg.gate_up, w_scale_EF=gate_up_scale)
        y_SD = down(h, down_q, w_S, plan, S, cfg.down, x_TD.dtype, w_scale_ED=down_scale)
    else:
        x_q, x_s = quant_rows(x_TD)
        h = gate_up(x_q, gate_up_q, plan, K, cfg.gate_up, w_scale_EF=gate_up_scale, x_scale_T=x_s,
                    out_dtype=x_TD.dtype)
        h_q, h_s = quant_rows(h)
        y_SD = down(h_q, down_q, w_S, plan, S, cfg.down, x_TD.dtype, w_scale_ED=down_scale, h_scale_P=h_s)
    return y_SD.view(T, K, D).sum(1) if K > 1 else y_SD.view(T, D)
