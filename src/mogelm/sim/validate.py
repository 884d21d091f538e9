"""Check the simulator against the paper's Tables 5-7 and our H200 measurements (DESIGN.md section 5,
the microbenchmark, and mogelm's engine: data/h200_engine*.json through sim/engine.py).

    mogelm sim validate [--json]
    from mogelm.sim.validate import run_checks, format_table, h200_forecasts, format_forecasts

Every row is one number the simulator predicts next to one number somebody measured, with the
relative error (predicted - measured) / measured. Targets: 25 % for the paper, 15 % for our
measurements. `role` says how independent a row is:

    prediction  no profile parameter was set from this number
    fit         a profile parameter was set from this number (listed so the table is complete)
    check       a ratio the paper states (e.g. weight transfer share), compared for consistency

An engine row the model is known to miss is listed in KNOWN_MISSES with the reason found in the
numbers; its note starts with "known miss" (no parameter is set per row to hide it).

Paper runs are W8A8 with 2,048-token inputs (PAPER.md section 6.7); decode KV length is taken as
2,048. The dense baselines are not named in the paper; PAPER.md derives Qwen2.5-32B/72B-like
shapes from its KV and communication ratios, and those shapes are used here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from mogelm.config import ModelConfig, from_name
from mogelm.sim.calibrate import SHAPES, calibrate
from mogelm.sim.cost import (
    QUANTS,
    allgather_time,
    attention_decode_time,
    dense_ffn_time,
    routed_experts_time,
    routing_load,
)
from mogelm.sim.engine import (
    decode_step_ms,
    file_profile,
    fp8_kv_pair,
    kv_rate_ratio,
    load_measurements,
    prefill_tokens_per_s,
)
from mogelm.sim.hardware import HardwareProfile, load_profile
from mogelm.sim.layout import H2P_8, decode_plan_at, plan_decode, plan_prefill

PAPER_TOL, OURS_TOL = 0.25, 0.15


@dataclass
class Check:
    source: str
    what: str
    predicted: float
    measured: float
    unit: str
    tolerance: float
    role: str = "prediction"
    note: str = ""

    @property
    def error(self) -> float:
        return (self.predicted - self.measured) / self.measured

    @property
    def passed(self) -> bool:
        return abs(self.error) <= self.tolerance

    def to_dict(self) -> dict:
        d = asdict(self)
        # numpy scalars (from the Monte-Carlo and the fits) are not JSON-serialisable: make them plain
        d.update(predicted=float(self.predicted), measured=float(self.measured),
                 error=round(float(self.error), 4), passed=bool(self.passed))
        return d


def dense_baseline(name: str) -> ModelConfig:
    """The paper's unnamed dense baselines, in Qwen2.5-like shapes (PAPER.md section 6.7)."""
    shapes = {
        "dense-32b": dict(hidden_size=5120, num_layers=64, num_heads=40, dense_intermediate_size=27648),
        "dense-72b": dict(hidden_size=8192, num_layers=80, num_heads=64, dense_intermediate_size=29568),
    }
    return ModelConfig(vocab_size=152064, num_kv_heads=8, head_dim=128, o_bias=False, ffn_type="dense",
                       name=name, **shapes[name])


