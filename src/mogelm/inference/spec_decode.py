"""Speculative decoding inside the paged engine: the options, the MTP drafter over the paged cache,
and the verify step's accept rule for a batch of requests (the engine, engine.py, calls these).

    engine = Engine(model, tok, speculative="ngram", draft_tokens=3)       # or "mtp"
    engine = Engine(model, tok, speculative="mtp", draft_tokens=2, spec_max_batch=64)

One engine step with speculation (docs/speculative.md, "Stage 2"):
  1. every running request that is decoding (one pending token) and may speculate gets up to k
     drafts appended to its token_ids (Request.num_draft): n-gram lookup in its tokens
     (drafters.NgramDrafter), or MTP: the draft made at the end of the previous step from the MTP
     module (below);
  2. the scheduler runs it as a *verify row*: the pending token and its drafts, k + 1 positions,
     each one a decode row of the paged attention (same block table, length position + 1: the
     kernel writes all k + 1 keys first, so row i sees the rows before it), so a decode+verify step
     is still "decode only" and replays a CUDA graph (buckets up to max_batch x (k + 1) rows);
  3. after the forward, `verify` applies speculative.accept_greedy / accept_sampled to the k + 1
     logits rows of each request; the engine emits the accepted drafts and the corrected (or
     bonus) token one at a time through its usual stop checks (stop token, stop strings,
     max_tokens, context), so a request ends exactly where decoding without drafts would, and rolls
     back the rejected positions' KV (BlockManager.truncate frees blocks left empty).

Which requests speculate: every decoding request except those with presence / frequency /
repetition penalties (their logits at draft position i depend on the drafts before it; such a
request simply decodes one token per step, exactly as without speculation). Logprobs and
logit_bias are supported exactly (logprobs come from each emitted token's own logits row). n > 1
choices speculate independently once forked. Sampled requests use the accept/resample rule with
their own generator (deterministic drafts: q one-hot), so a seeded request is reproducible.

Switch-off: a verify step computes k + 1 positions per sequence. At small batch a decode step
is bound by reading the weights, so the extra positions are almost free; at large batch it is
bound by compute and k + 1 times the tokens cost nearly k + 1 times the time while only
1 + E[accepted] tokens come out. The engine therefore speculates only while the running batch has
at most `spec_max_batch` sequences (default DEFAULT_SPEC_MAX_BATCH, from the H200 prediction in
benchmarks/notes_spec.md); above it every request decodes normally and MTP drafting pauses too
(its block would cost one layer per step; positions decoded meanwhile get no MTP KV, which only
weakens those sequences' drafts once speculation resumes).

MTP drafts (`MTPRunner`). The model's first MTP module (mogelm.mtp) predicts token t + 2 from the
trunk's pre-norm hidden state at t and the embedding of token t + 1. Its transformer block has
attention, so it keeps its own KV in the pool: layer L (after the L trunk layers) of the same
blocks and block tables. After every step the engine runs the module over every position whose
trunk hidden state this step produced and whose next token is now known (prompt chunks, decode
rows, the accepted part of verify rows): one extra forward of one block, decode rows only. The
last such row of a decoding request gives draft 1 (argmax). For k > 1 the module is chained on
its own output (DeepSeek/vLLM-style "MTP reuse"): draft i + 1 comes from the module's output
hidden state for draft i and the embedding of draft i, at the next position; these chained rows
run after scheduling (their positions are then allocated), write tentative KV that the next
step's real rows overwrite, and cost k - 1 more one-block forwards. Deeper MTP modules (depth
>= 2) are not used by the engine (only module 1 is chained), which is documented in
docs/speculative.md. The MTP KV of a block found in the prefix cache, or shared with forked
choices, may come from another sequence; that changes drafts, never the output. With an fp8 KV
cache the MTP layer takes the widest of the trunk's calibrated per-head scales.

Legend: N packed rows, D hidden, V vocabulary, R verify rows of one request (k + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mogelm.inference.block_manager import NULL_BLOCK
from mogelm.inference.paged import PagedAttention, PagedKVCache
from mogelm.inference.sampling import filter_logits, processed_logits
from mogelm.inference.speculative import accept_sampled

METHODS = ("ngram", "mtp")
DEFAULT_SPEC_MAX_BATCH = 64  # benchmarks/notes_spec.md: 72B gain predicted through 64, marginal at 256


@dataclass(frozen=True)
class SpecConfig:
    method: str  # "ngram" | "mtp"
    k: int  # draft tokens per verify row (at most)
    max_batch: int  # speculate only while the running batch is at most this

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {METHODS}, got {self.method!r}")
        if self.k < 1:
            raise ValueError(f"draft_tokens must be at least 1, got {self.k}")
        if self.max_batch < 0:
            raise ValueError(f"spec_max_batch must be >= 0, got {self.max_batch}")


def may_speculate(req) -> bool:
    """Requests that speculate: all but those with penalties (module docstring)."""
    return not req.params.has_penalties


def _pad_tables(tables: list[list[int]]) -> Tensor:
    width = max((len(t) for t in tables), default=1)
    padded = [t + [NULL_BLOCK] * (width - len(t)) for t in tables]
    return torch.from_numpy(np.array(padded, dtype=np.int32).reshape(len(padded), width))


class MTPRunner:
    """Module 1 of the model's MTP stack over the paged pool (its KV in layer `layer`)."""

    def __init__(self, model, cache: PagedKVCache, block_size: int):
        assert model.mtp is not None and len(cache.k) > model.cfg.num_layers
        self.model, self.module, self.cache = model, model.mtp[0], cache
        self.layer, self.block_size = model.cfg.num_layers, block_size
        if hasattr(self.module.block.mlp, "record_stats"):  # as fuse_for_inference does for the trunk
            self.module.block.mlp.record_stats = False

    def run(self, hidden_MD: Tensor, token_ids: list[int], positions: list[int],
            tables: list[list[int]]) -> Tensor:
        """The module over M rows (row i: trunk or chained hidden state at positions[i], token
        token_ids[i] = the token after it), writing their KV at their positions; returns the block's
        output hidden states [M, D] (pre-norm)."""
        dev, bs = hidden_MD.device, self.block_size
        ids = torch.tensor(token_ids, device=dev)
        pos = torch.tensor(positions, device=dev)
        slots = torch.tensor([t[p // bs] * bs + p % bs for t, p in zip(tables, positions)], device=dev)
        lens = torch.tensor([p + 1 for p in positions], dtype=torch.int32, device=dev)
        state = PagedAttention(self.cache, slots, _pad_tables(tables).to(dev), lens)
        m, model = self.module, self.model
        cos, sin = model.rotary(pos[None])
        emb = model.embed_tokens(ids)[None]
        u = m.eh_proj(torch.cat([m.enorm(emb), m.hnorm(hidden_MD[None].to(emb.dtype))], dim=-1))
        out, _ = m.block(u, cos, sin, state.layer(self.layer))
        return out[0]

    def draft(self, out_MD: Tensor) -> list[int]:
        """Greedy draft tokens from the module's output rows."""
        return self.model.lm_head(self.module.norm(out_MD)).argmax(dim=-1).tolist()


def verify(logits_NV: Tensor, verifiers: list[tuple[object, int, int]]) -> list[tuple[int, int]]:
    """The accept rule for every verify row: (num_accepted, next token) per (request, first logits
    row, k). Greedy requests: argmax equality (speculative.accept_greedy's rule, on host lists) on
    the processed logits (logit_bias);
    sampled: accept_sampled on the sampler's probabilities (temperature, top-k, top-p) with the
    request's generator, drafts deterministic. One host sync for all greedy rows."""
    if not verifiers:
        return []
    dev = logits_NV.device
    rows = [r0 + i for _, r0, k in verifiers for i in range(k + 1)]
    params = [req.params for req, _, k in verifiers for _ in range(k + 1)]
    x_NV = logits_NV[torch.tensor(rows, device=dev)]
    if any(p.logit_bias for p in params):
        x_NV = processed_logits(x_NV, params)  # no penalties here (may_speculate)
    argmax = x_NV.argmax(dim=-1).tolist()
    out, at = [], 0
    for req, _, k in verifiers:
        drafts = req.token_ids[len(req.token_ids) - k:]
        if req.params.greedy:  # accept_greedy's rule on host lists (no per-request tensor ops)
            target = argmax[at:at + k + 1]
            num = next((i for i in range(k) if drafts[i] != target[i]), k)
            out.append((num, target[num]))
        else:
            p = req.params
            probs = filter_logits(x_NV[at:at + k + 1],
                                  torch.full((k + 1,), p.temperature, device=dev),
                                  torch.full((k + 1,), p.top_k, device=dev, dtype=torch.long),
                                  torch.full((k + 1,), p.top_p, device=dev))
            num, nxt = accept_sampled(probs[None], torch.tensor([drafts], device=dev),
                                      generator=req.generator)
            out.append((int(num[0]), int(nxt[0])))
        at += k + 1
    return out
