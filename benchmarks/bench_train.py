"""Training-step benchmark on one GPU (issue 17): tokens/s, model TFLOP/s and MFU of whole training
steps with every lever on and off, and the routed experts' grouped GEMMs forward and backward.

    python benchmarks/bench_train.py --out benchmarks/results/train_h200_DATE    # full, ~6 min on an H200
    python benchmarks/bench_train.py --quick --out /tmp/bench_train             # smoke, ~1.5 min
    TRITON_INTERPRET=1 python benchmarks/bench_train.py --smoke --out /tmp/bt   # CPU, toy sizes: the paths

In one run, written to <out>/bench_train.json (every number), <out>/profile_best.txt (torch.profiler
table of the fastest configuration: top 15 ops by CUDA time) and a table printed last:
 1. ceilings: dense bf16 GEMM rate (8192^3 matmul) and device copy bandwidth;
 2. the routed experts' grouped GEMMs at T = 8192 and 32768 tokens (0.91B-model shapes D 2048,
    F 512 and Pangu shapes D 5120, F 1344; 64 experts, MoGE top-1 in 8 groups, K = 8): forward and
    backward TFLOP/s of each GEMM variant (kernels/triton_grouped.py) and of the previous path
    (Triton forward, PyTorch backward), the backward's four kernels one by one, and
    torch._grouped_mm; each against the dense rate;
 3. training steps (forward, chunked loss, backward, clipping, AdamW, step statistics; batch
    8 x 2,048 tokens, bf16 autocast, fp32 master weights): the 0.91B-active MoGE model (hidden
    2048, 16 layers, 16 query heads of 128 with 4 KV heads, 64 experts of 512 in 8 groups, shared
    expert 2048, vocab 32768: 3.73 B parameters, 0.908 B active) and a 72B-width MoGE block stack
    (hidden 5120, 40/8 heads, 64 experts of 1344, shared 5376) at 2 layers with vocab 32768; MoGE
    and top-k; the previous version (every lever off) and every lever off one at a time;
 4. the profile of the fastest 0.91B configuration.

Model FLOPs per token = 6 * N_active + 6 * L * H * hd * S (N_active from config.count_parameters,
embedding and LM head included as in the issue's 139 TFLOP/s; causal attention: QK^T and PV over
S/2 keys on average, 2 * 2 * hd FLOPs per key and head, times 3 for forward + backward). The "6N"
columns leave attention out (the issue's convention). Recomputation under activation
checkpointing is not counted (MFU, not hardware FLOP utilisation). MFU = model FLOP/s / the dense
bf16 GEMM rate measured in the same run.
"""

# ruff: noqa: B023  (every lambda below is timed before its loop variables change)
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from mogelm.config import ModelConfig, count_parameters
from mogelm.kernels import ops, torch_impl
from mogelm.kernels import triton_grouped as tg
from mogelm.kernels import triton_moe as tm

T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


# ----------------------------------------------------------------------------------------------
# Timing and ceilings
# ----------------------------------------------------------------------------------------------

def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_ms(fn, rep_ms: float = 100.0) -> float:
    """Median ms of fn (triton do_bench, L2 flushed) on CUDA; one timed call on the CPU."""
    if not torch.cuda.is_available():
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def ceilings(smoke: bool) -> dict:
    if smoke:
        return {"dense_tflops": 1.0, "copy_gbs": 1.0}
    n = 1 << 30
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    bw = 2 * src.numel() * 2 / ms / 1e6
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b)
    return {"dense_tflops": 2 * 8192**3 / ms / 1e9, "copy_gbs": bw}


# ----------------------------------------------------------------------------------------------
# 2. Grouped GEMMs of the routed experts
# ----------------------------------------------------------------------------------------------

GEMM_SHAPES = {"0.91b": dict(D=2048, F=512, E=64, G=8), "pangu": dict(D=5120, F=1344, E=64, G=8)}
SMOKE_GEMM = {"tiny": dict(D=64, F=32, E=8, G=4)}


