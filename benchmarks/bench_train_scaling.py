"""Training throughput across GPUs: FSDP2 x EP layouts (mogelm.parallel), MoGE vs top-k (issue 19).

One torchrun job per GPU count, all writing into the same --out folder; the last one also prints
weak-scaling efficiency against the 1-GPU file (same model, same tokens per GPU):

    NCCL_NVLS_ENABLE=0 PYTHONPATH=src torchrun --standalone --nproc-per-node 1 \\
        benchmarks/bench_train_scaling.py --out benchmarks/results/train_scaling
    NCCL_NVLS_ENABLE=0 PYTHONPATH=src torchrun --standalone --nproc-per-node 2 \\
        benchmarks/bench_train_scaling.py --out benchmarks/results/train_scaling
    NCCL_NVLS_ENABLE=0 PYTHONPATH=src torchrun --standalone --nproc-per-node 4 \\
        benchmarks/bench_train_scaling.py --out benchmarks/results/train_scaling
    # CPU smoke test (gloo, tiny model, each path once; about a minute on 2 cores):
    PYTHONPATH=src .venv/bin/torchrun --standalone --nproc-per-node 2 \\
        benchmarks/bench_train_scaling.py --quick --out /tmp/scaling

What one job measures, for each model x routing x layout (the layouts: every --ep dividing the
world and the expert groups, with --fsdp = world; --layouts to choose):
  step ms        median over --iters training steps after --warmup (CUDA events; the slowest rank):
                 forward + loss + backward + gradient clipping + AdamW, bf16 autocast, exactly the
                 pieces `mogelm train` runs (mogelm.train.context, mogelm.parallel)
  tokens/s/GPU   batch x seq / step, per GPU
  model TFLOP/s  tokens/s x training FLOPs per token (mogelm.info.flops_per_token: 3 x (matmul +
                 causal attention)); MFU = that / the dense bf16 GEMM rate measured in the same run
                 (torch.mm 8192^3, median of triton.testing.do_bench)
  comm ms        per rank, the time inside the expert-parallel dispatch/combine collectives
                 (forward and backward; it includes waiting for a slower rank), from the
                 dispatchers' injected comm_timer; min / max over ranks. FSDP2's all-gathers and
                 reduce-scatters run on their own streams and are not in it.
  rows           (token, expert) assignments each rank's experts computed per step (forward):
                 the per-GPU load; "busiest/mean" in the table
  peak GiB       torch.cuda.max_memory_allocated per rank, beside `mogelm info`'s estimate for the
                 same layout (mogelm.info.training_memory)
Routing: "moge" (equal-split all-to-all) and "topk" (count exchange + variable all-to-all) with
the router logits shifted by log p_e + Gumbel noise, p_e = the expert shares of a trained top-k
router (TRAINED_TOPK_SHARES, as in bench_expert_parallel.py), so top-k's per-GPU load is a trained
router's rather than a fresh one's near-uniform load. Overlap of the expert-parallel
communication with computation is not implemented; the JSON says so.

Models (--models): "0.91b" (hidden 2048, 16 layers, 16/4 heads of 128, 64 experts of 512 in 8
groups, shared expert 2048, vocab 32768: 3.73 B parameters, 0.908 B active; the issue's model) and
"72b-width" (Pangu Pro MoE widths: hidden 5120, 40/8 heads, 64 experts of 1344, shared 5376,
vocab 32768, --layers-72b layers, default 2). Predictions: benchmarks/notes_train_scaling.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mogelm.config import ModelConfig, from_name
from mogelm.info import flops_per_token, training_memory
from mogelm.model import Transformer
from mogelm.parallel.context import ParallelContext, validate_layout
from mogelm.train import TrainConfig, build_model, build_optimizer
from mogelm.train.context import DistributedContext

# Expert shares (they sum to K = 4) of layer 0 of a trained top-k model, the same numbers as
# bench_expert_parallel.py (mogelm `debug` preset, routing=topk, 60 steps on the stdlib corpus).
TRAINED_TOPK_SHARES = [0.4432, 0.5507, 0.6869, 0.6215, 0.5718, 0.3576, 0.4798, 0.2885]
GIB = 2**30


def model_config(name: str, layers_72b: int) -> ModelConfig:
    if name == "0.91b":
        return ModelConfig(vocab_size=32768, hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=4,
                           head_dim=128, rope_theta=1.6e7, max_seq_len=4096, num_experts=64, num_groups=8,
                           num_experts_per_tok=8, moe_intermediate_size=512,
                           shared_expert_intermediate_size=2048, name="0.91b")
    if name == "72b-width":
        return ModelConfig(vocab_size=32768, hidden_size=5120, num_layers=layers_72b, num_heads=40,
                           num_kv_heads=8, head_dim=128, rope_theta=1.6e7, max_seq_len=4096, num_experts=64,
                           num_groups=8, num_experts_per_tok=8, moe_intermediate_size=1344,
                           shared_expert_intermediate_size=5376, name="72b-width")
    if name == "tiny":  # the CPU smoke test: the debug preset with 8 groups of 2 experts
        return from_name("debug", num_experts=16, num_groups=8, num_experts_per_tok=8).replace(name="tiny")
    raise ValueError(f"unknown model {name!r}")


class CommTimer:
    """Time inside the dispatchers' collectives during a step (CUDA events or the clock)."""

    def __init__(self, cuda: bool):
        self.cuda, self.spans, self.open = cuda, [], None

    def begin(self, what):
        if self.cuda:
            self.open = torch.cuda.Event(enable_timing=True)
            self.open.record()
        else:
            self.open = time.perf_counter()

    def end(self, what):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.spans.append((self.open, e))
        else:
            self.spans.append((self.open, time.perf_counter()))

    def total_ms(self) -> float:
        if self.cuda:
            return sum(a.elapsed_time(b) for a, b in self.spans)
        return sum(b - a for a, b in self.spans) * 1e3

    def reset(self):
        self.spans = []