def _paper_checks() -> list[Check]:
    q = QUANTS["w8a8"]
    a2, duo = load_profile("ascend-800i-a2"), load_profile("ascend-300i-duo")
    moe = from_name("pangu-pro-moe-72b")
    models = {"72BA16B MoE": moe, "32B dense": dense_baseline("dense-32b"),
              "72B dense": dense_baseline("dense-72b")}
    out: list[Check] = []
    # Table 5: prefill on 2 cards of 800I A2, batch 2 x 2048.
    for label, ttft in (("72BA16B MoE", 424.21), ("32B dense", 604.07), ("72B dense", 1282.94)):
        p = plan_prefill(models[label], a2, q, cards=2, batch=2, context=2048)
        note = p.layout.describe()
        out.append(Check("paper Table 5", f"{label} prefill TTFT, 800I A2 x2, 2x2048", p.step_ms, ttft, "ms",
                         PAPER_TOL, note=note))
        out.append(Check("paper Table 5", f"{label} prefill tokens/s/card", p.tokens_per_s_per_card,
                         4096 / ttft * 1e3 / 2, "tok/s", PAPER_TOL, note=note))
    # Table 6: decode on 4 cards of 800I A2: throughput at the TPOT the paper ran at, the TPOT at
    # the paper's batch (in the layout the planner chose), and batch 1 in that layout.
    for label, b1, batch, tpot in (("72BA16B MoE", 18.44, 456, 99.31), ("32B dense", 16.26, 336, 86.34),
                                   ("72B dense", 26.88, 228, 97.74)):
        cfg = models[label]
        best = plan_decode(cfg, a2, q, cards=4, tpot_ms=tpot, context=2048)
        note = f"{best.layout.describe()}; chose batch {best.batch} (paper {batch})"
        out.append(Check("paper Table 6", f"{label} decode tokens/s/card at TPOT <= {tpot} ms, 800I A2 x4",
                         best.tokens_per_s_per_card, batch / tpot * 1e3 / 4, "tok/s", PAPER_TOL, note=note))
        at = decode_plan_at(cfg, a2, q, best.layout, cards=4, batch=batch, context=2048)
        out.append(Check("paper Table 6", f"{label} decode TPOT at batch {batch}", at.step_ms, tpot, "ms",
                         PAPER_TOL, note=best.layout.describe()))
        one = decode_plan_at(cfg, a2, q, best.layout, cards=4, batch=1, context=2048)
        out.append(Check("paper Table 6", f"{label} decode TPOT at batch 1", one.step_ms, b1, "ms", PAPER_TOL,
                         note=best.layout.describe()))
        if label == "72BA16B MoE":
            out.append(Check("paper 5.3", "MoE weight-transfer share of the batch-456 step",
                             at.step.weight_read_s / at.step.total * 100, 29.0, "%", PAPER_TOL, role="fit",
                             note="set the 800I A2 bandwidth estimate"))
    # Table 7: 300I Duo (card = 2 chips).
    best = plan_decode(moe, duo, q, cards=4, tpot_ms=99.5, context=2048)
    out.append(Check("paper Table 7", "MoE decode tokens/s/card at TPOT <= 99.5 ms, 300I Duo x4",
                     best.tokens_per_s_per_card, 80 / 99.5 * 1e3 / 4, "tok/s", PAPER_TOL,
                     note=f"{best.layout.describe()}; chose batch {best.batch} (paper 80)"))
    h2p = decode_plan_at(moe, duo, q, H2P_8, cards=4, batch=80, context=2048)
    out.append(Check("paper Table 7", "MoE decode TPOT at batch 80, paper's H2P layout", h2p.step_ms, 99.5,
                     "ms", PAPER_TOL, note=H2P_8.describe()))
    one = decode_plan_at(moe, duo, q, H2P_8, cards=4, batch=2, context=2048)
    out.append(Check("paper Table 7", "MoE decode TPOT at batch 1 per DP group ('about 50 ms')", one.step_ms,
                     50.0, "ms", PAPER_TOL, note="the paper gives this only as 'about 50 ms'"))
    share = h2p.step.parts.get("comm_ffn", 0.0)
    out.append(Check("paper 6.3", "300I Duo expert-block AllGather+ReduceScatter share of the batch-80 step",
                     share / h2p.step.total * 100, 8.0, "%", PAPER_TOL, role="fit",
                     note="set the 300I Duo cross-CPU link estimate"))
    p = plan_prefill(moe, duo, q, cards=2, batch=2, context=2048)
    out.append(Check("paper Table 7", "MoE prefill latency, 300I Duo x2, 2x2048", p.step_ms, 1940.3, "ms",
                     PAPER_TOL, note=p.layout.describe()))
    out.append(Check("paper Table 7", "MoE prefill tokens/s/card, 300I Duo x2", p.tokens_per_s_per_card,
                     1055.0, "tok/s", PAPER_TOL, note=p.layout.describe()))
    return out


