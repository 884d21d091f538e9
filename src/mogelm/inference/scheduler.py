"""The scheduler: which sequences run in the next step, how many of their tokens, and what to do
when the KV pool runs out of blocks.

    sched = Scheduler(block_manager, max_batch=16, chunk_size=256)
    sched.add(seq)                        # queued (FIFO)
    batch = sched.schedule()              # [(seq, n)], block copies, preempted sequences
    ...                                   # the engine runs the forward, then for each (seq, n):
    seq.num_computed += n; sched.blocks.commit(seq.id, seq.token_ids, seq.num_computed)
    sched.fork(seq, child)                # child continues from seq, sharing its blocks (n > 1)
    sched.finish(seq)                     # finished or aborted: its blocks are released

A sequence is its token ids (prompt, then generated tokens) and `num_computed`, the number of them
whose KV is in the pool. Every step feeds some of the rest, token_ids[num_computed:num_computed+n]:
a sequence with one token left is *decoding* (n = 1, its last sampled token), one with more is
*prefilling* (a prompt chunk, or a recompute after preemption). When a step's tokens reach the end
of token_ids, the logits of the last one give the next token. So prefill, chunked prefill, decode
and recompute are the same operation, and one forward carries any mix of them.

Per step (`schedule`):
  1. running sequences, oldest first: a decoding one gets its token (these do not count against
     the budget); a prefilling one gets min(left, budget) tokens, where the budget is `chunk_size`
     prompt tokens per step. A decode whose block is full needs a new block: when none is free,
     the newest running sequence is *preempted* (its blocks freed, itself requeued at the front of
     the waiting queue; it will recompute prompt + generated tokens, mostly from the prefix cache),
     until the decode fits (or it is itself the newest and is preempted). A prefill that does not
     fit waits. If nothing at all fits, the newest is preempted so the oldest can progress.
  2. admission, FIFO, while no sequence was preempted this step, its group fits in `max_batch`
     running slots and budget is left: the prompt's cached prefix blocks are adopted (prefix cache;
     not for a sequence whose `reads_prefix_cache` is False: it must compute every position), then
     its first chunk is scheduled if its blocks fit with `watermark` blocks to spare.
A sequence's group (optional attribute `group_size`, default 1) is itself plus the sequences that
will be forked from it once its prompt is computed (n > 1 choices); their slots are reserved at
admission. `fork(parent, child)` then makes the child a running sequence that shares every block
of the parent (BlockManager.fork; the first write into a shared partial block copies it).
Scheduled order: one-token rows first (the decode kernel's rows), then the chunks.

Speculative decoding (engine): a decoding sequence may carry `num_draft` draft tokens appended to
its token_ids (optional attribute, default 0). It then runs as a *verify* row of 1 + num_draft
tokens, scheduled like a decode (no prompt budget) and placed with the one-token rows. When its
blocks do not fit, its drafts are dropped (token_ids shortened, num_draft = 0) before anything is
preempted; a preempted sequence always loses its drafts (they are never recomputed as tokens).

A request that could never fit (more tokens than the pool holds for one sequence) is refused
before it reaches the scheduler (Engine.check_request), so preemption always ends with the oldest
sequence running alone at worst, and every admitted request finishes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from mogelm.inference.block_manager import BlockManager


class Sequence(Protocol):
    id: str
    token_ids: list[int]  # prompt, then generated tokens
    num_computed: int  # tokens whose KV is in the pool
    num_preemptions: int
    # optional: group_size (int, default 1), reads_prefix_cache (bool, default True); see above


def group_size(seq: Sequence) -> int:
    return getattr(seq, "group_size", 1)


def num_draft(seq: Sequence) -> int:
    """Draft tokens at the end of seq.token_ids (speculative decoding; 0 for most sequences)."""
    return getattr(seq, "num_draft", 0)


def drop_drafts(seq: Sequence) -> None:
    """Remove seq's draft tokens from its token_ids (not enough blocks for them, or preempted)."""
    k = num_draft(seq)
    if k:
        del seq.token_ids[-k:]
        seq.num_draft = 0


def is_decode_row(seq: Sequence, n: int) -> bool:
    """A one-token decode, or a verify row: the pending token plus all of seq's drafts."""
    return n == 1 + num_draft(seq)


