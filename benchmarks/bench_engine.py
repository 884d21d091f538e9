"""Inference engine benchmark (one GPU): the paged engine (live-length split-KV decode attention,
mixed prefill + decode batches, prefix caching) against the previous engine's method, at Pangu Pro
MoE 72B widths (hidden 5120, 40 / 8 heads of 128, 64 experts of 1344 in 8 groups, shared 5376, vocab
153376) with random bf16 weights at reduced depth (2 and 4 layers).

    python benchmarks/bench_engine.py --out benchmarks/results/engine_h200_2026-12-02   # ~6 min
    python benchmarks/bench_engine.py --quick --out /tmp/engine_quick                   # ~1.5 min

Every number goes to OUT/bench_engine.json; a short table is printed last. Sections:
  ceilings   device copy bandwidth (2 GiB bf16 copy, read + write) and dense bf16 GEMM (8192^3)
  check      the paged engine's logits (a mixed prefill step, then a graphed decode step) against
             the uncached forward (relative L2 error; bf16 rounding only)
  decode     one decode step replayed from the engine's CUDA graph, batch B in 1..256 at contexts
             512 / 1,024 / 2,048 (every row at position ctx - 1), 2 and 4 layers; the previous method
             (slotted cache, graph attending to the whole row, kv_len = 2,049) beside it. Per layer =
             (t4 - t2) / 2; the 48-layer step is EXTRAPOLATED as t2 + 46 x per layer. Bytes floor =
             weights touched (experts counted in an eager forward of the same step) + live KV, over
             the copy bandwidth of this run
  attention  the decode kernel alone (one layer, CUDA-graph replay) vs its live-KV floor, a small
             tile sweep at B=256 / ctx 1,024, and the previous method's masked SDPA over whole rows
  prefill    64 prompts of 512 tokens: mixed batches (chunk 8,192) vs one request at a time (the
             new engine, 512 tokens per step) vs the previous method (one request per forward,
             256-token chunks, as the previous engine scheduled it); 48 layers extrapolated
  prefix     64 requests sharing a 1,024-token prefix (+32 own tokens each, one output token):
             prefix caching off, cold (all arrive together), warm (prefix already cached)
  e2e        with --model DIR (a trained checkpoint): 64 requests of 256 prompt tokens, 128 greedy
             output tokens each (less if the context is shorter), through Engine.generate: output
             tokens/s, graphs on and off

Times are medians of triton.testing.do_bench (graph replays for the decode rows) or of repeated
wall-clock runs with the device synchronised (engine-level sections, host work included).
"""

# ruff: noqa: B023  (every lambda below is timed before its loop variables change)
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import triton
from torch import nn
from triton.testing import do_bench

from mogelm.config import from_name
from mogelm.inference import Engine, SamplingParams
from mogelm.inference.cache import SlotGraphDecoder, SlotKVCache, prefill
from mogelm.inference.paged import PagedAttention
from mogelm.kernels import ops
from mogelm.kernels import triton_attention as ta
from mogelm.kernels.cuda_graphs import capture_cuda_graph
from mogelm.model import Transformer
from mogelm.moe.layer import MoGELayer

MAX_CTX = 2048
BS = 16  # tokens per block
DEVICE = "cuda"


def log(*a):
    print(*a, flush=True)


def sync():
    torch.cuda.synchronize()


def ceilings() -> tuple[float, float]:
    src = torch.randn(1 << 30, device=DEVICE, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    bw = 2 * src.numel() * src.element_size() / ms / 1e6  # GB/s
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=10, rep=100, return_mode="median")
    return bw, 2 * 8192**3 / ms / 1e9


