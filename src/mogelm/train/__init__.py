"""Train a MoGE (or top-k / group-limited) language model on text: `mogelm train` as a library.

    from mogelm.train import TrainConfig, train
    train(TrainConfig(preset="debug", max_steps=200, out="runs/debug"))      # stdlib corpus, CPU

    mogelm train --preset debug --max-steps 200 --out runs/debug             # the same (commands/train.py)
    mogelm train --out runs/debug --resume                                   # continue after a crash
    mogelm train --preset small --nproc 2 --ep 2 --out runs/ep               # torchrun under the hood

The loop: AdamW (beta 0.9/0.95, weight decay on matrices only), linear warm-up then cosine decay
to min_lr, gradient accumulation, gradient clipping, fp32 on CPU and bf16 autocast on CUDA. Loss =
next-token cross-entropy + the model's balancing/z losses. After each optimizer step the
aux-loss-free expert biases (if enabled) are nudged toward balance.

Determinism and resuming: a checkpoint holds the model (HF layout), tokenizer, optimizer, RNG
states and step; `--resume` reloads the newest one and continues the very same loss curve on CPU.
Checkpoints are written to a temporary folder and renamed into place, so a kill -9 loses only the
steps since the last one. log.jsonl is cut back to the checkpoint's step.

Modules:
    config.py          TrainConfig; model, optimizer and learning-rate schedule built from it
    loop.py            train(tc, ctx): one loop for one process and many; which rows each step reads
    checkpointing.py   the checkpoint directory: atomic save, find, load, prune; RNG state
    logs.py            progress line, log.jsonl (+ TensorBoard), read_log
"""

from mogelm.train.checkpointing import find_checkpoints, load_trainer_state, save_checkpoint
from mogelm.train.config import (
    TrainConfig,
    build_model,
    build_model_config,
    build_optimizer,
    lr_at,
    resolve_device,
)
from mogelm.train.logs import JsonlLog, Progress, read_log
from mogelm.train.loop import VAL_SEED, prepare_data, sample_ids, train, train_batch, val_batches

__all__ = [
    "VAL_SEED", "JsonlLog", "Progress", "TrainConfig", "build_model", "build_model_config", "build_optimizer",
    "find_checkpoints", "load_trainer_state", "lr_at", "prepare_data", "read_log", "resolve_device",
    "sample_ids", "save_checkpoint", "train", "train_batch", "val_batches",
]
