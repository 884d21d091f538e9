"""Decode across GPUs (issue 18): Pangu Pro MoE 72B in bf16 — all 48 layers, random weights in the
real layout, built shard by shard on the GPUs — served by N = 2 or 4 ranks the way `mogelm serve
--nproc N --ep N` runs it (mogelm.parallel.tensor_parallel: attention tensor-parallel over KV
heads, experts by MoGE group, one all-reduce after attention and one after the MoE layer; the
engine's CUDA-graph decode step over the paged KV cache, with the engine's load-time fusions of
inference/fuse.py applied after sharding unless --no-fuse), MoGE against top-k routing.

    NCCL_NVLS_ENABLE=0 PYTHONPATH=src torchrun --standalone --nproc-per-node 4 \\
        benchmarks/bench_serve_multi_gpu.py --out benchmarks/results/serve_4xh200      # ~4 min
    NCCL_NVLS_ENABLE=0 PYTHONPATH=src torchrun --standalone --nproc-per-node 2 \\
        benchmarks/bench_serve_multi_gpu.py --out benchmarks/results/serve_2xh200      # ~4 min
    ... --quick    # GPU smoke run: 4 layers, batches 1 and 64, one context (~1 min)
    PYTHONPATH=src torchrun --standalone --nproc-per-node 2 benchmarks/bench_serve_multi_gpu.py \\
        --smoke --out /tmp/serve_smoke   # CPU + gloo, a tiny model, each path once (tests run it)

Every number goes to OUT/bench_serve_multi_gpu_<N>gpu.json (per rank where ranks differ); a short
table is printed last. What one run measures (N = the torchrun world size):
  ceilings     per GPU: device copy bandwidth (1 GiB bf16 copy, read + write), dense bf16 GEMM
               (8192^3), both medians of triton.testing.do_bench; the all-reduce of [B, 5120] bf16
               as the decode step issues it (2 x 48 per step), captured in one CUDA graph and
               replayed: "comm floor" ms per step, and the bus bandwidth 2(N-1)/N x bytes / time;
               all-gather and reduce-scatter of the same buffers in the simulator's calibration
               format ("collectives": `mogelm sim calibrate` fits its link model from them, beside
               a kernel benchmark's expert rows)
  decode       one decode step of B rows, every row at position ctx - 1 (live length ctx) of its
               own KV blocks, B in --batches, ctx in --contexts (1,024: the mean position of a
               2,048-token context, the convention of the one-GPU figures; 2,048: full context):
                 moge  graph   the engine's CUDAGraphRunner replay (host -> device copies of the
                               step's inputs included): the headline
                 moge  eager   the same step without the graph
                 topk  eager   top-k routing (top-8 of 64, router logits + log p_e: a trained top-k
                               router's expert shares), the same all-reduce layout; the rows on each
                               rank's experts vary (nonzero: a host sync per layer, no graph)
                 topk_a2a eager  the expert-parallel baseline: count exchange + variable all-to-all
                               over 1/N of the tokens per rank (TopKAllToAll)
               step ms = TPOT (median of --iters steps after warm-up; CUDA events; slowest rank);
               tokens/s = B / step (and per GPU: / N); % floor = bytes floor / step, the floor =
               this rank's weights touched (attention, shared expert and experts it holds: 1/N;
               experts counted in an eager pass; router, LM head) + live KV (its KV heads) at the
               copy bandwidth; eager rows also give comm ms (time inside the collectives, CUDA
               events, includes waiting for the slowest rank) and experts ms (slowest / fastest
               rank) and rows (busiest rank / mean): what MoGE's balance buys
The KV pool takes what fits (the smallest free memory over the ranks): batches that do not fit a
context are skipped and listed. Predictions with their arithmetic: notes_serve_multi_gpu.md.
"""

# ruff: noqa: B023  (every lambda below is timed before its loop variables change)
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from mogelm.config import from_name
from mogelm.inference.bench_model import fixed_count_ms
from mogelm.inference.engine import CUDAGraphRunner
from mogelm.inference.fuse import fuse_for_inference
from mogelm.inference.paged import PagedAttention, PagedKVCache
from mogelm.model import Transformer
from mogelm.moe.routing import build_router
from mogelm.parallel.dispatchers import all_gather_tensor, reduce_scatter_tensor
from mogelm.parallel.tensor_parallel import apply_tensor_parallel, make_tp_dispatcher

