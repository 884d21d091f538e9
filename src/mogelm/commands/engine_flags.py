"""The KV-cache and speculative-decoding flags `mogelm serve` and `mogelm generate` share (not a subcommand):

    mogelm serve --model DIR --gpu-memory-fraction 0.85 --kv-cache-dtype fp8
    mogelm generate --model DIR --prompt "..." --kv-cache-tokens 65536 --block-size 16
    mogelm serve --model DIR --speculative ngram --draft-tokens 3     (or mtp: a checkpoint with MTP)

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
    s = p.add_argument_group("speculative decoding (docs/speculative.md)")
    s.add_argument("--speculative", choices=("ngram", "mtp"), default=None,
                   help="draft tokens by n-gram lookup in the text so far, or with the checkpoint's MTP "
                        "modules, and verify them in one forward (same greedy output)")
    s.add_argument("--draft-tokens", type=int, default=3, help="drafts per sequence and step (default 3)")
    s.add_argument("--spec-max-batch", type=int, default=None,
                   help="never speculate while more than this many sequences run (default: --max-batch "
                        "with --spec-policy auto, 64 with fixed)")
    s.add_argument("--spec-policy", choices=("auto", "fixed"), default=None,
                   help="auto: measure what drafts earn and choose 0..--draft-tokens per batch size "
                        "(default on CUDA); fixed: always --draft-tokens up to --spec-max-batch "
                        "(default on CPU; seeded sampling repeats exactly)")


MTP_MISSING = ("--speculative mtp needs a checkpoint with MTP modules (mtp_depth > 0 in its config): train "
               "one with `mogelm train --mtp-depth 1`, or use --speculative ngram")


def check_speculative(args: argparse.Namespace, model_dir: str | None) -> None:
    """--speculative mtp on a checkpoint without MTP modules: one line, before the weights load."""
    if args.speculative == "mtp" and model_dir is not None:
        from mogelm.hf_config import read_config

        if read_config(model_dir).mtp_depth == 0:
            raise UserError(f"{model_dir} has no MTP modules: {MTP_MISSING}")


def engine_kwargs(args: argparse.Namespace) -> dict:
    if not 0 < args.gpu_memory_fraction <= 1:
        raise UserError(f"--gpu-memory-fraction must be in (0, 1], got {args.gpu_memory_fraction}")
    for name in ("kv_cache_tokens", "block_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if args.draft_tokens < 1:
        raise UserError(f"--draft-tokens must be at least 1, got {args.draft_tokens}")
    if args.spec_max_batch is not None and args.spec_max_batch < 0:
        raise UserError(f"--spec-max-batch must be >= 0, got {args.spec_max_batch}")
    return dict(gpu_memory_fraction=args.gpu_memory_fraction, kv_cache_tokens=args.kv_cache_tokens,
                kv_cache_dtype=args.kv_cache_dtype, block_size=args.block_size,
                prefix_caching=not args.no_prefix_caching, speculative=args.speculative,
                draft_tokens=args.draft_tokens, spec_max_batch=args.spec_max_batch,
                spec_policy=args.spec_policy)
