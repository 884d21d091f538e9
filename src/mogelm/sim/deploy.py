"""One deployment: the best parallel layout, decode batch and throughput of a model on N cards,
plus the prefill time of a few prompts, as a JSON-ready dict and as text (what `mogelm sim` prints).

    from mogelm.sim.deploy import plan_deployment, format_deployment
    out = plan_deployment(cfg, hw, QUANTS["w8a8"], cards=4, layouts=enumerate_layouts(cfg, 4), tpot_ms=100,
                          context=2048)
    print(format_deployment(out, prefill_batch=2))

Decode: the largest batch within the TPOT limit over the given layouts (layout.plan_decode), or,
with `batch`, the fastest layout whose memory holds that batch. Prefill: the fastest layout for
`prefill_batch` prompts of `context` tokens; null when it does not fit.
"""

from __future__ import annotations

from mogelm.config import ModelConfig
from mogelm.sim.cost import Quant
from mogelm.sim.hardware import HardwareProfile
from mogelm.sim.layout import MAX_BATCH, Layout, decode_plan_at, plan_decode, plan_prefill, world_size


def plan_deployment(cfg: ModelConfig, hw: HardwareProfile, quant: Quant, *, cards: int, layouts: list[Layout],
                    tpot_ms: float, context: int, topk_skew: float = 1.0, batch: int | None = None,
                    prefill_batch: int = 2) -> dict:
    if prefill_batch < 0:
        raise ValueError(f"--prefill-batch must be 0 (skip) or more, got {prefill_batch}")
    """Plan decode (and prefill) of `cfg` on `cards` cards; ValueError when nothing fits."""
    if batch is not None:
        plans = [decode_plan_at(cfg, hw, quant, lo, cards=cards, batch=batch, context=context,
                                topk_skew=topk_skew) for lo in layouts]
        fitting = [p for p in plans if p.memory.fits]
        if not fitting:
            raise ValueError(f"batch {batch} at context {context} does not fit in memory in any layout")
        decode = min(fitting, key=lambda p: p.step.total)
    else:
        decode = plan_decode(cfg, hw, quant, cards=cards, tpot_ms=tpot_ms, context=context,
                             topk_skew=topk_skew, layouts=layouts)
    prefill = None
    if prefill_batch:
        try:
            prefill = plan_prefill(cfg, hw, quant, cards=cards, batch=prefill_batch, context=context,
                                   topk_skew=topk_skew)
        except ValueError:
            prefill = None  # a prefill that does not fit is reported as null, not an error
    return {
        "model": cfg.name, "hardware": hw.name, "cards": cards, "devices": world_size(hw, cards),
        "quant": quant.name, "kv_bytes": quant.kv_bytes, "routing": cfg.routing if cfg.is_moe else "dense",
        "context": context, "topk_skew": topk_skew if cfg.is_moe and cfg.routing != "moge" else None,
        "tpot_limit_ms": None if batch is not None else tpot_ms,
        "decode": decode.to_dict(), "prefill": prefill.to_dict() if prefill else None,
    }


def format_deployment(out: dict, prefill_batch: int) -> str:
    """plan_deployment's result as text: layout, batch, TPOT, tokens/s per card, time and memory."""
    d = out["decode"]
    if out["tpot_limit_ms"] is not None:
        limit = f"TPOT <= {out['tpot_limit_ms']:g} ms"
    else:
        limit = f"fixed batch {d['batch']}"
    devices = f"{out['devices']} device{'s' if out['devices'] != 1 else ''}"
    lines = [f"{out['model']} on {out['cards']} x {out['hardware']} ({devices}), "
             f"{out['quant']}, context {out['context']}, {limit}, routing {out['routing']}",
             f"  layout          {d['layout_text']}"]
    why = {"memory": " (memory-bound: a larger batch does not fit)", "tpot": " (TPOT-bound)",
           "batch cap": f" (the search stops at {MAX_BATCH} sequences)"}.get(d["limited_by"], "")
    lines.append(f"  decode batch    {d['batch']}{why}")
    lines.append(f"  TPOT            {d['tpot_ms']:.2f} ms")
    lines.append(f"  tokens/s/card   {d['tokens_per_s_per_card']:.1f}")
    parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(d["breakdown_ms"].items(), key=lambda kv: -kv[1]))
    lines.append(f"  step breakdown  {parts} (ms); weight reads {d['weight_read_share'] * 100:.0f} % of the "
                 "step")
    m = d["memory"]
    lines.append(f"  memory/device   weights {m['weights_GB']:.1f} + KV {m['kv_cache_GB']:.1f} + activations "
                 f"{m['activations_GB']:.2f} = {m['total_GB']:.1f} GB of {m['capacity_GB']:.1f} GB usable")
    if out["prefill"]:
        p = out["prefill"]
        lines.append(f"  prefill         {prefill_batch} x {out['context']} tokens: TTFT {p['ttft_ms']:.1f} "
                     f"ms, {p['tokens_per_s_per_card']:.0f} tokens/s/card ({p['layout_text']})")
    return "\n".join(lines)
