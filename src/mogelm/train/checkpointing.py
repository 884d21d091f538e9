"""The `mogelm train` checkpoint directory: written atomically, found, loaded, pruned; RNG state.

    out/checkpoint-000100/ out/final/      one directory per checkpoint:
        config.json, model.safetensors     the model, HF layout (mogelm.checkpoint)
        tokenizer.json, tokenizer_config.json
        trainer_state.pt                   step, optimizer state, RNG states, train config
        trainer_state.json                 the same without tensors, for people

    save_checkpoint(path, model, optimizer, state, data_folder)   # one process; temp dir + rename
    state = load_checkpoint(path, model, optimizer)               # into a model built from its config
    find_checkpoints(out)  -> [(step, dir)], oldest first, final last
    tc, changes = resumed_config(dir, tc, world_size, explicit, allow_changed_optimizer)

A kill -9 during a save leaves the previous checkpoints intact: the directory appears only when
complete. Files get the usual permissions (0644 under umask 022; mogelm.checkpoint.save_pretrained
undoes the 0600 that safetensors gives its files).

Resuming takes the checkpoint's settings (trainer_state.json's "train_config") for everything the
user did not set again. What the user did set must agree with the checkpoint: a different model
(preset, routing, model flags, vocabulary) or training text is refused, naming the flag; a
different optimisation setting (learning rate and schedule, steps, global batch, sequence length,
seed) is refused unless `allow_changed_optimizer` (`--allow-changed-optimizer`), and then
returned as `changes` for the log.

Under torch.distributed, mogelm.parallel.checkpoint writes the same files plus the sharded state
(and reads these helpers' RNG layout).
"""

from __future__ import annotations

import dataclasses
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


# Resuming with the checkpoint's settings ----------------------------------------------------------
# TrainConfig fields a resumed run may not change: they define the model and its tokenizer.
MODEL_FIELDS = ("preset", "routing", "model_overrides", "vocab_size", "data", "max_bytes", "val_fraction")
# Fields that change the optimisation: refused unless allow_changed_optimizer. batch_size and
# grad_accum are compared as the global batch (with the world size) below, not one by one.
OPTIMIZER_FIELDS = ("lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip",
                    "max_steps", "max_tokens", "seq_len", "seed")
# Always this invocation's: where and how this process runs.
RUN_FIELDS = ("out", "resume", "stop_after", "device", "threads", "progress", "cache_dir")
_FLAGS = {"aux_loss_alpha": "--aux-alpha", "z_loss_coef": "--z-loss",
          "aux_free_update_rate": "--bias-rate", "aux_free_bias": "--aux-free-bias",
          "val_fraction": "the validation fraction", "min_lr_ratio": "the minimum learning rate ratio",
          "beta1": "the Adam beta1", "beta2": "the Adam beta2"}


def flag_name(name: str) -> str:
    """The command-line flag of a TrainConfig field (or model override)."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def read_trainer_state_json(d: Path) -> dict:
    try:
        state = json.loads((Path(d) / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{d}/trainer_state.json is unreadable ({type(e).__name__}); the checkpoint is "
                        "corrupt") from None
    if not isinstance(state, dict):
        raise UserError(f"{d}/trainer_state.json is not a JSON object; the checkpoint is corrupt")
    return state


def saved_world_size(state: dict, saved) -> int:
    """The process count a checkpoint was trained with (stored since 2026-12; older ones: derived
    from the samples seen)."""
    if "world_size" in state:
        return int(state["world_size"])
    per_step = saved.batch_size * saved.grad_accum
    step = int(state.get("step", 0))
    if step > 0 and per_step > 0 and state.get("samples_seen"):
        return max(1, int(state["samples_seen"]) // (step * per_step))
    return 1


def resumed_config(ckpt_dir: Path, new, world_size: int, explicit=None,
                   allow_changed_optimizer: bool = False):
    """The TrainConfig a run resumed from `ckpt_dir` continues with, and the optimisation settings
    that changed ({field: [old, new]}, empty unless allowed).

    explicit: TrainConfig fields the user set (e.g. flags given on the command line); the others
    come from the checkpoint. None: every field of `new` counts as set (a library caller that
    built the whole config). Raises UserError naming the flags for a forbidden change."""
    from mogelm.train.config import TrainConfig

    state = read_trainer_state_json(ckpt_dir)
    saved_d = state.get("train_config")
    if not isinstance(saved_d, dict):  # a checkpoint from before train_config was stored
        return new, {}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    saved_d = {k: v for k, v in saved_d.items() if k in fields}
    if "sim_devices" in saved_d:
        saved_d["sim_devices"] = tuple(saved_d["sim_devices"])
    try:
        saved = TrainConfig(**saved_d)
    except TypeError:
        return new, {}
    given = fields if explicit is None else set(explicit)
    merged = {}
    for f in fields:
        if f in RUN_FIELDS or f in given:
            merged[f] = getattr(new, f)
        else:
            merged[f] = getattr(saved, f)
    if "model_overrides" in given and explicit is not None:  # flags given add to the saved ones
        merged["model_overrides"] = {**saved.model_overrides, **new.model_overrides}
    tc = dataclasses.replace(saved, **merged)
    if tc.data and saved.data and [str(Path(p).resolve()) for p in tc.data] == \
            [str(Path(p).resolve()) for p in saved.data]:
        tc = dataclasses.replace(tc, data=list(saved.data))  # the same files, spelled differently

    refused, changes = [], {}
    if saved.preset != tc.preset:
        refused.append(f"--preset {saved.preset} -> {tc.preset}")
    else:  # the models both configs build (routing None = the preset's, and so on)
        from mogelm.train.config import build_model_config

        old_m = build_model_config(saved, saved.vocab_size).to_dict()
        new_m = build_model_config(tc, tc.vocab_size).to_dict()
        for k in old_m:
            if k not in ("max_seq_len", "name") and old_m[k] != new_m[k]:
                refused.append(f"{flag_name(k)} {_show(old_m[k])} -> {_show(new_m[k])}")
    for f in ("data", "max_bytes", "val_fraction"):
        if getattr(saved, f) != getattr(tc, f):
            refused.append(f"{flag_name(f)} {_show(getattr(saved, f))} -> {_show(getattr(tc, f))}")
    if refused:
        raise UserError(f"--resume: the checkpoint in {new.out} has another model: {'; '.join(refused)}. "
                        "A checkpoint's model, routing and training text cannot change; drop those flags, "
                        "or start a new run with another --out")
    for f in OPTIMIZER_FIELDS:
        if getattr(saved, f) != getattr(tc, f):
            changes[f] = [getattr(saved, f), getattr(tc, f)]
    old_batch = saved.batch_size * saved.grad_accum * saved_world_size(state, saved)
    new_batch = tc.batch_size * tc.grad_accum * world_size
    if old_batch != new_batch:
        changes["global_batch"] = [old_batch, new_batch]
    if changes and not allow_changed_optimizer:
        shown = "; ".join(
            (f"--batch-size x --grad-accum x --nproc (sequences per step) {o} -> {n}" if f == "global_batch"
             else f"{flag_name(f)} {_show(o)} -> {_show(n)}") for f, (o, n) in changes.items())
        raise UserError(f"--resume: the checkpoint in {new.out} was trained with other optimisation "
                        f"settings: {shown}; pass --allow-changed-optimizer to continue with the new ones "
                        "(they are logged), or drop those flags")
    return tc, changes


def _show(v) -> str:
    if v is None:
        return "(none)"
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v)) if v else "(none)"
    return str(v)
