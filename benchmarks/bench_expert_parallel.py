"""Expert-parallel straggler benchmark: one MoGE layer at Pangu Pro MoE shapes over EP=2.

Two GPUs, one process each (4 expert groups = 32 experts per GPU), bf16, NCCL:

    NCCL_NVLS_ENABLE=0 PYTHONPATH=src torchrun --standalone --nproc-per-node 2 \\
        benchmarks/bench_expert_parallel.py --out benchmarks/results/ep_h200x2
    # CPU smoke test (gloo, tiny shapes, seconds):
    .venv/bin/torchrun --standalone --nproc-per-node 2 benchmarks/bench_expert_parallel.py --tiny

What is timed (medians over --iters steps after warm-up, CUDA events):
  step     the MoGELayer forward (+ backward of sum(y * dy) in "train" mode) on T tokens per rank:
           router GEMM, routing, dispatch, routed experts, combine, shared expert (+ aux loss).
  comm     time inside the dispatch/combine collectives of this rank (forward and backward), which
           includes waiting for the slower rank: the straggler cost shows up here.
  experts  this rank's routed-expert compute alone (forward, + backward in train mode) on exactly
           the rows it received, timed separately: the per-rank work, slowest vs fastest.
Configurations (the differences between them are the shares of MoGE's gain):
  topk/topk_a2a   top-k routing, count exchange + variable all-to-all (the baseline)
  moge/topk_a2a   MoGE routing through the *same* variable dispatcher: balance only
  moge/moge_a2a   MoGE with the static equal-split all-to-all: + no count exchange, static shapes
  moge/moge_agrs  MoGE with all-gather -> experts -> reduce-scatter (the paper's inference layout)
  .../graph       the same forward replayed from a CUDA graph (static dispatchers only)
Routing distributions: logits = log(p_e) + Gumbel noise (Plackett-Luce sampling of experts in
proportion to p_e), added to the real router output (gate weights zeroed so the router GEMM still
runs). "uniform": p_e = 1/E. "trained-topk": per-expert shares measured on a trained top-k model
(see TRAINED_TOPK_SHARES). "lognormal": synthetic heavy skew, log p_e ~ N(0, 1), seed 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import time

import torch
import torch.distributed as dist

from mogelm.config import from_name
from mogelm.kernels import ops
from mogelm.moe.layer import MoGELayer
from mogelm.parallel.expert_parallel import apply_expert_parallel

# Expert shares (fraction of tokens routed to each expert; they sum to K = 4) of layer 0 of a
# trained top-k model: mogelm `debug` preset with routing=topk (8 experts, top-4), 60 steps on the
# CPython-stdlib corpus, validation routing statistics at step 60 (run by the training engineer,
# 2026-11-28, runs/q/topk/log.jsonl). Each of its 8 experts stands for 8 consecutive Pangu experts.
TRAINED_TOPK_SHARES = [0.4432, 0.5507, 0.6869, 0.6215, 0.5718, 0.3576, 0.4798, 0.2885]


def popularity(name: str, E: int) -> torch.Tensor:
    if name == "uniform":
        p = torch.ones(E)
    elif name == "trained-topk":
        s = torch.tensor(TRAINED_TOPK_SHARES)
        p = s.repeat_interleave(math.ceil(E / len(s)))[:E]
    elif name == "lognormal":
        p = torch.randn(E, generator=torch.Generator().manual_seed(0)).exp()
    else:
        raise ValueError(name)
    return p / p.sum()


class CommTimer:
    """Sums the time spent inside collectives during one step (events on CUDA, clock on CPU)."""

    def __init__(self, cuda: bool):
        self.cuda, self.spans, self.open = cuda, [], None

    def begin(self, what):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.open = e
        else:
            self.open = time.perf_counter()

    def end(self, what):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.spans.append((what, self.open, e))
        else:
            self.spans.append((what, self.open, time.perf_counter()))

    def total_ms(self, only: str | None = None) -> float:
        spans = [(a, b) for w, a, b in self.spans if only is None or w == only]
        if self.cuda:
            return sum(a.elapsed_time(b) for a, b in spans)
        return sum(b - a for a, b in spans) * 1e3

    def reset(self):
        self.spans = []


def timed(fn, iters: int, warmup: int, cuda: bool, timer: CommTimer | None = None):
    """Median step ms, comm ms and count-exchange ms of fn() over iters (after warm-up)."""
    for _ in range(warmup):
        fn(0)
    steps, comms, counts = [], [], []
    for i in range(iters):
        if timer is not None:
            timer.reset()
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(i)
            b.record()
            torch.cuda.synchronize()
            steps.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn(i)
            steps.append((time.perf_counter() - t0) * 1e3)
        if timer is not None:
            comms.append(timer.total_ms())
            counts.append(timer.total_ms("count exchange"))
    med = lambda v: statistics.median(v) if v else float("nan")
    return med(steps), med(comms), med(counts)


def gather_floats(values: list[float], device) -> list[list[float]]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def build_layer(cfg, dispatcher: str, device, dtype, comm_timer=None) -> MoGELayer:
    with torch.device(device):
        layer = MoGELayer(cfg)
    layer.to(dtype)
    torch.manual_seed(0)
    layer.reset_parameters()
    torch.nn.init.zeros_(layer.gate.weight)  # routing comes from the injected logits below
    apply_expert_parallel(layer_holder(layer), dist.group.WORLD, dispatcher, comm_timer)
    return layer


def layer_holder(layer):
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def moe_layers(self):
            return [self.layer]

    return Holder()


def run_config(args, cfg_base, routing, dispatcher, dist_name, T, mode, device, dtype, graph=False,
               profile=False):
    """One measurement; returns a dict (same on every rank after gathering). With profile=True:
    torch.profiler over 3 steps instead, returning this rank's op table (self device time)."""
    cuda = device.type == "cuda"
    cfg = cfg_base.replace(routing=routing)
    # The dispatcher times its collectives into this (eager runs only: not under graph capture or
    # the profiler); timed() reads and resets it every step.
    timer = CommTimer(cuda) if not (graph or profile) else None
    layer = build_layer(cfg, dispatcher, device, dtype, timer)
    rank, world = dist.get_rank(), dist.get_world_size()
    E, E_loc = cfg.num_experts, cfg.num_experts // world
    p = popularity(dist_name, E).to(device)
    g = torch.Generator(device=device).manual_seed(1000 + rank)
    n_sets = 4  # rotate among routing/input sets
    logp = p.log().to(dtype)
    biases = [(logp - torch.empty(T, E, device=device).exponential_(generator=g).log()).to(dtype)
              for _ in range(n_sets)]
    xs = [torch.randn(T, cfg.hidden_size, device=device, dtype=dtype, generator=g) for _ in range(n_sets)]
    dys = [torch.randn(T, cfg.hidden_size, device=device, dtype=dtype, generator=g) for _ in range(n_sets)]
    bias_now = torch.zeros(T, E, device=device, dtype=dtype)
    layer.gate.register_forward_hook(lambda m, i, o: o + bias_now)
    captured = {}
    layer.experts.register_forward_pre_hook(
        lambda m, a: captured.__setitem__("rows", [t.detach() for t in a])
    )
    train = mode == "train"
    layer.train(train)
    x_static = torch.zeros(T, cfg.hidden_size, device=device, dtype=dtype)

    def step(i):
        bias_now.copy_(biases[i % n_sets])
        if train:
            x = xs[i % n_sets].requires_grad_(True)
            y, stats = layer(x)
            ((y.float() * dys[i % n_sets]).sum() + stats.aux_loss).backward()
            x.grad = None
            for q in layer.parameters():
                q.grad = None
        else:
            with torch.no_grad():
                x_static.copy_(xs[i % n_sets])
                layer(x_static)

    fn = step
    graph_error = None
    if graph:
        assert cuda and not train
        try:
            step(0)  # warm NCCL and kernels eagerly first
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    step(0)
            torch.cuda.current_stream().wait_stream(s)
            cg = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cg):
                with torch.no_grad():
                    layer(x_static)

            def fn(i):
                bias_now.copy_(biases[i % n_sets])
                x_static.copy_(xs[i % n_sets])
                cg.replay()
        except Exception as e:  # noqa: BLE001 - recorded in the results
            graph_error = f"{type(e).__name__}: {str(e)[:200]}"
    if graph_error:
        return {"error": graph_error}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        for i in range(args.warmup):
            fn(i)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        t0 = time.perf_counter()
        with torch_profile(activities=acts) as prof:
            for i in range(3):
                fn(i)
            if cuda:
                torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / 3
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        try:
            table = prof.key_averages().table(sort_by=key, row_limit=30)
        except Exception:  # noqa: BLE001 - newer names
            table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=30)
        return {"profile": f"## {mode} T={T} {dist_name} {routing}/{dispatcher} rank {dist.get_rank()}: "
                           f"wall {wall:.2f} ms/step (3 steps)\n{table}\n"}
    step_ms, comm_ms, count_ms = timed(fn, args.iters, args.warmup, cuda, timer)

    # Per-rank load over the routing sets: rows (token, expert assignments) this rank computes.
    loads = []
    for i in range(n_sets):
        step(i) if not graph else fn(i)
        if graph:
            loads.append(float("nan"))
        else:
            loads.append(float(captured["rows"][2].numel()))
    # This rank's expert compute alone, on the rows it received in the last step.
    x_R, w_R, ids_R = captured["rows"] if not graph else (None, None, None)
    exp_ms = float("nan")
    if x_R is not None:
        xr = x_R.clone().requires_grad_(train)
        dyr = torch.randn_like(x_R)

        def experts_only(i):
            if train:
                y = layer.experts(xr, w_R, ids_R)
                y.backward(dyr)
                xr.grad = None
                for q in layer.experts.parameters():
                    q.grad = None
            else:
                with torch.no_grad():
                    layer.experts(xr, w_R, ids_R)

        exp_ms, _, _ = timed(experts_only, args.iters, args.warmup, cuda)
    mine = [step_ms, comm_ms, exp_ms, statistics.mean(loads), count_ms]
    every = gather_floats(mine, device)
    if cuda:
        torch.cuda.empty_cache()
    loads_r = [r[3] for r in every]
    total = sum(loads_r)
    return {
        "mode": mode, "T": T, "routing": routing, "dispatcher": dispatcher + ("/graph" if graph else ""),
        "dist": dist_name,
        "step_ms": [r[0] for r in every], "comm_ms": [r[1] for r in every],
        "experts_ms": [r[2] for r in every],
        "count_exchange_ms": [r[4] for r in every],
        "load_rows": loads_r, "load_share": [x / total if total else float("nan") for x in loads_r],
        "popularity_rank_share": [float(p[r * E_loc : (r + 1) * E_loc].sum()) for r in range(world)],
    }


