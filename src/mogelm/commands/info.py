"""`mogelm info`: a model's shapes, parameter counts, FLOPs per token and the memory of a training
step per rank for a batch and parallel layout (a thin layer over mogelm.info).

    mogelm info pangu-pro-moe-72b        # 71.99 B total, 16.50 B active
    mogelm info runs/demo/moge/final     # a checkpoint directory (or a config JSON file)
    mogelm info pangu-pro-moe-72b --nproc 16 --ep 8 --fsdp 16 --seq-len 4096 --optim-state-dtype bf16
    mogelm info debug --set num_layers=8 --json
    mogelm info runs/demo/moge/final     # a checkpoint directory
    mogelm info small --mtp-depth 1      # + one MTP module (counted separately)
"""

from __future__ import annotations

import argparse
import json

from mogelm.config import PRESETS
from mogelm.errors import UserError
from mogelm.info import H200_GIB, describe, describe_plan, load_config, model_info, training_plan


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=f"preset name ({', '.join(sorted(PRESETS))}), checkpoint directory, "
                                 "or model config JSON file")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="set_fields",
                   help="override a model config field (repeatable), as for `mogelm train`")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    g = p.add_argument_group("training step (FLOPs and memory per rank)")
    g.add_argument("--nproc", type=int, default=1, help="processes in the job (default 1)")
    g.add_argument("--ep", type=int, default=1, help="expert-parallel size (default 1)")
    g.add_argument("--fsdp", type=int, default=1, help="FSDP2 size (default 1: weights replicated)")
    g.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch per rank (default 1)")
    g.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    g.add_argument("--optim-state-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="dtype of AdamW's moments (default fp32)")
    g.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16 autocast (CUDA training) or fp32 (CPU) activations (default bf16)")
    g.add_argument("--experts", choices=("triton", "torch"), default="triton",
                   help="routed-expert kernels: triton (CUDA: keeps inputs, recomputes) or torch "
                        "(keeps intermediates; CPU) (default triton)")
    g.add_argument("--device-gib", type=float, default=H200_GIB,
                   help=f"memory of one device, for the fits / does not fit line (default {H200_GIB}: H200)")
    p.add_argument("--mtp-depth", type=int, default=None,
                   help="count with this many MTP modules (default: the preset's or checkpoint's)")


def run(args: argparse.Namespace) -> int:
    from mogelm.config import ModelConfig, base_fields, parse_overrides
    from mogelm.parallel.context import validate_layout

    cfg = load_config(args.model)
    if args.mtp_depth is not None:
        if args.mtp_depth < 0:
            raise UserError(f"--mtp-depth must be >= 0, got {args.mtp_depth}")
        cfg = cfg.replace(mtp_depth=args.mtp_depth)
    if args.set_fields:
        try:
            cfg = ModelConfig(**{**base_fields(cfg), **parse_overrides(args.set_fields)})
        except (ValueError, TypeError) as e:
            raise UserError(f"invalid model configuration: {e}") from None
    for flag in ("nproc", "batch_size", "seq_len"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be positive")
    try:
        validate_layout(args.nproc, args.ep, args.fsdp)
        if args.ep > 1:
            from mogelm.parallel.expert_parallel import validate_ep

            validate_ep(cfg, args.ep)
    except ValueError as e:
        raise UserError(f"{e} (--nproc {args.nproc})") from None
    plan = training_plan(cfg, nproc=args.nproc, ep=args.ep, fsdp=args.fsdp, batch_size=args.batch_size,
                         seq_len=args.seq_len, optim_state=args.optim_state_dtype, precision=args.precision,
                         experts=args.experts)
    if args.json:
        print(json.dumps({**model_info(cfg), "training": plan}, indent=2))
    else:
        print(describe(cfg))
        print(describe_plan(cfg, plan, args.device_gib))
    return 0
