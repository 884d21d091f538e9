"""`mogelm eval`: loss, perplexity and routing statistics of a checkpoint on text.

    mogelm eval --model runs/compare/moge/final --data notes/ --json
    mogelm eval --model runs/compare/moge/final          # held-out part of the embedded corpus

The text is tokenized with the checkpoint's own tokenizer.json and cut into non-overlapping
windows of --seq-len + 1 tokens; loss is the mean next-token cross-entropy (no aux losses).
Routing statistics per MoE layer: each expert's share of tokens, the Imbalance Score
(paper Eq. 3) per batch for P simulated devices, and the busiest device's load over the mean.

The `RoutingStats` accumulator here is also what `mogelm train` uses for validation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mogelm.analysis.metrics import imbalance_score, max_over_mean
from mogelm.errors import UserError

DEFAULT_DEVICES = (8, 4)


class RoutingStats:
    """Accumulates per-layer expert loads, co-activation and per-batch device balance.

    Legend: L MoE layers, E experts, P simulated devices (experts in contiguous blocks)."""

    def __init__(self, num_layers: int, num_experts: int, devices=DEFAULT_DEVICES, coactivation: bool = True):
        self.E = num_experts
        self.devices = [p for p in devices if num_experts % p == 0]
        self.loads_LE = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.coact_LEE = torch.zeros(num_layers, num_experts, num_experts, dtype=torch.float64) if coactivation else None
        self.tokens = 0
        self.batches = 0
        self.is_sum = {p: [0.0] * num_layers for p in self.devices}
        self.is_max = {p: [0.0] * num_layers for p in self.devices}
        self.mom_sum = {p: [0.0] * num_layers for p in self.devices}

    def add(self, layer_stats) -> None:
        T = layer_stats[0].expert_ids_TK.shape[0] if layer_stats else 0
        for layer, s in enumerate(layer_stats):
            counts = s.counts_E.detach().double().cpu()
            self.loads_LE[layer] += counts
            if self.coact_LEE is not None:
                ids = s.expert_ids_TK.cpu()
                mask_TE = torch.zeros(ids.shape[0], self.E, dtype=torch.float64).scatter_(1, ids, 1.0)
                self.coact_LEE[layer] += mask_TE.t() @ mask_TE
            for p in self.devices:
                dev = counts.view(p, -1).sum(-1)
                score = imbalance_score(dev, T)
                self.is_sum[p][layer] += score
                self.is_max[p][layer] = max(self.is_max[p][layer], score)
                self.mom_sum[p][layer] += max_over_mean(dev)
        self.tokens += T
        self.batches += 1

    def summary(self) -> dict:
        """Plain-JSON summary: shares [L][E], IS mean/max per layer per device count, max/mean."""
        n = max(self.batches, 1)
        out = {
            "tokens": self.tokens,
            "batches": self.batches,
            "expert_share": (self.loads_LE / max(self.tokens, 1)).tolist(),  # fraction of tokens per expert
            "imbalance": {
                str(p): {
                    "mean_per_layer": [v / n for v in self.is_sum[p]],
                    "max_per_layer": list(self.is_max[p]),
                    "max_over_mean_per_layer": [v / n for v in self.mom_sum[p]],
                }
                for p in self.devices
            },
        }
        if self.coact_LEE is not None:
            out["coactivation"] = (self.coact_LEE / max(self.tokens, 1)).tolist()
        return out


def step_balance(layer_stats, num_experts: int, devices=DEFAULT_DEVICES) -> dict:
    """IS and busiest/mean per layer for one batch, from the layers' counts (cheap, for train logs)."""
    out = {}
    for p in devices:
        if num_experts % p:
            continue
        is_l, mom_l = [], []
        for s in layer_stats:
            counts = s.counts_E.detach().double().cpu()
            dev = counts.view(p, -1).sum(-1)
            T = s.expert_ids_TK.shape[0]
            is_l.append(imbalance_score(dev, T))
            mom_l.append(max_over_mean(dev))
        out[f"is{p}"] = is_l
        out[f"mom{p}"] = mom_l
    return out


