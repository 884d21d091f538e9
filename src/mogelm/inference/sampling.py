"""Sampling parameters, logits processing (logit bias, penalties), next-token sampling and logprobs
for a batch of rows, each with its own settings.

    params = SamplingParams(max_tokens=64, temperature=0.6, top_p=0.95, top_k=50, seed=0,
                            repetition_penalty=1.1, logit_bias={13: -100.0})
    state = PenaltyState(prompt_ids, vocab_size)        # per request, only when params.has_penalties
    next_B = sample(logits_BV, [params_row0, ...], [generator_row0, ...], [state_row0, ...])
    state.update(int(next_B[0]))                         # after each generated token
    [lp] = token_logprobs(logits_BV, next_B, num_top=5)  # chosen token's logprob, rank, top 5

The pipeline of one step, row by row (the order vLLM's sampler uses):
  1. logit_bias: add bias[token] to the raw logits (OpenAI's `logit_bias`, values in [-100, 100]);
  2. repetition_penalty r (HF / vLLM semantics): for every token that occurs in the prompt or the
     output so far, a positive logit is divided by r and a negative one multiplied by r;
  3. frequency_penalty f and presence_penalty p (OpenAI semantics, output tokens only):
     logit -= f * count(token in output) + p * (count > 0);
  4. temperature == 0: argmax of the processed logits (deterministic). Otherwise divide by the
     temperature, cut to the top-k tokens (k <= 0: no cut), then to the smallest set whose
     probability reaches top_p (the nucleus; the most likely token always survives), and draw one
     token with the row's own torch.Generator. A request's seed therefore fixes its output
     whatever else shares the batch.

Logprobs (`token_logprobs`, `prompt_logprobs`) are log_softmax of whatever logits they are given.
Following vLLM's default (`logprobs_mode="raw_logprobs"`), the engine passes the RAW model logits:
the returned numbers are the model's own distribution, before bias, penalties, temperature and
top-k/top-p. `processed_logits` gives steps 1-3 for callers that want the processed distribution.

Legend: B rows, V vocabulary, T prompt positions, K top entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

# Sampling used in the Pangu Pro MoE docs (PAPER.md §3.4); a checkpoint's generation_config.json overrides.
PANGU_DEFAULTS = dict(temperature=0.6, top_p=0.95, top_k=50)
MAX_LOGPROBS = 20  # top logprobs per token, as vLLM's default max_logprobs (OpenAI chat allows 20)


class InvalidSampling(ValueError):
    """A bad sampling value; `param` names the field (the server reports it in its 400 body)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _finite_in(x, lo: float, hi: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and lo <= x <= hi  # NaN fails too


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
    presence_penalty: float = 0.0  # [-2, 2]; subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # [-2, 2]; subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # > 0; 1 = off; applies to prompt and output tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias in [-100, 100]
    logprobs: int | None = None  # per generated token: its logprob and the top `logprobs` (0: none)
    prompt_logprobs: int | None = None  # the same for every prompt token (echo with logprobs)

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
        for name in ("presence_penalty", "frequency_penalty"):
            if not _finite_in(getattr(self, name), -2.0, 2.0):
                raise InvalidSampling(name, f"{name} must be in [-2, 2], got {getattr(self, name)}")
        r = self.repetition_penalty
        if not _finite_in(r, 0.0, math.inf) or r == 0.0 or math.isinf(r):
            raise InvalidSampling("repetition_penalty",
                                  f"repetition_penalty must be a positive number, got {r}")
        for t, b in self.logit_bias.items():
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise InvalidSampling("logit_bias",
                                      f"logit_bias keys must be token ids (integers >= 0), got {t!r}")
            if not _finite_in(b, -100.0, 100.0):
                raise InvalidSampling("logit_bias", f"logit_bias values must be in [-100, 100], got {b!r} "
                                                    f"for token {t}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)
                                  or not 0 <= v <= MAX_LOGPROBS):
                raise InvalidSampling(name, f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """True when sampling needs the request's token history (a PenaltyState)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


class PenaltyState:
    """The token history penalties need, kept on the logits' device and updated one token at a time:
    which tokens occur in the prompt (repetition_penalty) and how often each occurs in the output
    (all three penalties). One per request with params.has_penalties."""

    def __init__(self, prompt_ids: list[int], vocab_size: int, device=None):
        self.prompt_mask_V = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        if prompt_ids:
            self.prompt_mask_V[torch.tensor(prompt_ids, device=device)] = True
        self.output_counts_V = torch.zeros(vocab_size, dtype=torch.int32, device=device)

    def update(self, token: int) -> None:
        """Count one generated token (call it for every sampled token, a final stop token included)."""
        self.output_counts_V[token] += 1


def processed_logits(logits_BV: Tensor, params: list[SamplingParams],
                     penalty_states: list[PenaltyState | None] | None = None) -> Tensor:
    """Steps 1-3 of the module docstring: logit_bias, then repetition, frequency and presence
    penalties; fp32 [B, V]. Rows without bias or penalties are the raw logits (as fp32).
    ValueError if a row has penalties but no PenaltyState: penalties are never silently dropped."""
    assert logits_BV.shape[0] == len(params)
    out_BV = logits_BV.float()  # a copy only if the logits are not fp32 yet; cloned below before writing
    copied = out_BV is not logits_BV
    dev, V = logits_BV.device, logits_BV.shape[1]
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    penalized = [i for i, p in enumerate(params) if p.has_penalties]
    if (biased or penalized) and not copied:
        out_BV = out_BV.clone()
    for i in biased:  # 1. logit_bias (ids beyond the vocabulary are the caller's error)
        ids = list(params[i].logit_bias)
        assert max(ids) < V, f"logit_bias token id {max(ids)} outside the vocabulary ({V})"
        out_BV[i, torch.tensor(ids, device=dev)] += torch.tensor(list(params[i].logit_bias.values()),
                                                                 device=dev, dtype=out_BV.dtype)
    if not penalized:
        return out_BV
    states = [penalty_states[i] if penalty_states is not None else None for i in penalized]
    if any(s is None for s in states):
        raise ValueError("presence/frequency/repetition penalties need the request's PenaltyState")
    rows = torch.tensor(penalized, device=dev)
    x_RV = out_BV[rows]
    prompt_RV = torch.stack([s.prompt_mask_V for s in states])
    counts_RV = torch.stack([s.output_counts_V for s in states]).to(x_RV.dtype)
    in_output_RV = counts_RV > 0

    def column(name):  # [R, 1] per-row values
        return torch.tensor([getattr(params[i], name) for i in penalized], device=dev,
                            dtype=x_RV.dtype).unsqueeze(1)

    rep_R1 = column("repetition_penalty")  # 2. repetition: shrink the logits of seen tokens toward 0
    x_RV = torch.where(prompt_RV | in_output_RV, torch.where(x_RV > 0, x_RV / rep_R1, x_RV * rep_R1), x_RV)
    x_RV = x_RV - column("frequency_penalty") * counts_RV - column("presence_penalty") * in_output_RV
    out_BV[rows] = x_RV  # 3. frequency and presence, output tokens only
    return out_BV


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


def sample(logits_BV: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           penalty_states: list[PenaltyState | None] | None = None) -> Tensor:
    """One next token per row: int64 [B]. Bias and penalties first (processed_logits); then greedy
    rows take the argmax and the others draw with their generator."""
    assert logits_BV.shape[0] == len(params) == len(generators)
    if any(p.logit_bias or p.has_penalties for p in params):
        logits_BV = processed_logits(logits_BV, params, penalty_states)
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


# --- logprobs ------------------------------------------------------------------------------------
@dataclass
class TokenLogprob:
    """One position's logprobs: the token there, its logprob and rank (1 = the most likely), and the
    `num_top` most likely tokens as (token id, logprob), most likely first."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


def token_logprobs(logits_BV: Tensor, token_ids_B: Tensor | list[int],
                   num_top: int | list[int] = 0) -> list[TokenLogprob]:
    """log_softmax of each row (computed in fp32), read at token_ids_B[b]; num_top (per row or one
    for all, <= MAX_LOGPROBS) most likely tokens beside it. One host sync for the whole batch."""
    B, V = logits_BV.shape
    tops = [num_top] * B if isinstance(num_top, int) else list(num_top)
    assert len(tops) == B and all(0 <= k <= MAX_LOGPROBS for k in tops)
    logp_BV = torch.log_softmax(logits_BV.float(), dim=-1)
    ids_B = torch.as_tensor(token_ids_B, device=logits_BV.device, dtype=torch.long).reshape(B)
    chosen_B = logp_BV.gather(1, ids_B.unsqueeze(1)).squeeze(1)
    rank_B = (logp_BV > chosen_B.unsqueeze(1)).sum(dim=1) + 1  # ties share the better rank
    k = min(max(tops, default=0), V)
    top_val_BK, top_ids_BK = logp_BV.topk(k, dim=-1) if k else (logp_BV[:, :0], ids_B[:, None][:, :0])
    ids, chosen, ranks = ids_B.tolist(), chosen_B.tolist(), rank_B.tolist()
    top_vals, top_ids = top_val_BK.tolist(), top_ids_BK.tolist()
    return [TokenLogprob(ids[b], chosen[b], ranks[b], list(zip(top_ids[b][:tops[b]], top_vals[b][:tops[b]])))
            for b in range(B)]


def prompt_logprobs(logits_TV: Tensor, prompt_ids: list[int], num_top: int = 0) -> list[TokenLogprob | None]:
    """Logprobs of every prompt token given the tokens before it, from the logits of an (uncached or
    chunked) forward over the prompt: logits_TV[t] predicts prompt_ids[t + 1]. The first token has
    nothing before it: None (as OpenAI's and vLLM's echo). Returns len(prompt_ids) entries."""
    T = len(prompt_ids)
    assert logits_TV.shape[0] >= T - 1
    if T <= 1:
        return [None] * T
    return [None] + token_logprobs(logits_TV[:T - 1], prompt_ids[1:], num_top)
