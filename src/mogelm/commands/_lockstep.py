"""The --nproc path `mogelm serve` and `mogelm generate` share (not a subcommand: cli.COMMANDS does
not list this module): the model sharded over N processes, one LockstepEngine per process.

    mogelm serve --model DIR --nproc 4 --ep 4          # 4 GPUs: attention TP 4, experts EP 4
    mogelm generate --model DIR --nproc 2 --ep 2 --prompt "def main("

Before torchrun starts (check): the flags, the machine (enough GPUs), the checkpoint's config
against the layout (mogelm.parallel.tensor_parallel.validate_tp), so a bad flag is one message.
The command then re-runs itself under torchrun (relaunch, mogelm.parallel.launch). In each worker
(build_engine): join the process group (NCCL on CUDA, gloo on CPU) plus a gloo group for the
engine's control messages, read this rank's slices of the checkpoint (load_sharded; MTP modules
are not loaded) and build the LockstepEngine (which, like Engine, applies inference/fuse.py's
fusions to the shard on CUDA). Rank 0 then serves or generates; the other ranks follow() until it closes.
Workers other than rank 0 ignore SIGINT/SIGTERM (they end when rank 0 closes or its channel
breaks) and die with torchrun.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys

from mogelm.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes (GPUs)")
    g.add_argument("--nproc", type=int, default=None,
                   help="processes on this machine, one per GPU (torchrun under the hood): attention "
                        "tensor-parallel and the expert groups expert-parallel over them (default 1; under "
                        "torchrun: its world size)")
    g.add_argument("--ep", type=int, default=None,
                   help="expert-parallel size; must equal --nproc (each process holds 1/N of the expert "
                        "groups and of the attention heads; default: --nproc)")
    g.add_argument("--moe-dispatch", default="auto", choices=("auto", "moge", "topk", "topk_a2a", "moge_a2a"),
                   help="how a multi-process MoE layer reaches its experts (default auto: moge for MoGE "
                        "routing, topk otherwise; mogelm.parallel.tensor_parallel)")


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ


def check(args: argparse.Namespace, model_dir: str, device: str | None) -> int:
    """The number of processes (1: the ordinary one-process path); UserError for a bad layout."""
    env_world = int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun() else None
    nproc = args.nproc if args.nproc is not None else (env_world or 1)
    ep = args.ep if args.ep is not None else nproc
    if nproc < 1 or ep < 1:
        raise UserError(f"--nproc and --ep must be positive, got --nproc {nproc} --ep {ep}")
    if env_world is not None and nproc != env_world:
        raise UserError(f"--nproc {nproc} but torchrun started {env_world} processes; leave --nproc out "
                        "under torchrun")
    if ep != nproc:
        raise UserError(f"--ep {ep} must equal --nproc {nproc}: every process holds 1/N of the expert groups "
                        "and of the attention heads (data-parallel replicas are not implemented)")
    if nproc == 1:
        return 1
    if getattr(args, "speculative", None):
        raise UserError("--speculative with --nproc > 1 is not supported: speculative decoding runs in one "
                        "process (leave --speculative out, or serve on one GPU)")
    if getattr(args, "quantize", None):
        raise UserError("--quantize with --nproc > 1 is not supported: several processes serve bf16 / fp32 "
                        "checkpoints (leave --quantize out)")
    from mogelm.hf_config import read_config
    from mogelm.parallel.tensor_parallel import resolve_dispatch, validate_tp

    cfg = read_config(model_dir)
    try:
        validate_tp(cfg, nproc)
        resolve_dispatch(cfg, args.moe_dispatch)
    except ValueError as e:
        raise UserError(f"--nproc {nproc}: {e}") from None
    if not under_torchrun():
        import torch

        if _device_type(device) == "cuda" and nproc > torch.cuda.device_count():
            gpus = torch.cuda.device_count()
            raise UserError(f"--nproc {nproc} needs {nproc} GPUs, this machine has {gpus}; use fewer "
                            "processes or --device cpu")
    return nproc


def _device_type(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def relaunch(nproc: int) -> int:
    """This command again under torchrun with `nproc` workers; their exit status."""
    from mogelm.parallel.launch import relaunch as torchrun_relaunch

    return int(torchrun_relaunch(nproc) or 0)


def _follower_signals() -> None:
    """Workers other than rank 0 end when rank 0 closes or its channel breaks, never on a signal
    of their own (rank 0 may be draining requests that need them); they die with torchrun."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def build_engine(args: argparse.Namespace, model_dir: str, device: str | None, dtype, engine_kwargs: dict):
    """In a torchrun worker: join the job, load this rank's shard, return its LockstepEngine."""
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from mogelm.inference.chat import Tokenizer
    from mogelm.inference.distributed import LockstepEngine
    from mogelm.inference.engine import generation_defaults
    from mogelm.inference.shards import load_sharded
    from mogelm.parallel.context import resolve_device
    from mogelm.parallel.tensor_parallel import CAPTURABLE, describe_layout, sharder

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast buffers: not with captured graphs here
    dev = resolve_device(device if device not in (None, "auto") else None)
    timeout = datetime.timedelta(seconds=float(os.environ.get("MOGELM_DIST_TIMEOUT", "300")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout)
    if dist.get_rank() != 0:
        _follower_signals()
    path = Path(model_dir)
    if not path.is_dir():
        raise UserError(f"model directory {str(path)!r} does not exist")
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    tokenizer = Tokenizer.from_dir(path)
    model = load_sharded(path, sharder(dist.group.WORLD, args.moe_dispatch), dev, dtype)
    if tokenizer.tok.get_vocab_size(with_added_tokens=True) > model.cfg.vocab_size:
        raise UserError(f"{path}: the tokenizer has more tokens ({tokenizer.vocab_size}) than the model's "
                        f"vocabulary ({model.cfg.vocab_size})")
    if dist.get_rank() == 0:
        print(f"mogelm: {describe_layout(model)}, {dev.type}", file=sys.stderr, flush=True)
    if not CAPTURABLE[model.tp_dispatch]:  # a host sync per layer: decode eagerly on every rank
        engine_kwargs = {**engine_kwargs, "cuda_graphs": False}
    return LockstepEngine(model, tokenizer, control, default_sampling=generation_defaults(path),
                          **engine_kwargs)


def finish(engine) -> None:
    """Rank 0 is done: let the other ranks return, then leave the process group."""
    import torch.distributed as dist

    engine.close()
    if dist.is_initialized():
        dist.destroy_process_group()
