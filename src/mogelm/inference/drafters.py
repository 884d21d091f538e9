"""Draft proposers for speculative decoding: n-gram lookup in the text so far, and MTP heads.

    drafter = NgramDrafter(max_ngram=3, min_ngram=1)
    drafts = drafter.propose(seq_ids, k=4)       # 0..4 token ids expected to follow seq_ids

A drafter sees one sequence's token ids (prompt + generated so far, the last one not yet fed to
the target model) and proposes up to k tokens to follow it. The target model then scores all of
them in one forward over k+1 positions and keeps the longest prefix it agrees with
(mogelm.inference.speculative holds the accept rule). Proposing fewer than k tokens, or none, is
always allowed: that step then advances by fewer tokens, never wrongly.

- NgramDrafter ("prompt lookup", as vLLM's `ngram` method): for n = max_ngram down to min_ngram,
  find the most recent earlier occurrence of the last n tokens and copy the (up to) k tokens that
  followed it. Needs no model and no training; it pays off on text that repeats itself (code,
  quoting the prompt, lists).
- MTPDrafter: the model's own multi-token prediction modules (mogelm.mtp), greedy. This is the
  reference version: one full forward of the model per call. The engine drafts with MTP module 1
  over its paged cache instead (inference/spec_decode.py, MTPRunner), and its draft 1 equals this
  class's (tests/test_spec_engine.py); the engine's n-gram drafts are NgramDrafter's, made through
  one NgramIndex per request (for_sequence; incremental: only the tokens added since the last step
  are indexed).

Pure code: no engine, no cache; the tests pin proposals on hand-made sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


class Drafter(Protocol):
    def propose(self, seq_ids: Sequence[int], k: int) -> list[int]:
        """Up to k token ids expected to follow `seq_ids` (possibly none)."""
        ...


def ngram_propose(seq_ids: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """The tokens that followed the most recent earlier occurrence of the longest matching suffix.

    For n from max_ngram down to min_ngram: the suffix is the last n tokens; an earlier occurrence
    starts at s with s + n <= len - 1 (at least one token follows it, so the suffix itself never
    counts); the most recent one wins and its continuation ids[s+n : s+n+k] is returned (shorter
    than k when it runs into the end of the sequence). No match at any n: []."""
    ids = np.asarray(seq_ids, dtype=np.int64)
    N = len(ids)
    if k <= 0 or N < 2:
        return []
    for n in range(min(max_ngram, N - 1), min_ngram - 1, -1):
        suffix = ids[N - n:]
        # windows[s] = ids[s : s+n] for s = 0 .. N-1-n (every start that leaves a token after it)
        windows = np.lib.stride_tricks.sliding_window_view(ids[: N - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            s = int(hits[-1])
            return ids[s + n : s + n + k].tolist()
    return []


@dataclass(frozen=True)
class NgramDrafter:
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram ({self.min_ngram}) <= max_ngram ({self.max_ngram})")

    def propose(self, seq_ids: Sequence[int], k: int) -> list[int]:
        return ngram_propose(seq_ids, k, self.max_ngram, self.min_ngram)

    def for_sequence(self) -> NgramIndex:
        """The incremental index of one growing sequence (what the engine drafts with)."""
        return NgramIndex(self.max_ngram, self.min_ngram)


class NgramIndex:
    """ngram_propose's answer for ONE growing sequence, kept up to date incrementally: the most
    recent start of every n-gram (min_ngram <= n <= max_ngram) that has a token after it, in a dict
    per n. A call indexes only the tokens added since the last one, then looks the suffixes up:
    O(new tokens + max_ngram) instead of ngram_propose's O(length) scans (the engine drafts for
    every running sequence every step: ~50 us per sequence with the scans on its host). If the
    sequence did not just grow (it was replaced or cut), the index is rebuilt from scratch."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram ({min_ngram}) <= max_ngram ({max_ngram})")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._reset()

    def _reset(self) -> None:
        self.last = {n: {} for n in range(self.min_ngram, self.max_ngram + 1)}  # n -> {n-gram: start}
        self.length, self.tail = 0, []  # tokens indexed so far, and the last 4 of them (to notice a cut)

    def _sync(self, ids: Sequence[int]) -> None:
        n0, N = self.length, len(ids)
        if N < n0 or list(ids[max(n0 - 4, 0):n0]) != self.tail:
            self._reset()
            n0 = 0
        # windows ids[t - n : t] whose next token exists (t <= N - 1) and that were not valid before
        for t in range(max(n0, 1), N):
            for n, table in self.last.items():
                if t >= n:
                    table[tuple(ids[t - n:t])] = t - n  # later t overwrite: the most recent start wins
        self.length, self.tail = N, list(ids[max(N - 4, 0):N])

    def propose(self, seq_ids: Sequence[int], k: int) -> list[int]:
        self._sync(seq_ids)
        N = len(seq_ids)
        if k <= 0 or N < 2:
            return []
        for n in range(min(self.max_ngram, N - 1), self.min_ngram - 1, -1):
            s = self.last[n].get(tuple(seq_ids[N - n:]))
            if s is not None:
                return list(seq_ids[s + n:s + n + k])
        return []


def for_sequence(drafter: Drafter) -> Drafter:
    """The drafter one sequence should call at every step: the drafter's own per-sequence state
    when it keeps one (`drafter.for_sequence()`: NgramDrafter gives an NgramIndex, same proposals at
    O(new tokens) a call), else the drafter itself (stateless drafters, tests' stand-ins)."""
    make = getattr(drafter, "for_sequence", None)
    return make() if make is not None else drafter


class MTPDrafter:
    """Greedy drafts from a model's MTP modules: min(k, mtp_depth) tokens.

    With seq = x_0..x_t (x_t the last token, produced by the target from position t-1), depth j
    at row t-1 sees the trunk's hidden state chain and the embedding of token t-1+j and predicts
    token t+j: draft j. Depth j >= 2 needs draft j-1 as its input token, so the drafts are made
    one at a time, each appended before the next forward. Reference implementation: full
    forwards, no cache (the engine's cached version: spec_decode.MTPRunner)."""

    def __init__(self, model):
        if getattr(model, "mtp", None) is None:
            raise ValueError("MTPDrafter needs a model with MTP modules (mtp_depth > 0)")
        self.model = model

    @torch.no_grad()
    def propose(self, seq_ids: Sequence[int], k: int) -> list[int]:
        model = self.model
        t = len(seq_ids) - 1
        if t < 1:
            return []  # no hidden state before the last token yet
        device = model.embed_tokens.weight.device
        ids = list(seq_ids)
        drafts: list[int] = []
        for j in range(1, min(k, model.cfg.mtp_depth) + 1):
            ids_1T = torch.tensor([ids], device=device)
            # Only rows <= t-1 of the trunk matter, and they do not see the appended drafts.
            hidden = model(ids_1T[:, :t], return_hidden=True).trunk_hidden
            out = model.mtp_forward(hidden, ids_1T[:, : t + j])  # depth j has rows 0..t-1
            token = int(out.logits[j - 1][0, t - 1].argmax())
            drafts.append(token)
            ids.append(token)
        return drafts