def gemm_problem(s: dict, T: int, dev: str, dtype):
    torch.manual_seed(T)
    D, F, E = s["D"], s["F"], s["E"]
    w, ids, _ = torch_impl.moge_route(torch.randn(T, E, device=dev), s["G"], 1, None, False, None)
    x = torch.randn(T, D, device=dev, dtype=dtype)
    gate_up = (torch.randn(E, 2 * F, D, device=dev) / D**0.5).to(dtype)
    down = (torch.randn(E, D, F, device=dev) / F**0.5).to(dtype)
    return x, w, ids, gate_up, down


def bench_gemms(shape_name: str, s: dict, T: int, variants: list[str], dense: float, dev: str, dtype,
                per_kernel: bool) -> list[dict]:
    """Forward and backward of the routed experts at T tokens: every variant, the previous path,
    torch._grouped_mm; TFLOP/s against the dense rate."""
    x, w, ids, gate_up, down = gemm_problem(s, T, dev, dtype)
    D, F, E = s["D"], s["F"], s["E"]
    K = ids.shape[1]
    S = T * K
    fwd_flop, bwd_flop = 6 * S * D * F, 12 * S * D * F
    dy = torch.randn(T, D, device=dev, dtype=dtype)
    rows = []

    def add(path, fwd_ms=None, bwd_ms=None, **extra):
        r = {"shape": shape_name, "tokens": T, "path": path, **extra}
        for kind, ms, flop in (("fwd", fwd_ms, fwd_flop), ("bwd", bwd_ms, bwd_flop)):
            if ms is not None:
                r.update({f"{kind}_ms": ms, f"{kind}_tflops": flop / ms / 1e9,
                          f"{kind}_pct_dense": 100 * flop / ms / 1e9 / dense})
        rows.append(r)
        text = " ".join(f"{k} {r[k + '_ms']:8.3f} ms {r[k + '_tflops']:6.1f} TF/s "
                        f"({r[k + '_pct_dense']:4.1f} %)" for k in ("fwd", "bwd") if k + "_ms" in r)
        log(f"  {shape_name} T={T} {path:28s} {text}" + (f" {extra}" if extra else ""))

    rep = 60 if T <= 8192 else 150
    cfg = tm.train_configs(S, D, F, E, tm._device_name(x))
    # previous version: inference forward (tuned tables) and the PyTorch backward
    try:
        f_ms = bench_ms(lambda: tm.routed_experts_forward(x, w, ids, gate_up, down), rep)
        b_ms = bench_ms(lambda: tm._torch_backward(dy, x, w, ids, gate_up, down), rep)
        add("previous (triton fwd, torch bwd)", f_ms, b_ms)
    except Exception as exc:  # noqa: BLE001 - one failing path must not end the run
        add("previous (triton fwd, torch bwd)", error=f"{type(exc).__name__}: {exc}"[:300])
    for vname in variants:
        v = tg.GemmVariant.parse(vname)
        try:
            tg._BROKEN.clear()
            _, kept = tg.forward(x, w, ids, gate_up, down, cfg, v)
            f_ms = bench_ms(lambda: tg.forward(x, w, ids, gate_up, down, cfg, v), rep)
            b_ms = bench_ms(lambda: tg.backward(dy, x, w, gate_up, down, kept, cfg, v), rep)
            extra = {"fell_back": tg.broken_variants()[vname]} if vname in tg.broken_variants() else {}
            add(f"triton_grouped {vname}", f_ms, b_ms, **extra)
            if per_kernel and vname == variants[0]:
                bench_backward_kernels(shape_name, T, x, w, dy, gate_up, down, kept, cfg, v, dense, rows)
        except Exception as exc:  # noqa: BLE001
            add(f"triton_grouped {vname}", error=f"{type(exc).__name__}: {exc}"[:300])
    # torch._grouped_mm over rows already sorted by expert (no gather / combine), autograd backward
    try:
        order, _, offsets = torch_impl.permute(ids, E)
        x_S = x.index_select(0, order // K).detach().requires_grad_()
        gu_l, dn_l = gate_up.detach().requires_grad_(), down.detach().requires_grad_()
        dy_S = torch.randn(S, D, device=dev, dtype=dtype)
        f_ms = bench_ms(lambda: torch_impl.grouped_swiglu(x_S, gu_l, dn_l, offsets), rep)
        fb_ms = bench_ms(lambda: torch.autograd.grad(torch_impl.grouped_swiglu(x_S, gu_l, dn_l, offsets),
                                                     [x_S, gu_l, dn_l], dy_S), rep)
        add("torch._grouped_mm (sorted rows)", f_ms, max(fb_ms - f_ms, 1e-6))
    except Exception as exc:  # noqa: BLE001
        add("torch._grouped_mm (sorted rows)", error=f"{type(exc).__name__}: {exc}"[:300])
    return rows


def bench_backward_kernels(shape_name, T, x, w, dy, gate_up, down, saved, cfg, v, dense, rows):
    """The backward's four GEMMs one by one (inputs made once)."""
    E, F2, D = gate_up.shape
    F = F2 // 2
    K = w.shape[1]
    S = T * K
    plan, h, gu = saved.plan, saved.h_PF, saved.gu_P2F
    w_S = w.reshape(-1).float().contiguous()
    seg = tg.segments(plan, E)
    dgu, _ = tg.launch_down_dgrad(dy, down, gu, w_S, plan, K, cfg.down_dgrad, v)
    kernels = {
        "down_dgrad (dy @ down, SwiGLU bwd)": (2 * S * D * F,
                                                lambda: tg.launch_down_dgrad(dy, down, gu, w_S, plan, K,
                                                                             cfg.down_dgrad, v)),
        "dx (dgu @ gate_up)": (4 * S * D * F, lambda: tg.launch_dx(dgu, gate_up, plan, S, cfg.dx, v)),
        "wgrad down (dy^T hw)": (2 * S * D * F,
                                 lambda: tg.launch_wgrad(dy, True, h, False, plan, seg, S, K, E,
                                                         cfg.wgrad_down, v, down.dtype)),
        "wgrad gate_up (dgu^T x)": (4 * S * D * F,
                                    lambda: tg.launch_wgrad(dgu, False, x, True, plan, seg, S, K, E,
                                                            cfg.wgrad_gate_up, v, gate_up.dtype)),
        "forward gate_up (+SwiGLU, gate weight)": (
            4 * S * D * F, lambda: tg.launch_gate_up(x, gate_up, plan, K, cfg.gate_up, v, True, w_S)),
        "forward down": (2 * S * D * F, lambda: tg.launch_down(h, down, None, plan, S, cfg.down, v)),
    }
    for name, (flop, fn) in kernels.items():
        ms = bench_ms(fn)
        rows.append({"shape": shape_name, "tokens": T, "path": f"kernel: {name}", "variant": str(v), "ms": ms,
                     "tflops": flop / ms / 1e9, "pct_dense": 100 * flop / ms / 1e9 / dense})
        log(f"    kernel {name:38s} {ms:8.3f} ms {flop / ms / 1e9:6.1f} TF/s "
            f"({100 * flop / ms / 1e9 / dense:4.1f} % dense)")


def tune(out: Path, dense: float, dev: str, smoke: bool) -> dict:
    """Tile sweep of the six training GEMMs at the 0.91B model's step (T = 16384 tokens): writes
    <out>/train_configs.json, the "train" section of a kernels/configs/<device>.json table."""
    from mogelm.kernels.triton_common import GemmConfig

    s, T = (SMOKE_GEMM["tiny"], 64) if smoke else (GEMM_SHAPES["0.91b"], 16384)
    dtype = torch.float32 if smoke else torch.bfloat16
    x, w, ids, gate_up, down = gemm_problem(s, T, dev, dtype)
    D, F, E = s["D"], s["F"], s["E"]
    K = ids.shape[1]
    S = T * K
    base = tm.train_configs(S, D, F, E, tm._device_name(x))
    v = tg.GemmVariant()
    _, kept = tg.forward(x, w, ids, gate_up, down, base, v)
    plan, h, gu = kept.plan, kept.h_PF, kept.gu_P2F
    w_S = w.reshape(-1).float().contiguous()
    seg = tg.segments(plan, E)
    dy = torch.randn(T, D, device=dev, dtype=dtype)
    dgu, _ = tg.launch_down_dgrad(dy, down, gu, w_S, plan, K, base.down_dgrad, v)
    bm = base.block_m
    runs = {
        "gate_up": lambda c: tg.launch_gate_up(x, gate_up, plan, K, c, v, True, w_S),
        "down": lambda c: tg.launch_down(h, down, None, plan, S, c, v),
        "down_dgrad": lambda c: tg.launch_down_dgrad(dy, down, gu, w_S, plan, K, c, v),
        "dx": lambda c: tg.launch_dx(dgu, gate_up, plan, S, c, v),
        "wgrad_down": lambda c: tg.launch_wgrad(dy, True, h, False, plan, seg, S, K, E, c, v, dtype),
        "wgrad_gate_up": lambda c: tg.launch_wgrad(dgu, False, x, True, plan, seg, S, K, E, c, v, dtype),
    }
    row = [GemmConfig(bm, n, k, 8, wp, st) for n, k, wp, st in
           ((64, 64, 4, 4), (128, 64, 8, 3), (128, 64, 4, 4), (256, 64, 8, 3), (128, 128, 8, 2),
            (64, 128, 4, 3))]
    wgrad = [GemmConfig(m, n, min(k, bm), 1, wp, st) for m, n, k, wp, st in
             ((128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 3), (128, 64, 64, 4, 4),
              (128, 256, 64, 8, 3), (64, 64, 64, 4, 4))]
    if smoke:
        interp = tg.heuristic_train_configs(None, None)
        row, wgrad = [interp.gate_up], [interp.wgrad_down]
    best, ms = {}, {}
    for name, fn in runs.items():
        cands = [getattr(base, name)] + (wgrad if name.startswith("wgrad") else row)
        if name == "gate_up":  # two fp32 accumulators: keep to tiles whose registers fit
            cands = [c for c in cands if c.block_n <= 128]
        timed = []
        for c in cands:
            try:
                timed.append((bench_ms(lambda: fn(c)), c))
            except Exception as exc:  # noqa: BLE001 - a tile that does not fit or compile
                log(f"  tune {name} {c}: {type(exc).__name__}")
        t_best, c_best = min(timed, key=lambda tc: tc[0])
        best[name], ms[name] = dataclasses.asdict(c_best), t_best
        log(f"  tune {name:14s} best {t_best:7.3f} ms (base {timed[0][0]:7.3f}) {c_best}")
    table = {"train": {f"E={E},F={F},D={D}": {str(S): {**best, "ms": ms}}}}
    (out / "train_configs.json").write_text(json.dumps(table, indent=1))
    return table


# ----------------------------------------------------------------------------------------------
# 3. Training steps
# ----------------------------------------------------------------------------------------------

def model_091b(routing: str = "moge", layers: int = 16) -> ModelConfig:
    return ModelConfig(vocab_size=32768, hidden_size=2048, num_layers=layers, num_heads=16, num_kv_heads=4,
                       head_dim=128, rope_theta=1.6e7, max_seq_len=2048, num_experts=64, num_groups=8,
                       num_experts_per_tok=8, moe_intermediate_size=512, shared_expert_intermediate_size=2048,
                       routing=routing, name="0.91b-active")


def model_72b_width(routing: str = "moge", layers: int = 2) -> ModelConfig:
    return ModelConfig(vocab_size=32768, hidden_size=5120, num_layers=layers, num_heads=40, num_kv_heads=8,
                       head_dim=128, rope_theta=1.6e7, max_seq_len=2048, num_experts=64, num_groups=8,
                       num_experts_per_tok=8, moe_intermediate_size=1344,
                       shared_expert_intermediate_size=5376, routing=routing, name=f"72b-width-{layers}l")


def model_smoke(routing: str = "moge") -> ModelConfig:
    return ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       rope_theta=1e4, max_seq_len=64, num_experts=8, num_groups=4, num_experts_per_tok=4,
                       moe_intermediate_size=16, shared_expert_intermediate_size=32, routing=routing,
                       name="smoke")