def build_models(layers: tuple[int, ...]) -> dict[int, Transformer]:
    """The deepest model with random bf16 weights, and shallower ones sharing its first layers."""
    deepest = max(layers)
    cfg = from_name("pangu-pro-moe-72b", num_layers=deepest, max_seq_len=MAX_CTX + BS)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=DEVICE).to(torch.bfloat16)
    torch.manual_seed(0)
    model.reset_parameters()
    model.eval()
    out = {deepest: model}
    for n in layers:
        if n != deepest:
            m = copy.copy(model)
            m._modules = dict(model._modules)  # own module dict: replacing layers leaves `model` alone
            m.layers = nn.ModuleList(list(model.layers)[:n])
            m.cfg = dataclasses.replace(cfg, num_layers=n)
            out[n] = m
    return out


def weight_bytes(cfg) -> dict[str, float]:
    D, hd = cfg.hidden_size, cfg.head_dim
    attn = D * cfg.num_heads * hd * 2 + D * cfg.num_kv_heads * hd * 2
    return dict(attention=2 * attn, router=2 * D * cfg.num_experts,
                shared=2 * 3 * D * cfg.shared_expert_intermediate_size,
                expert=2 * 3 * D * cfg.moe_intermediate_size, lm_head=2 * D * cfg.vocab_size)


def kv_bytes_per_token_layer(cfg) -> int:
    return 2 * cfg.num_kv_heads * cfg.head_dim * 2  # K and V, bf16


def fill_rows(B: int, ctx: int, gen: torch.Generator, num_blocks: int):
    """B rows at position ctx - 1 (live length ctx), each over its own random blocks."""
    per = -(-ctx // BS)
    blocks = (torch.randperm(num_blocks - 1, generator=gen)[:B * per] + 1).view(B, per).to(torch.int32)
    pos = torch.full((B,), ctx - 1, dtype=torch.long)
    slots = blocks[:, (ctx - 1) // BS].long() * BS + (ctx - 1) % BS
    lens = torch.full((B,), ctx, dtype=torch.int32)
    ids = torch.randint(0, 1000, (B,), generator=gen)
    return ids, pos, slots, blocks, lens


def experts_touched(model, ids, pos, slots, tables, lens, cache) -> float:
    """Mean over layers of the experts that receive >= 1 row in an eager forward of this step."""
    seen = []
    count = lambda mod, inp, out: seen.append(int((out[1].counts_E > 0).sum()))  # noqa: E731
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, MoGELayer)]
    state = PagedAttention(cache, slots.to(DEVICE), tables.to(DEVICE), lens.to(DEVICE))
    with torch.inference_mode():
        model(ids.to(DEVICE)[None], positions_BT=pos.to(DEVICE)[None], kv_cache=state)
    for h in hooks:
        h.remove()
    return sum(seen) / len(seen)


