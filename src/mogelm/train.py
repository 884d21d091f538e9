"""`mogelm train`: train a MoGE (or top-k / group-limited) language model on text.

    mogelm train --preset debug --max-steps 200 --out runs/debug            # stdlib corpus, CPU
    mogelm train --preset small --routing topk --data notes/ --out runs/topk
    mogelm train --out runs/debug --resume                                   # continue after a crash
    mogelm train --preset small --nproc 2 --ep 2 --out runs/ep               # torchrun under the hood

The loop (one function, `train`): AdamW (beta 0.9/0.95, weight decay on matrices only), linear
warm-up then cosine decay to min_lr, gradient accumulation, gradient clipping, fp32 on CPU and
bf16 autocast on CUDA. Loss = next-token cross-entropy + the model's balancing/z losses. After
each optimizer step the aux-loss-free expert biases (if enabled) are nudged toward balance.

Determinism and resuming: sample i of the run is a pure function of (seed, i) (mogelm.data), so
the data position is the step number. A checkpoint holds the model (HF layout), tokenizer,
optimizer, RNG states and step; `--resume` reloads the newest one and continues the very same
loss curve on CPU. Checkpoints are written to a temporary folder and renamed into place, so a
kill -9 loses only the steps since the last one. log.jsonl is cut back to the checkpoint's step.

Distributed (contract with mogelm.parallel): `train(tc, ctx)` takes an optional context with
rank, world_size, is_main, parallelize(model), sync_gradients(model), clip_grad_norm(model, max),
all_reduce_mean(float), barrier() and optionally save_checkpoint(...) (called on every rank when
present, else only the main rank saves). Rank r trains on rows [r*B, (r+1)*B) of each global
micro-batch of world_size*B rows, so one process with batch world_size*B sees the same tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mogelm.config import ROUTINGS, ModelConfig, from_name
from mogelm.errors import UserError
from mogelm.evaluate import RoutingStats, evaluate_batches, step_balance
from mogelm.fsutil import replace_dir

VAL_SEED = 1234  # validation windows are the same for every run on the same corpus
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass(kw_only=True)
class TrainConfig:
    out: str = "runs/train"
    preset: str = "debug"
    routing: str | None = None  # None: the preset's (moge)
    model_overrides: dict = field(default_factory=dict)  # any ModelConfig field
    data: list[str] = field(default_factory=list)  # empty: the embedded stdlib corpus
    max_bytes: int | None = None  # cap on the embedded corpus size
    vocab_size: int | None = None  # tokenizer and model vocabulary (default: the preset's)
    val_fraction: float = 0.05
    cache_dir: str | None = None
    seq_len: int = 256
    batch_size: int = 8  # rows per micro-batch per rank
    grad_accum: int = 1
    max_steps: int = 0
    max_tokens: int = 0  # used when max_steps is 0
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = -1  # -1: 5 % of max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    keep_checkpoints: int = 1
    log_every: int = 0  # non-tty progress lines (0: about 20 per run)
    progress: str = "auto"  # auto ('\\r' line on a terminal) | lines | none
    sim_devices: tuple[int, ...] = (8, 4)
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    resume: bool = False
    stop_after: int = 0  # stop (as if killed) after this step; for tests of --resume

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.batch_size * self.seq_len * self.grad_accum * world_size

    def total_steps(self, world_size: int = 1) -> int:
        if self.max_steps > 0:
            return self.max_steps
        if self.max_tokens > 0:
            return math.ceil(self.max_tokens / self.tokens_per_step(world_size))
        raise UserError("give --max-steps or --max-tokens")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sim_devices"] = list(self.sim_devices)
        return d


# Reusable pieces (also used by mogelm.parallel's equality tests) ----------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (use cpu, cuda or auto)") from None


def build_model_config(tc: TrainConfig, vocab_size: int | None = None) -> ModelConfig:
    overrides = dict(tc.model_overrides)
    if tc.routing is not None:
        overrides["routing"] = tc.routing
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    overrides.setdefault("max_seq_len", max(tc.seq_len, 1))
    try:
        cfg = from_name(tc.preset, **overrides)
    except (ValueError, TypeError) as e:
        raise UserError(f"invalid model configuration: {e}") from None
    if cfg.max_seq_len < tc.seq_len:
        raise UserError(f"--seq-len {tc.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    return cfg


def build_model(cfg: ModelConfig, seed: int, device: torch.device | str = "cpu"):
    from mogelm.model import Transformer

    torch.manual_seed(seed)
    return Transformer(cfg).to(device)


def build_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (>= 2 dims) only; biases, norms, router_scale undecayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "router_scale" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=1e-8)


def lr_at(step: int, tc: TrainConfig, total_steps: int) -> float:
    """Linear warm-up over warmup steps, then cosine from lr to lr * min_lr_ratio at total_steps."""
    warmup = tc.warmup_steps if tc.warmup_steps >= 0 else max(1, total_steps // 20)
    if step < warmup:
        return tc.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = tc.lr * tc.min_lr_ratio
    return floor + 0.5 * (tc.lr - floor) * (1 + math.cos(math.pi * progress))


def sample_ids(step: int, micro: int, tc: TrainConfig, rank: int = 0, world_size: int = 1) -> range:
    """Global sample counters of rank `rank`'s rows in micro-batch `micro` of `step`."""
    first = ((step * tc.grad_accum + micro) * world_size + rank) * tc.batch_size
    return range(first, first + tc.batch_size)