@dataclass
class ScheduledBatch:
    rows: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens this step)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write block copies (src, dst)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.rows)

    @property
    def is_decode_only(self) -> bool:
        """Every row decodes (one token, or a speculative verify row: one decode row per token)."""
        return all(is_decode_row(s, n) for s, n in self.rows)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch: int, chunk_size: int, watermark: int | None = None):
        if max_batch <= 0 or chunk_size <= 0:
            raise ValueError(f"max_batch ({max_batch}) and chunk_size ({chunk_size}) must be positive")
        self.blocks, self.max_batch, self.chunk_size = blocks, max_batch, chunk_size
        # blocks kept free when admitting, so admissions do not immediately preempt decodes
        self.watermark = blocks.num_usable // 100 if watermark is None else watermark
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order (the newest last)
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished (or aborted) sequence, running or waiting, and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.id)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` (not queued, holding nothing) continues from `parent`'s computed tokens with the same
        blocks, and runs from the next step on. Its slot was reserved by the parent's group_size."""
        self.blocks.fork(parent.id, child.id)
        child.num_computed = parent.num_computed
        self.running.append(child)

    def num_slots_used(self) -> int:
        """Running slots taken: the running sequences and the children they will fork."""
        return sum(group_size(s) for s in self.running)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        drop_drafts(seq)
        self.running.remove(seq)
        self.blocks.free(seq.id)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)  # before the never-run requests (older preemptions end up first)
        batch.preempted.append(seq)

    def _try_write(self, seq: Sequence, n: int, batch: ScheduledBatch) -> bool:
        copies = self.blocks.prepare_write(seq.id, seq.num_computed, seq.num_computed + n)
        if copies is None:
            return False
        batch.copies += copies
        batch.rows.append((seq, n))
        return True

    def _fit_chunk(self, seq: Sequence, n: int) -> int:
        """How many of n wanted tokens fit: the room left in the blocks seq holds (after a
        copy-on-write of a shared last block, which takes one free block) plus the free blocks."""
        start, held = seq.num_computed, self.blocks.num_tokens_capacity(seq.id)
        cow = self.blocks.blocks_needed(seq.id, start, start + 1) if start < held else 0
        free = self.blocks.num_free - cow
        return 0 if free < 0 else min(n, held - start + free * self.blocks.block_size)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        while True:  # a pass schedules nothing only if preemptions freed blocks late, or a deadlock
            preempted = len(batch.preempted)
            budget = self._schedule_running(batch)
            if batch.rows or not self.running:
                break
            if len(batch.preempted) > preempted:  # blocks were freed after earlier sequences tried
                continue
            assert len(self.running) > 1, "a sequence alone always fits (max_len <= the pool)"
            self._preempt(self.running[-1], batch)  # partial prefills hold every block: free the newest
        if not batch.preempted:
            self._admit(batch, budget)
        batch.rows.sort(key=lambda row: not is_decode_row(*row))  # one-token and verify rows first (stable)
        return batch

    def _schedule_running(self, batch: ScheduledBatch) -> int:
        """Step 1 (module docstring); returns the prompt-token budget left."""
        budget = self.chunk_size
        i = 0
        while i < len(self.running):  # oldest first
            seq = self.running[i]
            left = len(seq.token_ids) - seq.num_computed
            if num_draft(seq) and left == 1 + num_draft(seq):  # a verify row: all its tokens, or none
                if self._try_write(seq, left, batch):
                    i += 1
                    continue
                drop_drafts(seq)  # no room for the drafts: decode one token as usual
                left = 1
            if left == 1:
                while not self._try_write(seq, 1, batch):
                    victim = self.running[-1]  # the newest (seq itself at worst)
                    self._preempt(victim, batch)
                    if victim is seq:
                        return budget
            elif budget > 0:
                n = self._fit_chunk(seq, min(left, budget))
                if n > 0 and self._try_write(seq, n, batch):
                    budget -= n
            i += 1
        return budget

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        """Step 2: waiting sequences, FIFO, with their cached prefix, while their group (running
        slots) and first chunk (blocks) fit."""
        bs = self.blocks.block_size
        slots = self.num_slots_used()
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if slots + group_size(seq) > self.max_batch:
                break
            reads = getattr(seq, "reads_prefix_cache", True)
            hits = self.blocks.lookup_prefix(seq.token_ids) if reads else []
            cached = len(hits) * bs
            n = min(len(seq.token_ids) - cached, budget)
            need = self.blocks.blocks_to_adopt(hits) + -(-(cached + n) // bs) - len(hits)
            if need > self.blocks.num_free - (self.watermark if self.running else 0):
                break
            self.waiting.popleft()
            seq.num_computed = self.blocks.adopt_prefix(seq.id, seq.token_ids, hits) if reads else 0
            ok = self._try_write(seq, n, batch)
            assert ok, "admission checked the free blocks"
            self.running.append(seq)
            slots += group_size(seq)
            if n > 1:
                budget -= n
