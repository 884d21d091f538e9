"""Build a hardware profile from our benchmark JSON (`mogelm sim calibrate`).

    mogelm sim calibrate tests/data/sim_bench_h200.json --out h200-measured.json [--base nvidia-h200]
    mogelm sim --hardware h200-measured.json ...

Benchmark JSON (written by the kernel benchmarks to benchmarks/results/*.json; extra keys ignored):

    {"device": "NVIDIA H200", "date": "2026-11-28",
     "copy_bandwidth_GBps": 4250.0, "dense_bf16_tflops": 672.0,
     "rows": [{"model_shape": "pangu" | "qwen3-30b-a3b", "backend": "loop" | "grouped_mm" | "triton",
               "dtype": "bf16" | "fp8", "tokens": 128, "ms": 1.164, "floor_ms": 0.621, "tflops": 36.1}, ...]}

Two optional sections, as written by `python benchmarks/bench_sim_microbench.py`:

     "collectives": [{"world": 2, "bytes": 4669440, "allgather_ms": 0.067, "reducescatter_ms": 0.068}, ...],
     "decode_attention": [{"batch": 128, "kv_bytes": 1073741824, "ms": 0.266, ...}, ...]

What it derives, on top of a base profile (peak rates, memory size, interconnect come from there):
  mem_efficiency      = copy bandwidth / datasheet bandwidth
  gemm_efficiency     = dense bf16 GEMM rate / datasheet bf16 peak
  grouped_gemm_curve  for one backend's bf16 rows: efficiency = (roofline ideal of the expert
                      block, from the two numbers above and the cost model's bytes and flops) /
                      measured time, keyed by rows per expert (tokens * K / experts). The cost
                      model interpolates it in log(rows), so a calibrated profile reproduces the
                      measured expert-block times at the measured points.
  links[0]            from "collectives": the fixed time per call and the bandwidth of the innermost
                      level, by least squares on t = fixed + (p-1)/p * n / bw over the all-gather
                      and reduce-scatter rows; the fixed time beyond the base profile's per-step
                      alpha becomes call_overhead_us (per call, not per ring step)
  decode_attention_kv_share  from "decode_attention": the largest-batch row (bandwidth-bound),
                      ideal KV streaming time / (measured - one kernel's fixed time)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from mogelm.sim.cost import QUANTS, roofline, routing_load
from mogelm.sim.hardware import HardwareProfile, load_profile

# Expert shapes the benchmarks run: hidden, experts, experts per token, groups, expert width.
SHAPES = {
    "pangu": dict(d=5120, experts=64, top_k=8, groups=8, width=1344),
    "qwen3-30b-a3b": dict(d=2048, experts=128, top_k=8, groups=8, width=768),
}
DEVICE_BASES = {"H200": "nvidia-h200", "H100": "nvidia-h100", "A100": "nvidia-a100",
                "800I": "ascend-800i-a2", "910B": "ascend-800i-a2", "300I": "ascend-300i-duo"}


def _base_for(device: str, base: str | None) -> HardwareProfile:
    if base:
        return load_profile(base)
    for key, name in DEVICE_BASES.items():
        if key.lower() in device.lower():
            return load_profile(name)
    raise ValueError(f"cannot tell which base profile fits device {device!r}; pass --base PROFILE")


def block_ideal_ms(shape: dict, tokens: int, hw: HardwareProfile) -> tuple[float, float]:
    """(roofline ideal ms of the routed-expert block, rows per expert) on one device, bf16, MoGE routing."""
    q = QUANTS["bf16"]
    rows = tokens * shape["top_k"]
    _, touched = routing_load("moge", tokens, shape["experts"], shape["groups"], shape["top_k"], 1)
    d, f = shape["d"], shape["width"]
    flops = 2.0 * rows * 3 * d * f
    nbytes = touched * 3 * d * f * q.weight_bytes + rows * (2 * d * q.act_bytes + 3 * f * 2)
    return roofline(flops, nbytes, hw, "bf16", hw.gemm_efficiency, kernels=0) * 1e3, rows / shape["experts"]


def calibrate(bench: dict, *, base: str | None = None, backend: str | None = None,
              source: str = "benchmark JSON") -> HardwareProfile:
    missing = [k for k in ("device", "copy_bandwidth_GBps", "dense_bf16_tflops") if k not in bench]
    if missing:
        raise ValueError(f"benchmark JSON lacks {', '.join(missing)}: "
                         "calibrate reads the kernel-benchmark schema "
                         "(see mogelm/sim/calibrate.py or mogelm/sim/README.md)")
    copy_bw, dense = float(bench["copy_bandwidth_GBps"]), float(bench["dense_bf16_tflops"])
    if copy_bw <= 0 or dense <= 0:
        raise ValueError("copy_bandwidth_GBps and dense_bf16_tflops must be positive")
    hw = _base_for(str(bench["device"]), base)
    bw_nominal = max(hw.memory_bandwidth_GBps, copy_bw)
    peak = hw.peak_flops("bf16") / 1e12
    date = bench.get("date", "undated")
    sources = dict(hw.sources)
    sources["mem_efficiency"] = f"calibrated: copy bandwidth {copy_bw:g} GB/s measured on {date} ({source})"
    sources["gemm_efficiency"] = (f"calibrated: dense bf16 GEMM {dense:g} TFLOP/s measured on {date} "
                                  f"({source})")
    hw = dataclasses.replace(hw, name=f"{hw.name}-calibrated", memory_bandwidth_GBps=bw_nominal,
                             mem_efficiency=copy_bw / bw_nominal, gemm_efficiency=min(dense / peak, 1.0),
                             grouped_gemm_curve=[], sources=sources,
                             description=f"{bench['device']} calibrated from {source} ({date}); "
                                         f"base {hw.name}")

    rows = [r for r in bench.get("rows", []) if isinstance(r, dict) and r.get("dtype", "bf16") == "bf16"
            and r.get("model_shape") in SHAPES and float(r.get("ms", 0)) > 0 and int(r.get("tokens", 0)) > 0]
    backends = sorted({r.get("backend", "") for r in rows})
    if backend is not None and backend not in backends:
        raise ValueError(f"backend {backend!r} has no usable bf16 rows; "
                         f"the file has: {', '.join(backends) or 'none'}")
    curves: dict[str, dict[float, float]] = {}
    for r in rows:
        ideal, rpe = block_ideal_ms(SHAPES[r["model_shape"]], int(r["tokens"]), hw)
        curves.setdefault(r.get("backend", ""), {})[rpe] = ideal / float(r["ms"])
    coll = [r for r in bench.get("collectives", []) if isinstance(r, dict) and int(r.get("world", 0)) >= 2]
    if coll:
        # A fit on one group size cannot separate a per-call cost from per-step latency; keep the
        # base profile's per-step alpha and put the rest of the fixed time into the per-call cost,
        # which does not grow with p (eager launches dominate it).
        fixed_us, bw = fit_alpha_beta(coll)
        p = int(coll[0]["world"])
        base = hw.links[0]
        steps = base.steps(p) if base.topology != "mesh" else 1
        call = max(fixed_us - steps * base.latency_us, 0.0)
        inner = dataclasses.replace(base, topology="switch", bandwidth_GBps=round(bw / 1e9, 1),
                                    call_overhead_us=round(call, 2))
        hw.links = [inner, *hw.links[1:]]
        sources["links"] = (f"innermost level calibrated from {len(coll)} collective sizes on {p} devices, "
                            f"measured on {date} ({source}): {fixed_us:.1f} us fixed per call (kept alpha "
                            f"{base.latency_us:g} us per step, the rest as call_overhead_us), "
                            f"{bw / 1e9:.0f} GB/s; "
                            "outer levels from the base profile. " + sources.get("links", ""))
    attn = [r for r in bench.get("decode_attention", []) if isinstance(r, dict) and float(r.get("ms", 0)) > 0]
    if attn:
        top = max(attn, key=lambda r: float(r["kv_bytes"]))
        ideal = float(top["kv_bytes"]) / hw.bandwidth
        share = ideal / max(float(top["ms"]) * 1e-3 - hw.op_overhead, 1e-9)
        hw.decode_attention_kv_share = round(min(share, 1.0), 4)
        sources["decode_attention_kv_share"] = (f"calibrated from decode attention at batch "
                                                f"{top.get('batch')}, measured on {date} ({source})")
    if curves:
        # Without a choice, take the backend that is most efficient on average: the one we would run.
        chosen = backend or max(curves, key=lambda b: sum(curves[b].values()) / len(curves[b]))
        hw.grouped_gemm_curve = sorted([rpe, round(eff, 4)] for rpe, eff in curves[chosen].items())
        sources["grouped_gemm_curve"] = (f"calibrated: backend {chosen!r}, {len(curves[chosen])} bf16 "
                                         f"points, measured on {date} ({source})")
    return hw


def fit_alpha_beta(rows: list[dict]) -> tuple[float, float]:
    """(fixed us per call, bandwidth in bytes/s) fitting every all-gather / reduce-scatter time in `rows`."""
    if len({int(r["world"]) for r in rows}) > 1:
        raise ValueError("collective rows must all have the same world size")
    a, y = [], []
    for r in rows:
        p, n = int(r["world"]), float(r["bytes"])
        for key in ("allgather_ms", "reducescatter_ms"):
            if r.get(key):
                a.append([1.0, (p - 1) / p * n])
                y.append(float(r[key]) * 1e-3)
    if len(y) < 2:
        raise ValueError("collectives need at least two timed rows to fit alpha and bandwidth")
    (alpha, inv_bw), *_ = np.linalg.lstsq(np.array(a), np.array(y), rcond=None)
    if alpha < 0 or inv_bw <= 0:
        raise ValueError("collective times do not fit alpha + n / bandwidth with positive values")
    return alpha * 1e6, 1.0 / inv_bw


def calibrate_file(path: str, *, base: str | None = None, backend: str | None = None) -> HardwareProfile:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"benchmark file not found: {path}")
    try:
        bench = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(bench, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return calibrate(bench, base=base, backend=backend, source=p.name)


def describe_calibration(hw: HardwareProfile) -> str:
    """One line: the efficiencies and grouped-GEMM curve a calibrated profile carries."""
    return (f"  bandwidth {hw.memory_bandwidth_GBps:.0f} GB/s x {hw.mem_efficiency:.3f}, dense GEMM "
            f"efficiency {hw.gemm_efficiency:.3f}, grouped-GEMM curve " +
            ", ".join(f"{r:g} rows/expert: {e:.2f}" for r, e in hw.grouped_gemm_curve))