def bench_decode(models, batches, ctxs, bw, wb, res):
    rows = []
    for L, model in sorted(models.items()):
        cfg = model.cfg
        with torch.inference_mode():
            eng = Engine(model, None, max_batch=max(batches), max_len=MAX_CTX + BS,
                         kv_cache_tokens=max(batches) * (MAX_CTX + BS), cuda_graphs=True)
            assert eng.graphs is not None, "paged graph capture failed"
            slot_cache = SlotKVCache(cfg, max(batches), MAX_CTX, device=DEVICE, dtype=torch.bfloat16)
            old = SlotGraphDecoder(model, slot_cache, sorted(set(batches) | {max(batches)}))
        gen = torch.Generator().manual_seed(L)
        for ctx in ctxs:
            for B in batches:
                ids, pos, slots, tables, lens = fill_rows(B, ctx, gen, eng.cache.num_blocks)
                b = next(s for s in eng.graphs.buckets if s >= B)
                graph, s_ids, s_pos, state, _ = eng.graphs.graphs[b]
                with torch.inference_mode():
                    eng.graphs(ids, pos, slots, tables, lens)  # fills the static buffers
                new_ms = do_bench(graph.replay, warmup=5, rep=40, return_mode="median")
                og, o_ids, o_pos, _ = old.graphs[B]
                with torch.inference_mode():  # the static buffers are inference tensors
                    o_ids.copy_(ids)
                    o_pos.copy_(pos)
                old_ms = do_bench(og.replay, warmup=5, rep=40, return_mode="median")
                touched = experts_touched(model, ids, pos, slots, tables, lens, eng.cache)
                layer_w = wb["attention"] + wb["router"] + wb["shared"] + touched * wb["expert"]
                kv = B * ctx * kv_bytes_per_token_layer(cfg)
                rows.append(dict(layers=L, batch=B, ctx=ctx, bucket=b, new_ms=new_ms, previous_ms=old_ms,
                                 experts_touched=touched, layer_weight_bytes=layer_w, layer_kv_bytes=kv,
                                 previous_layer_kv_bytes=B * (MAX_CTX + 1) * kv_bytes_per_token_layer(cfg)))
                log(f"  decode L={L} B={B:4d} ctx={ctx:5d}: paged {new_ms:7.3f} ms, previous "
                    f"{old_ms:7.3f} ms, experts touched {touched:.1f}")
        del eng, old, slot_cache
        torch.cuda.empty_cache()
    res["decode_rows"] = rows
    # per-layer slope and the extrapolated 48-layer step
    summary = []
    Ls = sorted(models)
    for ctx in ctxs:
        for B in batches:
            r = {x["layers"]: x for x in rows if x["batch"] == B and x["ctx"] == ctx}
            lo, hi = r[Ls[0]], r[Ls[-1]]
            per_new = (hi["new_ms"] - lo["new_ms"]) / (Ls[-1] - Ls[0])
            per_old = (hi["previous_ms"] - lo["previous_ms"]) / (Ls[-1] - Ls[0])
            layer_floor = (hi["layer_weight_bytes"] + hi["layer_kv_bytes"]) / bw / 1e6
            step48_new = lo["new_ms"] + (48 - Ls[0]) * per_new
            step48_old = lo["previous_ms"] + (48 - Ls[0]) * per_old
            floor48 = (48 * (hi["layer_weight_bytes"] + hi["layer_kv_bytes"]) + wb["lm_head"]) / bw / 1e6
            summary.append(dict(batch=B, ctx=ctx, per_layer_ms=per_new, previous_per_layer_ms=per_old,
                                per_layer_floor_ms=layer_floor, per_layer_frac_floor=layer_floor / per_new,
                                step48_ms_extrapolated=step48_new, previous_step48_ms_extrapolated=step48_old,
                                step48_floor_ms=floor48, step48_frac_floor=floor48 / step48_new,
                                previous_step48_frac_floor=floor48 / step48_old,
                                tokens_per_s_48=B / step48_new * 1e3,
                                previous_tokens_per_s_48=B / step48_old * 1e3))
    res["decode"] = summary


def graph_ms(fn) -> float:
    """Median ms of replays of fn captured in a CUDA graph (after a warm-up on a side stream)."""
    g, _ = capture_cuda_graph(fn)
    return do_bench(g.replay, warmup=10, rep=50, return_mode="median")


