"""The training loop, `train(tc, ctx)`, and which rows of the data each step reads.

One loop for one process and for many: `ctx` is a parallel context, mogelm.parallel's
LocalContext (world size 1, the default) or ParallelContext (torch.distributed). It holds rank,
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
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mogelm.analysis.metrics import RoutingStats, step_balance
from mogelm.errors import UserError
from mogelm.evaluate import evaluate_batches
from mogelm.mtp import mtp_losses
from mogelm.parallel.local import LocalContext
from mogelm.train.checkpointing import find_checkpoints, prune_checkpoints, resume_point, set_rng_state
from mogelm.train.config import (
    TrainConfig,
    build_model,
    build_model_config,
    build_optimizer,
    lr_at,
    resolve_device,
)
from mogelm.train.logs import JsonlLog, Progress

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


# The loop ----------------------------------------------------------------------------------------
def train(tc: TrainConfig, ctx=None, log=None) -> dict:
    """Train per `tc` under parallel context `ctx` (default: one process on tc.device);
    returns {"out", "steps", "final_val", "final_dir"} ({"out", "steps", "stopped"} after stop_after)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    for name in ("seq_len", "batch_size", "grad_accum", "eval_batches"):
        if getattr(tc, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if ctx is None:
        ctx = LocalContext(resolve_device(tc.device))
    rank, world, is_main = ctx.rank, ctx.world_size, ctx.is_main
    say = log if is_main else (lambda msg: None)
    device = ctx.device
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    total = tc.total_steps(world)
    out = Path(tc.out)

    # Where do we start? A fresh run must not overwrite an earlier one.
    existing = find_checkpoints(out)
    if existing and not tc.resume:
        raise UserError(
            f"{out} already holds checkpoints; pass --resume to continue, or choose another --out"
        )
    resume_dir = existing[-1][1] if (tc.resume and existing) else None
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
        say(f"resuming from {resume_dir} at step {start}")
    else:
        start, rng = 0, None
        cfg = build_model_config(tc, vocab)
    model = build_model(cfg, tc.seed, device)
    if td.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {td.vocab_size} tokens but the model only {cfg.vocab_size}; "
                        "token ids would be out of range (use the same --vocab-size for both)")
    check_token_range(td.splits["train"], cfg.vocab_size, "the training data")
    model = ctx.parallelize(model)
    model.train()
    optimizer = build_optimizer(model, tc)
    if resume_dir is not None:
        ctx.load_checkpoint(resume_dir, model, optimizer)  # this rank's weights and optimizer state
        set_rng_state(rng)
    else:
        torch.manual_seed(tc.seed + 1 + rank)

    jlog = JsonlLog(out / "log.jsonl", keep_until_step=start if resume_dir else None, enabled=is_main)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(tc.to_dict(), indent=2))
    from mogelm.config import count_parameters

    n_total, n_active = count_parameters(cfg)
    say(f"model: {tc.preset if cfg.name == 'custom' else cfg.name} routing={cfg.routing} "
        f"{n_total / 1e6:.1f}M parameters ({n_active / 1e6:.1f}M active); "
        f"{total} steps x {tc.tokens_per_step(world):,} tokens; device {device}")
    progress = Progress(total, start, tc.log_every, f"[{cfg.routing}] ", enabled=is_main, mode=tc.progress)
    moe_layers = model.moe_layers()

    def checkpoint(step_done: int, final: bool) -> None:
        st = {"step": step_done, "total_steps": total,
              "samples_seen": step_done * tc.grad_accum * world * tc.batch_size,
              "seed": tc.seed, "data": str(td.folder), "train_config": tc.to_dict()}
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
    tokens_step = tc.tokens_per_step(world)
    t_last = time.time()
    for step in range(start, total):
        lr = lr_at(step, tc, total)
        for g in optimizer.param_groups:
            g["lr"] = lr
        ce_sum, aux_sum = 0.0, 0.0
        mtp_sum = [0.0] * cfg.mtp_depth  # per-depth MTP cross-entropy (mogelm.mtp)
        counts = None
        step_stats = []
        for micro in range(tc.grad_accum):
            x_BT, y_BT = train_batch(td, tc, step, micro, rank, world)
            x_BT, y_BT = x_BT.to(device), y_BT.to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out_m = model(x_BT, return_stats=True, return_hidden=cfg.mtp_depth > 0)
                ce = F.cross_entropy(out_m.logits.float().view(-1, cfg.vocab_size), y_BT.reshape(-1))
                aux = out_m.aux_loss
                loss = ce + aux
                if cfg.mtp_depth > 0:  # + lambda * mean over depths of the MTP cross-entropies
                    mtp_out = model.mtp_forward(out_m.hidden, x_BT)
                    mtp_ce_D = mtp_losses(mtp_out, y_BT)
                    aux = aux + mtp_out.aux_loss
                    loss = ce + aux + tc.mtp_weight * mtp_ce_D.mean()
            (loss / tc.grad_accum).backward()
            ce_sum += float(ce.detach()) / tc.grad_accum
            aux_sum += float(aux.detach()) / tc.grad_accum
            if cfg.mtp_depth > 0:
                mtp_sum = [a + v / tc.grad_accum for a, v in zip(mtp_sum, mtp_ce_D.detach().tolist())]
            c = [s.counts_E.detach() for s in out_m.layer_stats]
            counts = c if counts is None else [a + b for a, b in zip(counts, c)]
            step_stats = out_m.layer_stats
        ce_sum = ctx.all_reduce_mean(ce_sum)  # log the global batch's loss, not this rank's slice
        mtp_sum = [ctx.all_reduce_mean(v) for v in mtp_sum]
        if not math.isfinite(ce_sum):  # after the all-reduce, so every rank stops together
            jlog.close()
            raise UserError(
                f"the loss became {ce_sum} at step {step}; lower --lr (now {tc.lr}) or check the data"
            )
        ctx.sync_gradients(model)
        grad_norm = ctx.clip_grad_norm(model, tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for layer, c in zip(moe_layers, counts or []):
            if layer.expert_bias_E is not None:
                from mogelm.moe.routing import update_expert_bias

                update_expert_bias(layer.expert_bias_E, c, cfg.aux_free_update_rate)

        now = time.time()
        rec = {"kind": "train", "step": step + 1, "tokens": (step + 1) * tokens_step, "loss": ce_sum,
               "aux": aux_sum, "lr": lr, "grad_norm": grad_norm,
               "tok_s": tokens_step / max(now - t_last, 1e-9)}
        if mtp_sum:
            rec["mtp_loss"] = sum(mtp_sum) / len(mtp_sum)
            rec.update({f"mtp_loss_{d}": v for d, v in enumerate(mtp_sum, start=1)})
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
