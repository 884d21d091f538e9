"""Tile and path sweeps for the 72B decode step's two weakest parts on one H200 (issue 14):
the paged decode attention over an e4m3 vs bf16 KV pool (keys per step, warps, stages), and the
fp8 dense projections (Triton small-M weight-only kernel vs W8A8 torch._scaled_mm vs bf16 cuBLAS)
per row count. Writes sweep_decode_tiles.json under --out and prints the winners.

    python benchmarks/sweep_decode_tiles.py --out /tmp/out
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from functools import partial

import torch
from triton.testing import do_bench

from mogelm.kernels import ops
from mogelm.kernels import triton_attention as ta
from mogelm.kernels import triton_infer as ti


def bench(fn) -> float:
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def copy_bw() -> float:
    n = 1 << 30
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        dst.copy_(src)
    ms_graph = bench(g.replay)
    print(f"copy 2 GiB bf16: eager {2 * n * 2 / ms / 1e6:.0f} GB/s, inside a CUDA graph "
          f"{2 * n * 2 / ms_graph / 1e6:.0f} GB/s")
    return 2 * n * 2 / ms / 1e6


def sweep_attention(bw: float, rows: int = 256, ctx: int = 2048) -> list[dict]:
    H, Hkv, hd, bs = 40, 8, 128, 16
    blocks = rows * ctx // bs
    tables = torch.arange(blocks, device="cuda", dtype=torch.int32).view(rows, -1)
    # shuffle the blocks so the pool is read as the engine reads it (scattered pages)
    tables = tables.flatten()[torch.randperm(blocks, device="cuda")].view(rows, -1).to(torch.int32)
    lens = torch.full((rows,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(rows, H, hd, device="cuda", dtype=torch.bfloat16)
    out = []
    for kv in ("fp8", "bf16"):
        k = torch.randn(blocks, bs, Hkv, hd, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        sc = None
        if kv == "fp8":
            k, v = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
            sc = torch.ones(Hkv, device="cuda", dtype=torch.float32)
        nbytes = 2 * k.numel() * k.element_size()
        for bn, w, st in itertools.product((64, 128, 256), (4, 8), (2, 3)):
            cfg = ta.DecodeAttentionConfig(block_n=bn, num_warps=w, num_stages=st)
            try:
                ms = bench(partial(ta.paged_decode_attention, q, k, v, tables, lens, 0.088,
                                   sc, sc, cfg=cfg))
            except Exception as e:  # noqa: BLE001 - a tile that does not compile is skipped
                print(f"attention {kv} {cfg}: {type(e).__name__}")
                continue
            out.append(dict(kv=kv, block_n=bn, num_warps=w, num_stages=st, ms=ms,
                            pct_floor=100 * nbytes / (ms * 1e-3) / (bw * 1e9)))
        best = min((r for r in out if r["kv"] == kv), key=lambda r: r["ms"])
        dflt = ta.DEFAULT_FP8_CONFIG if kv == "fp8" else ta.DEFAULT_CONFIG
        default = next(r for r in out if r["kv"] == kv and r["block_n"] == dflt.block_n
                       and r["num_warps"] == dflt.num_warps and r["num_stages"] == dflt.num_stages)
        print(f"attention kv={kv} B={rows} ctx={ctx}: default {default['ms']:.3f} ms "
              f"({default['pct_floor']:.0f}% floor), best {best['ms']:.3f} ms ({best['pct_floor']:.0f}%) "
              f"block_n={best['block_n']} warps={best['num_warps']} stages={best['num_stages']}")
    return out


def sweep_linear(bw: float) -> list[dict]:
    D, F, hd = 5120, 5376, 128
    shapes = {"qkv": (56 * hd, D), "o_proj": (D, 40 * hd), "shared_gate_up": (2 * F, D),
              "shared_down": (D, F)}
    C = ti.LinearConfig
    cands = [C(16, 16, 256, 4, 4), C(16, 32, 256, 4, 4), C(16, 64, 256, 4, 4), C(16, 32, 512, 4, 3),
             C(32, 64, 256, 4, 3), C(64, 64, 128, 4, 4), C(64, 128, 128, 8, 3)]
    out = []
    for M in (1, 8, 16, 32, 64, 128, 256, 340):
        for name, (N, K) in shapes.items():
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
            wq, ws = ops.quantize_rows_fp8(w)
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            row = dict(rows=M, proj=name, bf16_ms=bench(partial(torch.matmul, x, w.t())),
                       w8a8_ms=bench(partial(ops._linear_fp8_scaled_mm, x, wq, ws, None)),
                       fp8_floor_ms=N * K / (bw * 1e6))
            best = None
            for c in cands:
                if c.block_m > max(16, 2 * M):
                    continue
                ms = bench(partial(ti.linear_fp8_wo, x, wq, ws, cfg=c))
                if best is None or ms < best[0]:
                    best = (ms, c)
            row.update(wo_ms=best[0], wo_cfg=str(best[1]))
            out.append(row)
        keys = ("bf16_ms", "w8a8_ms", "wo_ms", "fp8_floor_ms")
        tot = {k: sum(r[k] for r in out if r["rows"] == M) for k in keys}
        print(f"dense M={M:4d}: bf16 {tot['bf16_ms']:.3f}  W8A8 {tot['w8a8_ms']:.3f}  weight-only "
              f"{tot['wo_ms']:.3f}  fp8 floor {tot['fp8_floor_ms']:.3f} ms (4 projections)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--parts", default="attention,linear", help="comma list of attention, linear")
    args = ap.parse_args()
    t = time.perf_counter()
    bw = copy_bw()
    print(f"{torch.cuda.get_device_name()}: copy {bw:.0f} GB/s (eager do_bench, 2 GiB bf16)")
    res = dict(date=time.strftime("%Y-%m-%d"), device=torch.cuda.get_device_name(), copy_GBps=bw,
               attention=sweep_attention(bw) if "attention" in args.parts else [],
               linear=sweep_linear(bw) if "linear" in args.parts else [])
    res["seconds"] = time.perf_counter() - t
    with open(os.path.join(args.out, "sweep_decode_tiles.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(f"{res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
