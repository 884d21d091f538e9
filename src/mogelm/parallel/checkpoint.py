"""Distributed checkpoints through torch.distributed.checkpoint (DCP), independent of the layout.

    save_distributed(path, model, optimizer, extra={"step": 100})   # every rank, any layout
                                                                     # (DP x EP, FSDP2 x EP);
                                                                     # extra must be JSON-able
    extra = load_distributed(path, model, optimizer)                 # any other layout, or one
                                                                     # process (no dist)
    full = gather_full_state(model, optimizer, ep_group)             # every rank; whole tensors
                                                                     # in the one-process layout

The stacked routed-expert tensors ([E_local, ...] shards under expert parallel, and under FSDP2
a further slice of those rows on each rank) are stored one entry per *global* expert
(`model.layers.0.mlp.experts.gate_up_EFD.e17`), and so is their optimizer state; everything else
is stored once under its state_dict name, as a DTensor when FSDP2 shards it (DCP reshards
DTensors by itself). A reader at another layout asks DCP for exactly the experts and slices it
holds, so nothing is gathered onto one rank: a checkpoint written by FSDP 4 x EP 2 loads into
one process, into DP 2 x EP 2 or into FSDP 2 x EP 1 (and back). DCP writes one file per rank plus
metadata; replicated entries are written once.

The `mogelm train` checkpoint directory built on these lives in mogelm.train.context (parallel/
does not import train).
"""

from __future__ import annotations

import contextlib
import json
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from mogelm.moe.experts import RoutedExperts
from mogelm.parallel.expert_parallel import shard_info


def is_dtensor(t) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "device_mesh")


def _local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the rows of `t` this rank holds, index of the first of them in `t`'s global rows): the
    tensor itself for a plain tensor; the local shard and its offset for a DTensor (FSDP2)."""
    if not is_dtensor(t):
        return t, 0
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(isinstance(pl, Shard) and pl.dim != 0 for pl in t.placements):
        raise ValueError("expert tensors must be sharded on dim 0 (the expert dimension)")
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), offset[0]


def _expert_params(model: nn.Module) -> dict[int, int]:
    """id(param) -> global index of its first expert row (before any FSDP slicing), for every
    stacked expert parameter."""
    out = {}
    for mod in model.modules():
        if isinstance(mod, RoutedExperts):
            for p in (mod.gate_up_EFD, mod.down_EDF):
                info = shard_info(p)
                out[id(p)] = 0 if info is None else info[0] * p.shape[0]
    return out


def _split(prefix: str, t: torch.Tensor, first: int, into: dict) -> None:
    """One entry per expert row this rank holds: views of the live tensor, so a load fills it."""
    local, offset = _local_rows(t)
    for i in range(local.shape[0]):
        into[f"{prefix}.e{first + offset + i}"] = local[i]


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


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit back in its sharded state. After a forward without backward (e.g.
    validation) the units that keep their parameters gathered (reshard_after_forward=False) hold
    plain tensors instead of the sharded DTensor parameters the optimizer knows."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def logical_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Flat dict of tensors (views of the live ones) with layout-independent keys."""
    reshard(model)
    offsets = _expert_params(model)
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


# Whole tensors (the one-process files of a training checkpoint) ------------------------------------
def _full(t: torch.Tensor, expert: bool, ep_group) -> torch.Tensor:
    """The whole tensor: a DTensor all-gathered over its mesh, then expert rows over EP."""
    whole = t.full_tensor() if is_dtensor(t) else t.detach()
    if expert and ep_group is not None and dist.get_world_size(ep_group) > 1:
        parts = [torch.empty_like(whole) for _ in range(dist.get_world_size(ep_group))]
        dist.all_gather(parts, whole.contiguous(), group=ep_group)
        whole = torch.cat(parts)
    return whole


def gather_full_state(model: nn.Module, optimizer=None, ep_group=None, keep: bool = True) -> dict:
    """Every rank calls this (collectives, in parameter order): {"model": state_dict with whole
    tensors, "optim": {param name: {state key: whole tensor or value}}} as one process would hold
    them; with keep=False (the non-main ranks) the tensors are gathered and dropped and the
    result is empty. Costs one whole copy of model and optimizer on the main rank."""
    reshard(model)
    experts = _expert_params(model)
    out: dict = {"model": {}, "optim": {}}
    params = dict(model.named_parameters())
    for name, t in model.state_dict().items():
        p = params.get(name)
        whole = _full(t, p is not None and id(p) in experts, ep_group)
        if keep:
            out["model"][name] = whole.cpu()
    if optimizer is not None:
        names = {id(p): n for n, p in params.items()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                entry = {}
                for k, v in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        v = _full(v, id(p) in experts, ep_group)
                    elif is_dtensor(v):
                        v = v.full_tensor()
                    entry[k] = v.cpu() if torch.is_tensor(v) else v
                if keep:
                    out["optim"][names[id(p)]] = entry
    return out
