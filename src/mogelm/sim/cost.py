"""Operator-level cost model: roofline operators, alpha-beta collectives, one transformer layer.

    from mogelm.sim.cost import QUANTS, gemm_time, allgather_time, step_cost
    t = gemm_time(m=456, n=5120, k=5120, hw=hw, quant=QUANTS["w8a8"])       # seconds
    cost = step_cost(cfg, hw, QUANTS["w8a8"], layout, tokens=456, seqs=456, context=2048, phase="decode")
    cost.total, cost.parts                                                   # seconds, breakdown

Every operator costs  max(flops / (peak * efficiency), bytes / achievable_bandwidth) + op_overhead:
the roofline, with a fixed per-kernel time on top. Collectives use alpha-beta over the
interconnect level that holds the group (hardware.LinkLevel):

    all-gather(p, n) = reduce-scatter(p, n) = c + steps(p) * alpha + (p-1)/p * n / bus_bandwidth(p)
    all-reduce(p, n) = 2 * all-gather(p, n)          (reduce-scatter then all-gather)

n is the full buffer per device (the gathered result); c is a per-call overhead (0 in the built-in
profiles; calibrated from eager measurements). For a switch or a shared bus, steps = p-1 and the
bus bandwidth is the per-device link bandwidth, so all-gather = (p-1) * (alpha + n / (p * bw)):
the ring. For a full mesh (HCCS), one step and p-1 links at once.

The layer follows the paper's H2P inference layout (PAPER.md section 6.1): attention runs
data-parallel x tensor-parallel with an all-gather before QKV and a reduce-scatter after o_proj
(RMSNorm on the shard); the MoE block all-gathers every token to every device, runs routed experts
expert-parallel x tensor-parallel and the shared expert tensor-parallel, then reduce-scatters.

Routing load. MoGE gives every EP rank exactly T*K/EP rows (when EP divides the number of
groups). Top-k gives a random load; the busiest rank sets the time, so we use the expected
maximum over EP ranks of its rows (Monte-Carlo with analysis.metrics' routing sampler, cached),
and likewise the most experts any rank touches, which sets its weight reads (see routing_load).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from mogelm.analysis.metrics import sample_expert_counts
from mogelm.config import ModelConfig
from mogelm.sim.hardware import HardwareProfile

# Quantisation ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Quant:
    """Bytes per element and compute dtype of one quantisation scheme."""

    name: str
    weight_bytes: float  # linear-layer weights (scales included)
    act_bytes: float  # GEMM activations
    kv_bytes: float  # KV cache elements
    compute: str  # peak_tflops key used for GEMMs
    comm_bytes: float = 2.0  # hidden states on the wire stay bf16 (TopoComm's int8 comms not modelled)
    embed_bytes: float = 2.0  # embedding and lm_head stay bf16 (not quantised in W8A8 checkpoints)
    expert_bytes: float | None = None  # routed-expert weights when they differ from weight_bytes

    @property
    def expert_weight_bytes(self) -> float:
        return self.weight_bytes if self.expert_bytes is None else self.expert_bytes


QUANTS: dict[str, Quant] = {
    "bf16": Quant(name="bf16", weight_bytes=2, act_bytes=2, kv_bytes=2, compute="bf16"),
    # The paper's W8A8 checkpoints carry int8 KV scales (PAPER.md section 3.3), so KV is int8 too.
    "w8a8": Quant(name="w8a8", weight_bytes=1, act_bytes=1, kv_bytes=1, compute="int8"),
    # int4 weights with one fp16 scale per 128 weights.
    "w4a8": Quant(name="w4a8", weight_bytes=0.5 + 2 / 128, act_bytes=1, kv_bytes=1, compute="int8"),
    "fp8": Quant(name="fp8", weight_bytes=1, act_bytes=1, kv_bytes=1, compute="fp8"),
    # mogelm's fp8 decode recipes (quant.RECIPES), weight-only at decode sizes: e4m3 weights read,
    # products in bf16. fp8-all: every linear but the router, embeddings and LM head; fp8-experts:
    # the routed experts only. "-kv16": a bf16 KV cache instead of e4m3.
    "fp8-all": Quant(name="fp8-all", weight_bytes=1, act_bytes=2, kv_bytes=1, compute="bf16"),
    "fp8-all-kv16": Quant(name="fp8-all-kv16", weight_bytes=1, act_bytes=2, kv_bytes=2, compute="bf16"),
    "fp8-experts": Quant(name="fp8-experts", weight_bytes=2, act_bytes=2, kv_bytes=1, compute="bf16",
                         expert_bytes=1),
    "fp8-experts-kv16": Quant(name="fp8-experts-kv16", weight_bytes=2, act_bytes=2, kv_bytes=2,
                              compute="bf16", expert_bytes=1),
}

ROUTED_KERNELS = 5  # permute, gate_up grouped GEMM, SwiGLU, down grouped GEMM, unpermute+combine
DENSE_FFN_KERNELS = 3  # gate_up GEMM, SwiGLU, down GEMM


# Roofline operators ----------------------------------------------------------------------------


def roofline(flops: float, nbytes: float, hw: HardwareProfile, compute: str, efficiency: float,
             kernels: int = 1) -> float:
    """Seconds for an operator: max(compute time, memory time) + a fixed time per kernel."""
    t_compute = flops / (hw.peak_flops(compute) * efficiency) if flops else 0.0
    t_memory = nbytes / hw.bandwidth
    return max(t_compute, t_memory) + kernels * hw.op_overhead


def gemm_time(m: float, n: float, k: float, hw: HardwareProfile, quant: Quant,
              weight_bytes: float | None = None, out_bytes: float = 2.0) -> float:
    """y[m, n] = x[m, k] @ W[k, n]: 2mnk flops; reads W and x once, writes y."""
    wb = quant.weight_bytes if weight_bytes is None else weight_bytes
    quantised = wb < 2
    flops = 2.0 * m * n * k
    ab = quant.act_bytes if quantised else 2.0
    nbytes = k * n * wb + m * k * ab + m * n * out_bytes
    t = roofline(flops, nbytes, hw, quant.compute if quantised else "bf16", hw.gemm_efficiency)
    if quantised and quant.act_bytes < 2:
        t += act_quant_time(m * k, hw)
    return t


def act_quant_time(elements: float, hw: HardwareProfile) -> float:
    """Dynamic per-token activation quantisation before an int8/fp8 GEMM: read bf16, write 8 bits."""
    return elementwise_time(elements, hw, 3.0)


def elementwise_time(elements: float, hw: HardwareProfile, bytes_per_element: float = 4.0) -> float:
    """Norms, activations, residual adds: memory-bound; bytes_per_element counts reads + writes."""
    return roofline(0.0, elements * bytes_per_element, hw, "bf16", 1.0)


def routed_experts_time(rows: float, touched: float, num_local: int, d: int, f_local: float,
                        hw: HardwareProfile, quant: Quant) -> float:
    """The routed-expert block on one device: SwiGLU experts, `rows` token-expert pairs.

    rows: token-expert assignments this device computes; touched: experts whose weights it reads;
    f_local: expert width on this device (moe_intermediate_size / expert TP).
    """
    if rows <= 0:
        return 0.0
    flops = 2.0 * rows * 3 * d * f_local
    nbytes = (touched * 3 * d * f_local * quant.expert_weight_bytes
              + rows * (2 * d * quant.act_bytes + 3 * f_local * 2))
    eff = hw.grouped_efficiency(rows / max(num_local, 1))
    if eff is None:
        t = roofline(flops, nbytes, hw, quant.compute, hw.gemm_efficiency * hw.grouped_gemm_factor,
                     kernels=ROUTED_KERNELS)
        if quant.act_bytes < 2:  # quantise the input of each grouped GEMM
            t += act_quant_time(rows * d, hw) + act_quant_time(rows * f_local, hw)
        return t
    # Calibrated: the measured block time is the roofline ideal (measured copy bandwidth, measured
    # dense GEMM rate) divided by an efficiency that already includes the kernels' fixed costs.
    ideal = roofline(flops, nbytes, hw, quant.compute, hw.gemm_efficiency, kernels=0)
    return ideal / eff


def dense_ffn_time(rows: float, d: int, f_local: float, hw: HardwareProfile, quant: Quant,
                   kernels: int = DENSE_FFN_KERNELS) -> float:
    """A SwiGLU MLP (the shared expert or a dense FFN) on `rows` tokens, width f_local per device.

    kernels: 3 for a serving engine (merged gate_up GEMM, fused SwiGLU, down GEMM); mogelm's own
    `moe.experts.SwiGLU` runs 5 (gate, up, SiLU, multiply, down).
    """
    if rows <= 0 or f_local <= 0:
        return 0.0
    flops = 2.0 * rows * 3 * d * f_local
    nbytes = 3 * d * f_local * quant.weight_bytes + rows * (2 * d * quant.act_bytes + 3 * f_local * 2)
    compute = quant.compute if quant.weight_bytes < 2 else "bf16"
    t = roofline(flops, nbytes, hw, compute, hw.gemm_efficiency, kernels=kernels)
    if quant.weight_bytes < 2 and quant.act_bytes < 2:
        t += act_quant_time(rows * d, hw) + act_quant_time(rows * f_local, hw)
    return t


def attention_decode_time(seqs: float, context: float, heads: float, kv_heads: float, head_dim: int,
                          hw: HardwareProfile, quant: Quant) -> float:
    """One decode step of attention on one device: reads every cached K and V once.

    The KV stream runs at bandwidth x decode_attention_kv_share, and for an 8-bit cache
    (kv_bytes < 2) at decode_attention_fp8_kv_efficiency of that: the kernel's rate over its bytes
    relative to the bf16 kernel's (hardware.py).
    """
    flops = 4.0 * seqs * context * heads * head_dim  # QK^T and PV
    nbytes = seqs * context * 2 * kv_heads * head_dim * quant.kv_bytes
    t_compute = flops / (hw.peak_flops("bf16") * hw.attention_efficiency)
    t_kv = nbytes / hw.bandwidth / hw.decode_attention_kv_share
    if quant.kv_bytes < 2:
        t_kv /= hw.decode_attention_fp8_kv_efficiency
    return max(t_compute, t_kv) + hw.op_overhead


def attention_prefill_time(seqs: float, length: float, heads: float, kv_heads: float, head_dim: int,
                           hw: HardwareProfile) -> float:
    """Causal flash attention over `seqs` prompts of `length` tokens (half the square computed)."""
    flops = 4.0 * seqs * length * length / 2 * heads * head_dim
    nbytes = seqs * length * (2 * heads + 2 * kv_heads) * head_dim * 2
    return roofline(flops, nbytes, hw, "bf16", hw.attention_efficiency)


def kv_bytes_per_token(cfg: ModelConfig, kv_bytes: float = 2.0) -> float:
    """KV-cache bytes one token occupies over all layers (Pangu Pro MoE, bf16: 192 KiB)."""
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * kv_bytes


# Collectives -----------------------------------------------------------------------------------


def allgather_time(p: int, nbytes: float, hw: HardwareProfile) -> float:
    """All-gather (or reduce-scatter) of a buffer of `nbytes` in total over p devices."""
    if p <= 1 or nbytes <= 0:
        return 0.0
    lk = hw.link_for(p)
    return ((lk.call_overhead_us + lk.steps(p) * lk.latency_us) * 1e-6
            + (p - 1) / p * nbytes / lk.bus_bandwidth(p))


reducescatter_time = allgather_time


def allreduce_time(p: int, nbytes: float, hw: HardwareProfile) -> float:
    """All-reduce as reduce-scatter + all-gather."""
    return 2.0 * allgather_time(p, nbytes, hw)


# Routing load ----------------------------------------------------------------------------------

EXACT_TOKENS = 64  # up to this many tokens, sample each token's distinct picks exactly


@functools.lru_cache(maxsize=256)
def expert_popularity(num_experts: int, top_k: int, skew: float) -> tuple[float, ...]:
    """Per-expert pick probabilities (summing to 1) whose busiest expert gets `skew` x the mean load.

    Zipf-shaped (p_i ~ i^-a, a solved by bisection), then shuffled with a fixed seed so popular
    experts land on random devices. skew = 1 is uniform. A token picks K distinct experts, so no
    expert can exceed N/K x the mean.
    """
    if not 1.0 <= skew <= num_experts / top_k:
        raise ValueError(f"top-k skew must be in [1, N/K = {num_experts / top_k:g}], got {skew}")
    ranks = np.arange(1, num_experts + 1, dtype=np.float64)

    def ratio(a: float) -> float:
        w = ranks ** -a
        return float(w[0] / w.mean())

    lo, hi = 0.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(mid) < skew else (lo, mid)
    w = ranks ** -lo
    p = w / w.sum()
    return tuple(np.random.default_rng(7).permutation(p).tolist())


@functools.lru_cache(maxsize=65536)
def routing_load(routing: str, tokens: int, num_experts: int, num_groups: int, top_k: int, ep: int,
                 skew: float = 1.0, samples: int = 128) -> tuple[float, float]:
    """(E[max rows], E[max experts touched]) over the `ep` expert-parallel ranks for `tokens` tokens.

    The busiest rank sets the expert block's time: rows drive compute, touched experts drive the
    weight bytes it reads. The randomness is per token:
      moge  every token picks K' = K/M distinct experts inside every group of N/M, uniformly;
      topk  every token picks K distinct experts out of N, uniformly (skew = 1) or with the
            expert popularity of `expert_popularity(N, K, skew)` (a real router's imbalance).
    MoGE with EP dividing M gives every rank exactly T*K/EP rows by construction, whatever the
    router prefers inside a group. Up to EXACT_TOKENS tokens the picks are sampled exactly
    (Gumbel top-K, through analysis.metrics.sample_expert_counts, the sampler behind
    `mogelm imbalance` too); above, each group's (or the layer's) picks are one multinomial (with
    replacement, a slight over-estimate of the spread). A fixed seed makes the Monte-Carlo
    deterministic; results are cached.
    """
    if tokens <= 0:
        return 0.0, 0.0
    rng = np.random.default_rng(1234)
    n_g = num_experts // num_groups
    moge = routing == "moge"
    probs = None if moge or skew == 1.0 else np.array(expert_popularity(num_experts, top_k, skew))
    if tokens <= EXACT_TOKENS:
        shape = (samples, tokens, num_groups, n_g) if moge else (samples, tokens, 1, num_experts)
        keys = rng.gumbel(size=shape)
        if probs is not None:
            keys += np.log(probs)
        k_pick = top_k // num_groups if moge else top_k
        counts = sample_expert_counts(torch.from_numpy(keys), k_pick).numpy()  # K largest keys per group
    elif moge:
        k_prime = top_k // num_groups
        counts = rng.multinomial(tokens * k_prime, [1 / n_g] * n_g, size=(samples, num_groups))
        counts = counts.reshape(samples, num_experts)
    else:
        pvals = probs if probs is not None else [1 / num_experts] * num_experts
        counts = rng.multinomial(tokens * top_k, pvals, size=samples)
    per_rank = counts.reshape(samples, ep, num_experts // ep)
    rows = per_rank.sum(axis=-1).max(axis=-1).mean()
    touched = (per_rank > 0).sum(axis=-1).max(axis=-1).mean()
    if moge and num_groups % ep == 0:
        rows = tokens * top_k / ep  # exact: every token sends K' rows to each group
    return float(rows), float(touched)


# One step of the whole model -------------------------------------------------------------------


@dataclass
class StepCost:
    """Seconds for one forward step on the busiest device, with a breakdown."""

    total: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    weight_read_s: float = 0.0  # time to stream the weights this step touches (the paper's "weight transfer")

    def add(self, part: str, seconds: float) -> None:
        self.parts[part] = self.parts.get(part, 0.0) + seconds
        self.total += seconds

    def scaled(self, factor: float) -> StepCost:
        out = StepCost(total=self.total * factor, weight_read_s=self.weight_read_s * factor)
        out.parts = {k: v * factor for k, v in self.parts.items()}
        return out


def step_cost(cfg: ModelConfig, hw: HardwareProfile, quant: Quant, layout, *, tokens: int, seqs: int,
              context: int, phase: str, routing: str | None = None, topk_skew: float = 1.0,
              eager: bool = False) -> StepCost:
    """Cost of one forward step: decode (tokens = seqs, each attending to `context` cached tokens)
    or prefill (seqs prompts of `context` tokens, tokens = seqs * context).

    `layout` is a layout.Layout (attn_dp, attn_tp, ep, etp, shared_tp; world = their products).
    routing overrides cfg.routing ("moge", anything else is costed as top-k); topk_skew is the
    busiest expert's load over the mean for a top-k router (1 = uniform; see expert_popularity).
    Every layer is identical, so one layer is costed and multiplied by num_layers. `eager` adds
    the profile's host time per layer of an ungraphed step (mogelm's engine prefill; "host").
    """
    if phase not in ("decode", "prefill"):
        raise ValueError(f"phase must be decode or prefill, got {phase!r}")
    routing = routing or cfg.routing
    d, hd, L = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    world = layout.world
    tp, dp = layout.attn_tp, layout.attn_dp
    t_dp = math.ceil(tokens / dp)  # tokens in the busiest attention DP group
    s_dp = math.ceil(seqs / dp)
    heads = cfg.num_heads / tp
    kv_heads = max(cfg.num_kv_heads / tp, 1.0)  # KV heads are replicated once tp > num_kv_heads
    cb = quant.comm_bytes

    layer = StepCost()
    weights = 0.0  # weight bytes read per layer on the busiest device
    # --- attention block (H2P: AG -> QKV -> attn -> o_proj -> RS, norms on the shard) ---------
    layer.add("elementwise", elementwise_time(t_dp / tp * d, hw))  # input RMSNorm on the shard
    layer.add("comm_attention", allgather_time(tp, t_dp * d * cb, hw))
    qkv_n = (heads + 2 * kv_heads) * hd
    layer.add("gemm", gemm_time(t_dp, qkv_n, d, hw, quant))
    layer.add("elementwise", elementwise_time(t_dp * qkv_n, hw))  # bias + RoPE + KV-cache write
    if phase == "decode":
        layer.add("attention", attention_decode_time(s_dp, context, heads, kv_heads, hd, hw, quant))
    else:
        layer.add("attention", attention_prefill_time(s_dp, context, heads, kv_heads, hd, hw))
    layer.add("gemm", gemm_time(t_dp, d, heads * hd, hw, quant))
    weights += (qkv_n * d + heads * hd * d) * quant.weight_bytes
    layer.add("comm_attention", reducescatter_time(tp, t_dp * d * cb, hw))
    layer.add("elementwise", elementwise_time(t_dp / tp * d, hw, 6.0))  # residual add + RMSNorm

    # --- FFN block: all tokens to all devices, experts, reduce-scatter back ----------------------
    layer.add("comm_ffn", allgather_time(world, tokens * d * cb, hw))
    if cfg.is_moe:
        n, k_top = cfg.num_experts, cfg.num_experts_per_tok
        # Router: every device computes all logits (the global softmax needs them), then top-k.
        layer.add("gemm", gemm_time(tokens, n, d, hw, quant, weight_bytes=2.0))
        layer.add("elementwise", elementwise_time(tokens * n, hw, 8.0))
        weights += d * n * 2.0
        ep, etp = layout.ep, layout.etp
        num_local = n // ep
        skew = 1.0 if routing == "moge" else float(topk_skew)
        rows, touched = routing_load("moge" if routing == "moge" else "topk", int(tokens), n, cfg.num_groups,
                                     k_top, ep, skew)
        f_local = cfg.moe_intermediate_size / etp
        layer.add("routed_experts", routed_experts_time(rows, touched, num_local, d, f_local, hw, quant))
        weights += touched * 3 * d * f_local * quant.expert_weight_bytes
        ffn_width = cfg.shared_expert_intermediate_size
    else:
        ffn_width = cfg.dense_intermediate_size
    if ffn_width:
        shared_dp = world // layout.shared_tp
        f_local = ffn_width / layout.shared_tp
        part = "shared_ffn" if cfg.is_moe else "dense_ffn"
        layer.add(part, dense_ffn_time(math.ceil(tokens / shared_dp), d, f_local, hw, quant))
        weights += 3 * d * f_local * quant.weight_bytes
    layer.add("comm_ffn", reducescatter_time(world, tokens * d * cb, hw))
    layer.add("elementwise", elementwise_time(tokens / world * d, hw, 6.0))  # combine + residual

    step = layer.scaled(L)
    step.weight_read_s = L * weights / hw.bandwidth
    # --- head: final norm, vocab-parallel lm_head on the last token of each sequence ----------
    head_rows = s_dp
    step.add("elementwise", elementwise_time(head_rows * d, hw))
    step.add("gemm", gemm_time(head_rows, cfg.vocab_size / tp, d, hw, quant, weight_bytes=quant.embed_bytes))
    step.add("comm_attention", allgather_time(tp, head_rows * 8.0, hw))  # per-shard max logit + index
    step.weight_read_s += cfg.vocab_size / tp * d * quant.embed_bytes / hw.bandwidth
    if eager and hw.eager_layer_overhead_us:
        step.add("host", L * hw.eager_layer_overhead_us * 1e-6)
    return step