BS = 16  # tokens per KV block
GIB = 2**30
# Expert shares of layer 0 of a trained top-k model (mogelm `debug` preset, routing=topk, 60 steps on
# the stdlib corpus), as bench_expert_parallel.py / bench_train_scaling.py use them; repeated over 64.
TRAINED_TOPK_SHARES = [0.4432, 0.5507, 0.6869, 0.6215, 0.5718, 0.3576, 0.4798, 0.2885]
TPOT_LIMIT_MS = 99.0


def log(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


class EventTimer:
    """begin(what) / end(what) around spans (the dispatchers' comm_timer protocol): CUDA events on
    the GPU, perf_counter on the CPU; `enabled` False makes both no-ops (graph capture, replays)."""

    def __init__(self, cuda: bool):
        self.cuda, self.enabled = cuda, False
        self.open: dict[str, object] = {}
        self.spans: list[tuple[str, object, object]] = []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def begin(self, what: str) -> None:
        if self.enabled:
            self.open[what] = self._now()

    def end(self, what: str) -> None:
        if self.enabled:
            self.spans.append((what, self.open.pop(what), self._now()))

    def take_ms(self) -> float:
        """Total ms of the spans since the last call."""
        if self.cuda:
            torch.cuda.synchronize()
            total = sum(a.elapsed_time(b) for _, a, b in self.spans)
        else:
            total = sum(b - a for _, a, b in self.spans) * 1e3
        self.spans.clear()
        return total


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def time_fixed(fn, iters: int, warmup: int, cuda: bool) -> float:
    """Median ms of `iters` calls after `warmup`: fixed counts on every rank (each call may hold
    collectives, so every rank must make the same calls; do_bench picks its own counts)."""
    return fixed_count_ms(fn, torch.device("cuda" if cuda else "cpu"), iters, warmup)


def ceilings(cuda: bool) -> dict:
    if not cuda:
        return {"copy_GBps": None, "gemm_TFLOPs": None}
    from triton.testing import do_bench

    bufs = [torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16), torch.empty(1 << 29, device="cuda",
                                                                                dtype=torch.bfloat16)]
    ms = do_bench(lambda: bufs[1].copy_(bufs[0]), warmup=10, rep=100, return_mode="median")
    bw = 2 * bufs[0].numel() * 2 / ms / 1e6
    bufs.clear()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ a, warmup=10, rep=100, return_mode="median")
    return {"copy_GBps": bw, "gemm_TFLOPs": 2 * 8192**3 / ms / 1e9}


def comm_floor(batches, hidden: int, num_calls: int, dtype, device, cuda: bool, iters: int) -> dict:
    """ms per decode step spent in its `num_calls` all-reduces of [B, hidden], alone (one CUDA graph
    on the GPU, a plain loop on the CPU), and the bus bandwidth of one."""
    N, out = dist.get_world_size(), {}
    for B in batches:
        x = torch.randn(B, hidden, device=device, dtype=dtype)

        def calls():
            for _ in range(num_calls):
                dist.all_reduce(x)

        if cuda:
            calls()  # warm the communicator for this size outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                calls()
            ms = time_fixed(graph.replay, iters, 2, cuda)
        else:
            ms = time_fixed(calls, iters, 1, cuda)
        per_call = ms / num_calls
        nbytes = B * hidden * x.element_size()
        out[B] = {"step_ms": ms, "per_call_us": per_call * 1e3,
                  "bus_GBps": 2 * (N - 1) / N * nbytes / (per_call / 1e3) / 1e9 if N > 1 else None}
    return out


