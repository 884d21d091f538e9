"""mogelm's own inference engine on one device, as the simulator sees it, and our measurements of it.

    from mogelm.sim.engine import decode_step_ms, prefill_tokens_per_s, load_measurements
    decode_step_ms(cfg, hw, QUANTS["fp8-all"], batch=256, context=2048)     # one graphed decode step
    prefill_tokens_per_s(cfg, hw, QUANTS["fp8"], tokens_per_step=8192, seqs_per_step=16, prompt_len=512,
                         steps=4)                                        # 64 x 512 prompts, chunk 8192

Model. A decode step is one step_cost of the whole model on one device (layout 1 x 1): the engine
replays it from a CUDA graph, so no host time is added. A prefill run is `steps` eager engine steps
of `tokens_per_step` prompt tokens in `seqs_per_step` prompts each: step_cost(phase="prefill",
eager=True), i.e. the device work plus the profile's `eager_layer_overhead_us` per layer (the host
time the device waits for in an ungraphed step: Python, and the many small launches of the chunked
prefill attention). That parameter describes one version of the engine's code, so it is fitted per
measurement file, on the file's own prefill row marked "fit" (`fit_eager_overhead`, `file_profile`);
the file's other prefill rows are predictions. Prefill weights: mogelm's fp8 recipes run W8A8 at
prefill sizes ("auto"), so an fp8 prefill is costed with QUANTS["fp8"].

The decode-attention kernel over an e4m3 KV cache streams its bytes at a fraction of the bf16
kernel's rate (the profile's `decode_attention_fp8_kv_efficiency`). `fp8_kv_pair` picks the decode
rows that measure it: the largest batch run with both KV dtypes (same recipe and context) whose
per-layer attention-core times `mogelm bench decode --breakdown` recorded; `kv_rate_ratio` is the
ratio of their KV bytes per second.

Measurements (data/h200_engine*.json, one file per run; validate.py turns every row into a check):

    {"device": "NVIDIA H200", "date": "2026-12-02", "source": "...", "copy_bandwidth_GBps": 4249,
     "decode":  [{"quant": "bf16", "batch": 256, "context": 2048, "layers": 48, "step_ms": 69.25,
                  "method": "...",
                  "attention_core_ms_per_layer": 0.45, "kv_bytes_per_layer": 1073741824}, ...],
                  (the last two optional: from a run with the step breakdown)
     "prefill": [{"quant": "bf16", "tokens_per_step": 8192, "seqs_per_step": 16, "prompt_len": 512,
                  "steps": 4, "layers": 48, "tokens_per_s": 13121, "fit": false, "method": "..."}, ...]}

`import_bench(decode_json, prefill_json, out)` writes such a file from the JSON of
`mogelm bench decode` / `mogelm bench prefill` (inference/bench_model.py), so a new GPU run joins
the validation by one call; its "one_long" prefill (one prompt in one step) is marked as the
file's fit row.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mogelm.config import ModelConfig, from_name
from mogelm.sim.cost import QUANTS, Quant, step_cost
from mogelm.sim.hardware import HardwareProfile
from mogelm.sim.layout import Layout

ONE_DEVICE = Layout(attn_dp=1, attn_tp=1, ep=1, etp=1, shared_tp=1)
DATA = Path(__file__).with_name("data")
SIM_QUANT = {  # (bench recipe, KV dtype) -> sim quant
    ("bf16", "bf16"): "bf16", ("fp8-all", "fp8"): "fp8-all", ("fp8-all", "bf16"): "fp8-all-kv16",
    ("fp8-experts", "fp8"): "fp8-experts", ("fp8-experts", "bf16"): "fp8-experts-kv16"}
KV16 = {"fp8-all": "fp8-all-kv16", "fp8-experts": "fp8-experts-kv16"}  # e4m3-KV quant -> its bf16-KV twin


def decode_step_ms(cfg: ModelConfig, hw: HardwareProfile, quant: Quant, *, batch: int, context: int) -> float:
    """One decode step of `batch` sequences at `context` tokens each, on one device (graphed)."""
    return step_cost(cfg, hw, quant, ONE_DEVICE, tokens=batch, seqs=batch, context=context,
                     phase="decode").total * 1e3


def prefill_ms(cfg: ModelConfig, hw: HardwareProfile, quant: Quant, *, tokens_per_step: int,
               seqs_per_step: int, prompt_len: int, steps: int) -> float:
    """`steps` eager prefill steps of `seqs_per_step` whole prompts of `prompt_len` tokens."""
    step = step_cost(cfg, hw, quant, ONE_DEVICE, tokens=tokens_per_step, seqs=seqs_per_step,
                     context=prompt_len, phase="prefill", eager=True)
    return step.total * 1e3 * steps


def prefill_tokens_per_s(cfg: ModelConfig, hw: HardwareProfile, quant: Quant, *, tokens_per_step: int,
                         seqs_per_step: int, prompt_len: int, steps: int) -> float:
    ms = prefill_ms(cfg, hw, quant, tokens_per_step=tokens_per_step, seqs_per_step=seqs_per_step,
                    prompt_len=prompt_len, steps=steps)
    return tokens_per_step * steps / ms * 1e3


def fit_eager_overhead(cfg: ModelConfig, hw: HardwareProfile, row: dict) -> HardwareProfile:
    """The profile with eager_layer_overhead_us set so that this measured prefill row is reproduced:
    (measured time - predicted device time) / (steps x layers)."""
    base = dataclasses.replace(hw, eager_layer_overhead_us=0.0)
    quant = QUANTS[row["quant"]]
    device_ms = prefill_ms(cfg, base, quant, tokens_per_step=row["tokens_per_step"],
                           seqs_per_step=row["seqs_per_step"], prompt_len=row["prompt_len"],
                           steps=row["steps"])
    measured_ms = row["tokens_per_step"] * row["steps"] / row["tokens_per_s"] * 1e3
    per_layer_us = max(measured_ms - device_ms, 0.0) / (row["steps"] * cfg.num_layers) * 1e3
    sources = dict(hw.sources)
    sources["eager_layer_overhead_us"] = (f"fitted on one measured prefill ({row.get('method', '')}): "
                                          f"{per_layer_us:.0f} us of host time per layer of an eager step")
    return dataclasses.replace(hw, eager_layer_overhead_us=round(per_layer_us, 1), sources=sources)


def fit_row(measurement: dict) -> dict | None:
    """The measurement file's prefill row marked "fit" (the first, if several), or None."""
    return next((r for r in measurement.get("prefill", []) if r.get("fit")), None)