def bench_attention(cfg, batches, ctxs, bw, res, sweep: bool):
    H, Hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    nb = max(batches) * -(-MAX_CTX // BS) + 1
    k = torch.randn(nb, BS, Hkv, hd, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    scale = hd**-0.5
    gen = torch.Generator().manual_seed(1)
    rows = []
    old_k = torch.randn(max(batches), Hkv, MAX_CTX + 1, hd, device=DEVICE, dtype=torch.bfloat16)
    old_v = torch.randn_like(old_k)
    for ctx in ctxs:
        for B in batches:
            _, _, _, tables, lens = fill_rows(B, ctx, gen, nb)
            tables, lens = tables.to(DEVICE), lens.to(DEVICE)
            q = torch.randn(B, H, hd, device=DEVICE, dtype=torch.bfloat16)
            S = ta.num_splits_for(B, Hkv, MAX_CTX, q.device)
            ms = graph_ms(lambda: ta.paged_decode_attention(q, k, v, tables, lens, scale, num_splits=S))
            floor = B * ctx * kv_bytes_per_token_layer(cfg) / bw / 1e6
            q4 = q[:, :, None]  # the previous method: SDPA over whole rows with a position mask
            mask = (torch.arange(MAX_CTX + 1, device=DEVICE) <= ctx - 1)[None, None, None]
            old_ms = graph_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                q4, old_k[:B], old_v[:B], attn_mask=mask, enable_gqa=True))
            rows.append(dict(batch=B, ctx=ctx, splits=S, ms=ms, floor_ms=floor, frac_floor=floor / ms,
                             previous_ms=old_ms,
                             previous_frac_of_live_floor=floor / old_ms))
            log(f"  attention B={B:4d} ctx={ctx:5d} splits={S:2d}: {ms * 1e3:8.1f} us, floor "
                f"{floor * 1e3:7.1f} us ({floor / ms:6.1%}); previous {old_ms * 1e3:8.1f} us")
    res["attention"] = rows
    if not sweep:
        return
    sweep_rows = []
    for B, ctx in ((256, 1024),):
        _, _, _, tables, lens = fill_rows(B, ctx, gen, nb)
        tables, lens = tables.to(DEVICE), lens.to(DEVICE)
        q = torch.randn(B, H, hd, device=DEVICE, dtype=torch.bfloat16)
        floor = B * ctx * kv_bytes_per_token_layer(cfg) / bw / 1e6
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3):
                    c = ta.DecodeAttentionConfig(block_n=block_n, num_warps=warps, num_stages=stages)
                    S = ta.num_splits_for(B, Hkv, MAX_CTX, q.device, c)
                    try:
                        ms = graph_ms(lambda: ta.paged_decode_attention(q, k, v, tables, lens, scale,
                                                                        num_splits=S, cfg=c))
                    except Exception as e:  # e.g. out of shared memory for a large tile
                        log(f"    sweep {c}: {type(e).__name__}")
                        continue
                    sweep_rows.append(dict(batch=B, ctx=ctx, block_n=block_n, num_warps=warps,
                                           num_stages=stages, splits=S, ms=ms, frac_floor=floor / ms))
                    log(f"    sweep B={B} ctx={ctx} block_n={block_n:3d} warps={warps} stages={stages}: "
                        f"{ms * 1e3:7.1f} us ({floor / ms:6.1%})")
    res["attention_sweep"] = sweep_rows


