"""MoE layer benchmark: loop vs torch._grouped_mm vs Triton (bf16, fp8) against measured ceilings.

In one run: measures the device copy bandwidth and the dense bf16 GEMM rate, then times the routed
experts for T in {1, 8, ..., 32768} at Pangu Pro MoE shapes (D 5120, 64 experts of 1344, 8 groups,
top-1 per group) and Qwen3-30B-A3B shapes (D 2048, 128 experts of 768, top-8), and the whole MoGE
layer (router GEMM + routing + routed + shared expert + add) against the sum of its GEMMs.

    python benchmarks/bench_moe_layer.py --json benchmarks/results/moe_layer_h200_2026-11-28.json
    python benchmarks/bench_moe_layer.py --tune configs.json      # tile sweep, writes a config table

floor = bytes of the expert weights touched (experts that receive >= 1 row) / copy bandwidth.
Triton and grouped_mm are timed eagerly and as CUDA-graph replays (T <= 2048); a row reports the
faster of the two and says which. Times are medians of triton.testing.do_bench (L2 flushed).
"""

# ruff: noqa: B023  (every lambda below is timed before its loop variables change)
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import torch
import triton
from triton.testing import do_bench

from mogelm.kernels import ops, torch_impl
from mogelm.kernels import triton_moe as tm
from mogelm.kernels.cuda_graphs import capture_cuda_graph

SHAPES = {  # D, F, E, groups, experts per group per token, renormalise, shared width
    "pangu": dict(D=5120, F=1344, E=64, G=8, kp=1, renorm=False, shared=5376),
    "qwen3-30b-a3b": dict(D=2048, F=768, E=128, G=1, kp=8, renorm=True, shared=0),
}
TOKENS = [1, 8, 32, 128, 512, 2048, 8192, 32768]
GRAPH_MAX_T = 2048
LOOP_MAX_T = 8192


def log(*a):
    print(*a, flush=True)


def timed(fn, graph: bool) -> float:
    """Median ms of fn (eager) or of replays of its CUDA graph."""
    if not graph:
        return do_bench(fn, warmup=10, rep=60, return_mode="median")
    g, _ = capture_cuda_graph(fn)
    return do_bench(g.replay, warmup=10, rep=60, return_mode="median")


def best_of(fn, T: int) -> tuple[float, bool]:
    eager = timed(fn, False)
    if T > GRAPH_MAX_T:
        return eager, False
    try:
        graphed = timed(fn, True)
    except Exception as exc:  # e.g. an op that syncs with the host cannot be captured
        log(f"    (graph capture failed: {type(exc).__name__}: {str(exc)[:80]})")
        return eager, False
    return (graphed, True) if graphed < eager else (eager, False)


def ceilings() -> tuple[float, float]:
    n = 1 << 30  # 2 GiB of bf16 each way
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    bw = 2 * src.numel() * src.element_size() / ms / 1e6  # GB/s, read + write
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    n_ = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: m @ n_, warmup=10, rep=100, return_mode="median")
    return bw, 2 * 8192**3 / ms / 1e9


def make_experts(s: dict, dtype=torch.bfloat16):
    D, F, E = s["D"], s["F"], s["E"]
    gate_up = (torch.randn(E, 2 * F, D, device="cuda") / D**0.5).to(dtype)
    down = (torch.randn(E, D, F, device="cuda") / F**0.5).to(dtype)
    return gate_up, down


def route(s: dict, T: int):
    logits = torch.randn(T, s["E"], device="cuda")
    w, ids, _ = torch_impl.moge_route(logits, s["G"], s["kp"], None, s["renorm"], None)
    return logits, w, ids


