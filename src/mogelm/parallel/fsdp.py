"""FSDP2 (`torch.distributed.fsdp.fully_shard`) over a Transformer whose experts are already
sharded for expert parallel, in torchtitan's layout (see mesh_layout below and DESIGN.md §4).

    from mogelm.parallel.fsdp import apply_fsdp
    apply_expert_parallel(model, expert_mesh.get_group("ep"))      # first: experts -> this EP rank
    apply_fsdp(model, dense_mesh, expert_fsdp_mesh, world_size)    # then: FSDP2 units

FSDP units, innermost first (each unit all-gathers its parameters before its forward and
reduce-scatters their gradients after its backward):
    layers.{l}.mlp.experts    this EP rank's routed experts, sharded over the expert FSDP mesh
                              (the ranks that hold the same experts); gradients become the
                              global-batch mean like every other gradient (see apply_fsdp)
    layers.{l}                attention, norms, router, router_scale, shared expert
    embed_tokens; [norm, lm_head] (one unit; with tied embeddings both stay in the root unit)
    the root (what is left)
Forward and backward prefetch the next block together with its experts explicitly (as torchtitan
does when EP is on): a dispatcher that synchronises with the host (top-k's count exchange) would
otherwise delay FSDP's implicit prefetch.

Parameters become DTensors; this module re-attaches the expert-shard tag of
mogelm.parallel.expert_parallel to the new expert parameters, so gradient clipping and the
distributed checkpoints still find them.

A model too large for one device is built on the meta device (mogelm.train.build_model(cfg,
seed, "meta")), sharded, and only then given memory: materialize_sharded replays the construction and
reset_parameters of a meta twin and, for each initialiser call, draws the whole tensor on the CPU
from the same random stream as a one-process build and keeps this rank's slice (so it draws as
much as a one-process build: minutes of CPU time for a 72B model). So every layout
starts from the very weights one process would (tests/test_fsdp.py), and no rank ever holds more
than one whole parameter tensor at a time (the largest: one layer's expert stack, or the
embedding).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.overrides import TorchFunctionMode

from mogelm.moe.layer import MoGELayer
from mogelm.parallel.expert_parallel import EXPERT_ATTR, shard_info


def mesh_layout(world_size: int, ep_size: int, fsdp_size: int) -> dict[str, tuple[tuple, tuple]]:
    """The two DeviceMesh shapes of an FSDP x EP layout (names, sizes), rank-major:

        dense   ("dp", "fsdp")          = (W/F, F)       dense parameters: HSDP when W/F > 1
        experts ("dp", "efsdp", "ep")   = (W/F, F/E, E)  experts: EP inside, FSDP over the rest

    EP borrows its ranks from the FSDP dimension (torchtitan's "dp_shard_in_ep"): the F ranks
    of one FSDP group hold one whole copy of the model, dense parameters in F slices and experts
    in E x F/E slices. Ranks r*E .. r*E+E-1 form an EP group, as in the DP x EP layout."""
    return {
        "dense": (("dp", "fsdp"), (world_size // fsdp_size, fsdp_size)),
        "experts": (("dp", "efsdp", "ep"), (world_size // fsdp_size, fsdp_size // ep_size, ep_size)),
    }


def default_mp_policy(device: torch.device) -> MixedPrecisionPolicy | None:
    """bf16 all-gathers and compute with fp32 gradient reduction on CUDA (torchtitan's default);
    None (fp32 throughout) on CPU."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def _divide_(factor: int, grad: torch.Tensor) -> None:
    grad.div_(factor)


def apply_fsdp(model: nn.Module, dense_mesh, expert_mesh, ep_size: int,
               mp_policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    """Wrap `model` in FSDP2 units (module docstring); call on every rank after
    apply_expert_parallel. `dense_mesh`/`expert_mesh`: 1-D (FSDP) or 2-D (replicate, shard: HSDP)
    meshes for the dense parameters and for this EP rank's experts; `ep_size`: the EP group size."""
    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    blocks = list(model.layers)
    expert_units = []
    for block in blocks:
        ffn = block.mlp
        if isinstance(ffn, MoGELayer):
            tags = {name: shard_info(getattr(ffn.experts, name)) for name in ("gate_up_EFD", "down_EDF")}
            fully_shard(ffn.experts, mesh=expert_mesh, **kw)
            # Each rank's loss is the mean over its 1/W of the global batch, and an expert's
            # gradient on its EP rank already sums the contributions of the E ranks of its EP
            # group (the dispatch's backward brings them). FSDP averages over the W/E ranks of
            # the expert mesh; one more division by E makes it the global-batch mean over W, as
            # for the dense parameters. (torchtitan sets a gradient divide factor of W instead:
            # that needs PREMUL_SUM, which gloo lacks, and torch 2.13 divides twice when the
            # expert mesh's shard dimension has size 1. The hook runs after the reduction.)
            ffn.experts.set_all_reduce_hook(functools.partial(_divide_, ep_size))
            for name, tag in tags.items():
                if tag is not None:
                    setattr(getattr(ffn.experts, name), EXPERT_ATTR, tag)
            expert_units.append(ffn.experts)
        else:
            expert_units.append(None)
        fully_shard(block, mesh=dense_mesh, **kw)
    tied = model.lm_head.weight is model.embed_tokens.weight
    if not tied:
        fully_shard(model.embed_tokens, mesh=dense_mesh, **kw)
        fully_shard([model.norm, model.lm_head], mesh=dense_mesh, reshard_after_forward=False, **kw)
    fully_shard(model, mesh=dense_mesh, **kw)

    # Explicit prefetch: block l's forward starts the all-gathers of block l+1 and its experts.
    def unit(i):
        return [blocks[i]] + ([expert_units[i]] if expert_units[i] is not None else [])

    for i, block in enumerate(blocks):
        if i + 1 < len(blocks):
            block.set_modules_to_forward_prefetch(unit(i + 1))
        if i > 0:
            block.set_modules_to_backward_prefetch(unit(i - 1))
    return model


# Materialising a model built on the meta device ----------------------------------------------------
def _local_slice(t: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(where this rank keeps `t`'s values, the matching part of the whole tensor `full`): the
    expert rows of this EP rank, then the rows of this FSDP shard."""
    info = shard_info(t)
    if info is not None:
        ep_rank, _, _ = info
        rows = t.shape[0]
        full = full[ep_rank * rows : (ep_rank + 1) * rows]
    if hasattr(t, "to_local"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = t.to_local()
        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
        return local, full[index]
    return t, full


class _ReplayInit(TorchFunctionMode):
    """Runs every in-place initialiser (normal_, uniform_, fill_, zero_) of a meta tensor on a
    whole CPU tensor instead, drawing from the CPU random stream as a one-process build does, and
    copies this rank's part into the tensor's target when it has one."""

    OPS = ("normal_", "uniform_", "fill_", "zero_")

    def __init__(self, draw_device: str | torch.device = "cpu"):
        super().__init__()
        self.targets: dict[int, torch.Tensor] = {}
        self.draw_device = draw_device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        # nn.init functions reach a mode as themselves (they dispatch torch functions before
        # calling the tensor method); tensor methods come as the method.
        init_fn = getattr(func, "__module__", "") == "torch.nn.init"
        tensor = args[0] if args else kwargs.get("tensor")
        if (init_fn or name in self.OPS) and isinstance(tensor, torch.Tensor) and tensor.is_meta:
            full = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.draw_device)
            if init_fn:
                if args:
                    func(full, *args[1:], **kwargs)
                else:
                    func(**{**kwargs, "tensor": full})
            else:
                getattr(full, name)(*args[1:], **kwargs)
            if id(tensor) in self.targets:
                local, part = _local_slice(self.targets[id(tensor)], full)
                local.copy_(part)
            return tensor
        return func(*args, **kwargs)


@torch.no_grad()
def materialize_sharded(model: nn.Module, device: torch.device,
                        draw_device: str | torch.device = "cpu") -> nn.Module:
    """Give a meta-built, already sharded Transformer memory on `device` and the weights
    `Transformer(cfg)` would get in one process from the current CPU random state (module
    docstring). Call on every rank right after sharding, with the same random state everywhere.
    draw_device=device draws on the accelerator instead: much faster for large models, same on
    every rank, but not the one-process CPU weights (benchmarks use it)."""
    from mogelm.model import RotaryEmbedding, Transformer, rope_inv_freq

    tags = {name: shard_info(p) for name, p in model.named_parameters() if shard_info(p) is not None}
    model.to_empty(device=device)  # new parameter objects: the expert-shard tags go on them again
    params = dict(model.named_parameters())
    for name, tag in tags.items():
        setattr(params[name], EXPERT_ATTR, tag)
    replay = _ReplayInit(draw_device)
    # The twin is unsharded and has no memory; building it replays the draws of the layers'
    # constructors (nn.Linear's own init, which reset_parameters then overwrites), keeping the
    # random stream where a one-process build has it.
    with torch.device("meta"), replay:
        twin = Transformer(model.cfg)
    live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    replay.targets = {id(t): live[name] for name, t in [*twin.named_parameters(), *twin.named_buffers()]
                      if name in live}
    with replay:
        twin.reset_parameters()
    for m in model.modules():  # computed, not drawn: rebuild on the device
        if isinstance(m, RotaryEmbedding):
            m.inv_freq = rope_inv_freq(model.cfg.head_dim, model.cfg.rope_theta, device)
    return model
