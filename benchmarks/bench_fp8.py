"""FP8 weights at Pangu Pro MoE shapes on one GPU: kernels against bf16 and the copy floor, and the
memory and time of loading a 72B-width checkpoint with quantisation on the way.

    python benchmarks/bench_fp8.py --out /tmp/fp8           # full run (~3-4 min on an H200)
    python benchmarks/bench_fp8.py --out /tmp/fp8 --quick   # each path once, small (~1 min)

In one run:
1. ceiling: device copy bandwidth (read + write of 2 GiB; 256 MiB with --quick);
2. routed experts (D 5120, 64 experts of 1344, MoGE routing 8 groups x top-1) at T = 1, 8, 64,
   256: Triton bf16 vs fp8 weight-only vs fp8 W8A8, CUDA-graph replays, each against its floor
   (bytes of the expert weights touched, scales included, / copy bandwidth);
3. dense projections at the same T: the shared expert's gate/up [5376, 5120] and down
   [5120, 5376], attention q/o [5120, 5120] and k/v [1024, 5120]: bf16 F.linear vs
   ops.linear_fp8 W8A8 (torch._scaled_mm) vs weight-only (dequantise, then GEMM); and the whole
   shared expert: bf16 SwiGLU vs Fp8Linear SwiGLU (W8A8) vs the fused Triton fp8 expert kernels
   with one expert (weight-only, SwiGLU in the epilogue);
4. loading: a 4-layer 72B-width bf16 checkpoint (random weights, full vocabulary; 1 layer and a
   32k vocabulary with --quick) written to a temporary folder, then loaded in fresh processes:
   bf16 as stored, bf16 quantised to fp8 while loading (quantize="fp8"), and the fp8 checkpoint
   written by quantize_checkpoint; each child reports load seconds, peak GPU memory
   (torch.cuda.max_memory_allocated), the model's bytes, peak host RSS (VmHWM, which counts the
   memory-mapped checkpoint pages it touched) and the peak of anonymous RSS (sampled every 5 ms).

Times are medians of triton.testing.do_bench over CUDA-graph replays (L2 flushed between runs).
Writes bench_fp8.json (every number) to --out and prints the tables last. Predictions and the
arithmetic behind them: benchmarks/notes_fp8.md.
"""

# ruff: noqa: B023  (every lambda below is timed before its loop variables change)
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import mogelm
from mogelm.kernels import ops
from mogelm.kernels.cuda_graphs import capture_cuda_graph

D, FE, E, G = 5120, 1344, 64, 8  # hidden, expert width, experts, groups (top-1 per group)
SHARED = 5376
DENSE = {"shared gate/up": (SHARED, D), "shared down": (D, SHARED), "attn q/o": (D, D), "attn k/v": (1024, D)}


def log(*a):
    print(*a, flush=True)


def graph_ms(fn) -> float:
    """Median ms of replays of fn captured in a CUDA graph."""
    from triton.testing import do_bench

    g, _ = capture_cuda_graph(fn)
    return do_bench(g.replay, warmup=5, rep=40, return_mode="median")


def copy_bandwidth(quick: bool) -> float:
    from triton.testing import do_bench

    n = (1 << 27) if quick else (1 << 30)  # bf16 elements: 256 MiB / 2 GiB
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * n * 2 / ms / 1e6  # GB/s