def bench_shape(name: str, s: dict, tokens: list[int], bw: float, dense: float, rows: list, layer_rows: list,
                args):
    D, F, E = s["D"], s["F"], s["E"]
    K = s["G"] * s["kp"]
    gate_up, down = make_experts(s)
    guq, gus, dnq, dns = ops.quantize_experts_fp8(gate_up, down)
    expert_bytes_bf16 = 3 * D * F * 2
    expert_bytes_fp8 = 3 * D * F + 4 * (2 * F + D)
    if s["shared"]:
        sh_gu = torch.randn(2 * s["shared"], D, device="cuda", dtype=torch.bfloat16) / D**0.5
        sh_dn = torch.randn(D, s["shared"], device="cuda", dtype=torch.bfloat16) / s["shared"] ** 0.5
    w_router = torch.randn(E, D, device="cuda", dtype=torch.bfloat16) / D**0.5
    for T in tokens:
        torch.manual_seed(T)
        logits, w, ids = route(s, T)
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        touched = int(torch.unique(ids).numel())
        flops = 2 * T * K * 3 * D * F
        common = dict(model_shape=name, tokens=T, experts_touched=touched)

        def add(backend, dtype, ms, graph, gmm_ms=None, **extra):
            per = expert_bytes_bf16 if dtype == "bf16" else expert_bytes_fp8
            floor_ms = touched * per / bw / 1e6
            row = dict(common, backend=backend, dtype=dtype, ms=ms, floor_ms=floor_ms,
                       frac_floor=floor_ms / ms,
                       tflops=flops / ms / 1e9, frac_dense=flops / ms / 1e9 / dense, cuda_graph=graph,
                       speedup_vs_grouped_mm=(gmm_ms / ms) if gmm_ms else None, **extra)
            rows.append(row)
            log(f"  {name:14s} T={T:6d} {backend:10s} {dtype:4s} {ms:9.4f} ms  floor {floor_ms:.4f} "
                f"({row['frac_floor']:6.1%})  {row['tflops']:6.1f} TFLOP/s ({row['frac_dense']:5.1%} dense)"
                f"{'  graph' if graph else ''}" + (f"  x{gmm_ms / ms:.2f} vs gmm" if gmm_ms else ""))

        if T <= LOOP_MAX_T and not args.skip_loop:
            ms = do_bench(lambda: torch_impl.routed_experts(x, w, ids, gate_up, down, use_loop=True),
                          warmup=1, rep=30, return_mode="median")
            add("loop", "bf16", ms, False)
        gmm_ms, g = best_of(lambda: torch_impl.routed_experts(x, w, ids, gate_up, down), T)
        add("grouped_mm", "bf16", gmm_ms, g)
        ref = torch_impl.routed_experts(x, w, ids, gate_up, down).float()
        out = tm.routed_experts_forward(x, w, ids, gate_up, down)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        ms, g = best_of(lambda: tm.routed_experts_forward(x, w, ids, gate_up, down), T)
        add("triton", "bf16", ms, g, gmm_ms, rel_err_vs_grouped_mm=err)
        bf16_ms = ms
        for act in ("bf16", "fp8"):
            out = tm.routed_experts_fp8(x, w, ids, guq, gus, dnq, dns, act)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            ms, g = best_of(lambda act=act: tm.routed_experts_fp8(x, w, ids, guq, gus, dnq, dns, act), T)
            add("triton", "fp8", ms, g, gmm_ms, activations=act, speedup_vs_triton_bf16=bf16_ms / ms,
                rel_err_vs_grouped_mm=err)

        # whole layer vs the sum of its GEMMs (bf16, Triton backend)
        cfg = tm.get_config(T * K, D, F, E, torch.cuda.get_device_name())
        plan = tm.align(ids, E, cfg.gate_up.block_m)
        h = tm.gate_up(x, gate_up, plan, K, cfg.gate_up)
        w_S = w.reshape(-1).contiguous()
        t_gu, _ = best_of(lambda: tm.gate_up(x, gate_up, plan, K, cfg.gate_up), T)
        t_dn, _ = best_of(lambda: tm.down(h, down, w_S, plan, T * K, cfg.down, x.dtype), T)
        t_router, _ = best_of(lambda: x @ w_router.t(), T)
        t_shared = 0.0
        if s["shared"]:
            def shared():
                gs, us = (x @ sh_gu.t()).chunk(2, -1)
                return (torch.nn.functional.silu(gs) * us) @ sh_dn.t()

            a_sh = torch.randn(T, s["shared"], device="cuda", dtype=torch.bfloat16)
            t_sgu, _ = best_of(lambda: x @ sh_gu.t(), T)
            t_sdn, _ = best_of(lambda: a_sh @ sh_dn.t(), T)
            t_shared = t_sgu + t_sdn

        def layer():
            lg = x @ w_router.t()
            wl, il, _ = tm.moge_route(lg, s["G"], s["kp"], None, s["renorm"], None)
            y = tm.routed_experts_forward(x, wl, il, gate_up, down)
            return y + shared() if s["shared"] else y

        t_layer, g = best_of(layer, T)
        gemms = t_gu + t_dn + t_router + t_shared
        args_r = (logits, s["G"], s["kp"], None, s["renorm"], None)
        t_route_torch, _ = best_of(lambda: torch_impl.moge_route(*args_r), T)
        t_route_triton, _ = best_of(lambda: tm.moge_route(*args_r), T)
        t_align, _ = best_of(lambda: tm.align(ids, E, cfg.gate_up.block_m), T)
        layer_rows.append(dict(common, layer_ms=t_layer, sum_of_gemms_ms=gemms, gate_up_ms=t_gu, down_ms=t_dn,
                               router_gemm_ms=t_router, shared_gemms_ms=t_shared,
                               overhead=t_layer / gemms - 1,
                               cuda_graph=g, route_torch_ms=t_route_torch, route_triton_ms=t_route_triton,
                               align_ms=t_align, config=repr(cfg)))
        log(f"  {name:14s} T={T:6d} routing torch {t_route_torch:.4f} ms, triton {t_route_triton:.4f} ms, "
            f"align {t_align:.4f} ms")
        log(f"  {name:14s} T={T:6d} layer {t_layer:.4f} ms vs GEMMs {gemms:.4f} ms "
            f"(gate_up {t_gu:.4f}, down {t_dn:.4f}, router {t_router:.4f}, shared {t_shared:.4f}): "
            f"{t_layer / gemms - 1:+.1%}")


# ---------------------------------------------------------------------------------------------
# tile sweep
# ---------------------------------------------------------------------------------------------

CANDIDATES = {  # regime -> kind -> (block_m, block_n, block_k, group_m, warps, stages), likeliest first
    "decode": {
        "bf16": [(16, 64, 128, 8, 4, 4), (16, 32, 128, 8, 4, 4), (16, 128, 64, 8, 4, 4),
                 (16, 64, 256, 8, 4, 3), (16, 32, 256, 8, 4, 3), (16, 64, 64, 8, 4, 6)],
        "fp8": [(16, 64, 256, 8, 4, 4), (16, 128, 128, 8, 4, 4), (16, 64, 128, 8, 4, 5),
                (16, 32, 256, 8, 4, 4), (16, 128, 256, 8, 4, 3), (16, 64, 512, 8, 4, 3)],
    },
    "mid": {
        "bf16": [(16, 64, 128, 8, 4, 4), (32, 64, 128, 8, 4, 4), (32, 128, 64, 8, 4, 4),
                 (16, 128, 64, 8, 4, 4), (32, 64, 64, 8, 4, 5), (64, 64, 128, 8, 4, 3)],
        "fp8": [(16, 64, 256, 8, 4, 4), (32, 64, 256, 8, 4, 3), (32, 128, 128, 8, 4, 4),
                (16, 128, 128, 8, 4, 4), (32, 64, 128, 8, 4, 4), (64, 64, 128, 8, 4, 4)],
    },
    "large": {
        "bf16": [(64, 128, 64, 8, 4, 4), (64, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 3),
                 (64, 64, 128, 8, 4, 4), (128, 128, 64, 8, 4, 4), (64, 256, 64, 8, 8, 3)],
    },
    "prefill": {
        "bf16": [(128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 3),
                 (128, 128, 64, 16, 8, 4), (256, 128, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4)],
        "w8a8": [(128, 128, 128, 8, 8, 3), (128, 128, 128, 8, 8, 4), (128, 256, 128, 8, 8, 3),
                 (128, 128, 64, 8, 8, 4), (256, 128, 128, 8, 8, 3), (128, 128, 128, 16, 8, 4)],
    },
}
DECODE_CANDIDATES = {  # block_f, block_k, block_d, warps, stages for the no-sort small-T kernel
    "bf16": [(32, 128, 128, 4, 4), (64, 128, 64, 4, 4), (32, 256, 128, 4, 3), (16, 256, 128, 4, 4),
             (64, 64, 128, 4, 5), (32, 128, 256, 4, 3)],
    "fp8": [(32, 256, 128, 4, 4), (64, 256, 64, 4, 3), (32, 512, 128, 4, 3), (16, 256, 128, 4, 4),
            (64, 128, 128, 4, 4)],
}
DECODE_TUNE_MAX_ROWS = 64
TUNE_PLAN = [  # kind, shape, token counts (the table's S buckets)
    ("bf16", "pangu", [1, 8, 32, 128, 512, 2048, 8192]),
    ("bf16", "qwen3-30b-a3b", [1, 32, 128, 512, 2048, 8192]),
    ("fp8", "pangu", [1, 32, 128]),
    ("fp8", "qwen3-30b-a3b", [1, 128]),
    ("w8a8", "pangu", [8192]),
    ("w8a8", "qwen3-30b-a3b", [8192]),
]


TUNE_PLAN_DECODE = [  # the small-T points only, merged into an existing table (--tune-base)
    ("bf16", "pangu", [1, 8]),
    ("bf16", "qwen3-30b-a3b", [1]),
    ("fp8", "pangu", [1, 32, 128]),
    ("fp8", "qwen3-30b-a3b", [1]),
]


def regime(rows_per_expert: float) -> str:
    return ("decode" if rows_per_expert <= 6 else "mid" if rows_per_expert <= 48
            else "large" if rows_per_expert <= 400 else "prefill")


def tune_point(s: dict, T: int, kind: str, experts) -> dict | None:
    """Time gate_up and down alone for each candidate tile; keep the best pair sharing block_m."""
    D, E = s["D"], s["E"]
    K = s["G"] * s["kp"]
    gate_up, down, gus, dns = experts
    _, w, ids = route(s, T)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    x_s = None
    if kind == "w8a8":
        x, x_s = tm.quant_rows(x)
    S = T * K
    reg = regime(S / E)
    cands = (CANDIDATES[reg].get(kind)
             or CANDIDATES[reg]["fp8" if kind == "w8a8" and reg != "prefill" else "bf16"])
    graph = T <= 128
    best = {}
    for c in cands:
        cfg = tm.GemmConfig(*c)
        try:
            plan = tm.align(ids, E, cfg.block_m)
            h = tm.gate_up(x, gate_up, plan, K, cfg, w_scale_EF=gus, x_scale_T=x_s, out_dtype=torch.bfloat16)
            h_s = None
            if kind == "w8a8":
                h, h_s = tm.quant_rows(h)
            w_S = w.reshape(-1).contiguous()
            t_gu = timed(lambda: tm.gate_up(x, gate_up, plan, K, cfg, w_scale_EF=gus, x_scale_T=x_s,
                                            out_dtype=torch.bfloat16), graph)
            t_dn = timed(lambda: tm.down(h, down, w_S, plan, S, cfg, torch.bfloat16, w_scale_ED=dns,
                                         h_scale_P=h_s), graph)
        except Exception as exc:  # e.g. out of shared memory for this tile
            log(f"  {kind} T={T} {c}: {type(exc).__name__} {str(exc)[:60]}")
            continue
        log(f"  {kind} T={T:6d} {c}: gate_up {t_gu:.4f} ms, down {t_dn:.4f} ms")
        for which, t in (("gate_up", t_gu), ("down", t_dn)):
            prev = best.setdefault(cfg.block_m, {}).get(which)
            if prev is None or t < prev[0]:
                best[cfg.block_m][which] = (t, c)
    full = {bm: v for bm, v in best.items() if len(v) == 2}
    if not full:
        return None
    bm = min(full, key=lambda b: full[b]["gate_up"][0] + full[b]["down"][0])
    keys = ("block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages")
    entry = {which: dict(zip(keys, full[bm][which][1])) for which in ("gate_up", "down")}
    entry["ms"] = {which: full[bm][which][0] for which in ("gate_up", "down")}
    if S <= DECODE_TUNE_MAX_ROWS and kind != "w8a8":  # whole forward: sorted path vs the decode kernel
        sorted_cfg = tm.MoEConfig(tm.GemmConfig(*full[bm]["gate_up"][1]), tm.GemmConfig(*full[bm]["down"][1]))
        x_bf = x

        def forward(cfg):
            if kind == "bf16":
                return tm.routed_experts_forward(x_bf, w, ids, gate_up, down, cfg)
            return tm.routed_experts_fp8(x_bf, w, ids, gate_up, gus, down, dns, "bf16", cfg)

        t_sorted = timed(lambda: forward(sorted_cfg), graph)
        entry["ms"]["sorted_forward"] = t_sorted
        best_dec = (t_sorted, None)
        for c in DECODE_CANDIDATES[kind]:
            cfg = tm.MoEConfig(sorted_cfg.gate_up, sorted_cfg.down, tm.DecodeConfig(*c))
            try:
                t = timed(lambda: forward(cfg), graph)
            except Exception as exc:
                log(f"  {kind} T={T} decode {c}: {type(exc).__name__} {str(exc)[:60]}")
                continue
            log(f"  {kind} T={T:6d} decode {c}: {t:.4f} ms (sorted path {t_sorted:.4f} ms)")
            if t < best_dec[0]:
                best_dec = (t, c)
        if best_dec[1] is not None:
            keys_d = ("block_f", "block_k", "block_d", "num_warps", "num_stages")
            entry["decode"] = dict(zip(keys_d, best_dec[1]))
            entry["ms"]["decode_forward"] = best_dec[0]
    log(f"  {kind} T={T}: best {entry}")
    return entry


def tune(path: str, budget_s: float, base: str | None = None, plan=TUNE_PLAN) -> None:
    table = json.load(open(base)) if base else {}
    t0 = time.time()
    for kind, name, tokens in plan:
        s = SHAPES[name]
        gate_up, down = make_experts(s)
        if kind == "bf16":
            experts = (gate_up, down, None, None)
        else:
            guq, gus, dnq, dns = ops.quantize_experts_fp8(gate_up, down)
            experts = (guq, dnq, gus, dns)
        key = f"E={s['E']},F={s['F']},D={s['D']}"
        for T in tokens:
            if time.time() - t0 > budget_s:
                log(f"  tune budget spent: {kind} {name} T={T} and later points keep the heuristic")
                break
            entry = tune_point(s, T, kind, experts)
            if entry:
                table.setdefault(kind, {}).setdefault(key, {})[str(T * s["G"] * s["kp"])] = entry
        with open(path, "w") as f:  # written after every shape, so a timeout keeps what was found
            json.dump(table, f, indent=1)
        del experts, gate_up, down


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write results here")
    p.add_argument("--shapes", default="pangu,qwen3-30b-a3b", help="comma-separated: " + ",".join(SHAPES))
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts")
    p.add_argument("--skip-loop", action="store_true", help="skip the per-expert loop backend")
    p.add_argument("--tune", help="run the tile sweep (TUNE_PLAN) instead and write a config table here")
    p.add_argument("--tune-budget", type=float, default=300.0, help="seconds for the sweep")
    p.add_argument("--tune-base", help="start from this table and re-tune only the small-T points")
    args = p.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    shapes = args.shapes.split(",")
    dev = torch.cuda.get_device_name()
    log(f"device {dev}, torch {torch.__version__}, triton {triton.__version__}")
    if args.tune:
        tune(args.tune, args.tune_budget, args.tune_base, TUNE_PLAN_DECODE if args.tune_base else TUNE_PLAN)
        return
    bw, dense = ceilings()
    log(f"copy bandwidth {bw:.0f} GB/s, dense bf16 GEMM {dense:.0f} TFLOP/s")
    rows, layer_rows = [], []
    for name in shapes:
        bench_shape(name, SHAPES[name], tokens, bw, dense, rows, layer_rows, args)
    result = dict(device=dev, date=datetime.date.today().isoformat(), torch=torch.__version__,
                  triton=triton.__version__, copy_bandwidth_GBps=bw, dense_bf16_tflops=dense, rows=rows,
                  layer_rows=layer_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    log("\nshape          T       loop    gmm      triton  %floor  TFLOP/s %dense  "
        "x gmm   fp8w   fp8w8a8 fp8/bf16")
    for name in shapes:
        for T in tokens:
            r = {(x["backend"], x["dtype"], x.get("activations")): x for x in rows
                 if x["model_shape"] == name and x["tokens"] == T}
            tr = r[("triton", "bf16", None)]
            lp = r.get(("loop", "bf16", None))
            fw, fa = r[("triton", "fp8", "bf16")], r[("triton", "fp8", "fp8")]
            log(f"{name:14s} {T:6d} {lp['ms'] if lp else float('nan'):8.3f} "
                f"{r[('grouped_mm', 'bf16', None)]['ms']:8.3f} "
                f"{tr['ms']:8.3f} {tr['frac_floor']:6.1%} {tr['tflops']:7.1f} {tr['frac_dense']:6.1%} "
                f"{tr['speedup_vs_grouped_mm']:5.2f} {fw['ms']:8.3f} {fa['ms']:8.3f} "
                f"{tr['ms'] / min(fw['ms'], fa['ms']):5.2f}")


if __name__ == "__main__":
    sys.exit(main())
