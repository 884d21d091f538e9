"""`mogelm eval`: loss, perplexity and routing statistics of a checkpoint on text.

    mogelm eval --model runs/compare/moge/final --data notes/ --json
    mogelm eval --model runs/compare/moge/final          # held-out part of the embedded corpus

A thin layer over mogelm.evaluate.evaluate_checkpoint, which says what is measured.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--data", nargs="*", default=None, help="files, folders or globs of .txt/.md/.py/.jsonl "
                   "(default: held-out part of the stdlib corpus)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the one in --model")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    p.add_argument("--max-batches", type=int, default=0,
                   help="stop after this many batches (0: all the text)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (default)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")


def run(args: argparse.Namespace) -> int:
    from mogelm.checkpoint import read_config
    from mogelm.commands._checks import check_device, check_range
    from mogelm.evaluate import evaluate_checkpoint

    check_range(args, "seq_len", "batch_size", low=1)
    check_range(args, "max_batches", low=0, note=" (0: all the text)")
    check_device(args.device)
    result = evaluate_checkpoint(args.model, args.data, args.tokenizer, args.seq_len, args.batch_size,
                                 args.max_batches, args.device)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model      {result['model']}  ({result['routing']}, {read_config(args.model).num_layers} layers)")
    print(f"text       {result['documents']} documents, {result['tokens']:,} tokens scored")
    print(f"loss       {result['loss']:.4f}")
    print(f"perplexity {result['ppl']:.2f}")
    if "routing_stats" in result:
        rs = result["routing_stats"]
        print(f"{'layer':>5} {'busiest expert':>15} "
              + " ".join(f"{'IS@' + p:>8} {'max/mean@' + p:>11}" for p in rs["imbalance"]))
        for layer, shares in enumerate(rs["expert_share"]):
            cells = " ".join(f"{v['mean_per_layer'][layer]:8.3f} {v['max_over_mean_per_layer'][layer]:11.3f}"
                             for v in rs["imbalance"].values())
            print(f"{layer:5d} {max(shares):14.1%} {cells}")
        print(f"(busiest expert: share of tokens routed to it; IS per batch of at most {args.batch_size}x"
              f"{args.seq_len} tokens, {rs['batches']} batches, paper Eq. 3)", file=sys.stderr)
    return 0
