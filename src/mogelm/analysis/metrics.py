"""Load-balance metrics on plain tensors (no model code).

Legend: T tokens, K experts per token, E experts, P devices (expert-parallel ranks),
R Monte-Carlo trials, G expert groups, J = E / G experts per group.

Experts map to devices in contiguous blocks: expert e lives on device e // (E / P), which is
exactly MoGE's group -> device placement when P equals the number of groups.

    device_loads(expert_ids_TK, E, P)      -> [P] expert computations per device (T_i in Eq. 3)
    imbalance_score(loads_P, T)            -> (max - min) / T                    (paper Eq. 3)
    sample_expert_counts(keys_RTGJ, k)     -> [R, E] rows per expert of random routings (the one
                                              Monte-Carlo routing sampler; sim.cost uses it too)
    simulate_imbalance(...)                -> Monte-Carlo IS samples             (paper Eq. 4, Fig. 2b)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from mogelm.kernels import ops  # plain-tensor functions only; no model code behind it


def expert_loads(expert_ids_TK: Tensor, num_experts: int) -> Tensor:
    """Rows per expert, int64 [E] on the CPU (the model's own count, kernels.ops.expert_counts)."""
    return ops.expert_counts(expert_ids_TK.cpu().long(), num_experts)


def device_loads(expert_ids_TK: Tensor, num_experts: int, num_devices: int) -> Tensor:
    """Expert computations per device, int64 [P], experts placed in contiguous blocks."""
    if num_experts % num_devices:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by num_devices ({num_devices})")
    return expert_loads(expert_ids_TK, num_experts).view(num_devices, -1).sum(-1)


def imbalance_score(loads_P: Tensor, num_tokens: int) -> float:
    """Paper Eq. 3: IS = (max_i T_i - min_i T_i) / |X|. 0 means perfectly balanced."""
    return float(loads_P.max() - loads_P.min()) / num_tokens


def max_over_mean(loads: Tensor) -> float:
    """Busiest unit's load over the mean load: the slowdown a straggler causes (1.0 = balanced)."""
    loads = loads.float()
    return float(loads.max() / loads.mean()) if float(loads.mean()) > 0 else float("nan")


def coactivation(expert_ids_TK: Tensor, num_experts: int) -> Tensor:
    """[E, E] empirical probability that experts i and j fire for the same token (diagonal: P(i))."""
    T = expert_ids_TK.shape[0]
    mask_TE = torch.zeros(T, num_experts)
    mask_TE.scatter_(1, expert_ids_TK.cpu(), 1.0)
    return (mask_TE.t() @ mask_TE) / max(T, 1)


def sample_expert_counts(keys_RTGJ: Tensor, picks_per_group: int) -> Tensor:
    """Rows per expert in R random routings of T tokens, int64 [R, E] (E = G * J, groups contiguous).

    Every token takes, inside each of the G groups, the `picks_per_group` experts with the largest
    keys. The caller draws the keys and so chooses the routing it samples: iid uniform (or Gumbel)
    keys give distinct experts uniformly at random; Gumbel keys plus log-probabilities give
    weighted sampling without replacement. G = 1 is top-k over all experts, G groups with
    picks_per_group K/G is MoGE."""
    R, T, G, J = keys_RTGJ.shape
    picked_RTGk = keys_RTGJ.topk(picks_per_group, dim=-1).indices
    ids_RS = (picked_RTGk + torch.arange(G).view(1, 1, G, 1) * J).reshape(R, -1)
    return torch.zeros(R, G * J, dtype=torch.int64).scatter_add_(1, ids_RS, torch.ones_like(ids_RS))


def simulate_imbalance(
    num_experts: int,
    num_devices: int,
    top_k: int,
    num_tokens: int,
    trials: int,
    routing: str = "topk",
    seed: int = 0,
    chunk: int = 4096,
) -> Tensor:
    """Monte-Carlo Imbalance Score samples (paper Eq. 4, Fig. 2b), float64 [trials].

    topk: every token draws K distinct experts uniformly at random (the paper's setup).
    moge: every token draws K/P distinct experts uniformly inside each device's group.
    """
    if num_experts < 1 or num_devices < 1:
        raise ValueError(f"experts ({num_experts}) and groups/devices ({num_devices}) must be positive")
    if num_experts % num_devices:
        raise ValueError(f"experts ({num_experts}) must be divisible by groups/devices ({num_devices})")
    chunk = max(1, min(chunk, (1 << 28) // max(1, num_tokens * num_experts)))  # keys <= 1 GiB per chunk
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top-k ({top_k}) must be in [1, experts={num_experts}]")
    if routing == "moge" and top_k % num_devices:
        raise ValueError(f"MoGE needs top-k ({top_k}) to be a multiple of groups ({num_devices})")
    if num_tokens < 1 or trials < 1:
        raise ValueError("tokens and trials must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    per_device = num_experts // num_devices
    out = []
    for start in range(0, trials, chunk):
        n = min(chunk, trials - start)
        # uniform keys: K distinct uniform experts per token (one group of E), or K/P per device's group
        if routing == "topk":
            keys = torch.rand(n, num_tokens, num_experts, generator=gen).view(n, num_tokens, 1, num_experts)
            counts_RE = sample_expert_counts(keys, top_k)
        elif routing == "moge":
            keys = torch.rand(n, num_tokens, num_devices, per_device, generator=gen)
            counts_RE = sample_expert_counts(keys, top_k // num_devices)
        else:
            raise ValueError(f"routing must be 'topk' or 'moge', got {routing!r}")
        loads = counts_RE.view(n, num_devices, per_device).sum(-1)
        out.append((loads.max(1).values - loads.min(1).values).double() / num_tokens)
    return torch.cat(out)


@dataclass
class ImbalanceSummary:
    routing: str
    mean: float
    p_positive: float
    p95: float
    max: float
    std: float

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(routing: str, samples: Tensor) -> ImbalanceSummary:
    s = samples.double()
    return ImbalanceSummary(
        routing=routing,
        mean=float(s.mean()),
        p_positive=float((s > 0).double().mean()),
        p95=float(torch.quantile(s, 0.95)) if s.numel() else math.nan,
        max=float(s.max()),
        std=float(s.std()) if s.numel() > 1 else 0.0,
    )


def load_summary(counts_E: Tensor, num_devices: int | None = None) -> dict[str, float]:
    """Per-layer load observability in one dict (what MoE users ask of vLLM/Megatron logs):
    max/mean and min/mean of expert load, coefficient of variation, Jain's fairness index
    (1 = perfectly even), dead experts (no rows), and, with `num_devices`, the device-level
    max/mean and Imbalance Score for contiguous expert placement."""
    c = counts_E.double().cpu()
    mean = float(c.mean())
    out = {
        "expert_max_over_mean": float(c.max() / mean) if mean > 0 else float("nan"),
        "expert_min_over_mean": float(c.min() / mean) if mean > 0 else float("nan"),
        "expert_cv": float(c.std(unbiased=False) / mean) if mean > 0 else float("nan"),
        "jain_fairness": (float(c.sum() ** 2 / (len(c) * (c**2).sum())) if float(c.sum()) > 0
                          else float("nan")),
        "dead_experts": int((c == 0).sum()),
    }
    if num_devices is not None:
        dev = c.view(num_devices, -1).sum(-1)
        rows = float(c.sum())
        out["device_max_over_mean"] = float(dev.max() / dev.mean()) if rows > 0 else float("nan")
        # IS needs the token count; with K rows per token, rows/K tokens: report per-row spread instead
        out["device_spread_over_rows"] = float(dev.max() - dev.min()) / rows if rows > 0 else float("nan")
    return out


# Routing statistics of a model's forward passes (training log, validation, `mogelm eval`) ------------
DEFAULT_DEVICES = (8, 4)  # simulated expert-parallel device counts the statistics are given for


class RoutingStats:
    """Accumulates per-layer expert loads, co-activation and per-batch device balance over batches.

    Legend: L MoE layers, E experts, P simulated devices (experts in contiguous blocks).
    `add` takes the per-layer stats of one forward (anything with `counts_E` [E] and
    `expert_ids_TK` [T, K], e.g. mogelm.MoEStats); `summary` returns plain JSON."""

    def __init__(self, num_layers: int, num_experts: int, devices=DEFAULT_DEVICES, coactivation: bool = True):
        self.E = num_experts
        self.devices = [p for p in devices if num_experts % p == 0]
        self.loads_LE = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.coact_LEE = (
            torch.zeros(num_layers, num_experts, num_experts, dtype=torch.float64) if coactivation else None
        )
        self.tokens = 0
        self.batches = 0
        self.is_sum = {p: [0.0] * num_layers for p in self.devices}
        self.is_max = {p: [0.0] * num_layers for p in self.devices}
        self.mom_sum = {p: [0.0] * num_layers for p in self.devices}

    def add(self, layer_stats) -> None:
        T = layer_stats[0].expert_ids_TK.shape[0] if layer_stats else 0
        for layer, s in enumerate(layer_stats):
            self.loads_LE[layer] += s.counts_E.detach().double().cpu()
            if self.coact_LEE is not None:
                # coactivation() is a fp32 probability; times T it is the integer token count up to
                # a rounding error far below 0.5 (T < 2**23), so rounding gives the exact count.
                self.coact_LEE[layer] += torch.round(coactivation(s.expert_ids_TK, self.E).double() * T)
            for p, (score, mom) in _balance(s.expert_ids_TK, self.E, self.devices).items():
                self.is_sum[p][layer] += score
                self.is_max[p][layer] = max(self.is_max[p][layer], score)
                self.mom_sum[p][layer] += mom
        self.tokens += T
        self.batches += 1

    def summary(self) -> dict:
        """Plain-JSON summary: shares [L][E], IS mean/max per layer per device count, max/mean."""
        n = max(self.batches, 1)
        out = {
            "tokens": self.tokens,
            "batches": self.batches,
            "expert_share": (self.loads_LE / max(self.tokens, 1)).tolist(),  # fraction of tokens per expert
            "imbalance": {
                str(p): {
                    "mean_per_layer": [v / n for v in self.is_sum[p]],
                    "max_per_layer": list(self.is_max[p]),
                    "max_over_mean_per_layer": [v / n for v in self.mom_sum[p]],
                }
                for p in self.devices
            },
        }
        if self.coact_LEE is not None:
            out["coactivation"] = (self.coact_LEE / max(self.tokens, 1)).tolist()
        return out


def step_balance(layer_stats, num_experts: int, devices=DEFAULT_DEVICES) -> dict:
    """IS and busiest/mean per layer of one batch, {"is<P>": [L], "mom<P>": [L]} (cheap, for train logs)."""
    usable = [p for p in devices if num_experts % p == 0]
    per_layer = [_balance(s.expert_ids_TK, num_experts, usable) for s in layer_stats]
    out = {}
    for p in usable:
        out[f"is{p}"] = [b[p][0] for b in per_layer]
        out[f"mom{p}"] = [b[p][1] for b in per_layer]
    return out


def _balance(expert_ids_TK: Tensor, num_experts: int, devices) -> dict[int, tuple[float, float]]:
    """{P: (Imbalance Score, busiest over mean)} of one layer's selection on P devices."""
    T = expert_ids_TK.shape[0]
    out = {}
    for p in devices:
        loads_P = device_loads(expert_ids_TK.detach(), num_experts, p)
        out[p] = (imbalance_score(loads_P, T), max_over_mean(loads_P))
    return out