def trained_router_bias(model, shares: list[float], seed: int, device):
    """Forward hooks on every router GEMM: logits + log p_e + Gumbel noise (a trained router's
    expert popularity, drawn on the device); returns the counter {layer: (token, expert)
    assignments this rank's experts computed}."""
    rows: dict[int, int] = {}
    for i, layer in enumerate(model.moe_layers()):
        E = layer.cfg.num_experts
        p = torch.tensor(shares).repeat_interleave(math.ceil(E / len(shares)))[:E]
        log_p = (p / p.sum()).log().to(device)
        gen = torch.Generator(device=device).manual_seed(seed + i)

        def hook(module, args, out, log_p=log_p, gen=gen):
            u = torch.rand(out.shape, generator=gen, device=out.device).clamp_(1e-9, 1 - 1e-9)
            return out + (log_p - (-u.log()).log()).to(out.dtype)

        layer.gate.register_forward_hook(hook)

        def count(module, args, out, i=i):
            rows[i] = rows.get(i, 0) + int(args[2].numel())  # experts(x, weights, ids)

        layer.experts.register_forward_hook(count)
    return rows


def dense_rate(device: torch.device, quick: bool) -> float:
    """Dense GEMM FLOP/s measured now: bf16 8192^3 on CUDA (do_bench median), fp32 on the CPU."""
    n = 512 if quick or device.type != "cuda" else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    if device.type == "cuda":
        from triton.testing import do_bench

        ms = do_bench(lambda: torch.mm(a, b), warmup=50, rep=200, return_mode="median")
    else:
        torch.mm(a, b)
        t0 = time.perf_counter()
        for _ in range(5):
            torch.mm(a, b)
        ms = (time.perf_counter() - t0) / 5 * 1e3
    return 2 * n**3 / (ms / 1e3)


def gather(value: float, device) -> list[float]:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [x.item() for x in out]


