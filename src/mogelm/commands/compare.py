"""`mogelm compare`: the main job. Train a MoGE model and its top-k twin, then write a report.

    mogelm compare                       # small preset, embedded stdlib corpus, 7-23 min on 2 CPU cores
    mogelm compare --name quick --preset debug --max-steps 100
    mogelm compare --resume              # finish an interrupted comparison

A thin layer over mogelm.compare.run_comparison (what is trained and written is described there).
Printed at the end: final validation loss; Imbalance Score (paper Eq. 3) per training batch over
all steps and layers, mean and max, for 8 and 4 simulated devices; and the busiest device's load
over the mean load (the straggler factor) at 8 devices; or, with --json, the summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="compare",
                   help="run name: output goes to <runs-dir>/<name> (default compare)")
    p.add_argument("--runs-dir", default="runs", help="parent folder of runs (default runs)")
    p.add_argument("--preset", default="small", help="model preset for both models (default small)")
    p.add_argument("--baseline", default="topk", choices=("topk", "softmax_topk", "group_limited"),
                   help="the twin's routing (default topk, paper Eq. 2)")
    p.add_argument("--data", nargs="*", default=[],
                   help="files, folders or globs (default: CPython stdlib sources)")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="use only the first N bytes of the stdlib corpus")
    p.add_argument("--max-steps", type=int, default=300, help="optimizer steps per model (default 300)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--eval-every", type=int, default=50, help="validate every N steps (default 50)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches (default 8)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="tokenizer/model vocabulary (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="seed of both runs (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--jobs", type=int, default=2,
                   help="train the two models at once (2, CPU default) or in turn (1)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per training (default: cores / jobs)")
    p.add_argument("--cache-dir", default=None,
                   help="tokenizer/shard cache (default $MOGELM_CACHE or ~/.cache/mogelm)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted comparison of the same name")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from mogelm.compare import CompareConfig, run_comparison

    cc = CompareConfig(
        name=args.name, runs_dir=args.runs_dir, preset=args.preset, baseline=args.baseline,
        data=list(args.data or []), max_bytes=args.max_bytes, max_steps=args.max_steps,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, eval_every=args.eval_every,
        eval_batches=args.eval_batches, save_every=args.save_every,
        vocab_size=args.vocab_size, seed=args.seed, device=args.device, jobs=args.jobs, threads=args.threads,
        cache_dir=args.cache_dir, resume=args.resume,
    )
    summary = run_comparison(cc)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "final_routing"}))
    else:
        print_table(summary, cc.run_dir)
    return 0


def print_table(summary: dict, run_dir: Path) -> None:
    head = (f"{'model':<14}{'val loss':>9}{'ppl':>9}{'IS@8 mean':>11}{'IS@8 max':>10}{'IS@4 mean':>11}"
            f"{'IS@4 max':>10}{'busiest/mean@8':>16}")
    print()
    print(head)
    print("-" * len(head))
    for r, m in summary["models"].items():
        d8, d4 = m["devices"].get("8", {}), m["devices"].get("4", {})
        print(f"{r:<14}{m['final_val_loss']:>9.4f}{m['final_val_ppl']:>9.2f}"
              f"{d8.get('is_mean', float('nan')):>11.3f}{d8.get('is_max', float('nan')):>10.3f}"
              f"{d4.get('is_mean', float('nan')):>11.3f}{d4.get('is_max', float('nan')):>10.3f}"
              f"{d8.get('busiest_over_mean_mean', float('nan')):>16.3f}")
    print(f"\nIS per training batch of {summary['tokens_per_step']} tokens, over all steps and layers. "
          f"Wall time {summary['wall_s'] / 60:.1f} min. Report: {run_dir / 'report.md'}")
