"""Shared pieces of the Triton kernel modules: the interpreter flag, fp8 constants, dot options,
and the gate/up reduction loop that the grouped (triton_moe) and decode (triton_decode) kernels share.

Importing raises ImportError when triton is missing (ops.py reads that as "no triton").
"""

from __future__ import annotations

import os

import torch
import triton  # ImportError here when triton is missing
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # set before triton is imported (conftest.py)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value


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
