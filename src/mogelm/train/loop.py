"""The training loop, `train(tc, ctx)`, and which rows of the data each step reads.

One loop for one process and for many: `ctx` is a context of mogelm.train.context, LocalContext
(world size 1, the default) or DistributedContext (torch.distributed, any layout). It holds rank,
world_size, is_main, device, parallelize(model), sync_gradients(model), clip_grad_norm(model,
max), all_reduce_mean(float), barrier(), save_checkpoint(...) and load_checkpoint(...); the loop
calls all of them on every rank and never asks which kind it has.

Data: rank r trains on rows [r*B, (r+1)*B) of each global micro-batch of world_size*B rows, so
one process with batch world_size*B sees the same tokens. Sample i of the run is a pure function
of (seed, i) (mogelm.data), so the data position is the step number and a resumed run continues
the very same loss curve.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from mogelm.analysis.metrics import RoutingStats
from mogelm.errors import UserError
from mogelm.evaluate import evaluate_batches
from mogelm.fsutil import check_output_dir
from mogelm.kernels import ops
from mogelm.mtp import mtp_losses
from mogelm.train.checkpointing import (
    find_checkpoints,
    flag_name,
    prune_checkpoints,
    read_trainer_state_json,
    resume_point,
    resumed_config,
    set_rng_state,
)
from mogelm.train.config import (
    TrainConfig,
    build_model,
    build_model_config,
    build_optimizer,
    lr_at,
    resolve_device,
)
from mogelm.train.context import LocalContext
from mogelm.train.logs import JsonlLog, Progress
from mogelm.train.stats import StepStats

VAL_SEED = 1234  # validation windows are the same for every run on the same corpus


# Which rows each step reads ----------------------------------------------------------------------
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


def prepare_data(tc: TrainConfig, vocab_size: int, ctx, log=print):
    """Tokenizer + shards (cached); the main rank builds them first, the others then read the cache."""
    from mogelm import data as D

    def build():
        docs = D.load_documents(tc.data, tc.max_bytes)
        return D.prepare(docs, vocab_size, tc.val_fraction, tc.cache_dir, log=log)

    if ctx.is_main:
        td = build()
        ctx.barrier()
        return td
    ctx.barrier()
    return build()


# Checks before any work -----------------------------------------------------------------------------
def check_settings(tc: TrainConfig) -> None:
    """UserError naming the flag for a setting no run can use (before data preparation starts)."""
    def bad(name: str, rule: str) -> UserError:
        return UserError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(tc, name)}")

    for name in ("seq_len", "batch_size", "grad_accum", "eval_batches", "eval_every", "save_every",
                 "keep_checkpoints"):
        if getattr(tc, name) < 1:
            raise bad(name, "positive")
    for name in ("max_steps", "max_tokens"):
        if getattr(tc, name) < 0:
            raise bad(name, "positive (or 0 to use the other of --max-steps / --max-tokens)")
    for name in ("threads", "log_every", "stop_after"):
        if getattr(tc, name) < 0:
            raise bad(name, "0 or more")
    if not (math.isfinite(tc.lr) and tc.lr > 0):
        raise bad("lr", "a positive number")
    for name in ("weight_decay", "grad_clip"):
        if not (math.isfinite(getattr(tc, name)) and getattr(tc, name) >= 0):
            raise bad(name, "0 or more")
    if tc.warmup_steps < -1:
        raise bad("warmup_steps", "0 or more (or -1: 5% of the run)")
    if tc.max_bytes is not None and tc.max_bytes < 1:
        raise bad("max_bytes", "positive")
    if tc.vocab_size is not None and tc.vocab_size < 1:
        raise bad("vocab_size", "positive")
    if not 0 < tc.val_fraction < 1:
        raise UserError(f"val_fraction must be in (0, 1), got {tc.val_fraction}")
    if not (0 <= tc.beta1 < 1 and 0 <= tc.beta2 < 1 and 0 <= tc.min_lr_ratio <= 1):
        raise UserError("beta1 and beta2 must be in [0, 1) and min_lr_ratio in [0, 1]")
    from mogelm.model import CHECKPOINTING

    if tc.activation_checkpointing not in CHECKPOINTING:
        raise UserError(f"--activation-checkpointing must be one of {', '.join(CHECKPOINTING)}, "
                        f"not {tc.activation_checkpointing!r}")


def plan_run(tc: TrainConfig, world_size: int = 1, explicit=None, allow_changed_optimizer: bool = False):
    """Everything decided before the data is prepared: checks the settings and the output folder,
    finds the checkpoint to resume and the settings to resume with (resumed_config). Returns
    (tc, resume_dir or None, changed optimisation settings). The command runs it before torchrun
    starts, so that bad input gets one message, not one per rank."""
    check_settings(tc)
    out = check_output_dir(tc.out, "--out")
    existing = find_checkpoints(out)
    if existing and not tc.resume:
        raise UserError(
            f"{out} already holds checkpoints; pass --resume to continue, or choose another --out"
        )
    resume_dir = existing[-1][1] if (tc.resume and existing) else None
    changes = {}
    if resume_dir is not None:
        tc, changes = resumed_config(resume_dir, tc, world_size, explicit, allow_changed_optimizer)
        from mogelm.checkpoint import read_config

        max_len = read_config(resume_dir).max_seq_len
        if tc.seq_len > max_len:
            raise UserError(f"--seq-len {tc.seq_len} exceeds the checkpoint's model context ({max_len} "
                            "tokens)")
    tc.total_steps(world_size)  # UserError without --max-steps / --max-tokens
    return tc, resume_dir, changes


# The loop ----------------------------------------------------------------------------------------
def train(tc: TrainConfig, ctx=None, log=None, *, explicit=None,
          allow_changed_optimizer: bool = False) -> dict:
    """Train per `tc` under parallel context `ctx` (default: one process on tc.device);
    returns {"out", "steps", "final_val", "final_dir"} ({"out", "steps", "stopped"} after stop_after).

    With tc.resume, the settings come from the checkpoint except `explicit` ones (TrainConfig
    field names; None: all of tc's), which must agree with it (plan_run, resumed_config)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if ctx is None:
        ctx = LocalContext(resolve_device(tc.device))
    rank, world, is_main = ctx.rank, ctx.world_size, ctx.is_main
    say = log if is_main else (lambda msg: None)
    tc, resume_dir, changes = plan_run(tc, world, explicit, allow_changed_optimizer)
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    device = ctx.device
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    total = tc.total_steps(world)
    out = Path(tc.out)
    if tc.resume and resume_dir is None:
        say(f"--resume: no checkpoint in {out}, starting from scratch")

    preset_vocab = build_model_config(tc).vocab_size
    vocab = tc.vocab_size or preset_vocab
    td = prepare_data(tc, vocab, ctx, say)
    from mogelm.data import check_token_range

    if resume_dir is not None:
        from mogelm.checkpoint import read_config

        start, rng = resume_point(resume_dir)  # refuses a corrupt checkpoint before anything changes
        cfg = read_config(resume_dir)
        saved_data = read_trainer_state_json(resume_dir).get("data")
        if saved_data and Path(saved_data).name != td.folder.name:
            raise UserError(f"--resume: the training text differs from the checkpoint's (corpus "
                            f"{Path(saved_data).name} then, {td.folder.name} now; the embedded corpus "
                            "depends on the Python installation), so its tokenizer would not match; "
                            "resume where it was trained, or start a new run with another --out")
        say(f"resuming from {resume_dir} at step {start}")
        for f, (old, new) in changes.items():
            say(f"--allow-changed-optimizer: {flag_name(f) if f != 'global_batch' else 'sequences per step'} "
                f"{old} -> {new} from step {start}")
    else:
        start, rng = 0, None
        cfg = build_model_config(tc, vocab)
    # A context that shards the model (FSDP) takes it from the meta device, so no rank ever holds
    # all of it; parallelize then draws one process's initial weights, slice by slice.
    model = build_model(cfg, tc.seed, "meta" if getattr(ctx, "builds_on_meta", False) else device)
    if td.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {td.vocab_size} tokens but the model only {cfg.vocab_size}; "
                        "token ids would be out of range (use the same --vocab-size for both)")
    check_token_range(td.splits["train"], cfg.vocab_size, "the training data")
    model = ctx.parallelize(model)
    model.train()
    model.set_activation_checkpointing(tc.activation_checkpointing)
    optimizer = build_optimizer(model, tc)
    if resume_dir is not None:
        ctx.load_checkpoint(resume_dir, model, optimizer)  # this rank's weights and optimizer state
        set_rng_state(rng)
    else:
        torch.manual_seed(tc.seed + 1 + rank)

    jlog = JsonlLog(out / "log.jsonl", keep_until_step=start if resume_dir else None, enabled=is_main)
    if changes:
        jlog.write({"kind": "resume", "step": start, "changed": changes})
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(tc.to_dict(), indent=2))
    from mogelm.config import count_parameters

    n_total, n_active = count_parameters(cfg)
    say(f"model: {tc.preset if cfg.name == 'custom' else cfg.name} routing={cfg.routing} "
        f"{n_total / 1e6:.1f}M parameters ({n_active / 1e6:.1f}M active); "
        f"{total} steps x {tc.tokens_per_step(world):,} tokens; device {device}")
    progress = Progress(total, start, tc.log_every, f"[{cfg.routing}] ", enabled=is_main, mode=tc.progress,
                        devices=cfg.num_groups if cfg.is_moe else None)
    moe_layers = model.moe_layers()

    def checkpoint(step_done: int, final: bool) -> None:
        st = {"step": step_done, "total_steps": total,
              "samples_seen": step_done * tc.grad_accum * world * tc.batch_size,
              "seed": tc.seed, "data": str(td.folder), "train_config": tc.to_dict(), "world_size": world}
        path = out / ("final" if final else f"checkpoint-{step_done:06d}")
        ctx.save_checkpoint(path, model, optimizer, st, td.folder)
        if is_main:
            prune_checkpoints(out, tc.keep_checkpoints, step_done)

    def validate(step_done: int) -> dict:
        stats = RoutingStats(len(moe_layers), cfg.num_experts, tc.sim_devices) if cfg.is_moe else None
        res = evaluate_batches(model, val_batches(td, tc, rank, world), device, autocast_dtype, stats)
        loss = ctx.all_reduce_mean(res["loss"])
        rec = {"kind": "val", "step": step_done, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        if stats is not None:
            rec["routing"] = stats.summary()
        jlog.write(rec)
        return rec

    last_val = None
    # Statistics stay on the device and are read when logged (every step on the CPU): no host sync
    # per micro-batch (train/stats.py; the records are those of before).
    step_stats = StepStats(cfg.num_experts, tc.sim_devices, tc.grad_accum, tc.tokens_per_step(world), device,
                           cfg.is_moe)

    def log_steps() -> None:
        records, bad = step_stats.flush(ctx)  # collective: every rank flushes at the same steps
        for rec in records:
            jlog.write(rec)
            progress.update(rec["step"] - 1, rec)
        if bad is not None:  # after the all-reduce, so every rank stops together
            jlog.close()
            raise UserError(
                f"the loss became {bad[1]} at step {bad[0]}; lower --lr (now {tc.lr}) or check the data"
            )

    for step in range(start, total):
        lr = lr_at(step, tc, total)
        for g in optimizer.param_groups:
            g["lr"] = lr
        for micro in range(tc.grad_accum):
            x_BT, y_BT = train_batch(td, tc, step, micro, rank, world)
            x_BT, y_BT = x_BT.to(device), y_BT.to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out_m = model(x_BT, return_stats=True, head=False, return_hidden=cfg.mtp_depth > 0)
                # the LM head and its cross-entropy in one op (chunked on GPU: no whole-batch logits)
                ce = ops.linear_cross_entropy(out_m.hidden, model.lm_head.weight, y_BT)
                aux = out_m.aux_loss
                loss = ce + aux
                mtp_ce_D = None
                if cfg.mtp_depth > 0:  # + lambda * mean over depths of the MTP cross-entropies
                    mtp_out = model.mtp_forward(out_m.trunk_hidden, x_BT)
                    mtp_ce_D = mtp_losses(mtp_out, y_BT)
                    aux = aux + mtp_out.aux_loss
                    loss = ce + aux + tc.mtp_weight * mtp_ce_D.mean()
            (loss / tc.grad_accum).backward()
            step_stats.add_micro(ce, aux, out_m.layer_stats, mtp_ce_D)
        ctx.sync_gradients(model)
        grad_norm = ctx.clip_grad_norm(model, tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for layer, c in zip(moe_layers, step_stats.counts or []):
            if layer.expert_bias_E is not None:
                from mogelm.moe.routing import update_expert_bias

                update_expert_bias(layer.expert_bias_E, c, cfg.aux_free_update_rate)
        step_stats.end_step(step + 1, lr, grad_norm)

        done = step + 1
        if (step_stats.due(done, min(progress.every, 10)) or done % tc.eval_every == 0 or done == total
                or done % tc.save_every == 0 or done == tc.stop_after):
            log_steps()  # before any validation or checkpoint: a non-finite loss stops first
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