def bench_experts(tokens: list[int], bw: float) -> list[dict]:
    from mogelm.kernels import triton_moe as tm

    torch.manual_seed(0)
    gate_up = (torch.randn(E, 2 * FE, D, device="cuda") / D**0.5).bfloat16()
    down = (torch.randn(E, D, FE, device="cuda") / FE**0.5).bfloat16()
    quant = ops.quantize_experts_fp8(gate_up, down)
    rows = []
    for T in tokens:
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        w, ids, _ = tm.moge_route(torch.randn(T, E, device="cuda"), G, 1)
        touched = int(torch.unique(ids).numel())
        bytes_bf16 = touched * 3 * D * FE * 2
        bytes_fp8 = touched * (3 * D * FE + 4 * (2 * FE + D))
        bf16 = graph_ms(lambda: tm.routed_experts_forward(x, w, ids, gate_up, down))
        row = {"T": T, "experts_touched": touched, "bf16_ms": bf16,
               "bf16_floor_ms": bytes_bf16 / bw / 1e6, "fp8_floor_ms": bytes_fp8 / bw / 1e6}
        ref = tm.routed_experts_forward(x, w, ids, gate_up, down).float()
        for act, key in (("bf16", "fp8_weight_only"), ("fp8", "fp8_w8a8")):
            ms = graph_ms(lambda: tm.routed_experts_fp8(x, w, ids, *quant, act))
            out = tm.routed_experts_fp8(x, w, ids, *quant, act).float()
            row[f"{key}_ms"] = ms
            row[f"{key}_x_bf16"] = bf16 / ms
            row[f"{key}_pct_floor"] = 100 * row["fp8_floor_ms"] / ms
            row[f"{key}_rel_err_vs_bf16"] = ((out - ref).norm() / ref.norm()).item()
        row["bf16_pct_floor"] = 100 * row["bf16_floor_ms"] / bf16
        rows.append(row)
        log(f"experts T={T:4d}: bf16 {bf16:.3f} ms, fp8 w-only {row['fp8_weight_only_ms']:.3f} "
            f"({row['fp8_weight_only_x_bf16']:.2f}x), W8A8 {row['fp8_w8a8_ms']:.3f} "
            f"({row['fp8_w8a8_x_bf16']:.2f}x)")
    return rows


def bench_dense(tokens: list[int], bw: float) -> list[dict]:
    from mogelm.kernels import triton_moe as tm
    from mogelm.moe.experts import SwiGLU
    from mogelm.quant import Fp8Linear

    torch.manual_seed(0)
    rows = []
    for name, (N, K) in DENSE.items():
        w = (torch.randn(N, K, device="cuda") / K**0.5).bfloat16()
        q, s = ops.quantize_rows_fp8(w)
        for T in tokens:
            x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
            bf16 = graph_ms(lambda: F.linear(x, w))
            w8a8 = graph_ms(lambda: ops.linear_fp8(x, q, s, None, "fp8"))
            wonly = graph_ms(lambda: ops.linear_fp8(x, q, s, None, "bf16"))
            ref = F.linear(x.float(), w.float())
            err = (ops.linear_fp8(x, q, s, None, "fp8").float() - ref).norm() / ref.norm()
            rows.append({"shape": name, "N": N, "K": K, "T": T, "bf16_ms": bf16, "fp8_w8a8_ms": w8a8,
                         "fp8_weight_only_ms": wonly, "bf16_floor_ms": N * K * 2 / bw / 1e6,
                         "fp8_floor_ms": (N * K + 4 * N) / bw / 1e6, "w8a8_x_bf16": bf16 / w8a8,
                         "weight_only_x_bf16": bf16 / wonly, "w8a8_rel_err": err.item()})
            log(f"dense {name:14s} T={T:4d}: bf16 {bf16:.4f} ms, W8A8 {w8a8:.4f} ({bf16 / w8a8:.2f}x), "
                f"weight-only {wonly:.4f} ({bf16 / wonly:.2f}x)")
    # the whole shared expert
    swiglu = SwiGLU(D, SHARED).cuda().bfloat16()
    swiglu.reset_parameters(0.02, 0.02)
    fp8 = SwiGLU(D, SHARED).to("meta")
    for p in ("gate_proj", "up_proj", "down_proj"):
        setattr(fp8, p, Fp8Linear.from_float(getattr(swiglu, p), "fp8"))
    gu = torch.cat([swiglu.gate_proj.weight, swiglu.up_proj.weight])[None]  # [1, 2F, D]: one "expert"
    one = ops.quantize_experts_fp8(gu, swiglu.down_proj.weight[None])
    for T in tokens:
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        ones, zeros = torch.ones(T, 1, device="cuda"), torch.zeros(T, 1, dtype=torch.long, device="cuda")
        row = {"shape": "shared expert (SwiGLU)", "N": SHARED, "K": D, "T": T,
               "bf16_ms": graph_ms(lambda: swiglu(x)), "fp8_w8a8_ms": graph_ms(lambda: fp8(x)),
               "fp8_triton_weight_only_ms": graph_ms(
                   lambda: tm.routed_experts_fp8(x, ones, zeros, *one, "bf16")),
               "bf16_floor_ms": 3 * SHARED * D * 2 / bw / 1e6, "fp8_floor_ms": 3 * SHARED * D / bw / 1e6}
        row["w8a8_x_bf16"] = row["bf16_ms"] / row["fp8_w8a8_ms"]
        row["triton_weight_only_x_bf16"] = row["bf16_ms"] / row["fp8_triton_weight_only_ms"]
        rows.append(row)
        log(f"shared expert T={T:4d}: bf16 {row['bf16_ms']:.4f} ms, Fp8Linear W8A8 "
            f"{row['fp8_w8a8_ms']:.4f}, Triton 1-expert weight-only {row['fp8_triton_weight_only_ms']:.4f}")
    return rows


