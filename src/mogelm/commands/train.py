"""`mogelm train`: train a MoGE (or top-k / group-limited) language model on text.

    mogelm train --preset debug --max-steps 200 --out runs/debug            # stdlib corpus, CPU
    mogelm train --preset small --routing topk --data notes/ --out runs/topk
    mogelm train --out runs/debug --resume                                   # continue after a crash
    mogelm train --preset small --nproc 2 --ep 2 --out runs/ep               # torchrun under the hood
    mogelm train --preset small --mtp-depth 1 --mtp-weight 0.3 --out runs/mtp  # + MTP module (mogelm.mtp)

A thin layer over mogelm.train (the loop, checkpoints and logs are described there): flags ->
TrainConfig -> train(tc, ctx). With --nproc N > 1 the command re-runs itself under torchrun
(mogelm.parallel.launch); each torchrun worker joins the process group (ParallelContext), one
process runs on a LocalContext, and both go through the same loop.
"""

from __future__ import annotations

import argparse
import os

from mogelm.config import ROUTINGS
from mogelm.errors import UserError

NO_DISTRIBUTED = "distributed training is not available in this build"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="debug", help="model preset (debug, small, ...; default debug)")
    g.add_argument("--routing", choices=ROUTINGS, default=None, help="routing (default: the preset's, moge)")
    g.add_argument("--aux-alpha", type=float, default=None,
                   help="balancing loss weight alpha (paper Eq. 8; default 1e-3)")
    g.add_argument("--aux-loss-type", choices=("batch", "sequence", "none"), default=None,
                   help="balancing loss level (default batch, as in the paper)")
    g.add_argument("--z-loss", type=float, default=None, help="router z-loss coefficient (default 0)")
    g.add_argument("--aux-free-bias", action="store_true",
                   help="aux-loss-free expert bias balancing (DeepSeek-V3)")
    g.add_argument("--bias-rate", type=float, default=None,
                   help="update rate of the aux-free bias (default 1e-3)")
    g.add_argument("--topk-groups", type=int, default=None,
                   help="group_limited routing: groups a token may use")
    g.add_argument("--renormalize", action="store_true", help="renormalise kept gate weights to sum to 1")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="tokenizer/model vocabulary (default: the preset's)")
    g.add_argument("--mtp-depth", type=int, default=None,
                   help="multi-token prediction modules trained with the model (DeepSeek-V3 style; "
                        "default 0: none)")
    g.add_argument("--mtp-weight", type=float, default=None,
                   help="weight lambda of the mean MTP loss (default 0.3; needs --mtp-depth)")
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="*", default=[], help="files, folders or globs of .txt/.md/.py/.jsonl "
                   "(default: the CPython standard library sources, no download)")
    d.add_argument("--max-bytes", type=int, default=None,
                   help="use only the first N bytes of the stdlib corpus")
    d.add_argument("--cache-dir", default=None,
                   help="tokenizer/shard cache (default $MOGELM_CACHE or ~/.cache/mogelm)")
    d.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, default=8,
                   help="sequences per micro-batch per process (default 8)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    o.add_argument("--max-steps", type=int, default=0, help="optimizer steps")
    o.add_argument("--max-tokens", type=int, default=0,
                   help="training tokens (when --max-steps is not given)")
    o.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    o.add_argument("--warmup-steps", type=int, default=-1,
                   help="linear warm-up steps (default 5%% of the run)")
    o.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW weight decay on matrices (default 0.1)")
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
    r.add_argument("--log-every", type=int, default=0,
                   help="progress line every N steps when not on a terminal")
    r.add_argument("--progress", choices=("auto", "lines", "none"), default="auto",
                   help="progress display: a live line on a terminal (auto), plain lines, or none")
    r.add_argument("--nproc", type=int, default=1,
                   help="processes (torchrun) for data/expert parallel training")
    r.add_argument("--ep", type=int, default=1, help="expert-parallel size (with --nproc)")
    r.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace):
    from mogelm.train import TrainConfig

    overrides = {}
    for flag, fld in (("aux_alpha", "aux_loss_alpha"), ("aux_loss_type", "aux_loss_type"),
                      ("z_loss", "z_loss_coef"), ("bias_rate", "aux_free_update_rate"),
                      ("topk_groups", "topk_groups")):
        if getattr(args, flag) is not None:
            overrides[fld] = getattr(args, flag)
    if args.aux_free_bias:
        overrides["aux_free_bias"] = True
    if args.renormalize:
        overrides["renormalize"] = True
    if args.mtp_depth is not None:
        if args.mtp_depth < 0:
            raise UserError(f"--mtp-depth must be >= 0, got {args.mtp_depth}")
        overrides["mtp_depth"] = args.mtp_depth
    if args.mtp_weight is not None and not args.mtp_depth:
        raise UserError("--mtp-weight needs --mtp-depth N (N >= 1): there is no MTP loss to weight")
    mtp = {} if args.mtp_weight is None else {"mtp_weight": args.mtp_weight}
    return TrainConfig(
        out=args.out, preset=args.preset, routing=args.routing, model_overrides=overrides,
        data=list(args.data or []), max_bytes=args.max_bytes, vocab_size=args.vocab_size,
        cache_dir=args.cache_dir, seq_len=args.seq_len, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_steps=args.max_steps, max_tokens=args.max_tokens, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches, save_every=args.save_every, log_every=args.log_every,
        progress=args.progress, seed=args.seed, device=args.device, threads=args.threads, resume=args.resume,
        stop_after=args.stop_after, **mtp,
    )


def run(args: argparse.Namespace) -> int:
    from mogelm.train import resolve_device, train

    tc = config_from_args(args)
    tc.total_steps(max(args.nproc, 1))  # fail early without --max-steps/--max-tokens
    if args.nproc < 1 or args.ep < 1:
        raise UserError("--nproc and --ep must be positive")
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        try:
            from mogelm.parallel.launch import relaunch
        except ImportError:
            raise UserError(f"{NO_DISTRIBUTED} (mogelm.parallel.launch)") from None
        return int(relaunch(args.nproc) or 0)
    if "LOCAL_RANK" in os.environ:  # a torchrun worker: join the process group
        try:
            from mogelm.parallel.context import init_parallel
        except ImportError:
            raise UserError(f"{NO_DISTRIBUTED} (mogelm.parallel.context)") from None
        ctx = init_parallel(ep_size=args.ep, device=str(resolve_device(args.device)))
    else:
        from mogelm.parallel.local import LocalContext

        ctx = LocalContext(resolve_device(args.device))
    res = train(tc, ctx)
    if res.get("final_val") and ctx.is_main:
        print(f"final validation loss {res['final_val']['val_loss']:.4f}; checkpoint {res['final_dir']}")
    ctx.destroy()
    return 0
