"""Load one process's share of a model: every parameter a slice of the checkpoint's tensor, read
straight from the memory-mapped safetensors files, so no process ever holds the whole model.

    model = load_sharded("ckpt/", sharder(process_group), "cuda:1", torch.bfloat16)
    # sharder: mogelm.parallel.tensor_parallel (the caller composes the two layers)

`shard(model)` is handed the model built on the meta device, shards it in place (smaller
parameter shapes, other modules) and returns `slice_of(name) -> (dim, start, length) | None`,
the slice this process holds of parameter `name` (model naming) or None for the whole tensor.
The routed experts are stacked in memory and one tensor per expert on disk: their slice along
dim 0 names the experts to read. bf16 / fp32 checkpoints only (an fp8 one is refused); missing
or mis-shaped tensors are reported together in one UserError, as mogelm.checkpoint does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from mogelm.checkpoint import _checkpoint_files, _open, _to_checkpoint_name, assign_loaded, raise_mismatch
from mogelm.errors import UserError
from mogelm.hf_config import read_config, read_quantization_config
from mogelm.model import Transformer

SliceOf = Callable[[str], "tuple[int, int, int] | None"]


def load_sharded(path: str | Path, shard: Callable[[Transformer], SliceOf],
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    """This process's sharded model from checkpoint directory `path` (see the module docstring)."""
    path = Path(path)
    cfg = read_config(path)
    if read_quantization_config(path) is not None:
        raise UserError(f"{path} is an fp8 checkpoint: serving on several processes loads bf16 / fp32 "
                        "checkpoints only; use the bf16 checkpoint")
    weight_map = _checkpoint_files(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    full_shapes = {n: list(t.shape) for n, t in model.state_dict().items()}
    slice_of = shard(model)
    handles = {f: _open(path / f) for f in sorted(set(weight_map.values()))}
    problems: list[str] = []
    state: dict[str, Tensor] = {}

    def read(ck: str, full: list[int], sl: tuple[int, int, int] | None) -> Tensor | None:
        if ck not in weight_map:
            problems.append(f"missing {ck}")
            return None
        view = handles[weight_map[ck]].get_slice(ck)
        if list(view.get_shape()) != full:
            problems.append(f"{ck} has shape {view.get_shape()}, expected {full}")
            return None
        if sl is None:
            t = view[:]
        else:
            dim, start, length = sl
            t = view[(slice(None),) * dim + (slice(start, start + length),)]
        return t.to(device=device, dtype=dtype or t.dtype)

    try:
        F, D = cfg.moe_intermediate_size, cfg.hidden_size
        for name, meta in model.state_dict().items():
            if cfg.tie_embeddings and name == "lm_head.weight":
                continue
            module_name, _, kind = name.rpartition(".")
            if module_name.endswith(".mlp.experts"):  # [E_loc, ...] stacked here, one tensor per expert there
                sl = slice_of(name)
                first = sl[1] if sl is not None else 0
                parts = ("gate_proj", "up_proj") if kind == "gate_up_EFD" else ("down_proj",)
                per_expert = [[read(f"model.{module_name}.{first + e}.{part}.weight",
                                    [D, F] if part == "down_proj" else [F, D], None) for part in parts]
                              for e in range(meta.shape[0])]
                if all(t is not None for ts in per_expert for t in ts):
                    state[name] = torch.stack([torch.cat(ts) for ts in per_expert])
                continue
            ck = _to_checkpoint_name(name)
            if ck not in weight_map and name.endswith("expert_bias_E"):  # published checkpoints have none
                state[name] = torch.zeros(meta.shape, device=device)
                continue
            t = read(ck, full_shapes[name], slice_of(name))
            if t is not None:
                state[name] = t
        if problems:
            raise_mismatch(path, problems)
    finally:
        handles.clear()
    return assign_loaded(model, state, device).requires_grad_(False)