# --- loading ------------------------------------------------------------------------------------
def write_random_checkpoint(cfg, path: Path, shard_bytes: int = 4 << 30, device: str = "cuda") -> int:
    """A bf16 checkpoint of random weights in the Pangu layout, written shard by shard (host memory
    stays near one shard). Returns its bytes."""
    from safetensors.torch import save_file

    from mogelm.checkpoint import INDEX_FILE, to_checkpoint_tensors
    from mogelm.hf_config import config_to_hf

    with torch.device("meta"):
        shapes = {n: t.shape for n, t in to_checkpoint_tensors(mogelm.Transformer(cfg)).items()}
    path.mkdir(parents=True)
    shards, shard, size, total, weight_map = [], {}, 0, 0, {}

    def flush():
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        shards.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    for name, shape in shapes.items():
        if name.endswith(("norm.weight", "router_scale")):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02).cpu()
        nbytes = t.numel() * 2
        if shard and size + nbytes > shard_bytes:
            flush()
            size = 0
        shard[name] = t
        size += nbytes
        total += nbytes
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg, torch.bfloat16)))
    return total


CHILD = r"""
import json, sys, threading, time, torch
from mogelm.checkpoint import from_pretrained
path, quantize, device = sys.argv[1], (sys.argv[2] if sys.argv[2] != "none" else None), sys.argv[3]
cuda = device == "cuda"
peak = {"anon": 0, "file": 0}
stop = threading.Event()
def status():
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
            d[k] = int(v.split()[0]) * 1024
    return d
def sample():
    while not stop.is_set():
        s = status()
        peak["anon"] = max(peak["anon"], s["RssAnon"])
        peak["file"] = max(peak["file"], s["RssFile"])
        time.sleep(0.005)
torch.zeros(1, device=device)  # runtime start-up before the baseline
base = status(); threading.Thread(target=sample, daemon=True).start()
if cuda:
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
model = from_pretrained(path, device=device, dtype=torch.bfloat16, quantize=quantize)
if cuda:
    torch.cuda.synchronize()
secs = time.perf_counter() - t0
stop.set(); end = status()
nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
gpu_peak = torch.cuda.max_memory_allocated() if cuda else 0
print("RESULT " + json.dumps({"seconds": secs, "gpu_peak_bytes": gpu_peak,
    "model_bytes": nbytes, "host_vmhwm_bytes": end["VmHWM"], "host_rss_anon_peak_bytes": peak["anon"],
    "host_rss_file_peak_bytes": peak["file"], "host_rss_anon_before_bytes": base["RssAnon"]}))
"""


def load_in_child(path: Path, quantize: str | None, device: str = "cuda") -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), quantize or "none", device],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"load child failed: {out.stderr[-2000:]}")
    return json.loads(line.removeprefix("RESULT "))


