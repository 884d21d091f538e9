"""Loss, perplexity and routing statistics of a model on text (`mogelm eval`; `mogelm train` validates).

    from mogelm.evaluate import evaluate_checkpoint
    result = evaluate_checkpoint("runs/compare/moge/final", data=["notes/"])   # {"loss", "ppl", ...}
    evaluate_batches(model, [(x_BT, y_BT), ...])                               # the loss of given batches

    mogelm eval --model runs/compare/moge/final --data notes/ --json          # the CLI (commands/eval.py)

The text is tokenized with the checkpoint's own tokenizer.json and cut into non-overlapping
windows of seq_len + 1 tokens; loss is the mean next-token cross-entropy (no aux losses).
Routing statistics per MoE layer (mogelm.analysis.metrics.RoutingStats): each expert's share of
tokens, the Imbalance Score (paper Eq. 3) per batch for P simulated devices, and the busiest
device's load over the mean.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mogelm.analysis.metrics import RoutingStats
from mogelm.errors import UserError


@torch.no_grad()
def evaluate_batches(model, batches, device="cpu", autocast_dtype=None,
                     routing: RoutingStats | None = None) -> dict:
    """Mean next-token loss over (x_BT, y_BT) batches, feeding routing stats on the way."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x_BT, y_BT in batches:
            x_BT, y_BT = x_BT.to(device), y_BT.to(device)
            with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                out = model(x_BT, return_stats=True)
            logits: Tensor = out.logits.float()
            total += float(F.cross_entropy(logits.view(-1, logits.shape[-1]), y_BT.reshape(-1),
                                           reduction="sum"))
            count += y_BT.numel()
            if routing is not None and out.layer_stats:
                routing.add(out.layer_stats)
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


def evaluate_checkpoint(
    model_dir: str | Path,
    data: list[str] | None = None,
    tokenizer: str | Path | None = None,
    seq_len: int = 256,
    batch_size: int = 8,
    max_batches: int = 0,
    device: str = "auto",
) -> dict:
    """Loss, perplexity and routing statistics of checkpoint `model_dir` on text.

    data: files, folders or globs (default: the held-out part of the embedded corpus); tokenizer:
    a tokenizer.json instead of the checkpoint's; max_batches: 0 for all the text. Returns
    {"loss", "ppl", "tokens", "model", "routing", "documents"} and, for MoE models,
    "routing_stats" (RoutingStats.summary())."""
    from mogelm import data as D
    from mogelm.checkpoint import from_pretrained

    if seq_len < 1 or batch_size < 1 or max_batches < 0:
        raise UserError("--seq-len and --batch-size must be positive, --max-batches 0 or more")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"--model {model_dir}: no such checkpoint directory")
    from mogelm.hf_config import read_config

    read_config(model_dir)  # a folder that is no checkpoint is named as such, before its tokenizer
    tok = D.load_tokenizer(tokenizer or model_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = from_pretrained(model_dir, device=device)
    model.eval()
    if seq_len > model.cfg.max_seq_len:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context of {model.cfg.max_seq_len} tokens; "
                        f"use --seq-len {model.cfg.max_seq_len} or less")

    if data:
        docs = D.load_documents(data)
    else:
        _, docs = D.split_documents(D.default_documents(), 0.05)
    eos = tok.token_to_id(D.EOS_TOKEN)
    ids = D.encode_documents(tok, docs, eos if eos is not None else 0)
    D.check_token_range(ids, model.cfg.vocab_size, "the text, tokenized with this tokenizer,")
    T = seq_len
    W = (len(ids) - 1) // T
    if W < 1:
        raise UserError(
            f"the text has {len(ids)} tokens, fewer than one window of {T + 1}; use more text or --seq-len"
        )
    ids_t = torch.from_numpy(ids)

    def batches():
        for n, start in enumerate(range(0, W, batch_size)):
            if max_batches and n >= max_batches:
                return
            windows = range(start, min(start + batch_size, W))
            rows = torch.stack([ids_t[k * T : k * T + T + 1] for k in windows])
            yield rows[:, :-1], rows[:, 1:]

    cfg = model.cfg
    routing = None
    if cfg.is_moe:
        routing = RoutingStats(len(model.moe_layers()), cfg.num_experts, coactivation=False)
    autocast = torch.bfloat16 if device.startswith("cuda") else None
    result = evaluate_batches(model, batches(), device, autocast, routing)
    result.update(model=str(model_dir), routing=cfg.routing if cfg.is_moe else "dense", documents=len(docs))
    if routing is not None:
        result["routing_stats"] = routing.summary()
    return result
