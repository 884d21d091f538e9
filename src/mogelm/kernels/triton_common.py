"""Shared pieces of the Triton kernel modules: the interpreter flag, fp8 constants, dot options,
the gate/up reduction loop that the grouped (triton_moe) and decode (triton_decode) kernels share,
tile configs (GemmConfig) with the shared-memory fit, the L2 tile swizzle, and the TMA tensor
descriptor helpers of the training GEMMs (triton_grouped).

Importing raises ImportError when triton is missing (ops.py reads that as "no triton").
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch
import triton  # ImportError here when triton is missing
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # set before triton is imported (conftest.py)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value


@dataclass(frozen=True)
class GemmConfig:
    """Tiles of one grouped GEMM launch: block_m rows (or, for a wgrad, output rows), block_n
    output columns, block_k reduction step; group_m row blocks per L2 swizzle group."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


@functools.cache
def shared_memory_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 227 * 1024))


def fit_gemm(cfg: GemmConfig, a_bytes: int, w_bytes: int, num_w_tiles: int, limit: int) -> GemmConfig:
    """Shrink pipelining depth, then BLOCK_K, until the staged tiles fit in shared memory (with a
    margin for the epilogue). Tables are tuned for bf16 weights; fp32 weights (e.g. an fp32 model
    run without autocast) need four bytes a weight and would otherwise fail with OutOfResources."""
    def need(c: GemmConfig) -> int:
        return c.num_stages * c.block_k * (c.block_m * a_bytes + num_w_tiles * c.block_n * w_bytes)

    while need(cfg) > 0.9 * limit and (cfg.num_stages > 2 or cfg.block_k > 32):
        if cfg.num_stages > 2:
            cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
        else:
            cfg = dataclasses.replace(cfg, block_k=cfg.block_k // 2)
    return cfg


def device_limit(x: Tensor) -> int:
    """Shared memory per block on x's CUDA device."""
    return shared_memory_limit(x.device.index if x.device.index is not None else torch.cuda.current_device())


def tma_ok(t: Tensor) -> bool:
    """Whether a 2-D view of t can back a TMA tensor descriptor: unit last stride, 16-byte aligned
    base and row stride (host descriptors check the same and would raise)."""
    return (t.dim() >= 2 and t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and (t.stride(-2) * t.element_size()) % 16 == 0)


def descriptor(t2d: Tensor, block: list[int]):
    """A host-side TMA tensor descriptor over a 2-D tensor (triton.tools.tensor_descriptor; triton
    >= 3.4). Loads outside the tensor read zeros."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t2d, list(t2d.shape), list(t2d.stride()), block)


@triton.jit
def tile_ids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of tile `pid` under an L2 swizzle: GROUP_M row blocks walk the N tiles
    together, so a weight tile and a row block are each re-read from L2 rather than HBM by the
    programs running at the same time."""
    width = GROUP_M * num_pid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


def fp16_dot(a: Tensor, w: Tensor) -> bool:
    return w.dtype == FP8 and a.dtype in (torch.bfloat16, torch.float16)


def precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def gate_up_accumulate(
    a_ptrs,  # [BM, BLOCK_K] activation tile at reduction offset 0 (unit stride along D)
    g_ptrs,  # [BLOCK_K, BN] gate tile (a transposed view of gate rows), unit stride along D
    u_ptrs,  # [BLOCK_K, BN] up tile, same layout
    acc_g, acc_u,  # [BM, BN] fp32 accumulators
    offs_k,  # [BLOCK_K] tl.arange(0, BLOCK_K)
    D,  # reduction length (hidden size)
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # D % BLOCK_K == 0: no masks in the loop
    UPCAST: tl.constexpr,  # interpreter: dot in fp32 (it mishandles bf16 tl.dot)
    W_TO_X: tl.constexpr,  # weight-only fp8: convert weight tiles to the activation dtype before the dot
    FP16_DOT: tl.constexpr,  # with W_TO_X and 16-bit activations: dot in fp16 (triton_moe._gate_up_kernel)
    PRECISION: tl.constexpr,  # tl.dot input_precision
):
    """acc_g += a @ gate and acc_u += a @ up over the whole hidden dim, BLOCK_K columns a step.
    Masked tails read zeros. Returns (acc_g, acc_u)."""
    for k in range(0, tl.cdiv(D, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            bg = tl.load(g_ptrs)
            bu = tl.load(u_ptrs)
        else:
            kin = offs_k < D - k * BLOCK_K
            a = tl.load(a_ptrs, mask=kin[None, :], other=0.0)
            bg = tl.load(g_ptrs, mask=kin[:, None], other=0.0)
            bu = tl.load(u_ptrs, mask=kin[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        elif W_TO_X:
            if FP16_DOT:
                a = a.to(tl.float16)
            bg = bg.to(a.dtype)
            bu = bu.to(a.dtype)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    return acc_g, acc_u


@triton.jit
def weight_accumulate(
    a_ptrs,  # [BM, BLOCK_K] activation tile at reduction offset 0 (unit stride along K)
    b_ptrs,  # [BLOCK_K, BN] weight tile (a transposed view of weight rows), unit stride along K
    acc,  # [BM, BN] fp32 accumulator
    offs_k,  # [BLOCK_K] tl.arange(0, BLOCK_K)
    K,  # reduction length
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks in the loop
    UPCAST: tl.constexpr,  # interpreter: dot in fp32
    W_TO_X: tl.constexpr,  # weight-only fp8: convert weight tiles to the activation dtype before the dot
    FP16_DOT: tl.constexpr,  # with W_TO_X and 16-bit activations: dot in fp16 (e4m3 -> fp16 is exact)
    PRECISION: tl.constexpr,  # tl.dot input_precision
):
    """acc += a @ b over the whole reduction, BLOCK_K columns a step: gate_up_accumulate with one
    weight (the MoE down projection, the fp8 weight-only linear). Masked tails read zeros."""
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kin = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=kin[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kin[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        elif W_TO_X:
            if FP16_DOT:
                a = a.to(tl.float16)
            b = b.to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc
