"""LocalContext: one process, world size 1: the degenerate case of ParallelContext (context.py).

    ctx = LocalContext(torch.device("cpu"))
    model = ctx.parallelize(model)                  # moves it to the device, nothing else
    ...backward...; ctx.sync_gradients(model); ctx.clip_grad_norm(model, 1.0); opt.step()

It has ParallelContext's methods, so the training loop (mogelm.train) runs the same code in one
process and in many. Nothing here touches torch.distributed. Numerics are those of the plain
one-process loop: clip_grad_norm is torch.nn.utils.clip_grad_norm_, the collectives are
identities, and checkpoints are the one-process files of mogelm.train.checkpointing.
"""

from __future__ import annotations

import torch
from torch import nn


class LocalContext:
    """Rank 0 of a world of one: no process groups, no collectives."""

    rank = 0
    world_size = 1
    is_main = True

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