def timed_runs(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def bench_prefill(models, num_prompts, res, repeats):
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 150000, (512,), generator=gen).tolist() for _ in range(num_prompts)]
    warm = [torch.randint(0, 150000, (512,), generator=gen).tolist() for _ in range(4)]
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    rows = []
    for L, model in sorted(models.items()):
        kw = dict(kv_cache_tokens=(num_prompts + 4) * 528, cuda_graphs=False, prefix_caching=False)
        mixed = Engine(model, None, max_batch=num_prompts, chunk_size=8192, **kw)
        single = Engine(model, None, max_batch=1, chunk_size=512, **kw)
        single.generate(warm, one)
        # The mixed engine's steps are num_prompts * 512 tokens: warm up at exactly that size, so
        # kernel compilation/autotuning for the large step stays out of the timing (a 2,048-token
        # warm-up left a 1.2 s first-call outlier in the quick run of 2026-12-02).
        mixed.generate(prompts, one)
        slot = SlotKVCache(model.cfg, 1, 520, device=DEVICE, dtype=torch.bfloat16)

        @torch.inference_mode()
        def previous():  # one request per forward, 256-token chunks, first token by argmax
            for p in prompts:
                for start in range(0, len(p), 256):
                    logits = prefill(model, slot.rows(0, 1), p[start:start + 256], start)
                int(logits.argmax())

        previous()
        t_mixed = timed_runs(lambda: mixed.generate(prompts, one), repeats)
        t_single = timed_runs(lambda: single.generate(prompts, one), repeats)
        t_prev = timed_runs(previous, repeats)
        n = num_prompts * 512
        rows.append(dict(layers=L, prompts=num_prompts, tokens=n, mixed_ms=t_mixed, previous_ms=t_prev,
                         one_at_a_time_ms=t_single, mixed_steps=mixed.num_steps))
        log(f"  prefill L={L}: mixed {t_mixed:8.1f} ms ({n / t_mixed * 1e3:9.0f} tok/s), one at a time "
            f"{t_single:8.1f} ms, previous {t_prev:8.1f} ms")
        torch.cuda.empty_cache()
    Ls = sorted(models)
    lo, hi = rows[0], rows[-1]
    out = dict(rows=rows)
    for key in ("mixed_ms", "one_at_a_time_ms", "previous_ms"):
        per = (hi[key] - lo[key]) / (Ls[-1] - Ls[0])
        t48 = lo[key] + (48 - Ls[0]) * per
        out[key.replace("_ms", "_tokens_per_s_48")] = hi["tokens"] / t48 * 1e3
        out[key.replace("_ms", "_tokens_per_s_4")] = hi["tokens"] / hi[key] * 1e3
    out["speedup_vs_previous_48"] = out["mixed_tokens_per_s_48"] / out["previous_tokens_per_s_48"]
    out["speedup_vs_one_at_a_time_48"] = out["mixed_tokens_per_s_48"] / out["one_at_a_time_tokens_per_s_48"]
    res["prefill"] = out


def bench_prefix(model, num_requests, res, repeats):
    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, 150000, (1024,), generator=gen).tolist()
    suffixes = lambda: [torch.randint(0, 150000, (32,), generator=gen).tolist() for _ in range(num_requests)]
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    kw = dict(max_batch=num_requests, chunk_size=8192, kv_cache_tokens=2 * num_requests * 1072,
              cuda_graphs=False)
    off = Engine(model, None, prefix_caching=False, **kw)
    off.generate([prefix + s for s in suffixes()[:4]], one)  # warm-up
    t_off = timed_runs(lambda: off.generate([prefix + s for s in suffixes()], one), repeats)
    off = None
    cold, warm = [], []
    for _ in range(repeats):
        on = Engine(model, None, prefix_caching=True, **kw)
        prompts = [prefix + s for s in suffixes()]
        sync()
        t = time.perf_counter()
        on.generate(prompts, one)  # cold: nothing cached yet
        sync()
        cold.append((time.perf_counter() - t) * 1e3)
        before = on.stats()
        prompts = [prefix + s for s in suffixes()]
        sync()
        t = time.perf_counter()
        on.generate(prompts, one)  # warm: the prefix is cached
        sync()
        warm.append((time.perf_counter() - t) * 1e3)
        st = on.stats()
        hit_rate = (st["prefix_cache_hits_total"] - before["prefix_cache_hits_total"]) / (
            st["prefix_cache_queries_total"] - before["prefix_cache_queries_total"])
        del on
        torch.cuda.empty_cache()
    t_cold, t_warm = statistics.median(cold), statistics.median(warm)
    res["prefix"] = dict(layers=model.cfg.num_layers, requests=num_requests, off_ms=t_off, cold_ms=t_cold,
                         warm_ms=t_warm, speedup_warm=t_off / t_warm, speedup_cold=t_off / t_cold,
                         warm_hit_rate=hit_rate)
    log(f"  prefix L={model.cfg.num_layers}: off {t_off:8.1f} ms, cold {t_cold:8.1f} ms, warm "
        f"{t_warm:8.1f} ms (x{t_off / t_warm:.1f}), warm hit rate {hit_rate:.1%}")