def file_profile(measurement: dict, hw: HardwareProfile, model: str = "pangu-pro-moe-72b") -> HardwareProfile:
    """The profile for this measurement file's rows: eager_layer_overhead_us fitted on the file's
    own fit row (one engine version each); the profile unchanged where the file has none."""
    row = fit_row(measurement)
    if row is None:
        return hw
    return fit_eager_overhead(from_name(model, num_layers=row["layers"]), hw, row)


def kv_rate_ratio(fp8_row: dict, bf16_row: dict) -> float:
    """Measured KV bytes per second of the e4m3 decode-attention kernel over the bf16 one's."""
    rate = lambda r: r["kv_bytes_per_layer"] / r["attention_core_ms_per_layer"]  # noqa: E731
    return rate(fp8_row) / rate(bf16_row)


def fp8_kv_pair(measurement: dict) -> tuple[dict, dict] | None:
    """(e4m3-KV row, bf16-KV row): the largest batch at which the same weight recipe and context
    ran with both KV dtypes and a per-layer attention-core time; None if no such pair."""
    timed = [r for r in measurement.get("decode", []) if r.get("attention_core_ms_per_layer")]
    pairs = []
    for r in timed:
        if r["quant"] not in KV16:
            continue
        for o in timed:
            if (o["quant"], o["batch"], o["context"]) == (KV16[r["quant"]], r["batch"], r["context"]):
                pairs.append((r, o))
    return max(pairs, key=lambda p: (p[0]["batch"], p[0]["context"])) if pairs else None


def load_measurements(folder: Path = DATA) -> list[dict]:
    """Every stored engine measurement file (data/h200_engine*.json), oldest first."""
    out = []
    for f in sorted(folder.glob("h200_engine*.json")):
        d = json.loads(f.read_text())
        d["file"] = f.name
        out.append(d)
    return out




def rows_from_bench(decode: dict | None, prefill: dict | None, fit_case: str | None = "one_long") -> dict:
    """Engine measurement rows (the schema above) from bench_model results (either may be None).
    The prefill run of case `fit_case` is marked as the file's fit row."""
    first = decode or prefill or {}
    out = dict(device=first.get("device"), date=first.get("date"), source="mogelm bench decode / prefill",
               copy_bandwidth_GBps=(decode or {}).get("copy_bandwidth_GBps"), decode=[], prefill=[])
    layers = None
    if decode:
        layers = decode["settings"].get("layers")
        for r in decode.get("decode", []):
            key = (r.get("recipe"), r.get("kv_dtype"))
            if "error" in r or key not in SIM_QUANT:
                continue
            row = dict(quant=SIM_QUANT[key], batch=r["batch"], context=r["context"], layers=layers or 48,
                       step_ms=r["step_ms"], tpot_ms=r.get("tpot_ms"),
                       method="CUDA-graph replay of the whole step (bench_model)")
            core = (r.get("layer_parts_ms") or {}).get("attention_core")
            if core and r.get("layer_kv_bytes"):  # the step breakdown: the attention kernel alone
                row.update(attention_core_ms_per_layer=core, kv_bytes_per_layer=r["layer_kv_bytes"])
            out["decode"].append(row)
    if prefill:
        recipe = prefill["settings"].get("recipe", "bf16")
        for r in prefill.get("runs", []):
            steps = max(1, -(-r["tokens"] // r["chunk_size"]))
            out["prefill"].append(dict(quant="bf16" if recipe == "bf16" else "fp8",
                                       tokens_per_step=r["tokens"] // steps,
                                       seqs_per_step=max(1, r["prompts"] // steps),
                                       prompt_len=r["prompt_len"],
                                       steps=steps, layers=prefill.get("layers", 48),
                                       tokens_per_s=r["tokens_per_s"], fit=r["case"] == fit_case,
                                       method=f"engine prefill, {r['case']} (bench_model)"))
    return out


def import_bench(decode_json: str | None, prefill_json: str | None, out: str,
                 fit_case: str | None = "one_long") -> dict:
    """Write rows_from_bench of these result files to `out` (e.g. data/h200_engine_<date>.json)."""
    read = lambda p: json.loads(Path(p).read_text()) if p else None  # noqa: E731
    rows = rows_from_bench(read(decode_json), read(prefill_json), fit_case)
    names = ", ".join(Path(p).name for p in (decode_json, prefill_json) if p)
    rows["source"] += f" ({names})"
    Path(out).write_text(json.dumps(rows, indent=1) + "\n")
    return rows