def nccl_equality_check(device) -> dict:
    """EP layer (every dispatcher) vs the full layer in one process, fp32, forward and input grad."""
    import copy

    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for routing, disp in (("moge", "moge_a2a"), ("moge", "moge_agrs"), ("topk", "topk_a2a")):
        cfg = from_name("debug", routing=routing)
        torch.manual_seed(0)
        with torch.device(device):
            full = MoGELayer(cfg)
            full.reset_parameters()
            x_all = torch.randn(2 * 64 * world, cfg.hidden_size,
                                generator=torch.Generator(device).manual_seed(1), device=device)
        ep = copy.deepcopy(full)
        apply_expert_parallel(layer_holder(ep), dist.group.WORLD, disp)
        xa = x_all.clone().requires_grad_()
        y_ref, _ = full(xa)
        y_ref.square().sum().backward()
        rows = slice(rank * 128, (rank + 1) * 128)
        x = x_all[rows].clone().requires_grad_()
        y, _ = ep(x)
        y.square().sum().backward()
        diff = max((y - y_ref[rows]).abs().max().item(), (x.grad - xa.grad[rows]).abs().max().item())
        out[f"{routing}/{disp}"] = max(r[0] for r in gather_floats([diff], device))
    return out


def fmt(res):
    if "error" in res:
        return f"| {res.get('label', '')} | error: {res['error']} |"
    f2 = lambda xs: "/".join(f"{x:.3f}" if not math.isnan(x) else "-" for x in xs)
    share = ("/".join(f"{x:.3f}" for x in res["load_share"])
             if not any(math.isnan(x) for x in res["load_share"]) else "-")
    return (f"| {res['mode']} | {res['T']} | {res['dist']} | {res['routing']}/{res['dispatcher']} "
            f"| {share} | "
            f"{f2(res['experts_ms'])} | {f2(res['comm_ms'])} | {max(res['step_ms']):.3f} |")


