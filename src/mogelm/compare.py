"""`mogelm compare`, the main job, as a library: train a MoGE model and its top-k twin, then write a report.

    mogelm compare                       # small preset, embedded stdlib corpus, 7-23 min on 2 CPU cores
    mogelm compare --name quick --preset debug --max-steps 100
    mogelm compare --resume              # finish an interrupted comparison

    from mogelm.compare import CompareConfig, run_comparison
    summary = run_comparison(CompareConfig(name="quick", preset="debug", max_steps=100))

Both models share everything but the router: the same preset (same number of experts and of
active experts per token; top-k ignores the groups) and model overrides, the same data order,
steps, schedule and seed, hence identical initial weights. Balancing: both use the paper's
batch-level aux loss (alpha 1e-3). On CPU the two train at once, each in its own process
(`python -m mogelm.compare`, which reads its TrainConfig as JSON from $MOGELM_TRAIN_CONFIG).
Output under runs/<name>/:

    moge/, topk/          `mogelm train` output folders (log.jsonl, final/ checkpoint)
    report.md             the report, with the PNGs below
    summary.json          every number in the report
    val_loss.png  imbalance.png  expert_load.png  intra_group.png  coactivation.png

summary.json (and the table `mogelm compare` prints, commands/compare.py): final validation loss;
Imbalance Score (paper Eq. 3) per training batch, mean and max, for 8 and 4 simulated devices;
the busiest device's load over the mean (the straggler factor); expert shares and co-activation.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from mogelm.errors import UserError, run_for_user
from mogelm.fsutil import check_output_dir
from mogelm.train import TrainConfig, find_checkpoints, prepare_data, read_log, resolve_device, train
from mogelm.train.context import LocalContext
from mogelm.train.loop import plan_run

DEVICES = (8, 4)
TRAIN_CONFIG_ENV = "MOGELM_TRAIN_CONFIG"  # the JSON TrainConfig of a training worker (_train_worker)


@dataclass(kw_only=True)
class CompareConfig:
    """One comparison: what `mogelm compare`'s flags set (see commands/compare.py for each one's help)."""

    name: str = "compare"
    runs_dir: str = "runs"
    preset: str = "small"
    baseline: str = "topk"  # the twin's routing: topk | softmax_topk | group_limited
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields, for both models
    data: list[str] = field(default_factory=list)
    max_bytes: int | None = None
    max_steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 2e-3
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    vocab_size: int | None = None
    seed: int = 0
    device: str = "auto"
    jobs: int = 2  # 2: both models at once, in two processes (the CPU default); 1: in turn
    threads: int = 0  # CPU threads per training (0: cores / jobs)
    cache_dir: str | None = None
    resume: bool = False

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def twin_configs(cc: CompareConfig, threads: int) -> list[TrainConfig]:
    """The two runs' TrainConfigs, MoGE first: identical but for the routing and the output folder."""
    return [
        TrainConfig(
            out=str(cc.run_dir / routing), preset=cc.preset, routing=routing,
            model_overrides=dict(cc.model_overrides), data=list(cc.data), max_bytes=cc.max_bytes,
            vocab_size=cc.vocab_size, cache_dir=cc.cache_dir, seq_len=cc.seq_len, batch_size=cc.batch_size,
            max_steps=cc.max_steps, lr=cc.lr, eval_every=cc.eval_every, eval_batches=cc.eval_batches,
            save_every=cc.save_every, seed=cc.seed, device=cc.device, threads=threads, resume=cc.resume,
            sim_devices=DEVICES, progress="lines",
        )
        for routing in ("moge", cc.baseline)
    ]


def train_twins(configs: list[TrainConfig], jobs: int) -> dict:
    """Train every config, in this process one after the other (jobs 1) or all at once, one
    process each (jobs 2); returns {routing: seconds}."""
    if jobs == 2:
        return _train_concurrently(configs)
    timings = {}
    for tc in configs:
        t = time.time()
        train(tc)
        timings[tc.routing] = time.time() - t
    return timings