def run_one(args, cfg: ModelConfig, routing: str, ep: int, fsdp: int, device, rate: float) -> dict:
    world, cuda = dist.get_world_size(), device.type == "cuda"
    cfg = cfg.replace(routing=routing, max_seq_len=max(cfg.max_seq_len, args.seq_len))
    timer = CommTimer(cuda)
    # Initial weights drawn on the GPU (the CPU draws that reproduce a one-process build exactly
    # take minutes per rank at these sizes; throughput does not depend on them).
    pctx = ParallelContext(ep_size=ep, fsdp_size=fsdp, device=device, comm_timer=timer,
                           init_draws_on="device")
    ctx = DistributedContext(pctx)
    if ctx.builds_on_meta:
        model = ctx.parallelize(build_model(cfg, 0, "meta"))
    else:  # one GPU, or DP x EP: built on the GPU directly (same reason)
        torch.manual_seed(0)
        with torch.device(device):
            model = ctx.parallelize(Transformer(cfg))
    model.train()
    shares = TRAINED_TOPK_SHARES if routing == "topk" else [1.0]  # MoGE: the same noise, uniform p
    rows = trained_router_bias(model, shares, 1000 + dist.get_rank(), device)
    opt = build_optimizer(model, TrainConfig(lr=1e-4, optim_state_dtype=args.optim_state_dtype))
    gen = torch.Generator().manual_seed(dist.get_rank())
    autocast = torch.bfloat16 if cuda else None

    def step():
        ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen).to(device)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = model(ids[:, :-1], return_stats=True)
            ce = F.cross_entropy(out.logits.float().view(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
            loss = ce + out.aux_loss
        loss.backward()
        ctx.sync_gradients(model)
        ctx.clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    steps, comms = [], []
    rows.clear()
    for _ in range(args.iters):
        timer.reset()
        dist.barrier()
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            steps.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            step()
            steps.append((time.perf_counter() - t0) * 1e3)
        comms.append(timer.total_ms())
    step_ms = max(gather(statistics.median(steps), device))  # the slowest rank sets the pace
    comm = gather(statistics.median(comms), device)
    rows_per_step = gather(sum(rows.values()) / args.iters, device)
    peak = gather(torch.cuda.max_memory_allocated(device) if cuda else 0, device)
    tokens = args.batch_size * args.seq_len
    fl = flops_per_token(cfg, args.seq_len)
    tok_s = tokens / (step_ms / 1e3)
    est = training_memory(cfg, nproc=world, ep=ep, fsdp=fsdp, batch_size=args.batch_size,
                          seq_len=args.seq_len, optim_state=args.optim_state_dtype,
                          precision="bf16" if cuda else "fp32", experts="triton" if cuda else "torch")
    res = {
        "model": cfg.name, "routing": routing, "world": world, "ep": ep, "fsdp": fsdp, "layout": ctx.layout,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "step_ms": step_ms,
        "tokens_per_s_per_gpu": tok_s, "model_tflops_per_gpu": tok_s * fl["training"] / 1e12,
        "mfu": tok_s * fl["training"] / rate, "comm_ms_per_rank": comm, "rows_per_rank": rows_per_step,
        "peak_gib_per_rank": [p / GIB for p in peak], "estimate_gib": est["total"] / GIB,
        "overlap": "not implemented",
    }
    model.zero_grad(set_to_none=True)
    opt.state.clear()
    if cuda:
        torch.cuda.empty_cache()
    return res


def layouts(args, world: int, cfg: ModelConfig) -> list[tuple[int, int]]:
    if args.layouts:
        pairs = [tuple(int(x) for x in item.split("x")) for item in args.layouts.split(",")]
    else:
        pairs = [(ep, world) for ep in (1, 2, 4, 8) if ep <= world and world % ep == 0
                 and cfg.num_groups % ep == 0]
    out = []
    for ep, fsdp in pairs:
        validate_layout(world, ep, fsdp)
        out.append((ep, fsdp))
    return out


def fmt_row(r: dict) -> str:
    comm = r["comm_ms_per_rank"]
    rows = r["rows_per_rank"]
    peak = r["peak_gib_per_rank"]
    balance = f"{max(rows) / max(1e-9, sum(rows) / len(rows)):.2f}" if rows and sum(rows) else "-"
    return (f"| {r['model']} | {r['routing']} | {r['world']} | EP {r['ep']} FSDP {r['fsdp']} | "
            f"{r['step_ms']:.1f} | {r['tokens_per_s_per_gpu']:,.0f} | {r['model_tflops_per_gpu']:.1f} | "
            f"{100 * r['mfu']:.1f} % | "
            f"{min(comm):.1f} / {max(comm):.1f} | {balance} | {max(peak):.1f} / {r['estimate_gib']:.1f} |")


def weak_scaling(out_dir: Path) -> list[str]:
    """Tokens/s per GPU at N GPUs over the 1-GPU run, same model, routing and layout kind."""
    runs = {}
    for f in sorted(out_dir.glob("scaling_w*.json")):
        for r in json.loads(f.read_text())["results"]:
            runs[(r["model"], r["routing"], r["world"], r["ep"], r["fsdp"])] = r
    lines = []
    for (model, routing, world, ep, fsdp), r in sorted(runs.items()):
        base = runs.get((model, routing, 1, 1, 1))
        if base is None or world == 1:
            continue
        eff = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
        lines.append(f"| {model} | {routing} | {world} | EP {ep} FSDP {fsdp} | {100 * eff:.1f} % |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for scaling_w{N}.json and table_w{N}.md")
    ap.add_argument("--quick", action="store_true", help="tiny model, each path once (smoke test)")
    ap.add_argument("--models", default="0.91b,72b-width")
    ap.add_argument("--routings", default="moge,topk")
    ap.add_argument("--layouts", default="",
                    help="EPxFSDP pairs, e.g. 1x4,2x4,4x4 (default: every EP, FSDP = world)")
    ap.add_argument("--layers-72b", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per GPU per step (default 8)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--optim-state-dtype", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args()
    if args.quick:
        args.models, args.batch_size, args.seq_len, args.iters, args.warmup = "tiny", 2, 32, 1, 1
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=600))
    world, rank = dist.get_world_size(), dist.get_rank()
    out_dir = Path(args.out)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    rate = min(gather(dense_rate(device, args.quick), device))
    results = []
    for name in args.models.split(","):
        cfg = model_config(name, args.layers_72b)
        for routing in args.routings.split(","):
            for ep, fsdp in layouts(args, world, cfg):
                r = run_one(args, cfg, routing, ep, fsdp, device, rate)
                results.append(r)
                if rank == 0:
                    print(fmt_row(r), flush=True)
    if rank == 0:
        meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "world": world,
                "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "dense_rate_tflops": rate / 1e12, "args": vars(args)}
        data = json.dumps({"meta": meta, "results": results}, indent=2)
        (out_dir / f"scaling_w{world}.json").write_text(data)
        header = ("| model | routing | GPUs | layout | step ms | tokens/s/GPU | TFLOP/s/GPU | MFU "
                  "| comm ms min / max | busiest/mean rows | peak / est. GiB |\n"
                  "|---|---|---|---|---|---|---|---|---|---|---|")
        table = [f"Dense rate measured in this run: {rate / 1e12:.1f} TFLOP/s ({meta['device']}, "
                 f"{meta['date']})", "", header, *[fmt_row(r) for r in results]]
        eff = weak_scaling(out_dir)
        if eff:
            table += ["", "Weak scaling (tokens/s per GPU over the 1-GPU run):", "",
                      "| model | routing | GPUs | layout | efficiency |", "|---|---|---|---|---|", *eff]
        (out_dir / f"table_w{world}.md").write_text("\n".join(table) + "\n")
        print("\n".join(table))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
