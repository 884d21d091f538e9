"""The engine's host work per decode step with and without speculative decoding (issue 16): the
part of a step no GPU speeds up.

    python benchmarks/bench_spec_host.py --out DIR            # any machine, ~30 s
    python benchmarks/bench_spec_host.py --out DIR --profile 64   # + a cProfile table at batch 64

Why: on one H200 a 1 B model's decode step is 2-6 ms at batch 1-64 (benchmarks/README.md), and
speculation adds host work per sequence (drafting, the accept rule, rollback, one output per
emitted token) to every step. To measure that work alone, the Engine (debug model, CPU, greedy)
runs with its forward replaced by a stub that returns one-hot logits for a fixed successor
function (next = (7 x token + 3) mod 61, so every sequence becomes a cycle and n-gram drafts are
accepted once it repeats): what remains is scheduling, batch building, drafting, sampling or
verifying and bookkeeping. Reported per batch size: host ms per step without drafts and with
n-gram drafts (k = 1, 2; fixed policy, so every step drafts), tokens per sequence and step, and
host ms per generated token per sequence. The reference ("roofline") for the speculative rows is
the plain step of the same run: speculation's host work is the difference.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import platform
import pstats
import sys
import time
from pathlib import Path

import torch

import mogelm
from mogelm.config import from_name
from mogelm.inference import Engine, SamplingParams

SUCCESSOR_MOD = 61


def stub_forward(vocab: int):
    def forward(inp, decode_only, want_hidden=False):
        ids = torch.tensor(inp.ids)[torch.tensor(inp.logits_indices, dtype=torch.long)]
        logits = torch.zeros(len(ids), vocab)
        logits[torch.arange(len(ids)), (ids * 7 + 3) % SUCCESSOR_MOD] = 1.0
        return logits, None
    return forward


def run(model, B: int, k: int, gen: int, profile: bool = False) -> dict:
    spec = dict(speculative="ngram", draft_tokens=k, spec_policy="fixed", spec_max_batch=B) if k else {}
    eng = Engine(model, None, max_batch=B, chunk_size=4096, **spec)
    eng._forward = stub_forward(model.cfg.vocab_size)
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    reqs = [eng.add_request([(i * 13 + j) % SUCCESSOR_MOD for j in range(100)], params) for i in range(B)]
    while any(r.num_generated == 0 for r in reqs):  # prefill
        eng.step()
    n0, s0 = sum(r.num_generated for r in reqs), eng.num_steps
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    while eng.has_unfinished():
        eng.step()
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    wall = time.perf_counter() - t0
    steps, tokens = eng.num_steps - s0, sum(r.num_generated for r in reqs) - n0
    return dict(batch=B, k=k, steps=steps, host_ms_per_step=1e3 * wall / steps,
                tokens_per_seq_step=tokens / steps / B, host_ms_per_token_per_seq=1e3 * wall / tokens * B)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--gen", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3, help="runs per point; the fastest is kept")
    p.add_argument("--profile", type=int, default=None, help="print a cProfile table at this batch (k = 2)")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = mogelm.Transformer(from_name("debug")).eval()
    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        base = None
        for k in (0, 1, 2):
            runs = [run(model, B, k, args.gen) for _ in range(args.repeats)]
            r = min(runs, key=lambda r: r["host_ms_per_step"])
            if k == 0:
                base = r
            r["ratio_to_plain_step"] = r["host_ms_per_step"] / base["host_ms_per_step"]
            rows.append(r)
            print(f"B={B:3d} k={k}: {r['host_ms_per_step']:6.3f} ms host per step "
                  f"(x{r['ratio_to_plain_step']:.2f} the plain step), {r['tokens_per_seq_step']:.2f} tokens "
                  f"per sequence and step, {r['host_ms_per_token_per_seq']:.3f} ms per token per sequence")
    if args.profile:
        run(model, args.profile, 2, args.gen, profile=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = dict(kind="spec_host", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
               device=f"cpu ({platform.processor() or platform.machine()})", torch=torch.__version__,
               rows=rows)
    tmp = out / "bench_spec_host.json.tmp"
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out / "bench_spec_host.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