@torch.inference_mode()
def check(model, res):
    """Paged engine logits vs the uncached forward: a mixed prefill step, then a graphed decode step."""
    eng = Engine(model, None, max_batch=4, chunk_size=2048, kv_cache_tokens=4096, cuda_graphs=True)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 150000, (n,), generator=gen).tolist() for n in (100, 37, 300)]
    seen = []
    forward = eng._forward
    eng._forward = lambda inp, graphed: seen.append((graphed, forward(inp, graphed))) or seen[-1][1]
    outs = eng.generate(prompts, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    errs = []
    for step, (_, logits) in enumerate(seen[:2]):
        for i, (p, o) in enumerate(zip(prompts, outs)):
            ids = p + o.token_ids[:step]
            ref = model(torch.tensor([ids], device=DEVICE))[0, -1].float()
            errs.append(((logits[i].float() - ref).norm() / ref.norm()).item())
    res["check"] = dict(decode_step_graphed=seen[1][0], rel_err_max=max(errs), rel_errs=errs)
    ok = max(errs) < 3e-2 and seen[1][0]
    log(f"  check: logits vs uncached forward, max rel. error {max(errs):.2e} "
        f"({'ok' if ok else 'FAILED'}; decode step graphed: {seen[1][0]})")


def bench_e2e(model_dir: str, res, num_requests: int):
    """End-to-end tokens of a trained checkpoint through the engine (host work included)."""
    rows = []
    for graphs in (True, False):
        eng = Engine.from_pretrained(model_dir, device=DEVICE, max_batch=num_requests, cuda_graphs=graphs)
        vocab = min(eng.model.cfg.vocab_size, eng.tokenizer.vocab_size if eng.tokenizer else 10**9)
        gen = torch.Generator().manual_seed(5)
        n_prompt = min(256, eng.max_len // 2)  # 256 + 128 unless the context is shorter
        prompts = [torch.randint(0, vocab, (n_prompt,), generator=gen).tolist() for _ in range(num_requests)]
        params = SamplingParams(max_tokens=min(128, eng.max_len - n_prompt), temperature=0, ignore_eos=True)
        eng.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))  # warm-up
        sync()
        t = time.perf_counter()
        outs = eng.generate(prompts, params)
        sync()
        dt = time.perf_counter() - t
        n = sum(len(o.token_ids) for o in outs)
        rows.append(dict(cuda_graphs=graphs, requests=num_requests, output_tokens=n, seconds=dt,
                         output_tokens_per_s=n / dt, **eng.stats()))
        log(f"  e2e {model_dir} graphs={graphs}: {n / dt:8.0f} output tok/s ({dt:.2f} s, "
            f"{eng.num_steps} steps)")
        del eng
        torch.cuda.empty_cache()
    res["e2e"] = rows


def write_json(out_dir: Path, res: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench_engine.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, path)
    return path


