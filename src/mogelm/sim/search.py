"""Model-configuration search over the paper's space (PAPER.md section 4), like its Figure 3.

    mogelm sim search [--plot fig3.png] [--json]
    from mogelm.sim.search import SearchSpace, Target, run_search

Every candidate MoGE shape in the space (hidden 4096-8192, query heads 32-64 at head size 128,
KV heads 8-16, layers 40-64, routed experts 32-64 in 8 groups with top-1 per group, a shared
expert four experts wide, total 60-80 B parameters) is planned on each target (hardware, cards,
TPOT limit): the simulator searches its parallel layout and the largest batch within the TPOT
limit and reports decode tokens/s per card. The same shape with top-k routing is planned too, so
the table shows what MoGE's exact balance buys. Throughput is normalised to one candidate drawn at
random with a fixed seed, as the paper does, and candidates are ranked by the geometric mean of
their normalised throughputs over the targets.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import asdict, dataclass, field

from mogelm.config import ModelConfig, count_parameters, from_name
from mogelm.sim.cost import QUANTS
from mogelm.sim.hardware import load_profile
from mogelm.sim.layout import plan_decode


@dataclass(kw_only=True)
class Target:
    hardware: str
    cards: int
    tpot_ms: float

    @property
    def label(self) -> str:
        return f"{self.hardware} x{self.cards} @{self.tpot_ms:g}ms"


# The paper's objective: decode throughput under 100 ms TPOT on 300I Duo, 50 ms on 800I A2.
PAPER_TARGETS = [Target(hardware="ascend-300i-duo", cards=4, tpot_ms=100.0),
                 Target(hardware="ascend-800i-a2", cards=4, tpot_ms=50.0)]


@dataclass(kw_only=True)
class SearchSpace:
    hidden_sizes: tuple[int, ...] = (4096, 5120, 6144, 7168, 8192)
    head_dim: int = 128
    kv_heads: tuple[int, ...] = (8, 16)
    layers: tuple[int, ...] = (40, 48, 56, 64)
    experts: tuple[int, ...] = (32, 48, 64)
    expert_widths: tuple[int, ...] = (768, 1024, 1344, 1536, 2048, 2560, 3072)
    num_groups: int = 8
    shared_experts: int = 4  # shared expert width = shared_experts * expert width (Pangu: 4 x 1344)
    total_params_b: tuple[float, float] = (60.0, 80.0)
    vocab_size: int = 153376

    def __post_init__(self) -> None:
        lo, hi = self.total_params_b
        if not 0 < lo <= hi:
            raise ValueError(f"total_params_b must be (low, high) with 0 < low <= high, "
                             f"got {self.total_params_b}")

    def candidates(self) -> list[ModelConfig]:
        out = []
        for d, kv, n_layers, n_exp, f in itertools.product(self.hidden_sizes, self.kv_heads, self.layers,
                                                           self.experts, self.expert_widths):
            heads = d // self.head_dim
            if d % self.head_dim or heads % kv or n_exp % self.num_groups:
                continue
            cfg = ModelConfig(
                vocab_size=self.vocab_size, hidden_size=d, num_layers=n_layers, num_heads=heads,
                num_kv_heads=kv, head_dim=self.head_dim, num_experts=n_exp, num_groups=self.num_groups,
                num_experts_per_tok=self.num_groups, moe_intermediate_size=f,
                shared_expert_intermediate_size=self.shared_experts * f,
                name=f"h{d}-q{heads}-kv{kv}-L{n_layers}-E{n_exp}-f{f}")
            total, _ = count_parameters(cfg)
            if self.total_params_b[0] <= total / 1e9 <= self.total_params_b[1]:
                out.append(cfg)
        return out


@dataclass
class Candidate:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    layers: int
    experts: int
    expert_width: int
    total_b: float
    active_b: float
    is_pangu: bool
    moge: dict[str, float] = field(default_factory=dict)  # target label -> tokens/s/card (0: infeasible)
    topk: dict[str, float] = field(default_factory=dict)
    batch: dict[str, int] = field(default_factory=dict)
    normalised: dict[str, float] = field(default_factory=dict)
    score: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _throughput(cfg, hw, quant, target, context, routing, topk_skew=1.0) -> tuple[float, int]:
    try:
        plan = plan_decode(cfg, hw, quant, cards=target.cards, tpot_ms=target.tpot_ms, context=context,
                           routing=routing, topk_skew=topk_skew)
    except ValueError:  # does not fit, or cannot meet the TPOT limit at any batch
        return 0.0, 0
    return plan.tokens_per_s_per_card, plan.batch


def is_pangu_shape(cfg: ModelConfig) -> bool:
    p = from_name("pangu-pro-moe-72b")
    keys = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "num_experts", "moe_intermediate_size")
    return all(getattr(cfg, k) == getattr(p, k) for k in keys)


def run_search(space: SearchSpace | None = None, targets: list[Target] | None = None, *, quant: str = "w8a8",
               context: int = 2048, compare_topk: bool = True, topk_skew: float = 1.0,
               seed: int = 0) -> list[Candidate]:
    """Plan every candidate on every target; return candidates ranked best first."""
    space = space or SearchSpace()
    targets = targets or PAPER_TARGETS
    q = QUANTS[quant]
    hws = {t.hardware: load_profile(t.hardware) for t in targets}
    results = []
    for cfg in space.candidates():
        total, active = count_parameters(cfg)
        c = Candidate(cfg.name, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.num_layers,
                      cfg.num_experts, cfg.moe_intermediate_size, total / 1e9, active / 1e9,
                      is_pangu_shape(cfg))
        for t in targets:
            c.moge[t.label], c.batch[t.label] = _throughput(cfg, hws[t.hardware], q, t, context, "moge")
            if compare_topk:
                c.topk[t.label], _ = _throughput(cfg, hws[t.hardware], q, t, context, "topk", topk_skew)
        results.append(c)
    if not results:
        raise ValueError("the search space holds no candidate within the parameter budget")
    # Normalise to a random feasible candidate, as the paper's Figure 3 does.
    feasible = [c for c in results if all(c.moge[t.label] > 0 for t in targets)] or results
    ref = random.Random(seed).choice(feasible)
    for c in results:
        for t in targets:
            base = ref.moge[t.label] or 1.0
            c.normalised[t.label] = c.moge[t.label] / base
        vals = [c.normalised[t.label] for t in targets]
        c.score = math.prod(vals) ** (1 / len(vals)) if all(v > 0 for v in vals) else 0.0
    results.sort(key=lambda c: -c.score)
    return results


def format_ranking(results: list[Candidate], targets: list[Target], top: int = 15) -> str:
    head = "| rank | shape | total B | active B | " + " | ".join(
        f"{t.label} tok/s/card (norm) | top-k/MoGE" for t in targets) + " | score |"
    lines = [head, "|" + "---|" * (5 + 2 * len(targets))]
    shown = results[:top] + [c for c in results[top:] if c.is_pangu]
    for c in shown:
        rank = results.index(c) + 1
        cells = []
        for t in targets:
            m, k = c.moge[t.label], c.topk.get(t.label, 0.0)
            cells.append(f"{m:.0f} (x{c.normalised[t.label]:.2f})")
            cells.append(f"{k / m:.3f}" if m and k else "-")
        star = " *pangu*" if c.is_pangu else ""
        lines.append(f"| {rank} | {c.name}{star} | {c.total_b:.1f} | {c.active_b:.1f} | " + " | ".join(cells)
                     + f" | {c.score:.3f} |")
    return "\n".join(lines)


def plot_search(results: list[Candidate], targets: list[Target], path: str) -> None:
    """Figure-3-style plot (analysis.plots.search_throughput): normalised throughput of every
    candidate on each target, MoGE and the same shape routed top-k, the Pangu shape starred."""
    from mogelm.analysis import plots

    order = sorted(results, key=lambda c: c.active_b)
    panels = {}
    for t in targets:
        ref = [c.moge[t.label] / c.normalised[t.label] if c.normalised[t.label] else 0 for c in order]
        base = max(ref) if ref else 1.0
        panels[t.label] = ([c.normalised[t.label] for c in order],
                           [c.topk.get(t.label, 0) / base for c in order])
    try:
        plots.search_throughput(panels, [i for i, c in enumerate(order) if c.is_pangu], path)
    except ImportError as e:
        if "matplotlib" not in (e.name or ""):
            raise
        raise ValueError("plotting needs matplotlib: pip install matplotlib (or mogelm[plot])") from e