# DESIGN.md section 5, one H200, bf16, Pangu expert shapes (hidden 5120, 64 x 1344, top-1 in 8 groups).
H200_SHARED_MS = {1: 0.061, 8: 0.064, 32: 0.064, 128: 0.069, 512: 0.146, 2048: 0.566, 8192: 2.225,
                  32768: 8.70}
H200_FUSED_MS = {1: 0.106, 32: 0.635, 128: 0.635, 8192: 5.8, 32768: 22.5}


def _h200_checks(hw: HardwareProfile | None = None) -> list[Check]:
    hw = hw or load_profile("nvidia-h200")
    q = QUANTS["bf16"]
    out = []
    for t, ms in H200_SHARED_MS.items():
        pred = dense_ffn_time(t, 5120, 5376, hw, q, kernels=5) * 1e3  # mogelm's unfused SwiGLU
        out.append(Check("DESIGN.md 5", f"H200 shared expert (dense SwiGLU 5376), T={t}", pred, ms, "ms",
                         OURS_TOL))
    for t, ms in H200_FUSED_MS.items():
        _, touched = routing_load("moge", t, 64, 8, 8, 1)
        pred = routed_experts_time(t * 8, touched, 64, 5120, 1344, hw, q) * 1e3
        role = "fit" if t >= 8192 else "prediction"
        note = "measured 0.61-0.66 ms for T=32-128" if t in (32, 128) else ""
        if role == "fit":
            note = "set grouped_gemm_factor"
        out.append(Check("DESIGN.md 5", f"H200 routed experts, fused Triton kernel, T={t}", pred, ms, "ms",
                         OURS_TOL, role=role, note=note))
    return out


H200_GROUPED_MM_MS = {1: 0.317, 8: 0.792, 32: 1.102, 128: 1.164, 512: 1.305, 2048: 2.825, 8192: 8.767,
                      32768: 34.92}


def _calibration_checks() -> list[Check]:
    """Leave-one-out: calibrate from DESIGN.md's torch._grouped_mm rows minus one, predict that one."""
    shape = SHAPES["pangu"]
    out = []
    inner = sorted(H200_GROUPED_MM_MS)[1:-1]  # interpolation only; the end points would be extrapolation
    for t_out in inner:
        rows = [{"model_shape": "pangu", "backend": "grouped_mm", "dtype": "bf16", "tokens": t, "ms": ms}
                for t, ms in H200_GROUPED_MM_MS.items() if t != t_out]
        hw = calibrate({"device": "NVIDIA H200", "date": "2026-11-28", "copy_bandwidth_GBps": 4250.0,
                        "dense_bf16_tflops": 672.0, "rows": rows}, source="DESIGN.md 5")
        _, touched = routing_load("moge", t_out, 64, 8, 8, 1)
        pred = routed_experts_time(t_out * 8, touched, 64, shape["d"], shape["width"], hw,
                                   QUANTS["bf16"]) * 1e3
        out.append(Check("DESIGN.md 5", f"H200 torch._grouped_mm experts, T={t_out}, calibrated without it",
                         pred, H200_GROUPED_MM_MS[t_out], "ms", OURS_TOL,
                         note="leave-one-out calibration curve"))
    return out


MICROBENCH = Path(__file__).with_name("data") / "h200_microbench.json"