@dataclass(frozen=True)
class Levers:
    expert_backward: str = "triton"  # ops.TrainOptions.expert_backward: triton | torch
    fused: str = "triton"  # norm / RoPE / SwiGLU: triton | compile | torch
    loss: str = "chunked"  # chunked | torch
    stats: str = "device"  # device (train/stats.py) | sync (float() per micro-batch + step_balance)
    variant: str = "default"  # grouped GEMM variant
    ckpt: str = "none"  # activation checkpointing: none | moe | full
    adamw: str = "foreach"  # foreach | fused (build_optimizer's choice on CUDA since 2026-12-02)

    def describe(self) -> str:
        return ",".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


PREVIOUS = Levers(expert_backward="torch", fused="torch", loss="torch", stats="sync")
ALL_ON = Levers()


def flops_per_token(cfg: ModelConfig, seq: int) -> tuple[float, float]:
    """(6 N_active + causal attention, 6 N_active) FLOPs per trained token."""
    _, active = count_parameters(cfg)
    return 6 * active + 6 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq, 6 * active


def build(cfg: ModelConfig, lv: Levers, dev: str):
    from mogelm.model import Transformer
    from mogelm.train import TrainConfig, build_optimizer

    torch.manual_seed(0)
    with torch.device(dev):
        model = Transformer(cfg)
    model.train()
    model.set_activation_checkpointing(lv.ckpt)
    tc = TrainConfig()
    opt = build_optimizer(model, tc)  # what `mogelm train` builds (its param groups, decay rules)
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
    # the lever decides the implementation, so "previous" keeps the foreach AdamW it was measured with
    opt = torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=1e-8,
                            **({"fused": True} if lv.adamw == "fused" else {"foreach": True}))
    return model, opt


