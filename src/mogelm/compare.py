"""`mogelm compare`: the main job. Train a MoGE model and its top-k twin, then write a report.

    mogelm compare                       # small preset, embedded stdlib corpus, ~10 min on 2 CPU cores
    mogelm compare --name quick --preset debug --max-steps 100
    mogelm compare --resume              # finish an interrupted comparison

Both models share everything but the router: the same preset (same number of experts and of
active experts per token; top-k ignores the groups), the same data order, steps, schedule and
seed, hence identical initial weights. Balancing: both use the paper's batch-level aux loss
(alpha 1e-3). Output under runs/<name>/:

    moge/, topk/          `mogelm train` output folders (log.jsonl, final/ checkpoint)
    report.md             the report, with the PNGs below
    summary.json          every number in the report
    val_loss.png  imbalance.png  expert_load.png  intra_group.png  coactivation.png

The summary table printed at the end: final validation loss; Imbalance Score (paper Eq. 3) per
training batch over all steps and layers, mean and max, for 8 and 4 simulated devices; and the
busiest device's load over the mean load (the straggler factor) at 8 devices.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from mogelm.errors import UserError

DEVICES = (8, 4)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="compare", help="run name: output goes to <runs-dir>/<name> (default compare)")
    p.add_argument("--runs-dir", default="runs", help="parent folder of runs (default runs)")
    p.add_argument("--preset", default="small", help="model preset for both models (default small)")
    p.add_argument("--baseline", default="topk", choices=("topk", "softmax_topk", "group_limited"),
                   help="the twin's routing (default topk, paper Eq. 2)")
    p.add_argument("--data", nargs="*", default=[], help="files, folders or globs (default: CPython stdlib sources)")
    p.add_argument("--max-bytes", type=int, default=None, help="use only the first N bytes of the stdlib corpus")
    p.add_argument("--max-steps", type=int, default=300, help="optimizer steps per model (default 300)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--eval-every", type=int, default=50, help="validate every N steps (default 50)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches (default 8)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    p.add_argument("--vocab-size", type=int, default=None, help="tokenizer/model vocabulary (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="seed of both runs (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--jobs", type=int, default=2, help="train the two models at once (2, CPU default) or in turn (1)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per training (default: cores / jobs)")
    p.add_argument("--cache-dir", default=None, help="tokenizer/shard cache (default $MOGELM_CACHE or ~/.cache/mogelm)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted comparison of the same name")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")


def _train_config(args, routing: str, run_dir: Path, threads: int):
    from mogelm.train import TrainConfig

    return TrainConfig(
        out=str(run_dir / routing), preset=args.preset, routing=routing, data=list(args.data or []),
        max_bytes=args.max_bytes, vocab_size=args.vocab_size, cache_dir=args.cache_dir, seq_len=args.seq_len,
        batch_size=args.batch_size, max_steps=args.max_steps, lr=args.lr, eval_every=args.eval_every,
        eval_batches=args.eval_batches, save_every=args.save_every, seed=args.seed, device=args.device,
        threads=threads, resume=args.resume, sim_devices=DEVICES, progress="lines",
    )


def _train_argv(tc) -> list[str]:
    """`mogelm train` flags reproducing a TrainConfig built by _train_config."""
    argv = ["--preset", tc.preset, "--routing", tc.routing, "--out", tc.out, "--seq-len", str(tc.seq_len),
            "--batch-size", str(tc.batch_size), "--max-steps", str(tc.max_steps), "--lr", repr(tc.lr),
            "--eval-every", str(tc.eval_every), "--eval-batches", str(tc.eval_batches),
            "--save-every", str(tc.save_every), "--seed", str(tc.seed), "--device", tc.device,
            "--threads", str(tc.threads), "--progress", tc.progress]
    if tc.data:
        argv += ["--data", *tc.data]
    for flag, value in (("--max-bytes", tc.max_bytes), ("--vocab-size", tc.vocab_size), ("--cache-dir", tc.cache_dir)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + (["--resume"] if tc.resume else [])


def _train_concurrently(configs: list) -> dict:
    """One `mogelm train` process per model, each on its own share of the cores. On a small CPU two
    single-threaded processes beat one two-threaded process running the models in turn (no
    OpenMP synchronisation; measured 1.9k tokens/s each against 3.0k for one at a time), and
    they degrade gracefully when other programs share the cores."""
    procs, t0, timings = [], time.time(), {}
    try:
        for tc in configs:
            env = {**os.environ, "OMP_NUM_THREADS": str(tc.threads)}
            procs.append((tc, subprocess.Popen([sys.executable, "-m", "mogelm", "train", *_train_argv(tc)], env=env)))
        pending = {tc.routing for tc, _ in procs}
        failed = None
        while pending and failed is None:
            for tc, proc in procs:
                if tc.routing in pending and proc.poll() is not None:
                    pending.discard(tc.routing)
                    timings[tc.routing] = time.time() - t0
                    if proc.returncode != 0:
                        failed = (tc, proc.returncode)
            time.sleep(0.2)
        if failed is not None:
            raise UserError(f"training the {failed[0].routing} model failed (exit status {failed[1]}); see above")
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    return timings


def run(args: argparse.Namespace) -> int:
    from mogelm.parallel.local import LocalContext
    from mogelm.train import prepare_data, resolve_device, train

    run_dir = Path(args.runs_dir) / args.name
    if run_dir.exists() and any(run_dir.iterdir()) and not args.resume:
        raise UserError(f"{run_dir} already exists; pass --resume to continue it, or choose another --name")
    if args.max_steps < 1:
        raise UserError("--max-steps must be positive")
    if args.jobs not in (1, 2):
        raise UserError("--jobs must be 1 or 2")
    t0 = time.time()
    routings = ("moge", args.baseline)
    cpu = resolve_device(args.device).type == "cpu"
    jobs = args.jobs if cpu else 1
    threads = args.threads or (max(1, _cpu_count() // jobs) if cpu else 0)
    configs = [_train_config(args, r, run_dir, threads) for r in routings]
    # Tokenizer and shards once, here, so bad input fails once and cleanly before any training.
    preset_vocab = configs[0].vocab_size or _preset_vocab(args.preset)
    prepare_data(configs[0], preset_vocab, LocalContext(), log=lambda msg: print(msg, file=sys.stderr, flush=True))
    run_dir.mkdir(parents=True, exist_ok=True)
    if jobs == 2:
        timings = _train_concurrently(configs)
    else:
        timings = {}
        for tc in configs:
            t = time.time()
            train(tc)
            timings[tc.routing] = time.time() - t
    summary = build_summary(run_dir, routings, args, wall_s=time.time() - t0, timings=timings)
    summary["jobs"], summary["threads_per_job"] = jobs, threads
    write_report(run_dir, summary)
    summary["wall_s"] = time.time() - t0  # report writing included
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "final_routing"}))
    else:
        print_table(summary, run_dir)
    return 0


def _preset_vocab(preset: str) -> int:
    from mogelm.config import from_name

    try:
        return from_name(preset).vocab_size
    except ValueError as e:
        raise UserError(str(e)) from None


# Summary ------------------------------------------------------------------------------------------
def _load_run(folder: Path) -> dict:
    from mogelm.train import read_log

    log_path = folder / "log.jsonl"
    if not log_path.is_file():
        raise UserError(f"{log_path} is missing; the run did not finish")
    recs = read_log(log_path)
    train = [r for r in recs if r.get("kind") == "train"]
    val = [r for r in recs if r.get("kind") == "val"]
    if not train or not val:
        raise UserError(f"{log_path} holds no training or validation records")
    return {"train": train, "val": val}


def build_summary(run_dir: Path, routings, args, wall_s: float, timings: dict) -> dict:
    from mogelm.config import count_parameters, from_name

    runs = {r: _load_run(run_dir / r) for r in routings}
    cfg = from_name(args.preset)
    total, active = count_parameters(cfg)
    models = {}
    for r, logs in runs.items():
        train = logs["train"]
        per_dev = {}
        for P in DEVICES:
            is_SL = np.asarray([t[f"is{P}"] for t in train if f"is{P}" in t], dtype=float)
            mom_SL = np.asarray([t[f"mom{P}"] for t in train if f"mom{P}" in t], dtype=float)
            if is_SL.size:
                per_dev[str(P)] = {
                    "is_mean": float(is_SL.mean()), "is_max": float(is_SL.max()),
                    "is_mean_per_layer": is_SL.mean(0).tolist(),
                    "busiest_over_mean_mean": float(mom_SL.mean()), "busiest_over_mean_max": float(mom_SL.max()),
                }
        final_val = logs["val"][-1]
        routing_stats = final_val.get("routing", {})
        shares = np.asarray(routing_stats.get("expert_share", [[0.0]]), dtype=float)
        models[r] = {
            "final_val_loss": final_val["val_loss"],
            "final_val_ppl": final_val["val_ppl"],
            "final_train_loss": float(np.mean([t["loss"] for t in train[-10:]])),
            "steps": train[-1]["step"],
            "tokens": train[-1]["tokens"],
            "train_s": timings.get(r),
            "devices": per_dev,
            "busiest_expert_share": float(shares.max()),
            "val_curve": [[v["step"], v["val_loss"]] for v in logs["val"]],
        }
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {_cpu_name()}, {_cpu_count()} CPUs",
        "command": "mogelm " + " ".join(sys.argv[1:]) if sys.argv and "compare" in sys.argv else "mogelm compare",
        "preset": args.preset,
        "num_experts": cfg.num_experts, "num_groups": cfg.num_groups, "active_experts": cfg.num_experts_per_tok,
        "parameters": total, "active_parameters": active,
        "tokens_per_step": args.batch_size * args.seq_len,
        "wall_s": wall_s,
        "models": models,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def print_table(summary: dict, run_dir: Path) -> None:
    head = f"{'model':<14}{'val loss':>9}{'ppl':>9}{'IS@8 mean':>11}{'IS@8 max':>10}{'IS@4 mean':>11}{'IS@4 max':>10}{'busiest/mean@8':>16}"
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


def write_report(run_dir: Path, summary: dict) -> None:
    from mogelm.analysis import plots, report

    runs = {r: _load_run(run_dir / r) for r in summary["models"]}
    E, M, K = summary["num_experts"], summary["num_groups"], summary["active_experts"]
    per_group = E // M
    val_curves = {r: ([v["step"] for v in x["val"]], [v["val_loss"] for v in x["val"]]) for r, x in runs.items()}
    train_curves = {r: ([t["step"] for t in x["train"]], [t["loss"] for t in x["train"]]) for r, x in runs.items()}
    plots.val_loss(val_curves, run_dir / "val_loss.png", train_curves)
    is_runs = {
        r: {"steps": [t["step"] for t in x["train"]],
            "is": {P: [t[f"is{P}"] for t in x["train"] if f"is{P}" in t] for P in DEVICES}}
        for r, x in runs.items()
    }
    plots.imbalance_over_training(is_runs, [P for P in DEVICES if E % P == 0], run_dir / "imbalance.png",
                                  summary["tokens_per_step"])
    final_routing = {r: x["val"][-1].get("routing", {}) for r, x in runs.items()}
    shares = {r: fr["expert_share"] for r, fr in final_routing.items() if "expert_share" in fr}
    plots.expert_load_heatmaps(shares, run_dir / "expert_load.png", per_group, K)
    L = len(next(iter(shares.values())))
    if "moge" in shares:
        plots.intra_group_load(shares["moge"], M, run_dir / "intra_group.png", sorted({0, L // 2, L - 1}))
    shown_layers = sorted({0, L - 1})
    coact = {r: [fr["coactivation"][layer] for layer in shown_layers] for r, fr in final_routing.items() if "coactivation" in fr}
    plots.coactivation(coact, run_dir / "coactivation.png", per_group, [f"layer {layer}" for layer in shown_layers])
    within_group = {}
    for r, fr in final_routing.items():
        if "coactivation" in fr:
            mats = np.asarray(fr["coactivation"], dtype=float)  # [L, E, E]
            blocks = np.kron(np.eye(M), np.ones((per_group, per_group))).astype(bool) & ~np.eye(E, dtype=bool)
            within_group[r] = float(mats[:, blocks].max())
    summary["max_within_group_coactivation"] = within_group
    (run_dir / "report.md").write_text(report.render(summary))
