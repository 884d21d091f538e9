"""Speculative decoding inside the paged engine: the options, the MTP drafter over the paged cache,
and the verify step's accept rule for a batch of requests (the engine, engine.py, calls these).

    engine = Engine(model, tok, speculative="ngram", draft_tokens=3)       # or "mtp"
    engine = Engine(model, tok, speculative="mtp", draft_tokens=2, spec_policy="fixed", spec_max_batch=64)

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

When: the engine's speculation policy (spec_policy.py) picks the draft length of every step, 0..k:
"auto" (the default on CUDA) measures what each length costs and earns per batch size, "fixed"
drafts k while at most `spec_max_batch` sequences run (DEFAULT_SPEC_MAX_BATCH by default). When a
step does not speculate, MTP drafting pauses too (its block would cost one layer per step;
positions decoded meanwhile get no MTP KV, which only weakens those sequences' drafts once
speculation resumes).

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

MTP graphs. On CUDA each of these forwards is one CUDA-graph replay (`MTPRunner.capture`:
graphs.PagedGraphs, the mechanism of the trunk's decode graphs, with the same buckets, up to
max(max_batch, min(max_batch, spec_max_batch) x (k + 1)) rows): static hidden states [b, D],
token ids, positions, pool slots, block tables and lengths [b]; the graph computes the block's
output [b, D] and the greedy drafts lm_head(norm(out)).argmax [b], so a call costs a few host-to-
device copies, one replay and one small device-to-host copy (one `.tolist()` for every draft of
the call); padding rows write to the null block with length 0. Calls with more rows than the
largest bucket (prefill chunks: a row for every prompt position) run eagerly, as everything does
on a CPU (tests run the graph path there through the eager stand-in, graphs.EagerReplay). The host
side builds each field with numpy (no per-row tensor ops). Why: eagerly the module costs ~20+
kernel launches plus host tensor building per call, ~1 ms (estimate), more than the graphed decode
step of a 1 B model, and MTP drafts lost at every batch size on one H200 (2026-12-02).

Legend: N packed rows, D hidden, V vocabulary, R verify rows of one request (k + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mogelm.inference.block_manager import NULL_BLOCK
from mogelm.inference.graphs import PagedGraphs, StaticRows
from mogelm.inference.paged import PagedAttention, PagedKVCache
from mogelm.inference.sampling import filter_logits, processed_logits
from mogelm.inference.speculative import accept_sampled

METHODS = ("ngram", "mtp")
DEFAULT_SPEC_MAX_BATCH = 64  # the fixed policy's cap (notes_spec.md: 72B gain predicted through 64)


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


def _pad_tables(tables: list[list[int]]) -> np.ndarray:
    """Block tables as one int32 array [U, W], padded with the null block."""
    width = max((len(t) for t in tables), default=1)
    return np.array([t + [NULL_BLOCK] * (width - len(t)) for t in tables], dtype=np.int32).reshape(-1, width)


class MTPRunner:
    """Module 1 of the model's MTP stack over the paged pool (its KV in layer `layer`): eager, or
    replayed from CUDA graphs once `capture` has run (module docstring, "MTP drafts")."""

    def __init__(self, model, cache: PagedKVCache, block_size: int):
        assert model.mtp is not None and len(cache.k) > model.cfg.num_layers
        self.model, self.module, self.cache = model, model.mtp[0], cache
        self.layer, self.block_size = model.cfg.num_layers, block_size
        self.graphs: PagedGraphs | None = None
        if hasattr(self.module.block.mlp, "record_stats"):  # as fuse_for_inference does for the trunk
            self.module.block.mlp.record_stats = False

    def capture(self, buckets: list[int], max_blocks: int) -> None:
        """Graphs of the module and its greedy draft for `buckets` rows (the trunk's decode buckets);
        on a CPU the eager stand-in (tests). Calls with more rows than the largest bucket stay eager."""
        D, dtype = self.model.cfg.hidden_size, self.model.embed_tokens.weight.dtype

        def build(rows: StaticRows):
            def fn():
                out_bD = self._forward(rows.extra["hidden"], rows.ids_1b[0], rows.pos_1b[0], rows.state)
                return out_bD, self._greedy(out_bD)
            return fn

        self.graphs = PagedGraphs(self.cache, buckets, max_blocks, build, extra={"hidden": ((D,), dtype)})

    def _forward(self, hidden_MD: Tensor, ids_M: Tensor, pos_M: Tensor, state: PagedAttention) -> Tensor:
        """The block's output hidden states [M, D] (pre-norm); writes the rows' KV."""
        m, model = self.module, self.model
        cos, sin = model.rotary(pos_M[None])
        emb = model.embed_tokens(ids_M)[None]
        u = m.eh_proj(torch.cat([m.enorm(emb), m.hnorm(hidden_MD[None].to(emb.dtype))], dim=-1))
        out, _ = m.block(u, cos, sin, state.layer(self.layer))
        return out[0]

    def _greedy(self, out_MD: Tensor) -> Tensor:
        """Greedy draft tokens [M] from the module's output rows."""
        return self.model.lm_head(self.module.norm(out_MD)).argmax(dim=-1)

    def run(self, hidden_MD: Tensor, token_ids, positions, tables: list[list[int]], table_of_row,
            want: list[int] | None = None) -> tuple[Tensor, list[int]]:
        """The module over M rows, writing their KV at their positions. Row i: the trunk's (or a chained)
        hidden state at positions[i], token_ids[i] = the token after it, block table
        tables[table_of_row[i]] (one table per sequence, U in all). Returns, for the rows `want`
        (default all, in that order), the block's output hidden states [W, D] (pre-norm; a tensor of
        their own) and their greedy drafts (one host copy). A graph replay when M fits a bucket."""
        dev, bs = hidden_MD.device, self.block_size
        ids_M = np.asarray(token_ids, dtype=np.int64)
        pos_M = np.asarray(positions, dtype=np.int64)
        M = len(pos_M)
        tables_MW = _pad_tables(tables)[np.asarray(table_of_row, dtype=np.int64)]
        slots_M = tables_MW[np.arange(M), pos_M // bs].astype(np.int64) * bs + pos_M % bs
        host = [torch.from_numpy(x) for x in (ids_M, pos_M, slots_M, tables_MW, (pos_M + 1).astype(np.int32))]
        if self.graphs is not None and M <= self.graphs.max_rows:
            out_MD, tokens_M = self.graphs(*host, hidden=hidden_MD)  # views of the static outputs
            tokens = tokens_M.tolist()
            if want is None:
                return out_MD.clone(), tokens
            return out_MD[torch.tensor(want, dtype=torch.long, device=dev)], [tokens[i] for i in want]
        ids, pos, slots, tables_t, lens = (x.to(dev) for x in host)
        out_MD = self._forward(hidden_MD, ids, pos, PagedAttention(self.cache, slots, tables_t, lens))
        if want is not None:
            out_MD = out_MD[torch.tensor(want, dtype=torch.long, device=dev)]
        return out_MD, self._greedy(out_MD).tolist()


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
