"""Parallel layouts, memory feasibility and the largest batch that meets a TPOT limit.

    from mogelm.sim.layout import plan_decode, plan_prefill
    plan = plan_decode(cfg, hw, QUANTS["w8a8"], cards=4, tpot_ms=100, context=2048)
    plan.layout, plan.batch, plan.tpot_ms, plan.tokens_per_s_per_card

A layout places one model on `world = cards * devices_per_card` devices (PAPER.md section 6.1):

    attention       attn_dp x attn_tp = world   (DP groups hold whole sequences and their KV cache)
    routed experts  ep x etp = world            (EP rank r holds experts [r*N/ep, (r+1)*N/ep))
    shared expert   shared_tp divides world     (world / shared_tp replicas, each on a token slice)

The paper's H2P layout on 8 devices is attn 2x4, experts 4x2, shared 8. Tensor- and
expert-parallel degrees are powers of two (the modelled topologies, 8-NPU meshes and 4-chip CPU
domains, are); TP degrees must divide the widths they split, and EP must divide the experts.

Memory per device = weights + KV cache + activations, against the usable fraction of capacity.
The batch search assumes decode time grows with batch (it does: every term is non-decreasing).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from mogelm.config import ModelConfig
from mogelm.sim.cost import Quant, StepCost, step_cost
from mogelm.sim.hardware import HardwareProfile


@dataclass(frozen=True, kw_only=True)
class Layout:
    attn_dp: int
    attn_tp: int
    ep: int
    etp: int
    shared_tp: int

    @property
    def world(self) -> int:
        return self.attn_dp * self.attn_tp

    def describe(self) -> str:
        return (f"attention DP{self.attn_dp}xTP{self.attn_tp}, routed experts EP{self.ep}xTP{self.etp}, "
                f"shared TP{self.shared_tp}")

    def to_dict(self) -> dict:
        return asdict(self)


H2P_8 = Layout(attn_dp=2, attn_tp=4, ep=4, etp=2, shared_tp=8)  # the paper's 300I Duo layout


def _powers_of_two_dividing(n: int) -> list[int]:
    return [p for p in (2 ** i for i in range(int(math.log2(n)) + 1)) if n % p == 0]


def enumerate_layouts(cfg: ModelConfig, world: int) -> list[Layout]:
    """Every valid layout of `cfg` on `world` devices."""
    out = []
    for tp in _powers_of_two_dividing(world):
        if cfg.num_heads % tp:
            continue
        if tp <= cfg.num_kv_heads and cfg.num_kv_heads % tp:
            continue
        if tp > cfg.num_kv_heads and tp % cfg.num_kv_heads:
            continue
        if cfg.is_moe:
            ffn_splits = []
            for ep in _powers_of_two_dividing(world):
                etp = world // ep
                if etp & (etp - 1) or cfg.num_experts % ep or cfg.moe_intermediate_size % etp:
                    continue
                ffn_splits.append((ep, etp))
            shared_w = cfg.shared_expert_intermediate_size
        else:
            ffn_splits = [(1, 1)]
            shared_w = cfg.dense_intermediate_size
        for ep, etp in ffn_splits:
            for stp in {tp, world}:
                if stp & (stp - 1) or (shared_w and shared_w % stp):
                    continue
                out.append(Layout(attn_dp=world // tp, attn_tp=tp, ep=ep, etp=etp, shared_tp=stp))
    return sorted(set(out), key=lambda lo: (lo.attn_tp, lo.ep, lo.shared_tp))


# Memory ----------------------------------------------------------------------------------------


@dataclass
class Memory:
    weights: float
    kv_cache: float
    activations: float
    capacity: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def to_dict(self) -> dict:
        return {k: round(v / 1e9, 3) for k, v in
                dict(weights_GB=self.weights, kv_cache_GB=self.kv_cache, activations_GB=self.activations,
                     total_GB=self.total, capacity_GB=self.capacity).items()}


def weight_bytes_per_device(cfg: ModelConfig, quant: Quant, lo: Layout) -> float:
    d, hd = cfg.hidden_size, cfg.head_dim
    kv_heads = max(cfg.num_kv_heads / lo.attn_tp, 1.0)
    attn = ((cfg.num_heads / lo.attn_tp + 2 * kv_heads) * hd * d + cfg.num_heads / lo.attn_tp * hd * d)
    per_layer = attn * quant.weight_bytes
    if cfg.is_moe:
        per_layer += (cfg.num_experts / lo.ep * 3 * d * cfg.moe_intermediate_size / lo.etp
                      * quant.expert_weight_bytes)
        per_layer += d * cfg.num_experts * 2.0  # router, bf16, replicated
        per_layer += 3 * d * cfg.shared_expert_intermediate_size / lo.shared_tp * quant.weight_bytes
    else:
        per_layer += 3 * d * cfg.dense_intermediate_size / lo.shared_tp * quant.weight_bytes
    embed = (1 if cfg.tie_embeddings else 2) * cfg.vocab_size * d / lo.attn_tp * quant.embed_bytes
    return cfg.num_layers * per_layer + embed


def kv_bytes_per_device(cfg: ModelConfig, quant: Quant, lo: Layout, seqs: int, context: int) -> float:
    kv_heads = max(cfg.num_kv_heads / lo.attn_tp, 1.0)
    return (cfg.num_layers * math.ceil(seqs / lo.attn_dp) * context * 2 * kv_heads * cfg.head_dim
            * quant.kv_bytes)


def activation_bytes_per_device(cfg: ModelConfig, lo: Layout, tokens: int, seqs: int) -> float:
    """Peak live activations of one layer (bf16) plus fp32 logits; a coarse upper estimate."""
    d = cfg.hidden_size
    t_dp = math.ceil(tokens / lo.attn_dp)
    qkv = (cfg.num_heads / lo.attn_tp + 2 * max(cfg.num_kv_heads / lo.attn_tp, 1.0)) * cfg.head_dim
    act = t_dp * (d + qkv) + 2 * tokens * d
    if cfg.is_moe:
        act += tokens * cfg.num_experts_per_tok / lo.ep * 3 * cfg.moe_intermediate_size / lo.etp
        act += tokens * cfg.num_experts * 2  # fp32 router probabilities
        act += tokens / (lo.world // lo.shared_tp) * 3 * cfg.shared_expert_intermediate_size / lo.shared_tp
    else:
        act += tokens / (lo.world // lo.shared_tp) * 3 * cfg.dense_intermediate_size / lo.shared_tp
    return act * 2.0 + math.ceil(seqs / lo.attn_dp) * cfg.vocab_size / lo.attn_tp * 4.0


def memory(cfg: ModelConfig, hw: HardwareProfile, quant: Quant, lo: Layout, *, tokens: int, seqs: int,
           context: int) -> Memory:
    return Memory(weights=weight_bytes_per_device(cfg, quant, lo),
                  kv_cache=kv_bytes_per_device(cfg, quant, lo, seqs, context),
                  activations=activation_bytes_per_device(cfg, lo, tokens, seqs),
                  capacity=hw.memory_bytes)


# Plans -----------------------------------------------------------------------------------------


@dataclass
class Plan:
    """A chosen layout and batch, with the predicted step time and throughput."""

    phase: str
    layout: Layout
    cards: int
    batch: int  # sequences in flight (decode) or prompts (prefill)
    context: int
    step: StepCost
    memory: Memory
    limited_by: str = ""  # decode search: what stopped a larger batch ("memory", "tpot" or "batch cap")

    @property
    def step_ms(self) -> float:
        return self.step.total * 1e3

    @property
    def tokens_per_s_per_card(self) -> float:
        tokens = self.batch if self.phase == "decode" else self.batch * self.context
        return tokens / self.step.total / self.cards

    def to_dict(self) -> dict:
        total = self.step.total
        return {
            "phase": self.phase,
            "layout": self.layout.to_dict(),
            "layout_text": self.layout.describe(),
            "cards": self.cards,
            "batch": self.batch,
            "context": self.context,
            ("tpot_ms" if self.phase == "decode" else "ttft_ms"): round(self.step_ms, 3),
            "tokens_per_s_per_card": round(self.tokens_per_s_per_card, 2),
            "breakdown_ms": {k: round(v * 1e3, 3) for k, v in sorted(self.step.parts.items())},
            "weight_read_share": round(self.step.weight_read_s / total, 4) if total else 0.0,
            "memory": self.memory.to_dict(),
            "limited_by": self.limited_by or None,
        }


MAX_BATCH = 1 << 16  # sequences; a cap so tiny models on big hardware still give an answer


def world_size(hw: HardwareProfile, cards: int) -> int:
    if cards < 1:
        raise ValueError(f"cards must be at least 1, got {cards}")
    return cards * hw.devices_per_card


def decode_plan_at(cfg, hw, quant, lo, *, cards, batch, context, routing=None, topk_skew=1.0) -> Plan:
    step = step_cost(cfg, hw, quant, lo, tokens=batch, seqs=batch, context=context, phase="decode",
                     routing=routing, topk_skew=topk_skew)
    mem = memory(cfg, hw, quant, lo, tokens=batch, seqs=batch, context=context)
    return Plan("decode", lo, cards, batch, context, step, mem)


def max_batch(cfg, hw, quant, lo, *, cards, tpot_ms, context, routing=None, topk_skew=1.0,
              limit=MAX_BATCH) -> Plan | None:
    """The largest decode batch (a multiple of attn_dp, at most `limit`) within the TPOT limit and
    memory, or None."""
    unit = lo.attn_dp

    def ok(b: int) -> Plan | None:
        plan = decode_plan_at(cfg, hw, quant, lo, cards=cards, batch=b, context=context, routing=routing,
                              topk_skew=topk_skew)
        return plan if plan.memory.fits and plan.step_ms <= tpot_ms else None

    best = ok(unit)
    if best is None:
        return None
    max_units = max(limit // unit, 1)
    lo_n, hi_n = 1, 2  # in units of attn_dp
    while hi_n <= max_units and (p := ok(hi_n * unit)) is not None:
        best, lo_n, hi_n = p, hi_n, hi_n * 2
    hi_n = min(hi_n, max_units + 1)  # never search past the cap
    while hi_n - lo_n > 1:
        mid = (lo_n + hi_n) // 2
        p = ok(mid * unit)
        if p is None:
            hi_n = mid
        else:
            best, lo_n = p, mid
    nxt = best.batch + unit
    if nxt > limit:
        best.limited_by = "batch cap"
    else:
        over = decode_plan_at(cfg, hw, quant, lo, cards=cards, batch=nxt, context=context, routing=routing,
                              topk_skew=topk_skew)
        best.limited_by = "memory" if not over.memory.fits else "tpot"
    return best


def plan_decode(cfg: ModelConfig, hw: HardwareProfile, quant: Quant, *, cards: int, tpot_ms: float,
                context: int, routing: str | None = None, topk_skew: float = 1.0,
                layouts: list[Layout] | None = None) -> Plan:
    """Best layout and batch for decode throughput under a TPOT limit. Raises ValueError if none."""
    world = world_size(hw, cards)
    layouts = layouts if layouts is not None else enumerate_layouts(cfg, world)
    if not layouts:
        raise ValueError(f"no parallel layout of {cfg.name} fits {world} devices ({cards} cards x "
                         f"{hw.devices_per_card}): TP and EP degrees must be powers of two dividing the "
                         "heads, expert widths and experts")
    plans = [p for lo in layouts if (p := max_batch(cfg, hw, quant, lo, cards=cards, tpot_ms=tpot_ms,
                                                      context=context, routing=routing, topk_skew=topk_skew))]
    if not plans:
        fits = [lo for lo in layouts if memory(cfg, hw, quant, lo, tokens=1, seqs=1, context=context).fits]
        if not fits:
            need = min(memory(cfg, hw, quant, lo, tokens=1, seqs=1, context=context).total for lo in layouts)
            raise ValueError(f"{cfg.name} does not fit on {cards} {hw.name} cards in {quant.name}: needs "
                             f"{need / 1e9:.1f} GB per device, {hw.memory_bytes / 1e9:.1f} GB usable")
        fastest = min(decode_plan_at(cfg, hw, quant, lo, cards=cards, batch=lo.attn_dp, context=context,
                                     routing=routing, topk_skew=topk_skew).step_ms for lo in fits)
        raise ValueError(f"TPOT limit {tpot_ms:g} ms is impossible: the fastest layout needs "
                         f"{fastest:.1f} ms per token at the smallest batch on {cards} {hw.name} cards")
    return max(plans, key=lambda p: (p.tokens_per_s_per_card, -p.step_ms))


def plan_prefill(cfg: ModelConfig, hw: HardwareProfile, quant: Quant, *, cards: int, batch: int, context: int,
                 routing: str | None = None, topk_skew: float = 1.0) -> Plan:
    """Fastest layout for one prefill of `batch` prompts of `context` tokens (TTFT)."""
    world = world_size(hw, cards)
    plans = []
    for lo in enumerate_layouts(cfg, world):
        mem = memory(cfg, hw, quant, lo, tokens=batch * context, seqs=batch, context=context)
        if not mem.fits:
            continue
        step = step_cost(cfg, hw, quant, lo, tokens=batch * context, seqs=batch, context=context,
                         phase="prefill", routing=routing, topk_skew=topk_skew)
        plans.append(Plan("prefill", lo, cards, batch, context, step, mem))
    if not plans:
        raise ValueError(f"prefill of {batch} x {context} tokens of {cfg.name} does not fit on {cards} "
                         f"{hw.name} cards in {quant.name}")
    return min(plans, key=lambda p: p.step.total)
