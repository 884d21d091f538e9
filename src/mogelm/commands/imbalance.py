"""`mogelm imbalance`: Monte-Carlo Imbalance Score of top-k vs MoGE routing (paper Eq. 3-4, Fig. 2b).

    mogelm imbalance --experts 64 --groups 8 --top-k 8 --tokens 16 --trials 20000 [--json]

A thin layer over mogelm.analysis.metrics (simulate_imbalance, summarize).
"""

from __future__ import annotations

import argparse
import json

from mogelm.analysis.metrics import simulate_imbalance, summarize
from mogelm.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", type=int, default=64, help="routed experts N (default 64, Pangu Pro MoE)")
    p.add_argument("--groups", type=int, default=8, help="expert groups = devices M (default 8)")
    p.add_argument("--top-k", type=int, default=8, help="experts per token K (default 8)")
    p.add_argument("--tokens", type=int, default=16, help="tokens per batch |X| (default 16, as in Fig. 2b)")
    p.add_argument("--trials", type=int, default=20000, help="Monte-Carlo batches D (default 20000)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


MAX_KEYS_BYTES = 1 << 30  # one Monte-Carlo batch's random keys (float32 [tokens, experts]) at most


def check_sizes(args: argparse.Namespace) -> None:
    """Each count positive and the Monte-Carlo arrays within memory, named by flag."""
    for name in ("experts", "groups", "top_k", "tokens", "trials"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.experts % args.groups:
        raise UserError(f"--experts {args.experts} must be divisible by --groups {args.groups} "
                        "(equal groups)")
    if args.top_k > args.experts:
        raise UserError(f"--top-k {args.top_k} exceeds --experts {args.experts}")
    per_batch = 4 * args.tokens * args.experts
    if per_batch > MAX_KEYS_BYTES:
        raise UserError(f"--tokens {args.tokens} x --experts {args.experts} needs {per_batch / 2**30:.1f} "
                        f"GiB per simulated batch (at most {MAX_KEYS_BYTES / 2**30:.0f} GiB); use fewer "
                        "--tokens")
    if 8 * args.trials > MAX_KEYS_BYTES:
        raise UserError(f"--trials {args.trials} is too many to hold the results in memory "
                        f"(at most {MAX_KEYS_BYTES // 8:,})")


def run(args: argparse.Namespace) -> int:
    check_sizes(args)
    results = []
    for routing in ("topk", "moge"):
        try:
            samples = simulate_imbalance(args.experts, args.groups, args.top_k, args.tokens, args.trials,
                                         routing, args.seed)
        except ValueError as e:
            raise UserError(str(e)) from None
        results.append(summarize(routing, samples))
    setup = {"experts": args.experts, "groups": args.groups, "top_k": args.top_k, "tokens": args.tokens,
             "trials": args.trials}
    if args.json:
        print(json.dumps({"setup": setup, "results": [r.to_dict() for r in results]}, indent=2))
        return 0
    print(f"Imbalance Score over {args.trials} random batches of {args.tokens} tokens "
          f"({args.experts} experts, {args.groups} groups/devices, top-{args.top_k}):")
    print(f"{'routing':<8} {'mean IS':>8} {'P(IS>0)':>8} {'p95':>7} {'max':>7}")
    for r in results:
        print(f"{r.routing:<8} {r.mean:8.3f} {r.p_positive:8.3f} {r.p95:7.3f} {r.max:7.3f}")
    return 0