def train_batch(td, tc: TrainConfig, step: int, micro: int = 0, rank: int = 0, world_size: int = 1):
    """(inputs, targets) int64 [batch_size, seq_len] of rank `rank` for micro-batch `micro` of `step`."""
    return td.batch("train", sample_ids(step, micro, tc, rank, world_size), tc.seq_len, seed=tc.seed)


def val_batches(td, tc: TrainConfig, rank: int = 0, world_size: int = 1):
    """The fixed validation windows (the same for every model trained on this corpus)."""
    W = td.num_windows("val", tc.seq_len)
    if W < 1:
        raise UserError(
            f"the validation split has {td.num_tokens('val')} tokens, fewer than one sequence of "
            f"{tc.seq_len + 1}; use more text, a larger val fraction or a smaller --seq-len"
        )
    rows = min(W, tc.eval_batches * tc.batch_size * world_size)
    # Every rank must run the same batch shapes: expert-parallel collectives exchange equal splits.
    rows -= rows % world_size
    if rows == 0:
        raise UserError(
            f"the validation split has {W} sequences of {tc.seq_len + 1} tokens, fewer than the "
            f"{world_size} processes; use more text or a smaller --seq-len"
        )
    per_rank = list(range(rows))[rank::world_size]
    for start in range(0, len(per_rank), tc.batch_size):
        yield td.batch("val", per_rank[start : start + tc.batch_size], tc.seq_len, seed=VAL_SEED)


def prepare_data(tc: TrainConfig, vocab_size: int, ctx=None, log=print):
    """Tokenizer + shards (cached); under a parallel context the main rank builds them first."""
    from mogelm import data as D

    def build():
        docs = D.load_documents(tc.data, tc.max_bytes)
        return D.prepare(docs, vocab_size, tc.val_fraction, tc.cache_dir, log=log)

    if ctx is None:
        return build()
    if ctx.is_main:
        td = build()
        ctx.barrier()
        return td
    ctx.barrier()
    return build()


