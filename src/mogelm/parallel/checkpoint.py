"""Distributed checkpoints through torch.distributed.checkpoint (DCP), independent of the layout.

    save_distributed(path, model, optimizer, extra={"step": 100})   # every rank, any DP x EP;
                                                                     # extra must be JSON-able
    extra = load_distributed(path, model, optimizer)                 # any other world size / EP,
                                                                     # or one process (no dist)

The stacked routed-expert tensors ([E_local, ...] shards under expert parallel) are stored one
entry per *global* expert (`model.layers.0.mlp.experts.gate_up_EFD.e17`), and so is their
optimizer state; everything else is stored once under its state_dict name. A reader at another
layout asks DCP for exactly the experts it holds, so nothing is gathered onto one rank and a
checkpoint written by 2 EP ranks loads into 1 process or 4 (and back). DCP writes one file per
rank plus metadata; replicated entries are written once.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from mogelm.fsutil import replace_dir
from mogelm.moe.experts import RoutedExperts
from mogelm.parallel.expert_parallel import shard_info


def _expert_offsets(model: nn.Module) -> dict[int, int]:
    """id(param) -> global index of its first expert, for every stacked expert parameter."""
    out = {}
    for mod in model.modules():
        if isinstance(mod, RoutedExperts):
            for p in (mod.gate_up_EFD, mod.down_EDF):
                info = shard_info(p)
                out[id(p)] = 0 if info is None else info[0] * p.shape[0]
    return out


def _split(prefix: str, t: torch.Tensor, first: int, into: dict) -> None:
    for i in range(t.shape[0]):
        into[f"{prefix}.e{first + i}"] = t[i]


def _ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create optimizer state (e.g. Adam moments) so DCP has tensors to load into: one step with
    zero gradients and lr 0 leaves the parameters unchanged; the loaded state then replaces it."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if all(p in optimizer.state and optimizer.state[p] for p in params):
        return
    saved = [(g["lr"], g.get("weight_decay")) for g in optimizer.param_groups]
    grads = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    for g in optimizer.param_groups:
        g["lr"] = 0.0
        if "weight_decay" in g:
            g["weight_decay"] = 0.0
    optimizer.step()
    for g, (lr, wd) in zip(optimizer.param_groups, saved):
        g["lr"] = lr
        if wd is not None:
            g["weight_decay"] = wd
    for p, grad in zip(params, grads):
        p.grad = grad


def logical_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Flat dict of tensors (views of the live ones) with layout-independent keys."""
    offsets = _expert_offsets(model)
    state: dict = {}
    params = dict(model.named_parameters())
    for name, t in model.state_dict().items():
        p = params.get(name)
        if p is not None and id(p) in offsets:
            _split(f"model.{name}", t, offsets[id(p)], state)
        else:
            state[f"model.{name}"] = t
    if optimizer is not None:
        names = {id(p): n for n, p in params.items()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for k, v in optimizer.state.get(p, {}).items():
                    key = f"optim.{names[id(p)]}.{k}"
                    if torch.is_tensor(v) and id(p) in offsets and v.shape == p.shape:
                        _split(key, v, offsets[id(p)], state)
                    else:
                        state[key] = v
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        state["optim.param_groups"] = json.dumps(groups)
    return state


def save_distributed(path: str, model: nn.Module, optimizer=None, extra: dict | None = None) -> None:
    """Write a DCP checkpoint to directory `path` (every rank calls this)."""
    state = logical_state_dict(model, optimizer)
    state["extra"] = json.dumps(extra or {})
    with _one_process_is_intended():
        dcp.save(state, checkpoint_id=path)


def load_distributed(path: str, model: nn.Module, optimizer=None) -> dict:
    """Load a DCP checkpoint into `model` (and `optimizer`) in place, at whatever layout they have
    now; works without torch.distributed initialised (one process). Returns the saved `extra`."""
    if optimizer is not None:
        _ensure_optimizer_state(optimizer)
    state = logical_state_dict(model, optimizer)
    state["extra"] = ""
    with _one_process_is_intended():
        dcp.load(state, checkpoint_id=path)
    if optimizer is not None:
        params = dict(model.named_parameters())
        for group, saved in zip(optimizer.param_groups, json.loads(state["optim.param_groups"])):
            group.update(saved)
        for name, p in params.items():  # non-tensor state (rare) comes back as objects
            for k, v in list(optimizer.state.get(p, {}).items()):
                if not torch.is_tensor(v):
                    optimizer.state[p][k] = state[f"optim.{name}.{k}"]
    return json.loads(state["extra"])


@contextlib.contextmanager
def _one_process_is_intended():
    """DCP warns "torch.distributed is disabled ... assuming single process" whenever no process
    group exists, even with no_dist=True. Here one process is a supported use (load_distributed's
    docstring), so that one warning is dropped; every other warning passes."""
    if dist.is_available() and dist.is_initialized():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


# Training checkpoints (the `mogelm train` directory layout) ----------------------------------------
DCP_SUBDIR = "distributed"


def _gather_experts(t: torch.Tensor, ep_group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(ep_group))]
    dist.all_gather(parts, t.detach().contiguous(), group=ep_group)
    return torch.cat(parts)