def sim_collectives(batches, hidden: int, dtype, device, cuda: bool, iters: int) -> list[dict]:
    """All-gather and reduce-scatter of the same [B, hidden] buffers, one call timed (10 per graph on
    the GPU), in the row format of `mogelm sim calibrate` ("collectives": bytes = the gathered
    buffer per device): the simulator's link model for this machine."""
    N, rows = dist.get_world_size(), []
    for B in batches:
        if N < 2 or B % N:
            continue
        full = torch.randn(B, hidden, device=device, dtype=dtype)
        part = torch.empty(B // N, hidden, device=device, dtype=dtype)
        times = {}
        for name, call in (("allgather_ms", lambda: all_gather_tensor(full, part)),
                           ("reducescatter_ms", lambda: reduce_scatter_tensor(part, full))):
            if cuda:
                call()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(10):
                        call()
                times[name] = time_fixed(graph.replay, iters, 2, cuda) / 10
            else:
                times[name] = time_fixed(call, iters, 1, cuda)
        rows.append({"world": N, "bytes": B * hidden * full.element_size(), **times})
    return rows


def build_model(cfg, device, dtype, timer, fuse: bool):
    """The sharded model of this rank, built on the meta device and drawn on `device` (same seed on
    every rank, so replicated weights agree: the ranks must route every token alike); then, with
    `fuse`, the engine's load-time fusions over this rank's slices (as `serve --nproc` runs on CUDA)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    apply_tensor_parallel(model, dist.group.WORLD, "moge", comm_timer=timer)
    model = model.to(dtype).to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        model.reset_parameters()
    model = model.eval().requires_grad_(False)
    return fuse_for_inference(model) if fuse else model


class Routing:
    """Switches every MoE layer between MoGE and the top-k baselines (same weights)."""

    def __init__(self, model, timer, device):
        self.model, self.timer, self.kind = model, timer, "moge"
        full = model.tp_full_cfg
        self.full_cfg, self.topk_cfg = full, full.replace(routing="topk")
        self.moge_routers = [layer.router for layer in model.moe_layers()]
        E = full.num_experts
        p = torch.tensor(TRAINED_TOPK_SHARES).repeat_interleave(math.ceil(E / len(TRAINED_TOPK_SHARES)))[:E]
        self.log_p = (p / p.sum()).log().to(device)
        for layer in model.moe_layers():
            layer.gate.register_forward_hook(self._bias)

    def _bias(self, module, args, out):
        return out + self.log_p.to(out.dtype) if self.kind != "moge" else None

    def set(self, kind: str) -> None:
        N, r = dist.get_world_size(), dist.get_rank()
        for i, layer in enumerate(self.model.moe_layers()):
            layer.router = self.moge_routers[i] if kind == "moge" else build_router(self.topk_cfg).to(
                self.log_p.device)
            layer.dispatcher = make_tp_dispatcher(kind, dist.group.WORLD, self.full_cfg, r, N, self.timer)
        self.kind = kind


def step_inputs(B: int, ctx: int, gen: torch.Generator, num_blocks: int, vocab: int):
    """B rows at position ctx - 1, each over its own blocks (host tensors, as the engine builds them)."""
    per = -(-ctx // BS)
    blocks = (torch.randperm(num_blocks - 1, generator=gen)[:B * per] + 1).view(B, per).to(torch.int32)
    pos = torch.full((B,), ctx - 1, dtype=torch.long)
    slots = blocks[:, (ctx - 1) // BS].long() * BS + (ctx - 1) % BS
    lens = torch.full((B,), ctx, dtype=torch.int32)
    ids = torch.randint(0, min(1000, vocab), (B,), generator=gen)
    return ids, pos, slots, blocks, lens


def weight_bytes(cfg, N: int, elt: int) -> dict:
    """Bytes this rank reads per step for each part (experts: per expert)."""
    D, hd = cfg.hidden_size, cfg.head_dim
    attn = (D * cfg.num_heads * hd * 2 + D * cfg.num_kv_heads * hd * 2) // N
    return dict(attention=elt * attn, shared=elt * 3 * D * cfg.shared_expert_intermediate_size // N,
                router=elt * D * cfg.num_experts, expert=elt * 3 * D * cfg.moe_intermediate_size,
                lm_head=elt * D * cfg.vocab_size)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the JSON")
    p.add_argument("--layers", type=int, default=48, help="decoder layers (default 48: the whole model)")
    p.add_argument("--batches", default="1,8,32,64,128,256,512,768,1024",
                   help="decode batch sizes (those whose KV does not fit are skipped)")
    p.add_argument("--contexts", default="1024,2048", help="live context of every row")
    p.add_argument("--routings", default="moge,topk,topk_a2a", help="moge (graph + eager), topk, topk_a2a")
    p.add_argument("--iters", type=int, default=20, help="timed graph replays per point (eager: half)")
    p.add_argument("--quick", action="store_true", help="GPU smoke run: 4 layers, batches 1 and 64, ctx 1024")
    p.add_argument("--smoke", action="store_true", help="CPU + gloo, a tiny model, each path once")
    p.add_argument("--no-fuse", action="store_true",
                   help="leave out the engine's load-time fusions (inference/fuse.py: q|k|v and the shared "
                        "expert's gate|up in one GEMM each), which serve --nproc applies on CUDA")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.smoke
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=600))
    N, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.smoke:
        cfg = from_name("debug", num_heads=8, num_kv_heads=4, max_seq_len=64 + BS)
        batches, contexts, iters, dtype = [1, 4], [32], 2, torch.float32
    else:
        layers = 4 if args.quick else args.layers
        batches = [1, 64] if args.quick else [int(b) for b in args.batches.split(",")]
        contexts = [1024] if args.quick else [int(c) for c in args.contexts.split(",")]
        cfg = from_name("pangu-pro-moe-72b", num_layers=layers, max_seq_len=max(contexts) + BS)
        iters, dtype = (5 if args.quick else args.iters), torch.bfloat16
    routings = args.routings.split(",")
    t_start = time.time()
    result = {"date": datetime.date.today().isoformat(), "world": N, "layers": cfg.num_layers,
              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "mode": "smoke" if args.smoke else "quick" if args.quick else "full", "fused": not args.no_fuse,
              "rows": []}

    result["ceilings"] = ceilings(cuda)
    log(f"ceilings (rank 0): {result['ceilings']}")
    result["comm_floor"] = comm_floor(batches, cfg.hidden_size, 2 * cfg.num_layers, dtype, device, cuda,
                                      iters)
    result["collectives"] = sim_collectives(batches, cfg.hidden_size, dtype, device, cuda, iters)
    c = result["ceilings"]
    result["copy_bandwidth_GBps"], result["dense_bf16_tflops"] = c["copy_GBps"], c["gemm_TFLOPs"]
    log(f"all-reduce per step (2 x {cfg.num_layers} of [B, {cfg.hidden_size}]): "
        + ", ".join(f"B={b}: {v['step_ms']:.2f} ms" for b, v in result["comm_floor"].items()))

    timer, expert_timer = EventTimer(cuda), EventTimer(cuda)
    model = build_model(cfg, device, dtype, timer, fuse=not args.no_fuse)
    routing = Routing(model, timer, device)
    counts: list[tuple[int, int]] = []  # (rows, experts with rows) per layer of the last counted pass
    counting = {"on": False}
    for layer in model.moe_layers():
        layer.experts.register_forward_pre_hook(lambda m, a: expert_timer.begin("experts"))
        layer.experts.register_forward_hook(lambda m, a, o: expert_timer.end("experts"))

        def count(m, a, o):
            if counting["on"]:
                ids = a[2]
                counts.append((ids.numel(), int(torch.unique(ids).numel())))

        layer.experts.register_forward_hook(count)
    weights_gb = sum(t.numel() * t.element_size() for t in model.parameters()) / 1e9
    log(f"model: {cfg.num_layers} layers, {weights_gb:.1f} GB of weights per rank ({N} ranks)")

    # KV pool: what fits on every rank (after the weights, a reserve for graphs and activations)
    local = model.cfg
    per_block = PagedKVCache.bytes_per_block(local, BS, dtype)
    want = max(B * -(-ctx // BS) for B in batches for ctx in contexts) + 1
    if cuda:
        free = torch.cuda.mem_get_info()[0]
        reserve = 6 * GIB + 2 * max(batches) * cfg.vocab_size * 4
        fit = torch.tensor([max(2, (free - reserve) // per_block)], device=device)
        dist.all_reduce(fit, op=dist.ReduceOp.MIN)
        num_blocks = int(min(want, fit.item()))
    else:
        num_blocks = want
    cache = PagedKVCache(local, num_blocks, BS, device=device, dtype=dtype)
    points = [(ctx, B) for ctx in contexts for B in batches if B * -(-ctx // BS) + 1 <= num_blocks]
    result["skipped"] = [(ctx, B) for ctx in contexts for B in batches if (ctx, B) not in points]
    result["kv_pool"] = {"blocks": num_blocks, "GB": num_blocks * per_block / 1e9}
    log(f"KV pool {num_blocks} blocks ({num_blocks * per_block / 1e9:.1f} GB per rank); skipped (ctx, B) "
        f"that do not fit: {result['skipped']}")

    max_blocks = -(-max(contexts) // BS)
    wb = weight_bytes(cfg, N, torch.tensor([], dtype=dtype).element_size())
    kv_token = PagedKVCache.bytes_per_block(local, 1, dtype)  # this rank's K + V of one token, all layers
    bw = result["ceilings"]["copy_GBps"]
    gen = torch.Generator().manual_seed(0)
    graph_batches = sorted({B for _, B in points})

    with torch.inference_mode():
        runner = None
        if cuda and "moge" in routings:
            t0 = time.time()
            runner = CUDAGraphRunner(model, cache, graph_batches, max_blocks)
            log(f"captured {len(graph_batches)} decode graphs in {time.time() - t0:.1f} s")
        for ctx, B in points:
            ids, pos, slots, tables, lens = step_inputs(B, ctx, gen, num_blocks, cfg.vocab_size)
            dev = [t.to(device) for t in (ids, pos, slots, tables, lens)]
            state = PagedAttention(cache, dev[2], dev[3], dev[4])

            def eager():
                return model(dev[0][None], positions_BT=dev[1][None], kv_cache=state)

            for kind in routings:
                routing.set(kind)
                # one counted, untimed pass: rows and experts touched on this rank
                counting["on"], counts[:] = True, []
                eager()
                counting["on"] = False
                rows = sum(c[0] for c in counts)
                touched = sum(c[1] for c in counts) / max(len(counts), 1)
                modes = ["graph", "eager"] if kind == "moge" and runner is not None else ["eager"]
                for mode in modes:
                    if mode == "graph":
                        ms = time_fixed(lambda: runner(ids, pos, slots, tables, lens), iters, 3, cuda)
                        comm = experts = None
                    else:
                        ms = time_fixed(eager, max(2, iters // 2), 2, cuda)
                        timer.enabled = expert_timer.enabled = True
                        timer.take_ms(), expert_timer.take_ms()
                        eager()
                        sync(cuda)
                        timer.enabled = expert_timer.enabled = False
                        comm, experts = timer.take_ms(), expert_timer.take_ms()
                    floor_bytes = (cfg.num_layers * (wb["attention"] + wb["shared"] + wb["router"]
                                                     + touched * wb["expert"]) + wb["lm_head"]
                                   + B * ctx * kv_token)
                    result["rows"].append(dict(
                        routing=kind, mode=mode, ctx=ctx, batch=B, rank=rank, step_ms=ms, comm_ms=comm,
                        experts_ms=experts, rows=rows, experts_touched=touched, floor_bytes=floor_bytes,
                        floor_ms=floor_bytes / bw / 1e6 if bw else None))
            done = [r for r in result["rows"] if (r["ctx"], r["batch"]) == (ctx, B)]
            log(f"ctx {ctx} B {B}: "
                + ", ".join(f"{r['routing']}/{r['mode']} {r['step_ms']:.2f} ms" for r in done))

    every: list = [None] * N
    dist.all_gather_object(every, result)
    if rank == 0:
        summary = summarize(every, N)
        result = {**every[0], "rows": None, "per_rank": [r["rows"] for r in every],
                  "ceilings_per_rank": [r["ceilings"] for r in every], "summary": summary,
                  "wall_s": time.time() - t_start}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        suffix = "" if result["mode"] == "full" else "_" + result["mode"]
        f = out / f"bench_serve_multi_gpu_{N}gpu{suffix}.json"
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        os.replace(tmp, f)
        print_table(summary, result, N)
        print(f"wrote {f} ({result['wall_s']:.0f} s)", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def summarize(every: list[dict], N: int) -> list[dict]:
    """One row per (routing, mode, ctx, batch): the slowest rank's step; comm / experts per rank."""
    by_key = defaultdict(list)
    for res in every:
        for r in res["rows"]:
            by_key[(r["routing"], r["mode"], r["ctx"], r["batch"])].append(r)
    out = []
    for (kind, mode, ctx, B), rs in by_key.items():
        step = max(r["step_ms"] for r in rs)
        floor = max((r["floor_ms"] or 0) for r in rs)
        rows = [r["rows"] for r in rs]
        experts = [r["experts_ms"] for r in rs if r["experts_ms"] is not None]
        comm = [r["comm_ms"] for r in rs if r["comm_ms"] is not None]
        out.append(dict(
            routing=kind, mode=mode, ctx=ctx, batch=B, step_ms=step, tokens_s=B / step * 1e3,
            tokens_s_per_gpu=B / step * 1e3 / N, floor_ms=floor or None,
            pct_floor=100 * floor / step if floor else None,
            comm_ms_max=max(comm) if comm else None, comm_ms_min=min(comm) if comm else None,
            experts_ms_max=max(experts) if experts else None,
            experts_ms_min=min(experts) if experts else None,
            rows_busiest_over_mean=max(rows) / (sum(rows) / len(rows)) if sum(rows) else None))
    for r in out:  # what MoGE buys: its step (graphed, and eager) against the best top-k of the same point
        if r["routing"] == "moge":
            topk = [o["step_ms"] for o in out if o["routing"] != "moge" and (o["ctx"], o["batch"]) ==
                    (r["ctx"], r["batch"])]
            r["moge_speedup_vs_best_topk"] = min(topk) / r["step_ms"] if topk else None
    return sorted(out, key=lambda r: (r["ctx"], r["batch"], r["routing"], r["mode"]))


def print_table(summary: list[dict], result: dict, N: int) -> None:
    c = result["ceilings"]
    print(f"\n{result['layers']} layers on {N} x {result['device']} ({result['mode']}); copy "
          f"{c['copy_GBps'] or 0:.0f} GB/s, bf16 GEMM {c['gemm_TFLOPs'] or 0:.0f} TFLOP/s (rank 0)")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    print("| routing | mode | ctx | batch | step (TPOT) ms | tokens/s | per GPU | % floor | comm ms "
          "(max/min rank) | experts ms (max/min) | rows busiest/mean | MoGE x best top-k |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in summary:
        print(f"| {r['routing']} | {r['mode']} | {r['ctx']} | {r['batch']} | {r['step_ms']:.2f} | "
              f"{r['tokens_s']:,.0f} | {r['tokens_s_per_gpu']:,.0f} | {f(r['pct_floor'], '.1f')} | "
              f"{f(r['comm_ms_max'], '.2f')} / {f(r['comm_ms_min'], '.2f')} | "
              f"{f(r['experts_ms_max'], '.2f')} / {f(r['experts_ms_min'], '.2f')} | "
              f"{f(r['rows_busiest_over_mean'], '.2f')} | {f(r.get('moge_speedup_vs_best_topk'), '.2f')} |")
    best = [r for r in summary if r["routing"] == "moge" and r["mode"] == "graph"
            and r["step_ms"] <= TPOT_LIMIT_MS]
    for ctx in sorted({r["ctx"] for r in best}):
        top = max((r for r in best if r["ctx"] == ctx), key=lambda r: r["tokens_s_per_gpu"])
        print(f"best MoGE at TPOT <= {TPOT_LIMIT_MS:.0f} ms, ctx {ctx}: {top['tokens_s_per_gpu']:,.0f} "
              f"tokens/s per GPU (batch {top['batch']}, {top['step_ms']:.1f} ms, "
              f"{f(top['pct_floor'], '.0f')} % of its bytes floor)")


if __name__ == "__main__":
    main()