def _microbench_checks() -> list[Check]:
    """Decode attention and NCCL collectives measured on 2x H200 (data/h200_microbench.json).

    First every point against the built-in (a-priori) H200 profile; then the points left out of a
    calibration that used only the smallest and largest collective and the largest attention batch.
    """
    if not MICROBENCH.is_file():
        return []
    mb = json.loads(MICROBENCH.read_text())
    bf16 = QUANTS["bf16"]
    coll, attn = mb["collectives"], mb["decode_attention"]
    src = "microbench 2xH200"

    def rows(hw, label, coll_rows, attn_rows, note):
        out = []
        for r in attn_rows:
            pred = attention_decode_time(r["batch"], r["context"], r["heads"], r["kv_heads"], r["head_dim"],
                                         hw, bf16) * 1e3
            out.append(Check(src, f"decode attention SDPA, batch {r['batch']} x {r['context']}, {label}",
                             pred, r["ms"], "ms", OURS_TOL, note=note))
        for r in coll_rows:
            pred = allgather_time(r["world"], r["bytes"], hw) * 1e3
            for key, name in (("allgather_ms", "all-gather"), ("reducescatter_ms", "reduce-scatter")):
                out.append(Check(src, f"NCCL {name} {r['bytes'] / 2**20:.2f} MiB on {r['world']} GPUs, "
                                      f"{label}", pred, r[key], "ms", OURS_TOL, note=note))
        return out

    out = rows(load_profile("nvidia-h200"), "built-in profile", coll, attn, "a-priori alpha 2.5 us, 360 GB/s")
    by_size = sorted(coll, key=lambda r: r["bytes"])
    fit_coll, held_coll = [by_size[0], by_size[-1]], by_size[1:-1]
    by_batch = sorted(attn, key=lambda r: r["batch"])
    cal = calibrate({**mb, "collectives": fit_coll, "decode_attention": by_batch[-1:]}, source="microbench")
    lk = cal.links[0]
    note = f"held out; calibrated {lk.call_overhead_us + lk.latency_us:.0f} us per call, " \
           f"{lk.bandwidth_GBps:.0f} GB/s, " \
           f"KV share {cal.decode_attention_kv_share:.2f}"
    out += rows(cal, "calibrated without it", held_coll, by_batch[:-1], note)
    return out


# Engine rows the model is known to miss, with the reason found in the numbers (not tuned away: a
# parameter set per row would hide the gap). tests/test_sim.py checks that the misses are exactly these.
KNOWN_MISSES = {
    ("h200_engine_2026-12-02_fp8.json", "prefill tokens/s, fp8, 4 steps of 16 x 512"):
        "the 4 steps of 16 x 512 take 592 ms each where the model says 481 (264 device + 217 host); "
        "over the 1 x 2048 fit row the measured time per extra prompt token is 49 us, the model's "
        "W8A8 device time 31 us (bf16: 56 us): either W8A8 at prefill sizes is not ~1.8x bf16 in "
        "this run or the host time grows with the prompts per step (16 chunk-attention calls per "
        "layer, not 1); two rows cannot tell which (src/mogelm/sim/README.md)",
}


def _engine_checks(hw: HardwareProfile | None = None) -> list[Check]:
    """mogelm's engine on one H200 (sim/engine.py): every stored decode step and prefill run
    (data/h200_engine*.json). Fitted, one row each: the eager host time per layer on each file's own
    prefill row marked "fit" (one engine version per file), and the e4m3/bf16 decode-attention byte
    rate (the profile's decode_attention_fp8_kv_efficiency) on the largest batch measured with both
    KV dtypes. Every other row is a prediction."""
    hw = hw or load_profile("nvidia-h200")
    out = []
    for m in load_measurements():
        src = f"H200 engine {m['date']}"
        cal = file_profile(m, hw)
        pair = fp8_kv_pair(m)
        if pair:
            fp8_row, bf16_row = pair
            cfg = from_name("pangu-pro-moe-72b")
            t = {r["quant"]: attention_decode_time(r["batch"], r["context"], cfg.num_heads, cfg.num_kv_heads,
                                                   cfg.head_dim, hw, QUANTS[r["quant"]]) for r in pair}
            pred = (fp8_row["kv_bytes_per_layer"] / t[fp8_row["quant"]]) / (
                bf16_row["kv_bytes_per_layer"] / t[bf16_row["quant"]])
            what = (f"decode attention KV byte rate, e4m3 / bf16 cache, batch {fp8_row['batch']} at "
                    f"{fp8_row['context']} ({fp8_row['quant']})")
            out.append(Check(src, what,
                             pred, kv_rate_ratio(fp8_row, bf16_row), "x", OURS_TOL, role="fit",
                             note=f"set decode_attention_fp8_kv_efficiency = "
                                  f"{hw.decode_attention_fp8_kv_efficiency:g} (per-layer attention core of "
                                  "the step breakdown)"))
        for r in m.get("decode", []):
            cfg = from_name("pangu-pro-moe-72b", num_layers=r["layers"])
            pred = decode_step_ms(cfg, hw, QUANTS[r["quant"]], batch=r["batch"], context=r["context"])
            what = f"decode step, {r['quant']}, batch {r['batch']} at {r['context']}, {r['layers']} layers"
            out.append(Check(src, what, pred, r["step_ms"], "ms", OURS_TOL, note=r["method"]))
        for r in m.get("prefill", []):
            cfg = from_name("pangu-pro-moe-72b", num_layers=r["layers"])
            pred = prefill_tokens_per_s(cfg, cal, QUANTS[r["quant"]], tokens_per_step=r["tokens_per_step"],
                                        seqs_per_step=r["seqs_per_step"], prompt_len=r["prompt_len"],
                                        steps=r["steps"])
            fit = r.get("fit", False)
            what = (f"prefill tokens/s, {r['quant']}, {r['steps']} steps of {r['seqs_per_step']} x "
                    f"{r['prompt_len']}")
            host = cal.eager_layer_overhead_us
            note = (f"set eager_layer_overhead_us = {host:g} for this file" if fit else
                    f"eager host time {host:g} us/layer (this file's fit); {r['method']}")
            if (m["file"], what) in KNOWN_MISSES:
                note = f"known miss: {KNOWN_MISSES[m['file'], what]}; {note}"
            out.append(Check(src, what, pred, r["tokens_per_s"], "tok/s", OURS_TOL,
                             role="fit" if fit else "prediction", note=note))
    return out