# Checkpoints -------------------------------------------------------------------------------------
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model, optimizer, state: dict, data_folder: Path) -> Path:
    """Write a complete checkpoint directory atomically (temp folder, then rename).

    Layout: config.json + model.safetensors (mogelm.checkpoint), tokenizer.json,
    tokenizer_config.json, trainer_state.pt (optimizer, RNG, step), trainer_state.json."""
    from mogelm.checkpoint import save_pretrained

    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(getattr(model, "module", model), tmp)  # unwrap DDP-style wrappers
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(data_folder / name, tmp / name)
    torch.save({**state, "optimizer": optimizer.state_dict(), "rng": _rng_state()}, tmp / "trainer_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "history"}, indent=2))
    replace_dir(tmp, path)
    return path


def find_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, dir) of complete checkpoints under `out`, oldest first (final last when present)."""
    found = []
    if out.is_dir():
        for d in out.iterdir():
            m = _CKPT_RE.match(d.name)
            if m and (d / "trainer_state.pt").is_file():
                found.append((int(m.group(1)), d))
    found.sort()
    final = out / "final"
    if (final / "trainer_state.pt").is_file():
        found.append((_read_step(final), final))
    return found


def _read_step(d: Path) -> int:
    try:
        return int(json.loads((d / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def load_trainer_state(d: Path) -> dict:
    try:
        return torch.load(d / "trainer_state.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or garbage pickle
        raise UserError(f"{d}/trainer_state.pt is unreadable ({type(e).__name__}); the checkpoint is corrupt") from None


# Logging -----------------------------------------------------------------------------------------
class Progress:
    """One status line on stderr: '\\r'-updated on a terminal, a plain line every N steps otherwise."""

    def __init__(self, total: int, start: int, every: int, label: str = "", enabled: bool = True, mode: str = "auto"):
        self.total, self.start, self.label = total, start, label
        self.enabled = enabled and mode != "none"
        self.tty = sys.stderr.isatty() and mode == "auto"
        self.every = every or max(1, total // 20)
        self.t0 = time.time()

    def update(self, step: int, rec: dict) -> None:
        if not self.enabled:
            return
        done = step + 1
        if not self.tty and done % self.every and done != self.total:
            return
        elapsed = time.time() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        is8 = rec.get("is8") or rec.get("is4") or [0.0]
        line = (
            f"{self.label}step {done}/{self.total} loss {rec['loss']:.3f} IS {sum(is8) / len(is8):.3f} "
            f"{rec['tok_s']:,.0f} tok/s ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        )
        if self.tty:
            print("\r" + line.ljust(90), end="" if done != self.total else "\n", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(("\n" if self.tty else "") + text, file=sys.stderr, flush=True)


class JsonlLog:
    """Append-only JSONL; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, path: Path, keep_until_step: int | None, enabled: bool):
        self.path, self.enabled = path, enabled
        self.tb = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if keep_until_step is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("step", -1) <= keep_until_step:
                    kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))
        self.f = path.open("a")
        try:  # TensorBoard when installed
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except Exception:  # noqa: BLE001 - tensorboard missing or broken: JSONL is enough
            self.tb = None

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{rec['kind']}/{k}", v, rec["step"])

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


