"""The KV-cache flags `mogelm serve` and `mogelm generate` share (not a subcommand):

    mogelm serve --model DIR --gpu-memory-fraction 0.85 --kv-cache-dtype fp8
    mogelm generate --model DIR --prompt "..." --kv-cache-tokens 65536 --block-size 16

add_arguments(parser) adds them; engine_kwargs(args) checks them (UserError) and returns the
Engine keyword arguments.
"""

from __future__ import annotations

import argparse

from mogelm.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KV cache (paged)")
    g.add_argument("--gpu-memory-fraction", type=float, default=0.9,
                   help="share of the GPU's memory for weights, activations and the KV cache; the cache "
                        "takes what is left after loading the weights and profiling one step (default 0.9)")
    g.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV cache size in tokens (default: on CPU max-batch x context; on CUDA from "
                        "--gpu-memory-fraction)")
    g.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                   help="auto: the model's dtype; fp8: e4m3 with per-head scales (half the memory)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    g.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV blocks of identical prompt prefixes")


def engine_kwargs(args: argparse.Namespace) -> dict:
    if not 0 < args.gpu_memory_fraction <= 1:
        raise UserError(f"--gpu-memory-fraction must be in (0, 1], got {args.gpu_memory_fraction}")
    for name in ("kv_cache_tokens", "block_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    return dict(gpu_memory_fraction=args.gpu_memory_fraction, kv_cache_tokens=args.kv_cache_tokens,
                kv_cache_dtype=args.kv_cache_dtype, block_size=args.block_size,
                prefix_caching=not args.no_prefix_caching)
