"""Speculative decoding on one GPU (issue 16, item 3): decode tokens/s of the engine with and
without drafts, the acceptance they reach, and the 72B layout's cost of a verify step per draft
length, with the speedup that acceptance x cost predicts.

    python benchmarks/bench_spec_decode.py --ckpt /tmp/spec_1b/final --out DIR     # H200: ~3-4 min
    python benchmarks/bench_spec_decode.py --quick --out /tmp/spec                  # CPU smoke, seconds
                                           (--quick: toy sizes; a random debug model unless --ckpt)
    bash benchmarks/run_spec_h200.sh                                                # train + this

Sections (every number goes to <out>/bench_spec_decode.json, rewritten after each one; a table is
printed last; the 72B section runs before the engine's, and no new measurement starts after
--budget-s seconds):
 1. ceilings: device copy bandwidth and dense bf16 GEMM rate (bench_model.ceilings);
 2. engine: the checkpoint (trained with --mtp-depth 1) in the Engine with CUDA graphs, greedy,
    B held-out prompts of --prompt-tokens tokens (documents of the embedded corpus past
    --max-bytes, which training never saw), --gen-tokens new tokens each (ignore_eos), at batch
    1, 16, 64, 256: without drafts, with n-gram and with MTP drafts for each k of --ks (speculation
    forced on at every batch: spec_policy "fixed", spec_max_batch = B), and with the engine's
    default on CUDA, the cost-aware policy (spec_policy "auto", inference/spec_policy.py: it measures
    0..k drafts per batch bucket and keeps the best) for n-gram drafts with k = max(--ks) and MTP
    with k = 2; its table of measured costs and its final choice go into the row. Decode tokens/s
    = tokens generated after every request has its first token / the wall
    time of those steps (prefill excluded); acceptance rate and mean accepted length from
    Engine.stats(); `same_output`: the share of sequences identical to the run without drafts
    (bf16: a verify row's GEMM shapes differ from a decode step's, so rare divergences are
    rounding, not a wrong rule; the CPU tests prove equality in fp32);
 3. verify72b: the Pangu 72B layout with random weights (bench_model.build_random_model, fp8 experts
    and fp8 KV as `mogelm bench decode`), context 2,048: one step of B sequences x q positions
    (q = 1..4; B x q decode rows, each sequence's q rows on one block table) replayed from a CUDA
    graph, at 2 and 4 layers, scaled to 48 by the per-layer slope (t48 = t4 + 44 x (t4 - t2) / 2);
 4. prediction: speedup(B, k) = mean accepted length(k) x t(B, 1) / (t(B, k + 1) + draft(B, k)) with
    the acceptance measured in section 2 (MTP and n-gram) and the 72B costs of section 3; an MTP
    draft costs k x (one layer at B rows + the LM head on B rows, both timed), n-gram drafts 0
    (host work, overlapping nothing: it shows in the engine's numbers, not here).
benchmarks/notes_spec.md holds the predictions written before the first run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from mogelm.inference.bench_model import (
    _replay_ms,
    build_random_model,
    ceilings,
    decode_rows,
    make_pool,
    time_fn,
)
from mogelm.inference.engine import CUDAGraphRunner, Engine
from mogelm.inference.paged import PagedAttention
from mogelm.inference.sampling import SamplingParams
from mogelm.inference.spec_policy import batch_bucket
from mogelm.kernels import ops

T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_json(out: Path, res: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "bench_spec_decode.json.tmp"
    tmp.write_text(json.dumps(res, indent=1, default=str))
    os.replace(tmp, out / "bench_spec_decode.json")


# --- 2. the engine --------------------------------------------------------------------------------
def held_out_prompts(tokenizer, n: int, length: int, max_bytes: int | None) -> list[list[int]]:
    """n prompts of `length` tokens from the embedded corpus's documents past the first max_bytes
    (what `mogelm train --max-bytes` trained on), or from its end when max_bytes is None."""
    from mogelm import data

    docs = data.load_documents(None)
    seen, held = 0, []
    for d in docs:
        if max_bytes is not None and seen < max_bytes:
            seen += len(d.text)  # data.default_documents counts characters, the crossing one included
            continue
        held.append(d.text)
    if max_bytes is None or not held:
        held = [d.text for d in docs[len(docs) // 2:]]
    prompts, i = [], 0
    while len(prompts) < n and i < len(held):
        ids = tokenizer.encode(held[i])
        for lo in range(0, len(ids) - length, 4 * length):  # a few windows per document
            prompts.append(ids[lo:lo + length])
            if len(prompts) == n:
                break
        i += 1
    while len(prompts) < n:  # a tiny corpus (smoke runs): repeat
        prompts.append(prompts[len(prompts) % max(len(prompts), 1)] if prompts else [1] * length)
    return prompts


def engine_run(model, tok, prompts, B: int, method: str | None, k: int, gen: int, forced: bool,
               device) -> dict:
    P = max(len(p) for p in prompts)
    spec = {} if method is None else dict(spec_policy="fixed" if forced else "auto", spec_max_batch=B)
    eng = Engine(model, tok, max_batch=B, chunk_size=min(B * P, 16384), fuse=False,
                 kv_cache_tokens=B * (P + gen + k + 64), speculative=method, draft_tokens=k, **spec)
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    # warm-up at the measured batch: every row count the timed steps use (decode, verify, MTP drafts)
    # compiles its Triton kernels here, not inside the timing (the first H200 run's MTP rows were
    # erratic: k = 1 slower than k = 3, which points at compilation inside the timed region)
    eng.generate(prompts[:B], SamplingParams(max_tokens=2 * (k + 1) + 2, temperature=0, ignore_eos=True))
    before = eng.stats()
    reqs = [eng.add_request(p, params) for p in prompts[:B]]
    while any(r.num_generated == 0 for r in reqs):  # prefill: every request has its first token
        eng.step()
    sync(device)
    n0, s0, t0 = sum(r.num_generated for r in reqs), eng.num_steps, time.perf_counter()
    step_s = []  # each decode step's wall time (eng.step() returns after the step's host sync)
    while eng.has_unfinished():
        t = time.perf_counter()
        eng.step()
        step_s.append(time.perf_counter() - t)
    sync(device)
    wall = time.perf_counter() - t0
    st = eng.stats()
    names = ("spec_decode_draft_tokens_total", "spec_decode_accepted_tokens_total",
             "spec_decode_num_drafts_total")
    d = {k2.removeprefix("spec_decode_").removesuffix("_total"): st[k2] - before[k2] for k2 in names}
    tokens = sum(r.num_generated for r in reqs) - n0
    row = dict(batch=B, method=method or "none", k=k if method else 0, forced=forced,
               decode_tokens=tokens, decode_s=wall, tokens_per_s=tokens / wall, steps=eng.num_steps - s0,
               median_step_ms=1e3 * sorted(step_s)[len(step_s) // 2] if step_s else None,
               draft_tokens=d["draft_tokens"], accepted_tokens=d["accepted_tokens"],
               verify_rows=d["num_drafts"],
               acceptance_rate=d["accepted_tokens"] / d["draft_tokens"] if d["draft_tokens"] else None,
               mean_accepted_length=1 + d["accepted_tokens"] / d["num_drafts"] if d["num_drafts"] else None,
               outputs=[r.output_ids for r in reqs])
    if method is not None and not forced:  # what the cost-aware policy measured and chose
        row["policy"] = {str(b): v for b, v in eng.spec_policy.table().items()}
        row["policy_choice"] = eng.spec_policy.table().get(batch_bucket(B), {}).get("best")
    del eng
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def section_engine(args, res, out, device) -> None:
    from mogelm.checkpoint import from_pretrained
    from mogelm.inference.chat import Tokenizer

    if args.ckpt is None:  # --quick without a checkpoint: a random debug model with one MTP module
        import mogelm
        from mogelm.inference.bench_model import random_tokenizer

        torch.manual_seed(0)
        model = mogelm.Transformer(mogelm.from_name("debug", mtp_depth=1)).to(device).eval()
        tok = random_tokenizer(model.cfg.vocab_size)
        n = max(args.batches)
        prompts = [torch.randint(0, 64, (args.prompt_tokens // 4,)).tolist() * 4 for _ in range(n)]
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = from_pretrained(Path(args.ckpt), device=device, dtype=dtype)
        tok = Tokenizer.from_dir(Path(args.ckpt))
        if device.type == "cuda":
            from mogelm.inference.fuse import fuse_for_inference

            fuse_for_inference(model)
        prompts = held_out_prompts(tok, max(args.batches), args.prompt_tokens, args.max_bytes)
    res["engine_model"] = dict(name=model.cfg.name, mtp_depth=model.cfg.mtp_depth,
                               parameters=sum(p.numel() for p in model.parameters()))
    rows = res.setdefault("engine", [])
    methods = [(None, 0)] + [(m, k) for m in ("ngram", "mtp") for k in args.ks]
    if model.mtp is None:
        methods = [(m, k) for m, k in methods if m != "mtp"]
    for B in args.batches:
        base = None
        # the plain run first (the others' reference), then the engine's default (auto), then forced
        auto = [("ngram", max(args.ks), False)] + ([("mtp", 2, False)] if model.mtp is not None else [])
        runs = [(None, 0, True)] + auto + [(m, k, True) for m, k in methods if m is not None]
        for method, k, forced in runs:
            if time.time() - T0 > args.budget_s:
                log(f"  budget of {args.budget_s} s spent: skipping the rest of the engine runs")
                return
            try:
                row = engine_run(model, tok, prompts, B, method, k, args.gen_tokens, forced, device)
            except Exception as e:
                rows.append(dict(batch=B, method=method or "none", k=k, forced=forced,
                                 error=f"{type(e).__name__}: {e}"[:400]))
                log(f"  B={B} {method} k={k}: FAILED {rows[-1]['error']}")
                traceback.print_exc()
                continue
            outs = row.pop("outputs")
            if method is None:
                base = row
                base["_outputs"] = outs
            elif base is not None:
                row["same_output"] = sum(a == b for a, b in zip(outs, base["_outputs"])) / len(outs)
                row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
            rows.append(row)
            acc = "" if row["acceptance_rate"] is None else \
                f" acc {row['acceptance_rate']:.3f} len {row['mean_accepted_length']:.2f}"
            gain = f" x{row['speedup']:.2f}" if "speedup" in row else ""
            chose = f" (auto chose k={row['policy_choice']})" if "policy_choice" in row else ""
            log(f"  B={B:3d} {row['method']:5s} k={row['k']} {'forced' if forced else 'auto  '}: "
                f"{row['tokens_per_s']:9.1f} tok/s{acc}{gain}{chose}")
            write_json(out, res)
        if base is not None:
            base.pop("_outputs", None)


# --- 3. the 72B verify cost -------------------------------------------------------------------------
def verify_rows(B: int, q: int, ctx: int, cache, gen, vocab: int):
    """B sequences at live length ctx, each with q rows at positions ctx - q .. ctx - 1 (a verify step
    of q - 1 drafts), on one block table per sequence."""
    ids, pos, slots, tables, lens = decode_rows(B, ctx, cache, gen, vocab)
    bs = cache.block_size
    pos_R = (pos[:, None] - q + 1 + torch.arange(q)).flatten()
    tables_R = tables.repeat_interleave(q, 0)
    slots_R = tables_R[torch.arange(B * q), pos_R // bs].long() * bs + pos_R % bs
    ids_R = torch.randint(0, vocab, (B * q,), generator=gen)
    return ids_R, pos_R, slots_R, tables_R, (pos_R + 1).to(torch.int32)


def verify_ms(model, cache, B: int, q: int, ctx: int, device) -> float:
    gen = torch.Generator().manual_seed(B * 10 + q)
    ids, pos, slots, tables, lens = verify_rows(B, q, ctx, cache, gen, model.cfg.vocab_size)
    if device.type == "cuda":
        runner = CUDAGraphRunner(model, cache, [B * q], tables.shape[1])
        runner(ids, pos, slots, tables, lens)
        ms = _replay_ms(runner.graphs[B * q][0])
        del runner
        return ms
    splits = ops.decode_attention_splits(B * q, cache.num_kv_heads, tables.shape[1] * cache.block_size,
                                         device)
    state = PagedAttention(cache, slots, tables, lens, num_splits=splits)
    return time_fn(lambda: model(ids[None], positions_BT=pos[None], kv_cache=state), device)


def section_verify72b(args, res, out, device) -> None:
    preset = "debug" if args.quick else "pangu-pro-moe-72b"
    ctx = 64 if args.quick else args.context
    layers = max(args.layers72)
    recipe = "bf16" if device.type != "cuda" else "fp8-all"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = build_random_model(preset, layers=layers, recipe=recipe, device=device, dtype=dtype,
                               max_seq_len=ctx + 64, fuse=device.type == "cuda")
    log(f"  built {preset} x {layers} layers ({recipe}) in {time.perf_counter() - t0:.1f} s")
    cache = make_pool(model, "fp8" if device.type == "cuda" else "auto", 16, device, 6.0,
                      max(args.batches) * (ctx + 16))
    full = model.layers
    table = res.setdefault("verify72b", dict(context=ctx, recipe=recipe, preset=preset, layers=args.layers72,
                                             ms={}))
    heads = table.setdefault("lm_head_ms", {})
    for B in args.batches:  # an MTP draft: one block (~ a layer at B rows) + the LM head on B rows
        x = torch.randn(1, B, model.cfg.hidden_size, device=device, dtype=dtype)
        heads[str(B)] = time_fn(lambda x=x: model.lm_head(model.norm(x)), device)
    for B in args.batches:
        for q in range(1, args.max_q + 1):
            if time.time() - T0 > args.budget_s:
                log("  budget spent: skipping the rest of the verify costs")
                return
            per = {}
            try:
                for L in args.layers72:
                    model.layers = full[:L]
                    per[L] = verify_ms(model, cache, B, q, ctx, device)
            except Exception as e:
                table["ms"][f"{B}x{q}"] = dict(error=f"{type(e).__name__}: {e}"[:300])
                log(f"  B={B} q={q}: FAILED {table['ms'][f'{B}x{q}']['error']}")
                continue
            finally:
                model.layers = full
            lo, hi = min(args.layers72), max(args.layers72)
            slope = (per[hi] - per[lo]) / (hi - lo)
            t48 = per[hi] + (48 - hi) * slope
            table["ms"][f"{B}x{q}"] = dict(batch=B, q=q, measured={str(k): v for k, v in per.items()},
                                           per_layer_ms=slope, scaled_48_ms=t48)
            log(f"  B={B:3d} q={q}: {per} ms -> 48 layers {t48:.2f} ms")
            write_json(out, res)


# --- 4. prediction ----------------------------------------------------------------------------------
def predictions(res: dict) -> list[dict]:
    """speedup(B, k) = mean accepted length(k) x t(B, 1) / t(B, k + 1) on the 72B layout, with the
    acceptance the trained model reached (per method and k, at batch 1 or the smallest measured)."""
    costs = res.get("verify72b", {}).get("ms", {})
    heads = res.get("verify72b", {}).get("lm_head_ms", {})
    lengths = {}
    for r in res.get("engine", []):
        if r.get("mean_accepted_length") and r.get("forced") and (r["method"], r["k"]) not in lengths:
            lengths[(r["method"], r["k"])] = r["mean_accepted_length"]
    out = []
    for (method, k), length in sorted(lengths.items()):
        for c in costs.values():
            B = c.get("batch")
            if B is None or c["q"] != k + 1 or f"{B}x1" not in costs or "scaled_48_ms" not in costs[f"{B}x1"]:
                continue
            t1 = costs[f"{B}x1"]["scaled_48_ms"]
            draft_ms = 0.0  # n-gram drafts are host work; MTP: k x (one block + the LM head) on B rows
            if method == "mtp":
                draft_ms = k * (costs[f"{B}x1"]["per_layer_ms"] + heads.get(str(B), 0.0))
            ratio = (c["scaled_48_ms"] + draft_ms) / t1
            out.append(dict(method=method, k=k, batch=B, mean_accepted_length=length, draft_ms=draft_ms,
                            verify_cost_ratio=ratio, predicted_speedup=length / ratio))
    return out


def table(res: dict) -> str:
    lines = ["", "engine (decode tokens/s; greedy; held-out prompts)",
             f"{'B':>4} {'method':6} {'k':>2} {'mode':6} {'tok/s':>10} {'speedup':>8} {'acc':>6} {'len':>5} "
             f"{'same':>5} {'chose':>5}"]
    for r in res.get("engine", []):
        if "error" in r:
            lines.append(f"{r['batch']:>4} {r['method']:6} {r['k']:>2} error: {r['error'][:60]}")
            continue
        f = lambda v, p: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        lines.append(f"{r['batch']:>4} {r['method']:6} {r['k']:>2} {'forced' if r['forced'] else 'auto':6} "
                     f"{r['tokens_per_s']:>10.1f} {f(r.get('speedup'), 2):>8} "
                     f"{f(r['acceptance_rate'], 3):>6} {f(r['mean_accepted_length'], 2):>5} "
                     f"{f(r.get('same_output'), 2):>5} {r.get('policy_choice', ''):>5}")
    v = res.get("verify72b", {}).get("ms", {})
    if v:
        lines += ["", "72B verify step, ms (48 layers, scaled): rows B, columns q = k + 1"]
        qs = sorted({c["q"] for c in v.values() if "q" in c})
        lines.append(f"{'B':>4} " + " ".join(f"{'q=' + str(q):>9}" for q in qs))
        for B in sorted({c["batch"] for c in v.values() if "batch" in c}):
            cells = [v.get(f"{B}x{q}", {}).get("scaled_48_ms") for q in qs]
            lines.append(f"{B:>4} " + " ".join(f"{'-':>9}" if c is None else f"{c:>9.2f}" for c in cells))
    p = res.get("prediction", [])
    if p:
        lines += ["", "predicted 72B speedup = mean accepted length x t(B,1) / (t(B,k+1) + MTP draft)"]
        for r in p:
            lines.append(f"  {r['method']:5} k={r['k']} B={r['batch']:>3}: length "
                         f"{r['mean_accepted_length']:.2f} / cost x{r['verify_cost_ratio']:.2f} = "
                         f"{r['predicted_speedup']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=None, help="checkpoint with MTP modules (mogelm train --mtp-depth 1)")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="toy sizes (a CPU smoke run of every path)")
    p.add_argument("--device", default=None)
    p.add_argument("--batches", default=None, help="comma-separated (default 1,16,64,256; quick 1,4)")
    p.add_argument("--ks", default=None, help="draft lengths (default 1,2,3; quick 1,2)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 128 (quick 16)")
    p.add_argument("--gen-tokens", type=int, default=None, help="default 128 (quick 8)")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="the corpus prefix training used (prompts come from past it)")
    p.add_argument("--context", type=int, default=2048, help="72B verify: live context per sequence")
    p.add_argument("--layers72", default=None, help="72B layer counts timed (default 2,4; quick 1,2)")
    p.add_argument("--max-q", type=int, default=None, help="positions per verify row (default 4; quick 3)")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="stop starting new measurements after this many seconds (default 300)")
    p.add_argument("--sections", default="engine,verify72b")
    args = p.parse_args(argv)
    if not args.quick and not args.ckpt and "engine" in args.sections.split(","):
        p.error("--ckpt is required (or --quick, or --sections verify72b)")
    args.batches = [int(x) for x in (args.batches or ("1,4" if args.quick else "1,16,64,256")).split(",")]
    args.ks = [int(x) for x in (args.ks or ("1,2" if args.quick else "1,2,3")).split(",")]
    args.layers72 = [int(x) for x in (args.layers72 or ("1,2" if args.quick else "2,4")).split(",")]
    args.max_q = args.max_q or (3 if args.quick else 4)
    args.prompt_tokens = args.prompt_tokens or (16 if args.quick else 128)
    args.gen_tokens = args.gen_tokens or (8 if args.quick else 128)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    res = dict(kind="spec_decode", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
               device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               torch=torch.__version__, argv=sys.argv[1:], quick=args.quick)
    res.update(ceilings(device))
    log(f"{res['device']}: copy {res['copy_bandwidth_GBps']:.0f} GB/s, dense bf16 "
        f"{res['dense_bf16_tflops']:.0f} TFLOP/s")
    write_json(out, res)
    with torch.inference_mode():
        # the 72B costs first (~1 min): the engine runs stop at --budget-s, the prediction needs both
        for name, fn in (("verify72b", section_verify72b), ("engine", section_engine)):
            if name not in args.sections.split(","):
                continue
            log(f"section {name}")
            try:
                fn(args, res, out, device)
            except Exception as e:
                res[f"{name}_error"] = f"{type(e).__name__}: {e}"[:500]
                log(f"  section {name} FAILED: {res[f'{name}_error']}")
                traceback.print_exc()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    res["prediction"] = predictions(res)
    res["total_s"] = time.time() - T0
    write_json(out, res)
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