def read_log(path: str | os.PathLike) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# The loop ----------------------------------------------------------------------------------------
def train(tc: TrainConfig, ctx=None, log=None) -> dict:
    """Train per `tc`; returns {"out", "steps", "final_val", "history", "final_dir"}."""
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    is_main = ctx.is_main if ctx is not None else True
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    say = log if is_main else (lambda msg: None)
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    for name in ("seq_len", "batch_size", "grad_accum", "eval_batches"):
        if getattr(tc, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    device = resolve_device(tc.device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    total = tc.total_steps(world)
    out = Path(tc.out)

    # Where do we start? A fresh run must not overwrite an earlier one.
    existing = find_checkpoints(out)
    if existing and not tc.resume:
        raise UserError(f"{out} already holds checkpoints; pass --resume to continue, or choose another --out")
    resume_dir = existing[-1][1] if (tc.resume and existing) else None
    if tc.resume and resume_dir is None:
        say(f"--resume: no checkpoint in {out}, starting from scratch")

    preset_vocab = build_model_config(tc).vocab_size
    vocab = tc.vocab_size or preset_vocab
    td = prepare_data(tc, vocab, ctx, say)
    from mogelm.data import check_token_range

    # A parallel context with its own loader reads sharded state after parallelize (any layout);
    # otherwise the one-process files are read: HF-layout model, then optimizer and RNG.
    sharded_resume = resume_dir is not None and hasattr(ctx, "load_checkpoint")
    if resume_dir is not None:
        from mogelm.checkpoint import from_pretrained, read_config

        state = load_trainer_state(resume_dir)
        model = build_model(read_config(resume_dir), tc.seed, device) if sharded_resume else from_pretrained(resume_dir, device=device)
        cfg = model.cfg
        start = int(state["step"])
        say(f"resuming from {resume_dir} at step {start}")
    else:
        state, start = None, 0
        cfg = build_model_config(tc, vocab)
        model = build_model(cfg, tc.seed, device)
    if td.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {td.vocab_size} tokens but the model only {cfg.vocab_size}; "
                        "token ids would be out of range (use the same --vocab-size for both)")
    check_token_range(td.splits["train"], cfg.vocab_size, "the training data")
    if ctx is not None:
        model = ctx.parallelize(model)
    model.train()
    optimizer = build_optimizer(model, tc)
    if sharded_resume:
        ctx.load_checkpoint(resume_dir, model, optimizer)
    elif state is not None:
        optimizer.load_state_dict(state["optimizer"])
    if state is not None:
        _set_rng_state(state["rng"])
    else:
        torch.manual_seed(tc.seed + 1 + rank)

    jlog = JsonlLog(out / "log.jsonl", keep_until_step=start if resume_dir else None, enabled=is_main)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(tc.to_dict(), indent=2))
    from mogelm.config import count_parameters

    n_total, n_active = count_parameters(cfg)
    say(f"model: {tc.preset if cfg.name == 'custom' else cfg.name} routing={cfg.routing} {n_total / 1e6:.1f}M parameters ({n_active / 1e6:.1f}M active); "
        f"{total} steps x {tc.tokens_per_step(world):,} tokens; device {device}")
    progress = Progress(total, start, tc.log_every, f"[{cfg.routing}] ", enabled=is_main, mode=tc.progress)
    moe_layers = [m for m in model.modules() if m.__class__.__name__ == "MoGELayer"]
    save = getattr(ctx, "save_checkpoint", None) if ctx is not None else None

    def checkpoint(step_done: int, final: bool) -> None:
        st = {"step": step_done, "total_steps": total, "samples_seen": step_done * tc.grad_accum * world * tc.batch_size,
              "seed": tc.seed, "data": str(td.folder), "train_config": tc.to_dict()}
        path = out / ("final" if final else f"checkpoint-{step_done:06d}")
        if save is not None:
            save(path, model, optimizer, st, td.folder)
        elif is_main:
            save_checkpoint(path, model, optimizer, st, td.folder)
            old = [d for s, d in find_checkpoints(out) if d.name != "final" and s < step_done]
            for _, d in zip(range(len(old) - max(tc.keep_checkpoints - 1, 0)), old):
                shutil.rmtree(d, ignore_errors=True)

    def validate(step_done: int) -> dict:
        stats = RoutingStats(len(moe_layers), cfg.num_experts, tc.sim_devices) if cfg.is_moe else None
        res = evaluate_batches(model, val_batches(td, tc, rank, world), device, autocast_dtype, stats)
        loss = ctx.all_reduce_mean(res["loss"]) if ctx is not None else res["loss"]
        rec = {"kind": "val", "step": step_done, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        if stats is not None:
            rec["routing"] = stats.summary()
        jlog.write(rec)
        return rec

    last_val = None
    tokens_step = tc.tokens_per_step(world)
    t_last = time.time()
    step = start
    for step in range(start, total):
        lr = lr_at(step, tc, total)
        for g in optimizer.param_groups:
            g["lr"] = lr
        ce_sum, aux_sum = 0.0, 0.0
        counts = None
        step_stats = []
        for micro in range(tc.grad_accum):
            x_BT, y_BT = train_batch(td, tc, step, micro, rank, world)
            x_BT, y_BT = x_BT.to(device), y_BT.to(device)
            with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out_m = model(x_BT, return_stats=True)
                ce = F.cross_entropy(out_m.logits.float().view(-1, cfg.vocab_size), y_BT.reshape(-1))
                loss = ce + out_m.aux_loss
            (loss / tc.grad_accum).backward()
            ce_sum += float(ce.detach()) / tc.grad_accum
            aux_sum += float(out_m.aux_loss.detach()) / tc.grad_accum
            c = [s.counts_E.detach() for s in out_m.layer_stats]
            counts = c if counts is None else [a + b for a, b in zip(counts, c)]
            step_stats = out_m.layer_stats
        if ctx is not None:
            ce_sum = ctx.all_reduce_mean(ce_sum)  # log the global batch's loss, not this rank's slice
        if not math.isfinite(ce_sum):  # after the all-reduce, so every rank stops together
            jlog.close()
            raise UserError(f"the loss became {ce_sum} at step {step}; lower --lr (now {tc.lr}) or check the data")
        if ctx is not None:
            ctx.sync_gradients(model)
            grad_norm = ctx.clip_grad_norm(model, tc.grad_clip)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for layer, c in zip(moe_layers, counts or []):
            if layer.expert_bias_E is not None:
                from mogelm.moe.routing import update_expert_bias

                update_expert_bias(layer.expert_bias_E, c, cfg.aux_free_update_rate)

        now = time.time()
        rec = {"kind": "train", "step": step + 1, "tokens": (step + 1) * tokens_step, "loss": ce_sum, "aux": aux_sum,
               "lr": lr, "grad_norm": grad_norm, "tok_s": tokens_step / max(now - t_last, 1e-9)}
        t_last = now
        if cfg.is_moe and step_stats:
            rec.update(step_balance(step_stats, cfg.num_experts, tc.sim_devices))
        jlog.write(rec)
        progress.update(step, rec)

        done = step + 1
        if done % tc.eval_every == 0 or done == total:
            last_val = validate(done)
            progress.message(f"[{cfg.routing}] step {done}: val loss {last_val['val_loss']:.4f}")
        if done == total:
            checkpoint(done, final=True)
        elif done % tc.save_every == 0 or done == tc.stop_after:
            checkpoint(done, final=False)
        if done == tc.stop_after and done < total:  # behave as if killed right after a checkpoint
            jlog.close()
            return {"out": str(out), "steps": done, "stopped": True}
    if start >= total:
        say(f"{out} already finished {total} steps")
    jlog.close()
    return {"out": str(out), "steps": total, "final_val": last_val, "final_dir": str(out / "final")}


# CLI ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="debug", help="model preset (debug, small, ...; default debug)")
    g.add_argument("--routing", choices=ROUTINGS, default=None, help="routing (default: the preset's, moge)")
    g.add_argument("--aux-alpha", type=float, default=None, help="balancing loss weight alpha (paper Eq. 8; default 1e-3)")
    g.add_argument("--aux-loss-type", choices=("batch", "sequence", "none"), default=None,
                   help="balancing loss level (default batch, as in the paper)")
    g.add_argument("--z-loss", type=float, default=None, help="router z-loss coefficient (default 0)")
    g.add_argument("--aux-free-bias", action="store_true", help="aux-loss-free expert bias balancing (DeepSeek-V3)")
    g.add_argument("--bias-rate", type=float, default=None, help="update rate of the aux-free bias (default 1e-3)")
    g.add_argument("--topk-groups", type=int, default=None, help="group_limited routing: groups a token may use")
    g.add_argument("--renormalize", action="store_true", help="renormalise kept gate weights to sum to 1")
    g.add_argument("--vocab-size", type=int, default=None, help="tokenizer/model vocabulary (default: the preset's)")
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="*", default=[], help="files, folders or globs of .txt/.md/.py/.jsonl "
                   "(default: the CPython standard library sources, no download)")
    d.add_argument("--max-bytes", type=int, default=None, help="use only the first N bytes of the stdlib corpus")
    d.add_argument("--cache-dir", default=None, help="tokenizer/shard cache (default $MOGELM_CACHE or ~/.cache/mogelm)")
    d.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per process (default 8)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    o.add_argument("--max-steps", type=int, default=0, help="optimizer steps")
    o.add_argument("--max-tokens", type=int, default=0, help="training tokens (when --max-steps is not given)")
    o.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    o.add_argument("--warmup-steps", type=int, default=-1, help="linear warm-up steps (default 5%% of the run)")
    o.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (default 0.1)")
    o.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (default 1.0)")
    r = p.add_argument_group("run")
    r.add_argument("--out", default="runs/train", help="output folder (checkpoints, log.jsonl)")
    r.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    r.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order (default 0)")
    r.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    r.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    r.add_argument("--eval-every", type=int, default=50, help="validate every N steps (default 50)")
    r.add_argument("--eval-batches", type=int, default=8, help="validation batches (default 8)")
    r.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    r.add_argument("--log-every", type=int, default=0, help="progress line every N steps when not on a terminal")
    r.add_argument("--progress", choices=("auto", "lines", "none"), default="auto",
                   help="progress display: a live line on a terminal (auto), plain lines, or none")
    r.add_argument("--nproc", type=int, default=1, help="processes (torchrun) for data/expert parallel training")
    r.add_argument("--ep", type=int, default=1, help="expert-parallel size (with --nproc)")
    r.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {}
    for flag, fld in (("aux_alpha", "aux_loss_alpha"), ("aux_loss_type", "aux_loss_type"), ("z_loss", "z_loss_coef"),
                      ("bias_rate", "aux_free_update_rate"), ("topk_groups", "topk_groups")):
        if getattr(args, flag) is not None:
            overrides[fld] = getattr(args, flag)
    if args.aux_free_bias:
        overrides["aux_free_bias"] = True
    if args.renormalize:
        overrides["renormalize"] = True
    return TrainConfig(
        out=args.out, preset=args.preset, routing=args.routing, model_overrides=overrides, data=list(args.data or []),
        max_bytes=args.max_bytes, vocab_size=args.vocab_size, cache_dir=args.cache_dir, seq_len=args.seq_len,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps, max_tokens=args.max_tokens,
        lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        eval_every=args.eval_every, eval_batches=args.eval_batches, save_every=args.save_every,
        log_every=args.log_every, progress=args.progress, seed=args.seed, device=args.device, threads=args.threads, resume=args.resume,
        stop_after=args.stop_after,
    )


def run(args: argparse.Namespace) -> int:
    tc = config_from_args(args)
    tc.total_steps(max(args.nproc, 1))  # fail early without --max-steps/--max-tokens
    if args.nproc < 1 or args.ep < 1:
        raise UserError("--nproc and --ep must be positive")
    ctx = None
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        try:
            from mogelm.parallel.launch import relaunch
        except ImportError:
            raise UserError("distributed training is not available in this build (mogelm.parallel.launch)") from None
        return int(relaunch(args.nproc) or 0)
    if "LOCAL_RANK" in os.environ:
        try:
            from mogelm.parallel.context import init_parallel
        except ImportError:
            raise UserError("distributed training is not available in this build (mogelm.parallel.context)") from None
        ctx = init_parallel(ep_size=args.ep, device=str(resolve_device(args.device)))
    res = train(tc, ctx)
    if res.get("final_val") and (ctx is None or ctx.is_main):
        print(f"final validation loss {res['final_val']['val_loss']:.4f}; checkpoint {res['final_dir']}")
    return 0