def bench_loading(quick: bool) -> dict:
    from mogelm.checkpoint import quantize_checkpoint

    overrides = {"num_layers": 1, "vocab_size": 32000} if quick else {"num_layers": 4}
    cfg = mogelm.from_name("pangu-pro-moe-72b", **overrides)
    tmp = Path(tempfile.mkdtemp(prefix="bench-fp8-"))
    try:
        t0 = time.perf_counter()
        ckpt_bytes = write_random_checkpoint(cfg, tmp / "bf16")
        write_s = time.perf_counter() - t0
        log(f"wrote {cfg.num_layers}-layer bf16 checkpoint: {ckpt_bytes / 1e9:.2f} GB in {write_s:.1f} s")
        t0 = time.perf_counter()
        qstats = quantize_checkpoint(tmp / "bf16", tmp / "fp8", device="cuda")
        quant_s = time.perf_counter() - t0
        log(f"quantize_checkpoint (cuda): {qstats['bytes_out'] / 1e9:.2f} GB in {quant_s:.1f} s")
        res = {"layers": cfg.num_layers, "vocab": cfg.vocab_size, "checkpoint_bytes": ckpt_bytes,
               "write_seconds": write_s, "quantize_checkpoint_seconds": quant_s,
               "fp8_checkpoint_bytes": qstats["bytes_out"]}
        runs = (("bf16", tmp / "bf16", None), ("bf16_quantize_on_load", tmp / "bf16", "fp8"),
                ("fp8_checkpoint", tmp / "fp8", None))
        for key, path, quantize in runs:
            r = load_in_child(path, quantize)
            res[key] = r
            log(f"load {key:22s}: {r['seconds']:.1f} s, GPU peak {r['gpu_peak_bytes'] / 1e9:.2f} GB "
                f"(model {r['model_bytes'] / 1e9:.2f} GB), host VmHWM {r['host_vmhwm_bytes'] / 1e9:.2f} GB, "
                f"anon RSS peak {r['host_rss_anon_peak_bytes'] / 1e9:.2f} GB")
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for bench_fp8.json")
    p.add_argument("--quick", action="store_true", help="each path once at small size (~1 min)")
    p.add_argument("--skip-loading", action="store_true", help="kernels only")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_fp8.py needs a CUDA GPU")
    start = time.perf_counter()
    tokens = [1, 64] if args.quick else [1, 8, 64, 256]
    bw = copy_bandwidth(args.quick)
    log(f"copy bandwidth {bw:.0f} GB/s")
    result = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "copy_GBps": bw, "quick": args.quick}
    result["experts"] = bench_experts(tokens, bw)
    result["dense"] = bench_dense(tokens, bw)
    if not args.skip_loading:
        result["loading"] = bench_loading(args.quick)
    result["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_fp8.json").write_text(json.dumps(result, indent=2))

    log(f"\n{result['device']}, torch {result['torch']}, copy {bw:.0f} GB/s, {result['seconds']:.0f} s")
    log("routed experts (graphs)  T  touched  bf16 ms (%floor)   fp8 w-only ms (x bf16, %floor)"
        "   W8A8 ms (x bf16)")
    for r in result["experts"]:
        log(f"{'':24s}{r['T']:3d} {r['experts_touched']:8d}  {r['bf16_ms']:.3f} "
            f"({r['bf16_pct_floor']:3.0f} %)"
            f"       {r['fp8_weight_only_ms']:.3f} ({r['fp8_weight_only_x_bf16']:.2f}x, "
            f"{r['fp8_weight_only_pct_floor']:3.0f} %)          {r['fp8_w8a8_ms']:.3f} "
            f"({r['fp8_w8a8_x_bf16']:.2f}x)")
    log("dense (graphs)                   T   bf16 ms   W8A8 ms (x)      weight-only ms (x)   fp8 floor ms")
    for r in result["dense"]:
        if "fp8_triton_weight_only_ms" in r:
            extra = (f"   triton 1-expert {r['fp8_triton_weight_only_ms']:.4f} "
                     f"({r['triton_weight_only_x_bf16']:.2f}x)")
        else:
            extra = f"   {r['fp8_weight_only_ms']:.4f} ({r['weight_only_x_bf16']:.2f}x)"
        log(f"{r['shape']:28s} {r['T']:4d}   {r['bf16_ms']:.4f}   {r['fp8_w8a8_ms']:.4f} "
            f"({r['w8a8_x_bf16']:.2f}x){extra}   {r['fp8_floor_ms']:.4f}")
    if "loading" in result:
        ld = result["loading"]
        log(f"loading {ld['layers']} layers (vocab {ld['vocab']}), "
            f"checkpoint {ld['checkpoint_bytes'] / 1e9:.2f} GB:")
        for key in ("bf16", "bf16_quantize_on_load", "fp8_checkpoint"):
            r = ld[key]
            log(f"  {key:22s} {r['seconds']:6.1f} s  GPU peak {r['gpu_peak_bytes'] / 1e9:6.2f} GB  model "
                f"{r['model_bytes'] / 1e9:6.2f} GB  host VmHWM {r['host_vmhwm_bytes'] / 1e9:6.2f} GB  "
                f"anon peak {r['host_rss_anon_peak_bytes'] / 1e9:5.2f} GB")


if __name__ == "__main__":
    main()