def save_training_checkpoint(ctx, path, model: nn.Module, optimizer, state: dict, data_folder=None) -> Path:
    """The `mogelm train` checkpoint, written by every rank of `ctx`, atomically (temp + rename):

        path/distributed/         DCP: model + optimizer shards + `state` (reloads at any layout)
        path/config.json, model.safetensors, tokenizer*.json   (full model, Pangu layout)
        path/trainer_state.pt     state + optimizer state in the one-process layout + RNG

    so `mogelm eval/generate` and a one-process `--resume` read it as an ordinary checkpoint."""
    from mogelm.checkpoint import save_pretrained
    from mogelm.train.checkpointing import rng_state

    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    save_distributed(str(tmp / DCP_SUBDIR), model, optimizer,
                     extra=json.loads(json.dumps(state, default=str)))
    # Full expert tensors (and their optimizer moments) for the one-process files.
    full: dict[int, torch.Tensor] = {}
    full_opt: dict[tuple[int, str], torch.Tensor] = {}
    for p in model.parameters():
        if shard_info(p) is not None:
            full[id(p)] = _gather_experts(p.data, ctx.ep_group)
            for k, v in (optimizer.state.get(p, {}) if optimizer is not None else {}).items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    full_opt[(id(p), k)] = _gather_experts(v, ctx.ep_group)
    if ctx.is_main:
        swapped = []
        for mod in model.modules():
            if isinstance(mod, RoutedExperts):
                for name in ("gate_up_EFD", "down_EDF"):
                    p = getattr(mod, name)
                    if id(p) in full:
                        swapped.append((mod, name, p, mod.num_experts))
                        setattr(mod, name, nn.Parameter(full[id(p)], requires_grad=False))
                        mod.num_experts = full[id(p)].shape[0]
        try:
            save_pretrained(model, tmp)
        finally:
            for mod, name, p, n in swapped:
                setattr(mod, name, p)
                mod.num_experts = n
        opt_sd = None
        if optimizer is not None:
            opt_sd = optimizer.state_dict()
            params = [p for g in optimizer.param_groups for p in g["params"]]
            for i, p in enumerate(params):
                if i in opt_sd["state"]:  # a copy: state_dict() shares the live per-param dicts
                    opt_sd["state"][i] = {k: full_opt.get((id(p), k), v)
                                          for k, v in opt_sd["state"][i].items()}
        torch.save({**state, "optimizer": opt_sd, "rng": rng_state(), "distributed": DCP_SUBDIR},
                   tmp / "trainer_state.pt")
        (tmp / "trainer_state.json").write_text(
            json.dumps({k: v for k, v in state.items() if k != "history"}, indent=2, default=str)
        )
        if data_folder is not None:
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if (Path(data_folder) / name).is_file():
                    shutil.copyfile(Path(data_folder) / name, tmp / name)
        replace_dir(tmp, path)
    ctx.barrier()
    return path


def load_training_checkpoint(path, model: nn.Module, optimizer=None) -> dict:
    """Model and optimizer state from a training checkpoint at the current layout; returns the
    saved trainer state (step, ...). Reads path/distributed when present, else path as DCP."""
    path = Path(path)
    dcp_dir = path / DCP_SUBDIR if (path / DCP_SUBDIR).is_dir() else path
    return load_distributed(str(dcp_dir), model, optimizer)