def _train_concurrently(configs: list[TrainConfig]) -> dict:
    """One training process per model (`python -m mogelm.compare`, the TrainConfig as JSON in the
    environment), each on its own share of the cores. On a small CPU two single-threaded
    processes beat one two-threaded process running the models in turn (no OpenMP
    synchronisation; measured 1.9k tokens/s each against 3.0k for one at a time), and they
    degrade gracefully when other programs share the cores."""
    procs, t0, timings = [], time.time(), {}
    try:
        for tc in configs:
            env = {**os.environ, "OMP_NUM_THREADS": str(tc.threads),
                   TRAIN_CONFIG_ENV: json.dumps(tc.to_dict())}
            procs.append((tc, subprocess.Popen([sys.executable, "-m", "mogelm.compare"], env=env)))
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
            tc, status = failed
            raise UserError(f"training the {tc.routing} model failed (exit status {status}); see above")
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    return timings


def _train_worker() -> int:
    """`python -m mogelm.compare`, started by _train_concurrently: train the one model whose
    TrainConfig is in $MOGELM_TRAIN_CONFIG; exit status 0, or 2 after a one-line error."""
    tc = TrainConfig.from_dict(json.loads(os.environ[TRAIN_CONFIG_ENV]))

    def run() -> int:
        res = train(tc)
        if res.get("final_val"):  # None when an earlier run already finished
            print(f"final validation loss {res['final_val']['val_loss']:.4f}; checkpoint {res['final_dir']}")
        return 0

    return run_for_user(run)