@torch.no_grad()
def evaluate_batches(model, batches, device="cpu", autocast_dtype=None, routing: RoutingStats | None = None) -> dict:
    """Mean next-token loss over (x_BT, y_BT) batches, feeding routing stats on the way."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x_BT, y_BT in batches:
            x_BT, y_BT = x_BT.to(device), y_BT.to(device)
            with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(x_BT, return_stats=True)
            logits: Tensor = out.logits.float()
            total += float(F.cross_entropy(logits.view(-1, logits.shape[-1]), y_BT.reshape(-1), reduction="sum"))
            count += y_BT.numel()
            if routing is not None and out.layer_stats:
                routing.add(out.layer_stats)
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


# CLI --------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--data", nargs="*", default=None,
                   help="files, folders or globs of .txt/.md/.py/.jsonl (default: held-out part of the stdlib corpus)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the one in --model")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    p.add_argument("--max-batches", type=int, default=0, help="stop after this many batches (0: all the text)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (default)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")


def run(args: argparse.Namespace) -> int:
    from mogelm import data as D
    from mogelm.checkpoint import from_pretrained

    if args.seq_len < 1 or args.batch_size < 1:
        raise UserError("--seq-len and --batch-size must be positive")
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise UserError(f"--model {model_dir}: no such checkpoint directory")
    tok = D.load_tokenizer(args.tokenizer or model_dir)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    model = from_pretrained(model_dir, device=device)
    model.eval()

    if args.data:
        docs = D.load_documents(args.data)
    else:
        _, docs = D.split_documents(D.default_documents(), 0.05)
    eos = tok.token_to_id(D.EOS_TOKEN)
    ids = D.encode_documents(tok, docs, eos if eos is not None else 0)
    D.check_token_range(ids, model.cfg.vocab_size, "the text, tokenized with this tokenizer,")
    T = args.seq_len
    W = (len(ids) - 1) // T
    if W < 1:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one window of {T + 1}; use more text or --seq-len")
    ids_t = torch.from_numpy(ids)

    def batches():
        for n, start in enumerate(range(0, W, args.batch_size)):
            if args.max_batches and n >= args.max_batches:
                return
            rows = torch.stack([ids_t[k * T : k * T + T + 1] for k in range(start, min(start + args.batch_size, W))])
            yield rows[:, :-1], rows[:, 1:]

    cfg = model.cfg
    routing = RoutingStats(len(model.moe_layers()), cfg.num_experts, coactivation=False) if cfg.is_moe else None
    autocast = torch.bfloat16 if device.startswith("cuda") else None
    result = evaluate_batches(model, batches(), device, autocast, routing)
    result.update(model=str(model_dir), routing=cfg.routing if cfg.is_moe else "dense", documents=len(docs))
    if routing is not None:
        result["routing_stats"] = routing.summary()
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model      {model_dir}  ({result['routing']}, {cfg.num_layers} layers)")
    print(f"text       {len(docs)} documents, {result['tokens']:,} tokens scored")
    print(f"loss       {result['loss']:.4f}")
    print(f"perplexity {result['ppl']:.2f}")
    if routing is not None:
        rs = result["routing_stats"]
        print(f"{'layer':>5} {'busiest expert':>15} " + " ".join(f"{'IS@' + p:>8} {'max/mean@' + p:>11}" for p in rs["imbalance"]))
        for layer, shares in enumerate(rs["expert_share"]):
            cells = " ".join(
                f"{v['mean_per_layer'][layer]:8.3f} {v['max_over_mean_per_layer'][layer]:11.3f}" for v in rs["imbalance"].values()
            )
            print(f"{layer:5d} {max(shares):14.1%} {cells}")
        print("(busiest expert: share of tokens routed to it; IS per batch of "
              f"{args.batch_size}x{T} tokens, paper Eq. 3)", file=sys.stderr)
    return 0
