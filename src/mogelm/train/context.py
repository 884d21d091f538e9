"""The training loop's parallel context: one process (LocalContext) or many (DistributedContext
over mogelm.parallel's ParallelContext), with the same methods, so the loop has one path.

    ctx = LocalContext(torch.device("cpu"))         # world size 1; nothing touches torch.distributed
    ctx = make_context("cpu", ep=2, fsdp=4)         # inside a torchrun worker: joins the job
    model = ctx.parallelize(model)                  # device, EP shards, FSDP2 units (per layout)
    ...backward...; ctx.sync_gradients(model); ctx.clip_grad_norm(model, 1.0); opt.step()
    ctx.save_checkpoint(path, model, optimizer, state, data_folder)   # the `mogelm train` directory
    state = ctx.load_checkpoint(path, model, optimizer)               # written at any layout

Checkpoint directory (every layout writes the one-process files; many processes add the DCP
shards, which reload at any other layout):

    path/config.json, model.safetensors, tokenizer*.json   the whole model, Pangu layout
    path/trainer_state.pt     step, optimizer state in the one-process layout, RNG states
    path/distributed/         (many processes) DCP: model + optimizer shards + trainer state

LocalContext's numerics are those of the plain one-process loop: clip_grad_norm is
torch.nn.utils.clip_grad_norm_ and the collectives are identities. It reads a checkpoint written
by many processes through its one-process files (mogelm.train.checkpointing).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn


class LocalContext:
    """Rank 0 of a world of one: no process groups, no collectives."""

    rank = 0
    world_size = 1
    is_main = True
    layout = "one process"
    builds_on_meta = False

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def parallelize(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def sync_gradients(self, model: nn.Module) -> None:
        """Nothing to average: this process's gradients are the global batch's."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip to a global L2 norm; returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))

    def all_reduce_mean(self, value: float) -> float:
        return value

    def barrier(self) -> None:
        pass

    def save_checkpoint(self, path, model: nn.Module, optimizer, state: dict, data_folder):
        """The `mogelm train` checkpoint directory (mogelm.train.checkpointing)."""
        from mogelm.train.checkpointing import save_checkpoint

        return save_checkpoint(path, model, optimizer, state, data_folder)

    def load_checkpoint(self, path, model: nn.Module, optimizer) -> dict:
        """After parallelize and building the optimizer: model and optimizer state from a
        `mogelm train` checkpoint directory; returns the trainer state."""
        from mogelm.train.checkpointing import load_checkpoint

        return load_checkpoint(path, model, optimizer)

    def destroy(self) -> None:
        pass


class DistributedContext:
    """A ParallelContext (mogelm.parallel.context) plus the `mogelm train` checkpoint directory."""

    def __init__(self, pctx):
        self.parallel = pctx
        self.rank, self.world_size, self.is_main = pctx.rank, pctx.world_size, pctx.is_main
        self.device = pctx.device
        self.layout = pctx.layout
        self.builds_on_meta = pctx.builds_on_meta  # build the model on "meta"; parallelize shards it

    def parallelize(self, model: nn.Module) -> nn.Module:
        return self.parallel.parallelize(model)

    def sync_gradients(self, model: nn.Module) -> None:
        self.parallel.sync_gradients(model)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        return self.parallel.clip_grad_norm(model, max_norm)

    def all_reduce_mean(self, value: float) -> float:
        return self.parallel.all_reduce_mean(value)

    def barrier(self) -> None:
        self.parallel.barrier()

    def destroy(self) -> None:
        self.parallel.destroy()

    def save_checkpoint(self, path, model: nn.Module, optimizer=None, state: dict | None = None,
                        data_folder=None) -> Path:
        """Every rank: the checkpoint directory (module docstring), written atomically (temp +
        rename by the main rank once every rank has written its DCP shard)."""
        from mogelm.checkpoint import save_pretrained
        from mogelm.fsutil import replace_dir
        from mogelm.parallel.checkpoint import gather_full_state, save_distributed
        from mogelm.train.checkpointing import rng_state

        state = dict(state or {})
        path = Path(path)
        tmp = path.parent / f".{path.name}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        save_distributed(str(tmp / DCP_SUBDIR), model, optimizer,
                         extra=json.loads(json.dumps(state, default=str)))
        full = gather_full_state(model, optimizer, self.parallel.ep_group, keep=self.is_main)
        if self.is_main:
            save_pretrained(_WholeModel(model.cfg, full["model"]), tmp)
            opt_sd = None
            if optimizer is not None:
                opt_sd = optimizer.state_dict()  # param_groups with integer ids, one-process order
                names = {id(p): n for n, p in model.named_parameters()}
                params = [p for g in optimizer.param_groups for p in g["params"]]
                opt_sd["state"] = {i: full["optim"][names[id(p)]] for i, p in enumerate(params)
                                   if full["optim"].get(names[id(p)])}
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
        self.barrier()
        return path

    def load_checkpoint(self, path, model: nn.Module, optimizer=None) -> dict:
        """Every rank, after parallelize and building the optimizer: this rank's part of model and
        optimizer from a checkpoint written at any layout (its DCP shards, or a one-process
        checkpoint's files); returns the saved trainer state."""
        from mogelm.parallel.checkpoint import load_distributed

        path = Path(path)
        if (path / DCP_SUBDIR).is_dir():
            return load_distributed(str(path / DCP_SUBDIR), model, optimizer)
        if (path / ".metadata").is_file():  # a bare DCP directory
            return load_distributed(str(path), model, optimizer)
        return _load_one_process_files(path, model, optimizer)