def run_comparison(cc: CompareConfig) -> dict:
    """Train both models and write report.md, the plots and summary.json under cc.run_dir;
    returns the summary."""
    run_dir = cc.run_dir
    check_output_dir(cc.runs_dir, "--runs-dir")
    check_output_dir(run_dir, "--name")
    if run_dir.exists() and any(run_dir.iterdir()) and not cc.resume:
        raise UserError(f"{run_dir} already exists; pass --resume to continue it, or choose another --name")
    if cc.max_steps < 1:
        raise UserError(f"--max-steps must be positive, got {cc.max_steps}")
    if cc.jobs not in (1, 2):
        raise UserError(f"--jobs must be 1 or 2, got {cc.jobs}")
    if cc.threads < 0:
        raise UserError(f"--threads must be 0 (cores / jobs) or more, got {cc.threads}")
    t0 = time.time()
    routings = ("moge", cc.baseline)
    cpu = resolve_device(cc.device).type == "cpu"
    jobs = cc.jobs if cpu else 1
    threads = cc.threads or (max(1, _cpu_count() // jobs) if cpu else 0)
    configs = twin_configs(cc, threads)
    for tc in configs:  # --eval-every 0, --lr -1, ...: refused now, not after the first step
        plan_run(tc)
    # Tokenizer and shards once, here, so bad input fails once and cleanly before any training.
    preset_vocab = configs[0].vocab_size or _preset_vocab(cc.preset, cc.model_overrides)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)
    prepare_data(configs[0], preset_vocab, LocalContext(), log=say)
    fresh = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        timings = train_twins(configs, jobs)
    except BaseException:
        # A fresh run that failed before its first checkpoint leaves nothing worth resuming:
        # remove its folder, so that the retry is not told "already exists; pass --resume".
        if fresh and not any(find_checkpoints(Path(tc.out)) for tc in configs):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    summary = build_summary(run_dir, routings, cc, wall_s=time.time() - t0, timings=timings)
    summary["jobs"], summary["threads_per_job"] = jobs, threads
    write_report(run_dir, summary)
    summary["wall_s"] = time.time() - t0  # report writing included
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _preset_vocab(preset: str, overrides: dict) -> int:
    from mogelm.config import from_name

    try:
        return from_name(preset, **overrides).vocab_size
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


# Summary ------------------------------------------------------------------------------------------
def _load_run(folder: Path) -> dict:
    log_path = folder / "log.jsonl"
    if not log_path.is_file():
        raise UserError(f"{log_path} is missing; the run did not finish")
    recs = read_log(log_path)
    train_recs = [r for r in recs if r.get("kind") == "train"]
    val = [r for r in recs if r.get("kind") == "val"]
    if not train_recs or not val:
        raise UserError(f"{log_path} holds no training or validation records")
    return {"train": train_recs, "val": val}


def build_summary(run_dir: Path, routings, cc: CompareConfig, wall_s: float, timings: dict) -> dict:
    from mogelm.config import count_parameters, from_name

    runs = {r: _load_run(run_dir / r) for r in routings}
    cfg = from_name(cc.preset, **cc.model_overrides)
    total, active = count_parameters(cfg)
    models = {}
    for r, logs in runs.items():
        train_recs = logs["train"]
        per_dev = {}
        for P in DEVICES:
            is_SL = np.asarray([t[f"is{P}"] for t in train_recs if f"is{P}" in t], dtype=float)
            mom_SL = np.asarray([t[f"mom{P}"] for t in train_recs if f"mom{P}" in t], dtype=float)
            if is_SL.size:
                per_dev[str(P)] = {
                    "is_mean": float(is_SL.mean()), "is_max": float(is_SL.max()),
                    "is_mean_per_layer": is_SL.mean(0).tolist(),
                    "busiest_over_mean_mean": float(mom_SL.mean()),
                    "busiest_over_mean_max": float(mom_SL.max()),
                }
        final_val = logs["val"][-1]
        routing_stats = final_val.get("routing", {})
        shares = np.asarray(routing_stats.get("expert_share", [[0.0]]), dtype=float)
        models[r] = {
            "final_val_loss": final_val["val_loss"],
            "final_val_ppl": final_val["val_ppl"],
            "final_train_loss": float(np.mean([t["loss"] for t in train_recs[-10:]])),
            "steps": train_recs[-1]["step"],
            "tokens": train_recs[-1]["tokens"],
            "train_s": timings.get(r),
            "devices": per_dev,
            "busiest_expert_share": float(shares.max()),
            "val_curve": [[v["step"], v["val_loss"]] for v in logs["val"]],
        }
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {_cpu_name()}, {_cpu_count()} CPUs",
        "command": ("mogelm " + " ".join(sys.argv[1:]) if sys.argv and "compare" in sys.argv
                    else "mogelm compare"),
        "preset": cc.preset,
        "num_experts": cfg.num_experts, "num_groups": cfg.num_groups,
        "active_experts": cfg.num_experts_per_tok,
        "parameters": total, "active_parameters": active,
        "tokens_per_step": cc.batch_size * cc.seq_len,
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


def write_report(run_dir: Path, summary: dict) -> None:
    from mogelm.analysis import plots, report

    runs = {r: _load_run(run_dir / r) for r in summary["models"]}
    E, M, K = summary["num_experts"], summary["num_groups"], summary["active_experts"]
    per_group = E // M
    val_curves = {r: ([v["step"] for v in x["val"]], [v["val_loss"] for v in x["val"]])
                  for r, x in runs.items()}
    train_curves = {r: ([t["step"] for t in x["train"]], [t["loss"] for t in x["train"]])
                    for r, x in runs.items()}
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
    coact = {r: [fr["coactivation"][layer] for layer in shown_layers]
             for r, fr in final_routing.items() if "coactivation" in fr}
    plots.coactivation(coact, run_dir / "coactivation.png", per_group,
                       [f"layer {layer}" for layer in shown_layers])
    within_group = {}
    for r, fr in final_routing.items():
        if "coactivation" in fr:
            mats = np.asarray(fr["coactivation"], dtype=float)  # [L, E, E]
            blocks = np.kron(np.eye(M), np.ones((per_group, per_group))).astype(bool) & ~np.eye(E, dtype=bool)
            within_group[r] = float(mats[:, blocks].max())
    summary["max_within_group_coactivation"] = within_group
    (run_dir / "report.md").write_text(report.render(summary))


if __name__ == "__main__":
    sys.exit(_train_worker())