def run_checks() -> list[Check]:
    return (_paper_checks() + _h200_checks() + _calibration_checks() + _microbench_checks()
            + _engine_checks())


def h200_full_model(hw: HardwareProfile | None = None) -> dict:
    """The full 72B model on one 8x H200 server (bf16, 2,048 context, TPOT <= 99 ms): a forecast only."""
    plan = plan_decode(from_name("pangu-pro-moe-72b"), hw or load_profile("nvidia-h200"), QUANTS["bf16"],
                       cards=8, tpot_ms=99.0, context=2048)
    return plan.to_dict()


def h200_eager_profile() -> HardwareProfile | None:
    """The H200 profile calibrated from the microbenchmark (eager collectives), if the data is there."""
    if not MICROBENCH.is_file():
        return None
    return calibrate(json.loads(MICROBENCH.read_text()), source="microbench")


def h200_forecasts() -> tuple[dict, dict | None]:
    """The full-model H200 forecast with the built-in profile, and with the microbenchmark's eager
    collectives (None without the microbenchmark data)."""
    eager = h200_eager_profile()
    return h200_full_model(), h200_full_model(eager) if eager else None


def format_forecasts(forecast: dict, forecast_eager: dict | None) -> str:
    lines = ["Forecast, no measurement yet: Pangu Pro MoE bf16 on 8x H200, TPOT <= 99 ms, context 2048:"]
    for name, f in (("built-in profile", forecast), ("microbench-calibrated (eager NCCL)", forecast_eager)):
        if f:
            lines.append(f"  {name}: {f['tokens_per_s_per_card']:.0f} tokens/s per GPU at batch "
                         f"{f['batch']}, TPOT {f['tpot_ms']:.1f} ms, limited by {f['limited_by']} "
                         f"({f['layout_text']})")
    return "\n".join(lines)


def format_table(checks: list[Check]) -> str:
    lines = ["| source | quantity | predicted | measured | error | target | role | note |",
             "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        flag = "ok" if c.passed else "MISS"
        lines.append(f"| {c.source} | {c.what} | {c.predicted:.4g} {c.unit} | {c.measured:.4g} {c.unit} | "
                     f"{c.error * 100:+.1f} % | ±{c.tolerance * 100:.0f} % {flag} | {c.role} | {c.note} |")
    preds = [c for c in checks if c.role == "prediction"]
    lines.append("")
    known = sum(not c.passed and c.note.startswith("known miss") for c in checks)
    lines.append(f"{sum(c.passed for c in preds)}/{len(preds)} predictions within target; "
                 f"{sum(c.passed for c in checks)}/{len(checks)} rows in all"
                 + (f"; {known} known engine miss(es), reason in the note." if known else "."))
    return "\n".join(lines)