DCP_SUBDIR = "distributed"


class _WholeModel:
    """What save_pretrained needs of a model (cfg and state_dict), over gathered whole tensors."""

    def __init__(self, cfg, state: dict):
        self.cfg, self._state = cfg, state

    def state_dict(self) -> dict:
        return self._state

    def named_modules(self):
        return iter(())  # plain whole tensors: no fp8 modules (distributed training is bf16/fp32)


def _load_one_process_files(path: Path, model: nn.Module, optimizer) -> dict:
    """A one-process checkpoint (no DCP shards) into a sharded model: each rank copies its part
    of every whole tensor (expert rows of its EP rank, then its FSDP slice)."""
    from mogelm.checkpoint import from_pretrained
    from mogelm.parallel.checkpoint import _expert_params, _local_rows, is_dtensor, reshard
    from mogelm.parallel.expert_parallel import shard_info
    from mogelm.train.checkpointing import load_trainer_state

    reshard(model)
    state = load_trainer_state(path)
    whole = from_pretrained(path).state_dict()
    experts = _expert_params(model)
    params = dict(model.named_parameters())

    def put(dst: torch.Tensor, src: torch.Tensor, expert_first: int | None) -> None:
        if expert_first is not None:
            src = src[expert_first : expert_first + dst.shape[0]]
        if is_dtensor(dst):
            local, offset = _local_rows(dst)
            local.copy_(src[offset : offset + local.shape[0]])
        else:
            dst.copy_(src)

    with torch.no_grad():
        for name, t in model.state_dict().items():
            p = params.get(name)
            put(t, whole[name].to(t.dtype), experts.get(id(p)) if p is not None else None)
        if optimizer is not None and state.get("optimizer"):
            from mogelm.parallel.checkpoint import _ensure_optimizer_state

            _ensure_optimizer_state(optimizer)
            saved = state["optimizer"]
            flat = [p for g in optimizer.param_groups for p in g["params"]]
            for i, p in enumerate(flat):
                for k, v in saved["state"].get(i, {}).items():
                    cur = optimizer.state[p].get(k)
                    if torch.is_tensor(cur) and torch.is_tensor(v) and v.dim() > 0:
                        put(cur, v.to(cur.dtype), experts.get(id(p)) if shard_info(p) else None)
                    elif torch.is_tensor(cur) and torch.is_tensor(v):
                        cur.copy_(v)
                    else:
                        optimizer.state[p][k] = v
            for group, sg in zip(optimizer.param_groups, saved["param_groups"]):
                group.update({k: v for k, v in sg.items() if k != "params"})
    return state


def make_context(device: str | torch.device = "auto", ep: int = 1, fsdp: int = 1, dispatcher: str = "auto"):
    """The context of this process: a DistributedContext inside a torchrun worker (joins the job
    with the given layout), else a LocalContext on `device`."""
    import os

    from mogelm.train.config import resolve_device

    if "LOCAL_RANK" not in os.environ:
        return LocalContext(resolve_device(str(device)))
    from mogelm.parallel.context import init_parallel

    pctx = init_parallel(ep_size=ep, fsdp_size=fsdp, dispatcher=dispatcher,
                         device=str(resolve_device(str(device))))
    return DistributedContext(pctx)