def make_step(model, opt, cfg: ModelConfig, lv: Levers, batches, dev: str):
    """One training step as mogelm.train's loop runs it (grad_accum 1), with the chosen levers."""
    from mogelm.analysis.metrics import step_balance
    from mogelm.train.context import LocalContext
    from mogelm.train.stats import StepStats

    tokens = batches[0][0].numel()
    stats = StepStats(cfg.num_experts, (8, 4), 1, tokens, torch.device(dev), cfg.is_moe)
    ctx = LocalContext(dev)
    amp = dict(device_type=dev, dtype=torch.bfloat16, enabled=dev == "cuda")
    losses = []

    def step(i: int) -> None:
        x_BT, y_BT = batches[i % len(batches)]
        for g in opt.param_groups:
            g["lr"] = 1e-4
        with torch.autocast(**amp):
            out = model(x_BT, return_stats=True, head=False)
            ce = ops.linear_cross_entropy(out.hidden, model.lm_head.weight, y_BT)
            loss = ce + out.aux_loss
        loss.backward()
        if lv.stats == "sync":  # the loop before issue 17: host reads every micro-batch
            losses.append(float(ce.detach()))
            float(out.aux_loss.detach())
        else:
            stats.add_micro(ce, out.aux_loss, out.layer_stats)
        grad_norm = ctx.clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if lv.stats == "sync":
            if cfg.is_moe:
                step_balance(out.layer_stats, cfg.num_experts, (8, 4))
        else:
            stats.end_step(i + 1, 1e-4, grad_norm)
            if (i + 1) % 10 == 0:
                losses.extend(r["loss"] for r in stats.flush(ctx)[0])

    def finish() -> list[float]:
        losses.extend(r["loss"] for r in stats.flush(ctx)[0])
        return losses

    return step, finish