HEADER = ("| mode | T/rank | routing dist | routing/dispatcher | load share r0/r1 | experts ms r0/r1 | "
          "comm ms r0/r1 | step ms (max) |\n|---|---|---|---|---|---|---|---|")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU/gloo smoke test at tiny shapes")
    ap.add_argument("--out", default=None, help="folder for results.json and table.md")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--train-tokens", default="4096,16384", help="tokens per rank, train mode")
    ap.add_argument("--decode-tokens", default="64,128,256,512", help="tokens per rank, forward only")
    ap.add_argument("--dists", default="uniform,trained-topk,lognormal")
    ap.add_argument("--backend", default="torch", help="kernel backend for the routed experts")
    ap.add_argument("--profile", action="store_true",
                    help="only profile (torch.profiler) a few configurations; "
                         "op tables to --out/profile_rankN.txt")
    args = ap.parse_args()

    cuda = torch.cuda.is_available() and not args.tiny
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    ops.set_backend(args.backend)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 equality check must be exact-ish
    if args.tiny:
        cfg = from_name("debug")
        dtype = torch.float32
        train_T, decode_T = [32], [8]
        args.iters, args.warmup = 2, 1
    else:
        cfg = from_name("pangu-pro-moe-72b")
        dtype = torch.bfloat16
        train_T = [int(t) for t in args.train_tokens.split(",") if t]
        decode_T = [int(t) for t in args.decode_tokens.split(",") if t]
    dists = args.dists.split(",")
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "world": world, "torch": torch.__version__, "backend": args.backend, "dtype": str(dtype),
        "config": cfg.name, "nccl": str(torch.cuda.nccl.version()) if cuda else None,
    }
    with ops.use_backend("loop"):  # exact fp32 reference path on any device
        meta["equality_max_abs_diff"] = nccl_equality_check(device)
    log(json.dumps(meta))
    results = []

    def record(res):
        results.append(res)
        log(fmt(res))
        if rank == 0 and args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)

    if args.profile:
        T_big = train_T[-1]
        todo = [("train", T_big, "topk", "topk_a2a"), ("train", T_big, "moge", "topk_a2a"),
                ("train", T_big, "moge", "moge_a2a"),
                ("forward", decode_T[0], "topk", "topk_a2a"), ("forward", decode_T[0], "moge", "moge_a2a")]
        texts = []
        for mode, T, routing, disp in todo:
            res = run_config(args, cfg, routing, disp, dists[0], T, mode, device, dtype, profile=True)
            texts.append(res["profile"])
            log(res["profile"][:4000])
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"profile_rank{rank}.txt"), "w") as f:
                f.write("\n".join(texts))
        dist.destroy_process_group()
        return
    log(HEADER)
    train_cfgs = [("topk", "topk_a2a"), ("moge", "topk_a2a"), ("moge", "moge_a2a"), ("moge", "moge_agrs")]
    for T in train_T:
        for dname in dists:
            for routing, disp in train_cfgs:
                for mode in ("train", "forward"):
                    try:
                        record(run_config(args, cfg, routing, disp, dname, T, mode, device, dtype))
                    except Exception as e:  # noqa: BLE001
                        record({"error": f"{type(e).__name__}: {str(e)[:300]}",
                                "label": f"{mode} {T} {dname} {routing}/{disp}"})
    for T in decode_T:
        for dname in dists:
            for routing, disp in train_cfgs:
                try:
                    record(run_config(args, cfg, routing, disp, dname, T, "forward", device, dtype))
                except Exception as e:  # noqa: BLE001
                    record({"error": f"{type(e).__name__}: {str(e)[:300]}",
                            "label": f"decode {T} {dname} {routing}/{disp}"})
    # CUDA graphs last: a capture that goes wrong cannot spoil the eager numbers above.
    for T in decode_T if cuda else []:
        for dname in dists[:1]:  # MoGE loads do not depend on the distribution
            for routing, disp, graph in (("moge", "moge_a2a", True), ("moge", "moge_agrs", True)):
                try:
                    record(run_config(args, cfg, routing, disp, dname, T, "forward", device, dtype,
                                      graph=graph))
                except Exception as e:  # noqa: BLE001
                    record({"error": f"{type(e).__name__}: {str(e)[:300]}",
                            "label": f"decode {T} {dname} {routing}/{disp}"})
    if rank == 0 and args.out:
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(HEADER + "\n" + "\n".join(fmt(r) for r in results) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