def print_tables(res):
    log(f"\ncopy {res['copy_bandwidth_GBps']:.0f} GB/s, dense bf16 {res['dense_bf16_tflops']:.0f} TFLOP/s; "
        f"check max rel. err {res['check']['rel_err_max']:.1e}")
    log("decode (per layer = slope of 2 -> 4 layers; step48 EXTRAPOLATED to 48 layers)")
    log("    B   ctx | layer ms  prev ms  floor ms  %floor | step48 ms  prev ms  floor ms  %floor  prev%  "
        "tok/s")
    for r in res["decode"]:
        log(f" {r['batch']:4d} {r['ctx']:5d} | {r['per_layer_ms']:8.3f} {r['previous_per_layer_ms']:8.3f} "
            f"{r['per_layer_floor_ms']:8.3f} {r['per_layer_frac_floor']:6.1%} | "
            f"{r['step48_ms_extrapolated']:9.2f} {r['previous_step48_ms_extrapolated']:8.2f} "
            f"{r['step48_floor_ms']:8.2f} {r['step48_frac_floor']:6.1%} "
            f"{r['previous_step48_frac_floor']:6.1%} {r['tokens_per_s_48']:6.0f}")
    log("attention alone (one layer)")
    for r in res["attention"]:
        log(f" B={r['batch']:4d} ctx={r['ctx']:5d}: {r['ms'] * 1e3:7.1f} us, {r['frac_floor']:6.1%} of the "
            f"live-KV floor; previous {r['previous_ms'] * 1e3:7.1f} us")
    p = res["prefill"]
    log(f"prefill {p['rows'][-1]['prompts']} x 512 tokens, tokens/s at 48 layers (extrapolated): mixed "
        f"{p['mixed_tokens_per_s_48']:.0f}, one at a time {p['one_at_a_time_tokens_per_s_48']:.0f}, previous "
        f"{p['previous_tokens_per_s_48']:.0f}: x{p['speedup_vs_previous_48']:.2f} vs previous, "
        f"x{p['speedup_vs_one_at_a_time_48']:.2f} vs one at a time")
    for r in res.get("e2e", []):
        log(f"e2e (trained checkpoint, graphs {r['cuda_graphs']}): {r['output_tokens_per_s']:.0f} output "
            "tok/s")
    x = res["prefix"]
    log(f"prefix ({x['layers']} layers, {x['requests']} requests): off {x['off_ms']:.1f} ms, cold "
        f"{x['cold_ms']:.1f}, warm {x['warm_ms']:.1f} -> x{x['speedup_warm']:.1f} warm, "
        f"x{x['speedup_cold']:.1f} cold")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for bench_engine.json")
    p.add_argument("--quick", action="store_true", help="each path once at small size (smoke run)")
    p.add_argument("--model", help="a trained checkpoint directory for the end-to-end section (optional)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.cuda.get_device_name()
    log(f"device {dev}, torch {torch.__version__}, triton {triton.__version__}, kernel backend "
        f"{ops.resolve_backend(torch.empty(0, device=DEVICE))}")
    res = dict(device=dev, date=datetime.date.today().isoformat(), torch=torch.__version__,
               triton=triton.__version__, quick=args.quick)
    bw, dense = ceilings()
    res.update(copy_bandwidth_GBps=bw, dense_bf16_tflops=dense)
    log(f"copy bandwidth {bw:.0f} GB/s, dense bf16 GEMM {dense:.0f} TFLOP/s")
    layers = (2, 4)
    batches = [1, 64] if args.quick else [1, 16, 64, 128, 256]
    ctxs = [1024] if args.quick else [512, 1024, 2048]
    models = build_models(layers)
    cfg = models[max(layers)].cfg
    wb = weight_bytes(cfg)
    res["weight_bytes"] = wb
    log(f"models built ({time.perf_counter() - t0:.0f} s); per-layer weights "
        f"{(wb['attention'] + wb['router'] + wb['shared'] + cfg.num_experts * wb['expert']) / 1e9:.2f} GB")
    check(models[min(layers)], res)
    bench_attention(cfg, batches, ctxs, bw, res, sweep=not args.quick)
    log(f"[{time.perf_counter() - t0:.0f} s] decode")
    bench_decode(models, batches, ctxs, bw, wb, res)
    write_json(Path(args.out), res)
    log(f"[{time.perf_counter() - t0:.0f} s] prefill")
    bench_prefill(models, 16 if args.quick else 64, res, 1 if args.quick else 3)
    log(f"[{time.perf_counter() - t0:.0f} s] prefix")
    bench_prefix(models[max(layers)], 16 if args.quick else 64, res, 1 if args.quick else 3)
    if args.model:
        log(f"[{time.perf_counter() - t0:.0f} s] e2e")
        del models
        torch.cuda.empty_cache()
        bench_e2e(args.model, res, 16 if args.quick else 64)
    res["seconds"] = time.perf_counter() - t0
    path = write_json(Path(args.out), res)
    print_tables(res)
    log(f"wrote {path} ({res['seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