def train_run(label: str, cfg: ModelConfig, lv: Levers, batch: int, seq: int, warmup: int, steps: int,
              dense: float, dev: str, profile_to: Path | None = None) -> dict:
    ops.set_options(expert_backward=lv.expert_backward, fused=lv.fused, loss=lv.loss, gemm_variant=lv.variant)
    row = {"label": label, "model": cfg.name, "routing": cfg.routing, "layers": cfg.num_layers,
           **dataclasses.asdict(lv), "batch": batch, "seq": seq}
    model = opt = None
    try:
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model, opt = build(cfg, lv, dev)
        gen = torch.Generator(device=dev).manual_seed(1)
        batches = []
        for _ in range(3):
            ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=dev, generator=gen)
            batches.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
        step, finish = make_step(model, opt, cfg, lv, batches, dev)
        t = time.perf_counter()
        step(0)
        sync()
        row["first_step_s"] = time.perf_counter() - t  # includes compiling kernels
        for i in range(1, warmup):
            step(i)
        sync()
        t = time.perf_counter()
        for i in range(warmup, warmup + steps):
            step(i)
        sync()
        dt = time.perf_counter() - t
        losses = finish()
        tokens = batch * seq
        f_all, f_6n = flops_per_token(cfg, seq)
        tok_s = tokens * steps / dt
        row.update(step_ms=1e3 * dt / steps, tokens_per_s=tok_s, tflops=tok_s * f_all / 1e12,
                   tflops_6n=tok_s * f_6n / 1e12, mfu=100 * tok_s * f_all / 1e12 / dense,
                   mfu_6n=100 * tok_s * f_6n / 1e12 / dense, loss_first=losses[0] if losses else None,
                   loss_last=losses[-1] if losses else None,
                   peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else 0.0,
                   gemm_fell_back=tg.broken_variants().get(lv.variant))
        log(f"  {label:44s} {row['step_ms']:8.1f} ms/step {tok_s:9.0f} tok/s {row['tflops']:6.1f} TF/s "
            f"MFU {row['mfu']:5.1f} % (6N {row['mfu_6n']:5.1f} %) loss {row['loss_first']:.4f} "
            f"mem {row['peak_mem_gb']:.0f} GB")
        if profile_to is not None:
            row["profile"] = profile(step, warmup + steps, profile_to, dev)
    except Exception as exc:  # noqa: BLE001 - record it, keep going
        row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        log(f"  {label}: FAILED {row['error']}")
        traceback.print_exc(limit=3)
    finally:
        del model, opt
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
        ops.set_options(**dataclasses.asdict(ops.TrainOptions()))
    return row


