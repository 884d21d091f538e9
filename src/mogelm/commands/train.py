"""`mogelm train`: train a MoGE (or top-k / group-limited) language model on text.

    mogelm train --preset debug --max-steps 200 --out runs/debug            # stdlib corpus, CPU
    mogelm train --preset small --routing topk --data notes/ --out runs/topk
    mogelm train --out runs/debug --resume                                   # continue after a crash
    mogelm train --out runs/debug --resume --lr 1e-3 --allow-changed-optimizer   # ... with a new lr
    mogelm train --preset small --nproc 2 --ep 2 --out runs/ep               # torchrun under the hood
    mogelm train --config model.json --set num_layers=8 --nproc 4 --ep 2 --fsdp 4 --out runs/big
    mogelm train --preset small --mtp-depth 1 --mtp-weight 0.3 --out runs/mtp  # + MTP module (mogelm.mtp)

A thin layer over mogelm.train (the loop, checkpoints and logs are described there): flags ->
TrainConfig -> train(tc, ctx). The model is a preset (--preset, default debug) or a config file
(--config: a ModelConfig JSON, a checkpoint's config.json or a checkpoint directory), never both;
then the routing flags, then every --set FIELD=VALUE in order (the last one wins). With --nproc
N > 1 the command re-runs itself under torchrun (mogelm.parallel.launch); each torchrun worker
joins the process group with the --ep/--fsdp layout (mogelm.train.context.make_context), one
process runs on a LocalContext, and both go through the same loop. Started by torchrun directly
(several nodes: docs/training.md), leave --nproc out: the world size is torchrun's.

--resume continues with the checkpoint's settings; flags given again must agree with them (a
changed model or text is refused, a changed optimisation setting needs --allow-changed-optimizer):
only the flags on the command line are compared, so defaults never count as changes. Bad input
is refused here, before torchrun starts, with one message.
"""

from __future__ import annotations

import argparse
import os
import sys

from mogelm.config import ROUTINGS
from mogelm.errors import UserError

NO_DISTRIBUTED = "distributed training is not available in this build"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=None, help="model preset (debug, small, ...; default debug)")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="model from a file instead of a preset: a ModelConfig JSON, a checkpoint's "
                        "config.json, or a checkpoint directory")
    g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="set_fields",
                   help="override one model config field, e.g. --set hidden_size=2048 (repeatable; "
                        "applied after --preset/--config and the routing flags)")
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
    o.add_argument("--activation-checkpointing", choices=("none", "moe", "full"), default="none",
                   help="recompute activations in the backward to save memory: each block's FFN (moe) "
                   "or whole blocks (full); default none")
    o.add_argument("--optim-state-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="dtype of AdamW's two moments (bf16 halves optimizer memory; default fp32)")
    r = p.add_argument_group("run")
    r.add_argument("--out", default="runs/train", help="output folder (checkpoints, log.jsonl)")
    r.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out, with its settings")
    r.add_argument("--allow-changed-optimizer", action="store_true",
                   help="with --resume: accept optimisation flags (--lr, --batch-size, --max-steps, ...) "
                        "that differ from the checkpoint's; the changes are logged")
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
    r.add_argument("--nproc", type=int, default=None,
                   help="processes on this machine (torchrun under the hood) for data/FSDP/expert "
                        "parallel training (default 1; under torchrun: its world size)")
    r.add_argument("--ep", type=int, default=1,
                   help="expert-parallel size: ranks sharing one copy of the experts (default 1)")
    r.add_argument("--fsdp", type=int, default=1,
                   help="FSDP2 size: ranks sharding the weights, gradients and optimizer states "
                        "(--ep must divide it; default 1: weights replicated, DP x EP)")
    r.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace):
    from mogelm.config import parse_overrides
    from mogelm.hf_config import read_model_file
    from mogelm.train import TrainConfig

    if args.config is not None and args.preset is not None:
        raise UserError("--config and --preset both name a model; give one (use --set to change "
                        "fields of either)")
    model_config = None
    if args.config is not None:
        try:
            model_config = read_model_file(args.config).to_dict()
        except UserError as e:
            raise UserError(f"--config {e}") from None
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
    try:
        overrides.update(parse_overrides(args.set_fields))
    except ValueError as e:
        raise UserError(str(e)) from None
    return TrainConfig(
        out=args.out, preset=args.preset or "debug", model_config=model_config, routing=args.routing,
        model_overrides=overrides, optim_state_dtype=args.optim_state_dtype,
        data=list(args.data or []), max_bytes=args.max_bytes, vocab_size=args.vocab_size,
        cache_dir=args.cache_dir, seq_len=args.seq_len, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_steps=args.max_steps, max_tokens=args.max_tokens, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches, save_every=args.save_every, log_every=args.log_every,
        progress=args.progress, seed=args.seed, device=args.device, threads=args.threads, resume=args.resume,
        stop_after=args.stop_after, activation_checkpointing=args.activation_checkpointing,
        **mtp,
    )


# flags that are not TrainConfig fields of the same name
_MODEL_FLAGS = ("aux_alpha", "aux_loss_type", "z_loss", "aux_free_bias", "bias_rate", "topk_groups",
                "renormalize", "set_fields", "mtp_depth")
