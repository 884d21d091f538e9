"""Draft acceptance of speculative decoding (greedy), on held-out text, from full forwards (no engine).

    python benchmarks/bench_spec_acceptance.py --model /tmp/mtp-small/final --out /tmp/spec-acc
    python benchmarks/bench_spec_acceptance.py --quick --out /tmp/spec-acc-smoke   # random debug model

Method (what speculative decoding with greedy verification would accept, computed offline):
1. Prompts: --prompts windows of --prompt-len tokens, evenly spaced over the validation split of
   the checkpoint's token cache (trainer_state.json "data", or --data-dir).
2. The target model continues each prompt greedily for --gen-len tokens (KV-cache decoding).
   Its greedy continuation is the text speculative decoding must reproduce token for token.
3. One full forward over prompt + continuation gives the main head's argmax at every position
   (checked against the continuation: "greedy mismatches" should be 0) and, for a model with
   MTP modules, the MTP logits of every depth (teacher forcing over the continuation).
4. A decoding walk per drafter and k: at state t (tokens 0..t known, t = prompt length at the
   start, i.e. after prefill emitted the first token) the drafter proposes up to k tokens for
   positions t+1..; the accepted length a is the longest prefix equal to the continuation; the
   verify step then emits a+1 tokens (the accepted drafts and the target's own next token),
   so t advances by a+1. The walk stops when fewer than k positions remain.
   - ngram: mogelm.inference.drafters.ngram_propose over tokens 0..t (prompt + text so far).
   - mtp: depth j's argmax at row t-1 (it sees the trunk's hidden state at t-1 and the embedding
     of token t-1+j) drafts token t+j, for j = 1..min(k, mtp_depth). While drafts 1..j-1 are
     accepted they equal the continuation, so the teacher-forced logits are exactly what a
     drafter feeding its own drafts would compute; a rejected draft ends the prefix anyway.
     (For depth >= 2 this assumes the engine rebuilds each depth's rows from accepted tokens.)
Reported per (drafter, k): acceptance rate = accepted / drafted tokens; mean accepted length =
accepted / verify steps (both with bootstrap standard errors over the sequences); tokens per
verify step = 1 + mean accepted length (the decode speed-up bound if a verify step of k+1
positions cost one decode step); the share of steps with a draft.
Also: per-position top-1 agreement of MTP depth 1 with the continuation, teacher-forced top-1
accuracy of the main and MTP heads on the held-out text itself; k = 1 acceptance from states
of real text (at every position of held-out windows, is the draft for the next token the
target's greedy token there? one verify step after a real prompt, free of the model's own
repetition); and (rows "ngram.../text") the same n-gram walk with the held-out text in place of
the model's continuation.

Nothing here is timed: acceptance depends on the model and the text, not on the machine.
Writes acceptance.json (every number) to --out and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from mogelm.inference.drafters import ngram_propose
from mogelm.model import KVCache, Transformer


@torch.no_grad()
def greedy_continuation(model: Transformer, prompts_BP: torch.Tensor, gen_len: int) -> torch.Tensor:
    """prompts [B, P] -> prompts followed by gen_len greedy tokens [B, P + gen_len] (KV cache)."""
    B, P = prompts_BP.shape
    cache = KVCache(model.cfg, B, P + gen_len, device=prompts_BP.device)
    positions = torch.arange(P).unsqueeze(0).expand(B, P)
    logits = model(prompts_BP, positions_BT=positions, kv_cache=cache, last_token_only=True)
    tokens = [logits[:, -1].argmax(-1)]
    for i in range(gen_len - 1):
        pos = torch.full((B, 1), P + i)
        logits = model(tokens[-1].unsqueeze(1), positions_BT=pos, kv_cache=cache)
        tokens.append(logits[:, -1].argmax(-1))
    return torch.cat([prompts_BP, torch.stack(tokens, 1)], 1)


def walk(seq: list[int], start: int, k: int, propose) -> dict:
    """Greedy speculative decoding over `seq` from state `start` (see the module docstring);
    propose(t, k) -> drafts for positions t+1... Returns step/draft/accept counts."""
    N = len(seq)
    t, steps, drafted, accepted, with_draft = start, 0, 0, 0, 0
    hist = [0] * (k + 1)
    while t + k <= N - 1:
        drafts = propose(t, k)[:k]
        a = 0
        while a < len(drafts) and drafts[a] == seq[t + 1 + a]:
            a += 1
        steps += 1
        drafted += len(drafts)
        accepted += a
        with_draft += bool(drafts)
        hist[a] += 1
        t += a + 1
    return {"steps": steps, "drafted": drafted, "accepted": accepted, "with_draft": with_draft,
            "accepted_hist": hist}


def summarise(drafter: str, k: int, counts: list[dict], resamples: int = 1000) -> dict:
    """Totals over the sequences (one walk each), and bootstrap standard errors over sequences:
    positions within one sequence are correlated, so the sequence is the unit of resampling."""
    tot = {key: sum(c[key] for c in counts) for key in ("steps", "drafted", "accepted", "with_draft")}
    hist = [sum(c["accepted_hist"][i] for c in counts) for i in range(k + 1)]
    steps = max(tot["steps"], 1)
    per_seq = torch.tensor([[c["drafted"], c["accepted"], c["steps"]] for c in counts], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    pick = torch.randint(0, len(counts), (resamples, len(counts)), generator=g)
    boot = per_seq[pick].sum(1)  # [resamples, 3]
    return {"drafter": drafter, "k": k, **tot, "accepted_hist": hist,
            "acceptance_rate": tot["accepted"] / max(tot["drafted"], 1),
            "acceptance_rate_se": float((boot[:, 1] / boot[:, 0].clamp(min=1)).std()),
            "mean_accepted": tot["accepted"] / steps,
            "mean_accepted_se": float((boot[:, 1] / boot[:, 2].clamp(min=1)).std()),
            "tokens_per_verify": 1 + tot["accepted"] / steps,
            "draft_share": tot["with_draft"] / steps}


def load_text(args, model: Transformer) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """[n, P + G] held-out text whose first P tokens are the prompts (and [m, S+1] windows for
    the teacher-forced accuracies) from the validation split; random ids for --quick alone."""
    P, G = args.prompt_len, args.gen_len
    S = min(model.cfg.max_seq_len, 256)
    if args.model is None:
        g = torch.Generator().manual_seed(args.seed)
        V = model.cfg.vocab_size
        return (torch.randint(0, V, (args.prompts, P + G), generator=g),
                torch.randint(0, V, (args.eval_windows, S + 1), generator=g), "random ids")
    from mogelm.data import TokenData

    folder = args.data_dir
    if folder is None:
        state = Path(args.model) / "trainer_state.json"
        if not state.is_file():
            sys.exit(f"error: {args.model} has no trainer_state.json; give --data-dir (a token cache)")
        folder = json.loads(state.read_text())["data"]
    td = TokenData(folder)
    val = torch.from_numpy(td.splits["val"].astype("int64"))
    if len(val) < P + G + 1:
        sys.exit(f"error: the validation split has {len(val)} tokens, fewer than --prompt-len + --gen-len")
    starts = torch.linspace(0, len(val) - P - G - 1, args.prompts).long()
    texts = torch.stack([val[s:s + P + G] for s in starts.tolist()])
    n_win = min(args.eval_windows, (len(val) - 1) // S)
    windows = torch.stack([val[i * S:i * S + S + 1] for i in range(n_win)]) if n_win else None
    return texts, windows, str(folder)


@torch.no_grad()
def teacher_forced_accuracy(model: Transformer, windows: torch.Tensor) -> dict:
    """Top-1 accuracy of the main head (token t+1) and of MTP depth d (token t+d+1) on real text."""
    x, y = windows[:, :-1], windows[:, 1:]
    out = model(x, return_hidden=True)
    res = {"windows": len(windows), "main": float((out.logits.argmax(-1) == y).float().mean())}
    if model.mtp is not None:
        for d, lg in enumerate(model.mtp_forward(out.trunk_hidden, x).logits, start=1):
            res[f"mtp_{d}"] = float((lg.argmax(-1) == y[:, d:]).float().mean())
    return res


@torch.no_grad()
def first_draft_on_text(model: Transformer, windows: torch.Tensor, max_ngram: int, min_ngram: int) -> dict:
    """k = 1 acceptance from states taken from real text: at every position t >= 1 of a held-out
    window (tokens 0..t real), is the draft for token t+1 the target's greedy token there?
    No greedy continuation is involved, so the model's own repetition does not enter. n-gram:
    accepted per drafted token (and the share of positions with a draft); MTP drafts always."""
    x = windows[:, :-1]
    out = model(x, return_hidden=True)
    greedy = out.logits.argmax(-1)  # [m, S]: the target's token t+1 after real tokens 0..t
    ids, g = x.tolist(), greedy.tolist()
    drafts = [(ngram_propose(row[:t + 1], 1, max_ngram, min_ngram), g[b][t])
              for b, row in enumerate(ids) for t in range(1, len(row))]
    drafted = sum(bool(d) for d, _ in drafts)
    hits = sum(d == [want] for d, want in drafts)
    res = {"positions": len(drafts), "ngram": hits / max(drafted, 1),
           "ngram_draft_share": drafted / len(drafts)}
    if model.mtp is not None:  # depth 1 at row t-1 (sees token t) drafts token t+1
        mtp1 = model.mtp_forward(out.trunk_hidden, x).logits[0].argmax(-1)  # [m, S-1]
        res["mtp_1"] = float((mtp1 == greedy[:, 1:]).float().mean())
    return res


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is not None:
        from mogelm.checkpoint import from_pretrained

        model = from_pretrained(args.model).eval()
    else:
        from mogelm.config import from_name

        torch.manual_seed(args.seed)
        model = Transformer(from_name("debug", mtp_depth=1)).eval()
    cfg = model.cfg
    if args.prompt_len + args.gen_len > cfg.max_seq_len:
        sys.exit(f"error: --prompt-len + --gen-len = {args.prompt_len + args.gen_len} exceeds the "
                 f"model's max_seq_len {cfg.max_seq_len}")
    texts, windows, source = load_text(args, model)
    prompts = texts[:, :args.prompt_len]
    t0 = time.time()
    seqs = torch.cat([greedy_continuation(model, prompts[i:i + args.batch], args.gen_len)
                      for i in range(0, len(prompts), args.batch)])
    t_gen = time.time() - t0
    P, N = args.prompt_len, seqs.shape[1]

    mtp_argmax, mismatches = [], 0
    with torch.no_grad():
        for i in range(0, len(seqs), args.batch):
            s = seqs[i:i + args.batch]
            out = model(s, return_hidden=True)
            # the continuation is the full forward's greedy choice at every generated position
            mismatches += int((out.logits[:, P - 1:-1].argmax(-1) != s[:, P:]).sum())
            if model.mtp is not None:
                logits = model.mtp_forward(out.trunk_hidden, s).logits
                for b in range(len(s)):
                    mtp_argmax.append([lg[b].argmax(-1).tolist() for lg in logits])

    results, per_position = [], {}
    seq_lists = seqs.tolist()
    for k in args.k:
        counts = [walk(seq, P, k, lambda t, k, seq=seq: ngram_propose(seq[:t + 1], k, args.max_ngram,
                                                                      args.min_ngram))
                  for seq in seq_lists]
        results.append(summarise(f"ngram{args.min_ngram}-{args.max_ngram}", k, counts))
    for k in args.k:  # reference: n-gram drafts against the held-out text itself, not the model's
        counts = [walk(seq, P, k, lambda t, k, seq=seq: ngram_propose(seq[:t + 1], k, args.max_ngram,
                                                                      args.min_ngram))
                  for seq in texts.tolist()]
        results.append(summarise(f"ngram{args.min_ngram}-{args.max_ngram}/text", k, counts))
    if model.mtp is not None:
        for k in [k for k in args.k if k <= cfg.mtp_depth]:
            counts = [walk(seq, P, k, lambda t, k, m=m: [m[j][t - 1] for j in range(k)])
                      for seq, m in zip(seq_lists, mtp_argmax)]
            results.append(summarise(f"mtp{cfg.mtp_depth}", k, counts))
        # row r of depth 1 drafts token r+2 from token r+1: rows P-1 .. N-3 lie in the continuation
        rows = range(P - 1, N - 2)
        hits = sum(m[0][r] == seq[r + 2] for seq, m in zip(seq_lists, mtp_argmax) for r in rows)
        per_position["mtp_1_agreement"] = hits / (len(seq_lists) * len(rows))
    accuracy = teacher_forced_accuracy(model, windows) if windows is not None else None
    on_text = (first_draft_on_text(model, windows, args.max_ngram, args.min_ngram)
               if windows is not None else None)

    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "model": args.model or "random debug (mtp_depth 1)", "config": cfg.to_dict(), "prompts_from": source,
        "prompts": len(prompts), "prompt_len": P, "gen_len": args.gen_len,
        "max_ngram": args.max_ngram, "min_ngram": args.min_ngram,
        "greedy_mismatches": mismatches, "generation_s": t_gen,
        "results": results, "per_position": per_position, "teacher_forced_accuracy": accuracy,
        "first_draft_acceptance_on_text": on_text,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".acceptance.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "acceptance.json")

    print(f"{len(prompts)} prompts x ({P} + {args.gen_len}) tokens from {source}; "
          f"greedy mismatches {mismatches}")
    if per_position:
        print("MTP depth 1 agrees with the next-but-one greedy token at "
              f"{per_position['mtp_1_agreement']:.3f} of positions")
    if accuracy:
        print("teacher-forced top-1 accuracy on held-out text: "
              + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items() if k != "windows"))
        print(f"k=1 acceptance from held-out-text states ({on_text['positions']} positions): "
              + ", ".join(f"{k} {v:.3f}" for k, v in on_text.items() if k != "positions"))
    print(f"{'drafter':<14} {'k':>2} {'steps':>6} {'drafted':>8} {'accepted':>8} {'accept (se)':>14} "
          f"{'mean acc (se)':>14} {'tok/verify':>10} {'drafted %':>9}")
    for r in results:
        print(f"{r['drafter']:<14} {r['k']:>2} {r['steps']:>6} {r['drafted']:>8} {r['accepted']:>8} "
              f"{r['acceptance_rate']:>7.3f} ({r['acceptance_rate_se']:.3f}) "
              f"{r['mean_accepted']:>6.3f} ({r['mean_accepted_se']:.3f}) {r['tokens_per_verify']:>10.3f} "
              f"{100 * r['draft_share']:>8.1f}%")
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (with MTP modules for the MTP rows)")
    p.add_argument("--data-dir", default=None, help="token cache folder (default: the checkpoint's)")
    p.add_argument("--out", required=True, help="folder for acceptance.json")
    p.add_argument("--prompts", type=int, default=48, help="prompts from the validation split")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    p.add_argument("--gen-len", type=int, default=192, help="greedy tokens generated per prompt")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4], help="draft lengths")
    p.add_argument("--max-ngram", type=int, default=3)
    p.add_argument("--min-ngram", type=int, default=1)
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows for the accuracies")
    p.add_argument("--batch", type=int, default=16, help="sequences per forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run); no --model: random")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.prompt_len, args.gen_len, args.eval_windows = 2, 16, 24, 2
    return args


if __name__ == "__main__":
    run(parse_args())