def profile(step, start: int, path: Path, dev: str) -> list[dict]:
    """torch.profiler over 2 steps: the top 15 ops by self device time, as a table file and rows."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        for i in range(start, start + 2):
            step(i)
        sync()
    events = prof.key_averages()
    if dev == "cuda":
        key = next((k for k in ("self_device_time_total", "self_cuda_time_total") if len(events)
                    and hasattr(events[0], k)), "self_cuda_time_total")
    else:
        key = "self_cpu_time_total"
    try:
        table = events.table(sort_by=key, row_limit=15)
    except Exception:  # noqa: BLE001 - the other name of the same sort key
        table = events.table(sort_by=key.replace("device", "cuda"), row_limit=15)
    path.write_text(table)
    total = sum(getattr(e, key) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:15]
    return [{"op": e.key[:120], "calls": e.count // 2, "ms_per_step": getattr(e, key) / 2e3,
             "share_pct": 100 * getattr(e, key) / total} for e in top]


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for bench_train.json and profile_best.txt")
    ap.add_argument("--quick", action="store_true", help="each path once at small size (~1.5 min)")
    ap.add_argument("--smoke", action="store_true", help="CPU run of the script's paths at toy sizes")
    ap.add_argument("--variants", default="default,persistent,tma,persistent+tma",
                    help="grouped GEMM variants to time (ws compiles to the same binary as without on "
                    "triton 3.6 / sm_90)")
    ap.add_argument("--sections", default="gemm,train,profile",
                    help="comma list of gemm, train, profile, tune (tune: tile sweep of the training GEMMs "
                    "at the 0.91B step, ~1-2 min, writes train_configs.json for kernels/configs/)")
    ap.add_argument("--budget-s", type=float, default=0, help="skip optional configurations past this "
                    "many seconds (default: 330 full, 80 quick)")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("error: bench_train.py needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1 on the CPU)",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cpu" if args.smoke else "cuda"
    if args.smoke:  # the Triton kernels through the interpreter, as on the GPU
        ops.set_backend("triton")
    budget = args.budget_s or (80 if args.quick else 330)
    sections = set(args.sections.split(","))
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        tg.GemmVariant.parse(v)  # fail now on a typo, not after minutes of work
    res = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if dev == "cuda"
           else "cpu", "torch": torch.__version__, "args": vars(args), "flops_formula":
           "6*N_active + 6*L*H*hd*S per token (causal attention); 6n columns: 6*N_active"}
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        pass

    def save():
        tmp = out / "bench_train.json.tmp"
        tmp.write_text(json.dumps(res, indent=1, default=str))
        os.replace(tmp, out / "bench_train.json")

    log(f"device {res['device']}, torch {res['torch']}, triton {res.get('triton')}")
    res["ceilings"] = c = ceilings(args.smoke)
    dense = c["dense_tflops"]
    log(f"ceilings: dense bf16 GEMM {dense:.0f} TFLOP/s, copy {c['copy_gbs']:.0f} GB/s")
    save()

    # 2. grouped GEMMs ---------------------------------------------------------------------------
    best_variant = "default"
    if "gemm" in sections:
        log("grouped GEMMs of the routed experts (fwd 6 S D F, bwd 12 S D F FLOPs; S = 8 T)")
        dtype = torch.float32 if args.smoke else torch.bfloat16
        shapes = SMOKE_GEMM if args.smoke else (
            {"0.91b": GEMM_SHAPES["0.91b"]} if args.quick else GEMM_SHAPES)
        tokens = [64] if args.smoke else ([8192] if args.quick else [8192, 32768])
        gv = variants[:2] if args.quick else variants
        res["gemm"] = rows = []
        for name, s in shapes.items():
            for T in tokens:
                vs = gv if T == tokens[0] else sorted({"default", best_variant})
                rows += bench_gemms(name, s, T, vs, dense, dev, dtype, per_kernel=T == tokens[0])
                gc.collect()
                if dev == "cuda":
                    torch.cuda.empty_cache()
                if T == tokens[0] and name == next(iter(shapes)):  # the training model's shape picks the best
                    timed = [r for r in rows if r["path"].startswith("triton_grouped") and "fwd_ms" in r
                             and "fell_back" not in r and r["shape"] == name]
                    if timed:
                        best = min(timed, key=lambda r: r["fwd_ms"] + r["bwd_ms"])
                        best_variant = best["path"].split(" ", 1)[1]
                save()
        res["best_variant"] = best_variant
        log(f"best grouped GEMM variant at the 0.91B shapes: {best_variant}")

    if "tune" in sections:
        log("tile sweep of the training GEMMs (0.91B shapes, T = 16384)")
        res["tune"] = tune(out, dense, dev, args.smoke)
        save()

    # 3. training steps --------------------------------------------------------------------------
    if "train" in sections:
        if args.smoke:
            big, wide, batch, seq, warmup, steps = model_smoke, model_smoke, 2, 32, 1, 2
        elif args.quick:
            big = functools.partial(model_091b, layers=4)
            wide = functools.partial(model_72b_width, layers=1)
            batch, seq, warmup, steps = 8, 2048, 2, 3
        else:
            big, wide, batch, seq, warmup, steps = model_091b, model_72b_width, 8, 2048, 3, 6
        on = functools.partial(dataclasses.replace, ALL_ON)
        plan = [  # (label, config factory, levers, optional)
            ("0.91b moge previous (all levers off)", big, PREVIOUS, False),
            ("0.91b moge all on", big, ALL_ON, False),
            ("0.91b moge -expert backward (torch)", big, on(expert_backward="torch"), True),
            ("0.91b moge -fused ops (torch)", big, on(fused="torch"), True),
            ("0.91b moge fused ops via torch.compile", big, on(fused="compile"), True),
            ("0.91b moge -chunked loss (torch)", big, on(loss="torch"), True),
            ("0.91b moge -device stats (sync)", big, on(stats="sync"), True),
            ("0.91b moge all on + fused AdamW", big, on(adamw="fused"), True),
            ("0.91b topk previous", lambda: big("topk"), PREVIOUS, False),
            ("0.91b topk all on", lambda: big("topk"), ALL_ON, False),
            ("72b-width moge previous", wide, PREVIOUS, False),
            ("72b-width moge all on", wide, ALL_ON, False),
            ("72b-width topk all on", lambda: wide("topk"), ALL_ON, True),
            ("0.91b moge all on + ckpt moe", big, on(ckpt="moe"), True),
            ("0.91b moge all on + ckpt full", big, on(ckpt="full"), True),
        ]
        if best_variant != "default":
            plan.insert(2, (f"0.91b moge all on + gemm {best_variant}", big, on(variant=best_variant), False))
        if args.quick:  # previous, all on (+ the best GEMM variant, checkpointing), the wide stack; the
            # torch.compile configuration is left to the full run (its Inductor compile takes ~1 min)
            keep = ("0.91b moge previous", "0.91b moge all on", "72b-width moge all on")
            plan = [p for p in plan if p[0].startswith(keep) and "AdamW" not in p[0]]
        res["train"] = rows = []
        log(f"training steps: batch {batch} x {seq} tokens, {warmup} warm-up + {steps} timed steps each")
        for label, factory, lv, optional in plan:
            if optional and time.time() - T0 > budget:
                rows.append({"label": label, "skipped": f"past the {budget:.0f} s budget"})
                log(f"  {label}: skipped (time budget)")
                continue
            rows.append(train_run(label, factory(), lv, batch, seq, warmup, steps, dense, dev))
            save()

        if "profile" in sections:
            ok = [r for r in rows if "tokens_per_s" in r and r["model"] == rows[0].get("model")]
            if ok:
                best = max(ok, key=lambda r: r["tokens_per_s"])
                lv = Levers(**{k: best[k] for k in dataclasses.asdict(ALL_ON)})
                cfg = (big("topk") if best["routing"] == "topk" else big())
                log(f"profile of the fastest configuration: {best['label']}")
                prof_row = train_run(best["label"] + " (profiled)", cfg, lv, batch, seq, warmup, 1, dense,
                                     dev, profile_to=out / "profile_best.txt")
                res["profile"] = {"label": best["label"], "top_ops": prof_row.get("profile"),
                                  "error": prof_row.get("error")}
                save()

    res["broken_variants"] = tg.broken_variants()
    res["elapsed_s"] = time.time() - T0
    save()
    print_tables(res)
    return 0


def print_tables(res: dict) -> None:
    c = res["ceilings"]
    print(f"\n== bench_train {res['date']} on {res['device']} "
          f"(torch {res['torch']}, triton {res.get('triton')}) ==")
    print(f"dense bf16 GEMM {c['dense_tflops']:.0f} TFLOP/s, copy {c['copy_gbs']:.0f} GB/s; "
          f"FLOPs/token = {res['flops_formula']}")
    if res.get("gemm"):
        print("\ngrouped GEMMs (routed experts)            T      fwd ms  fwd TF/s  %dense"
              "   bwd ms  bwd TF/s  %dense")
        for r in res["gemm"]:
            if "fwd_ms" in r:
                print(f"{r['shape']:6s} {r['path']:34s} {r['tokens']:6d} {r['fwd_ms']:9.3f} "
                      f"{r['fwd_tflops']:8.1f} {r['fwd_pct_dense']:6.1f} {r['bwd_ms']:9.3f} "
                      f"{r['bwd_tflops']:8.1f} {r['bwd_pct_dense']:6.1f}"
                      + ("  (fell back)" if "fell_back" in r else ""))
            elif "ms" in r:
                print(f"{r['shape']:6s} {r['path'][:40]:40s} {r['tokens']:6d} {r['ms']:9.3f} "
                      f"{r['tflops']:8.1f} {r['pct_dense']:6.1f}")
            else:
                print(f"{r['shape']:6s} {r['path']:34s} {r['tokens']:6d} ERROR {r.get('error', '')[:60]}")
    if res.get("train"):
        print("\ntraining step                                    ms/step     tok/s   TF/s   MFU%  MFU6N%"
              "  loss@1  GB")
        for r in res["train"]:
            if "tokens_per_s" in r:
                print(f"{r['label'][:46]:46s} {r['step_ms']:9.1f} {r['tokens_per_s']:9.0f} "
                      f"{r['tflops']:6.1f} {r['mfu']:6.1f} {r['mfu_6n']:6.1f} {r['loss_first'] or 0:7.4f} "
                      f"{r['peak_mem_gb']:4.0f}")
            else:
                print(f"{r['label'][:46]:46s} {r.get('error') or r.get('skipped')}"[:140])
    if res.get("profile") and res["profile"].get("top_ops"):
        print(f"\nprofile of {res['profile']['label']} (self device time per step):")
        for o in res["profile"]["top_ops"]:
            print(f"  {o['share_pct']:5.1f} %  {o['ms_per_step']:8.2f} ms  {o['calls']:5d}x  {o['op'][:80]}")
    if res.get("broken_variants"):
        print(f"\nGEMM variants that fell back: {res['broken_variants']}")


if __name__ == "__main__":
    sys.exit(main())
