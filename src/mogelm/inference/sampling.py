"""Sampling parameters and next-token sampling for a batch of rows, each with its own settings.

    params = SamplingParams(max_tokens=64, temperature=0.6, top_p=0.95, top_k=50, seed=0)
    next_B = sample(logits_BV, [params_row0, ...], [generator_row0, ...])

temperature == 0 is greedy (argmax, deterministic). Otherwise logits are divided by the
temperature, cut to the top-k tokens (k <= 0: no cut), then to the smallest set whose probability
reaches top_p (the nucleus; the most likely token always survives), and one token is drawn with the
row's own torch.Generator. A request's seed therefore fixes its output whatever else shares the batch.

Legend: B rows, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

# Sampling used in the Pangu Pro MoE docs (PAPER.md §3.4); a checkpoint's generation_config.json overrides.
PANGU_DEFAULTS = dict(temperature=0.6, top_p=0.95, top_k=50)


class InvalidSampling(ValueError):
    """A bad sampling value; `param` names the field (the server reports it in its 400 body)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(kw_only=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # <= 0: disabled
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings; the text ends before the first one
    stop_token_ids: list[int] = field(default_factory=list)  # tokens that end generation (not emitted)
    ignore_eos: bool = False  # keep going past the tokenizer's EOS (load tests)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        self.validate()

    def validate(self) -> None:
        """InvalidSampling (a ValueError) naming the field; the server turns it into a 400."""
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidSampling("max_tokens",
                                  f"max_tokens must be a positive integer, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:  # also rejects NaN
            raise InvalidSampling("temperature", f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidSampling("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise InvalidSampling("top_k", "top_k must be -1 or 0 (both: disabled) or a positive integer, "
                                           f"got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidSampling("seed", f"seed must be in [0, 2**63), got {self.seed}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InvalidSampling("stop_token_ids",
                                  f"stop_token_ids must be non-negative integers, got {self.stop_token_ids}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits_BV: Tensor, temperature_B: Tensor, top_k_B: Tensor, top_p_B: Tensor) -> Tensor:
    """Temperature, top-k and top-p applied row by row; returns probabilities [B, V] (fp32).

    Rows must have temperature > 0; top_k_B <= 0 disables top-k, top_p_B == 1 disables top-p."""
    B, V = logits_BV.shape
    logits = logits_BV.float() / temperature_B.unsqueeze(1)
    # top-k: keep logits >= the k-th largest (ties at the boundary are kept)
    k_B = torch.where(top_k_B > 0, top_k_B.clamp(max=V), torch.full_like(top_k_B, V))
    sorted_BV, order_BV = logits.sort(dim=-1, descending=True)
    kth_B1 = sorted_BV.gather(1, (k_B - 1).unsqueeze(1))
    sorted_BV = sorted_BV.masked_fill(sorted_BV < kth_B1, float("-inf"))
    # top-p: drop a token when the mass of the strictly more likely tokens already reaches top_p
    probs_sorted = sorted_BV.softmax(dim=-1)
    mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
    sorted_BV = sorted_BV.masked_fill(mass_before >= top_p_B.unsqueeze(1), float("-inf"))
    filtered = torch.full_like(logits, float("-inf")).scatter(1, order_BV, sorted_BV)
    return filtered.softmax(dim=-1)


def sample(logits_BV: Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> Tensor:
    """One next token per row: int64 [B]. Greedy rows take the argmax; the others draw with their
    generator."""
    assert logits_BV.shape[0] == len(params) == len(generators)
    out_B = logits_BV.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out_B
    dev = logits_BV.device
    idx = torch.tensor(rows, device=dev)
    probs = filter_logits(
        logits_BV[idx],
        torch.tensor([params[i].temperature for i in rows], device=dev, dtype=torch.float32),
        torch.tensor([params[i].top_k for i in rows], device=dev, dtype=torch.int64),
        torch.tensor([params[i].top_p for i in rows], device=dev, dtype=torch.float32),
    )
    for j, i in enumerate(rows):  # one draw per row so each request's seed alone decides its tokens
        out_B[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    return out_B
