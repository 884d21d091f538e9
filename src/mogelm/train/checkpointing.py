"""The `mogelm train` checkpoint directory: written atomically, found, loaded, pruned; RNG state.

    out/checkpoint-000100/ out/final/      one directory per checkpoint:
        config.json, model.safetensors     the model, HF layout (mogelm.checkpoint)
        tokenizer.json, tokenizer_config.json
        trainer_state.pt                   step, optimizer state, RNG states, train config
        trainer_state.json                 the same without tensors, for people

    save_checkpoint(path, model, optimizer, state, data_folder)   # one process; temp dir + rename
    state = load_checkpoint(path, model, optimizer)               # into a model built from its config
    find_checkpoints(out)  -> [(step, dir)], oldest first, final last

A kill -9 during a save leaves the previous checkpoints intact: the directory appears only when
complete. Under torch.distributed, mogelm.parallel.checkpoint writes the same files plus the
sharded state (and reads these helpers' RNG layout).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from mogelm.errors import UserError
from mogelm.fsutil import replace_dir

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model, optimizer, state: dict, data_folder: Path) -> Path:
    """Write a complete checkpoint directory atomically (temp folder, then rename)."""
    from mogelm.checkpoint import save_pretrained

    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(getattr(model, "module", model), tmp)  # unwrap DDP-style wrappers
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(data_folder / name, tmp / name)
    torch.save({**state, "optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / "trainer_state.pt")
    readable = {k: v for k, v in state.items() if k != "history"}
    (tmp / "trainer_state.json").write_text(json.dumps(readable, indent=2))
    replace_dir(tmp, path)
    return path


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Weights and optimizer state of checkpoint `path` into `model` (built from the checkpoint's
    config) and `optimizer` (built over that model); returns the trainer state."""
    from mogelm.checkpoint import from_pretrained

    state = load_trainer_state(path)
    model.load_state_dict(from_pretrained(path).state_dict())
    optimizer.load_state_dict(state["optimizer"])
    return state


def find_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, dir) of complete checkpoints under `out`, oldest first (final last when present)."""
    found = []
    if out.is_dir():
        for d in out.iterdir():
            m = _CKPT_RE.match(d.name)
            if m and (d / "trainer_state.pt").is_file():
                found.append((int(m.group(1)), d))
    found.sort()
    final = out / "final"
    if (final / "trainer_state.pt").is_file():
        found.append((_read_step(final), final))
    return found


def prune_checkpoints(out: Path, keep: int, before_step: int) -> None:
    """Delete the oldest numbered checkpoints older than `before_step`, leaving `keep - 1` of them
    (plus the newest one, just written, and final)."""
    old = [d for s, d in find_checkpoints(out) if d.name != "final" and s < before_step]
    for _, d in zip(range(len(old) - max(keep - 1, 0)), old):
        shutil.rmtree(d, ignore_errors=True)


def _read_step(d: Path) -> int:
    try:
        return int(json.loads((d / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def resume_point(d: Path) -> tuple[int, dict]:
    """(step, RNG states) a run resumed from checkpoint `d` continues from."""
    state = load_trainer_state(d)
    return int(state["step"]), state["rng"]


def load_trainer_state(d: Path) -> dict:
    try:
        return torch.load(d / "trainer_state.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or garbage pickle
        raise UserError(
            f"{d}/trainer_state.pt is unreadable ({type(e).__name__}); the checkpoint is corrupt"
        ) from None