_RENAMED = {"config": "model_config"}
_NOT_CONFIG = ("nproc", "ep", "fsdp", "allow_changed_optimizer")


def explicit_fields(args: argparse.Namespace) -> set[str] | None:
    """TrainConfig fields the user set on the command line (None: unknown, e.g. args built by
    hand; then every field counts as set)."""
    given = getattr(args, "explicit", None)
    if given is None:
        return None
    return {("model_overrides" if d in _MODEL_FLAGS else _RENAMED.get(d, d))
            for d in given if d not in _NOT_CONFIG}


def _world_size(args: argparse.Namespace) -> int:
    """--nproc, checked against torchrun's WORLD_SIZE in a worker, and the layout against it."""
    under_torchrun = "LOCAL_RANK" in os.environ
    env_world = int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun else None
    nproc = args.nproc if args.nproc is not None else (env_world or 1)
    if nproc < 1 or args.ep < 1 or args.fsdp < 1:
        raise UserError(f"--nproc and --ep must be positive (and --fsdp), got --nproc {nproc} --ep {args.ep} "
                        f"--fsdp {args.fsdp}")
    if args.ep > nproc:
        raise UserError(f"--ep {args.ep} needs --nproc {args.ep} or more: each expert-parallel rank is a "
                        "process")
    if nproc % args.ep:
        raise UserError(f"--ep {args.ep} must divide --nproc {nproc} (processes = data parallel x expert "
                        "parallel)")
    if env_world is not None and nproc != env_world:
        raise UserError(f"--nproc {nproc} but torchrun started {env_world} processes; "
                        "leave --nproc out under torchrun")
    if nproc == 1 and (args.ep > 1 or args.fsdp > 1):
        raise UserError(f"--ep {args.ep} --fsdp {args.fsdp} need several processes; add --nproc N")
    try:
        from mogelm.parallel.context import validate_layout
    except ImportError:
        raise UserError(f"{NO_DISTRIBUTED} (mogelm.parallel.context)") from None
    try:
        validate_layout(nproc, args.ep, args.fsdp)
    except ValueError as e:
        raise UserError(f"{e} (--nproc {nproc})") from None
    return nproc


def check_processes(nproc: int, device: str) -> None:
    """--nproc against the machine: refused beyond its GPUs, warned beyond its CPU cores."""
    if nproc == 1:
        return
    import torch

    from mogelm.train import resolve_device

    if resolve_device(device).type == "cuda":
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise UserError(f"--nproc {nproc} needs {nproc} GPUs, this machine has {gpus}; use --nproc "
                            f"{gpus} or --device cpu")
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if nproc > cores:
            print(f"warning: --nproc {nproc} starts {nproc} processes on {cores} CPU cores; they will share "
                  "them and run slowly", file=sys.stderr)


def _is_collective_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    from mogelm.parallel.dispatchers import CollectiveError

    return isinstance(e, (CollectiveError, dist.DistError))


def run(args: argparse.Namespace) -> int:
    from mogelm.train import train
    from mogelm.train.context import make_context
    from mogelm.train.loop import plan_run

    tc = config_from_args(args)
    explicit = explicit_fields(args)
    nproc = _world_size(args)
    if "LOCAL_RANK" not in os.environ:  # once, before any process starts: a bad flag gets one message
        tc_now, resume_dir, _ = plan_run(tc, nproc, explicit, args.allow_changed_optimizer)
        if tc.data:  # read (not tokenized) once here: unreadable text is one message, not one per rank
            from mogelm.data import load_documents

            load_documents(tc.data, tc.max_bytes, warn=lambda msg: None)
        if args.ep > 1:  # the model-dependent layout check (EP vs expert groups)
            from mogelm.checkpoint import read_config
            from mogelm.parallel.expert_parallel import validate_ep
            from mogelm.train.config import build_model_config

            cfg = read_config(resume_dir) if resume_dir is not None else build_model_config(tc_now)
            try:
                validate_ep(cfg, args.ep)
            except ValueError as e:
                raise UserError(f"--ep {args.ep}: {e}") from None
        check_processes(nproc, args.device)  # last: a warning only when the run will start
        if nproc > 1:
            try:
                from mogelm.parallel.launch import relaunch
            except ImportError:
                raise UserError(f"{NO_DISTRIBUTED} (mogelm.parallel.launch)") from None
            return int(relaunch(nproc) or 0)
    ctx = make_context(args.device, ep=args.ep, fsdp=args.fsdp)  # a torchrun worker joins the job here
    try:
        res = train(tc, ctx, explicit=explicit, allow_changed_optimizer=args.allow_changed_optimizer)
    except Exception as e:
        if ctx.world_size == 1 or not _is_collective_failure(e):
            raise
        # A peer died or hung: one line per rank instead of a traceback (exit 2, so the launcher adds
        # nothing); torchrun then stops the others and names the first failure.
        from mogelm.parallel.dispatchers import describe_failure

        raise UserError(describe_failure(e)) from None
    if res.get("final_val") and ctx.is_main:
        print(f"final validation loss {res['final_val']['val_loss']:.4f}; checkpoint {res['final_dir']}")
    ctx.destroy()
    return 0
