"""Shared pieces of the Triton kernel modules: the interpreter flag, fp8 constants, dot options.

Importing raises ImportError when triton is missing (ops.py reads that as "no triton").
"""

from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (ImportError here when triton is missing)
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # set before triton is imported (conftest.py)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value


def fp16_dot(a: Tensor, w: Tensor) -> bool:
    return w.dtype == FP8 and a.dtype in (torch.bfloat16, torch.float16)


def precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"
