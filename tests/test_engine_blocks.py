"""The paged engine's bookkeeping without a model: block manager (allocation, refcounts, prefix cache
with LRU eviction, fork and copy-on-write, truncate) and scheduler (decode first, prompt-token budget,
admission by free blocks, preemption of the newest sequence), and the pool's copy and fp8 writes.
"""

from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mogelm.config import from_name
from mogelm.inference.block_manager import NULL_BLOCK, BlockManager, block_hash
from mogelm.inference.paged import PagedKVCache
from mogelm.inference.scheduler import Scheduler


def test_allocate_write_free_and_accounting():
    bm = BlockManager(num_blocks=9, block_size=4)
    assert (bm.num_usable, bm.num_free, bm.num_used) == (8, 8, 0)
    assert bm.prepare_write("a", 0, 10) == []  # 3 blocks
    assert len(bm.tables["a"]) == 3 and NULL_BLOCK not in bm.tables["a"]
    t = bm.tables["a"]
    assert bm.slots("a", 3, 6) == [t[0] * 4 + 3, t[1] * 4, t[1] * 4 + 1]
    assert bm.prepare_write("a", 10, 12) == [] and len(bm.tables["a"]) == 3  # room in the last block
    assert bm.prepare_write("b", 0, 21) is None and "b" not in bm.tables  # needs 6 blocks, 5 free
    assert bm.num_used == 3
    bm.check()
    bm.free("a")
    bm.free("b")
    assert bm.num_used == 0 and not bm.tables
    bm.check()


def test_prefix_cache_hits_lru_eviction_and_counts():
    bm = BlockManager(num_blocks=7, block_size=4)  # 6 usable
    prompt = list(range(100, 111))  # 11 tokens: blocks [0:4] [4:8] full, [8:11] partial
    bm.adopt_prefix("a", prompt, bm.lookup_prefix(prompt))
    bm.prepare_write("a", 0, 11)
    bm.commit("a", prompt, 11)  # two full blocks cached
    assert bm.num_cached == 2
    same = bm.lookup_prefix(prompt + [5])
    assert same == bm.tables["a"][:2]
    assert bm.lookup_prefix(prompt[:8]) == bm.tables["a"][:1]  # the block of the last token is not matched
    assert bm.lookup_prefix([0] + prompt[1:]) == []  # the chain breaks at the first block
    assert bm.adopt_prefix("b", prompt + [5], same) == 8
    assert bm.ref_counts[same[0]] == 2 and (bm.prefix_queries, bm.prefix_hits) == (11 + 12, 8)
    bm.free("a")
    bm.free("b")  # cached blocks stay, evictable; the partial block is free
    assert bm.num_used == 0 and bm.num_cached == 2
    bm.check()
    # fill the pool: free blocks go first, then the cached ones, least recently used first
    bm.prepare_write("c", 0, 16)  # 4 blocks: the 4 never-cached ones
    assert bm.num_cached == 2 and bm.evictions == 0
    bm.prepare_write("c", 16, 20)  # evicts one: the tail block (entered the LRU first)
    assert bm.evictions == 1 and bm.lookup_prefix(prompt) == same[:1]
    bm.check()


def test_fork_copy_on_write_and_truncate():
    bm = BlockManager(num_blocks=10, block_size=4)
    bm.prepare_write("a", 0, 6)  # blocks x (full), y (2 of 4)
    bm.fork("a", "b")
    x, y = bm.tables["a"]
    assert bm.ref_counts[x] == bm.ref_counts[y] == 2
    assert bm.blocks_needed("b", 6, 7) == 1
    copies = bm.prepare_write("b", 6, 7)  # b writes into the shared partial block: a private copy
    assert copies == [(y, bm.tables["b"][1])] and bm.tables["b"][0] == x and bm.ref_counts[y] == 1
    assert bm.prepare_write("a", 6, 7) == []  # a holds y alone now
    bm.check()
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    bm.prepare_write("a", 7, 9)
    bm.commit("a", tokens, 9)  # x and y full and cached
    assert bm.num_cached == 2
    bm.truncate("a", 6)  # reject 3 tokens: the third block goes, y is kept but will be rewritten
    assert len(bm.tables["a"]) == 2
    assert bm.prepare_write("a", 6, 7) == [] and bm.num_cached == 1  # y left the cache before its rewrite
    bm.check()
    for s in ("a", "b"):
        bm.free(s)
    assert bm.num_used == 0
    bm.check()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("wfkt"), st.integers(0, 3), st.integers(1, 9)), max_size=40))
def test_random_operations_keep_the_accounting_and_free_everything(ops):
    """Any sequence of writes, forks, truncations and frees keeps the invariants; freeing every
    sequence returns every block."""
    bm = BlockManager(num_blocks=12, block_size=3)
    length = {}
    for op, s, n in ops:
        seq = f"s{s}"
        if op == "w":
            start = length.get(seq, 0)
            if bm.prepare_write(seq, start, start + n) is not None:
                length[seq] = start + n
                bm.commit(seq, [7] * (start + n), start + n)  # equal tokens: hashes collide on purpose
        elif op == "f" and seq in length and f"s{n % 4}" not in length:
            bm.fork(seq, f"s{n % 4}")
            length[f"s{n % 4}"] = length[seq]
        elif op == "t" and seq in length:
            length[seq] = min(length[seq], n)
            bm.truncate(seq, length[seq])
        elif op == "k" and seq in length:
            bm.free(seq)
            del length[seq]
        bm.check()
    for seq in list(length):
        bm.free(seq)
    bm.check()
    assert bm.num_used == 0 and bm.num_free == bm.num_usable


def test_block_hash_chains():
    assert block_hash(b"", [1, 2]) != block_hash(b"", [2, 1])
    assert block_hash(block_hash(b"", [1, 2]), [3]) != block_hash(block_hash(b"", [9, 9]), [3])


@dataclass(eq=False)
class Seq:
    id: str
    token_ids: list[int]
    num_computed: int = 0
    num_preemptions: int = 0
    log: list = field(default_factory=list)


def advance(batch):
    """What the engine does after the forward: count the tokens in, append a token when sampled."""
    for seq, n in batch.rows:
        seq.num_computed += n
        if seq.num_computed == len(seq.token_ids):
            seq.token_ids.append(0)


def test_scheduler_budget_decodes_first_and_admission_by_blocks():
    bm = BlockManager(num_blocks=40, block_size=4, prefix_caching=False)
    sched = Scheduler(bm, max_batch=3, chunk_size=10, watermark=0)
    a, b, c, d = (Seq(x, list(range(n))) for x, n in (("a", 7), ("b", 5), ("c", 30), ("d", 2)))
    for s in (a, b, c, d):
        sched.add(s)
    batch = sched.schedule()
    assert [(s.id, n) for s, n in batch.rows] == [("a", 7), ("b", 3)]  # 10 prompt tokens, FIFO
    advance(batch)
    batch = sched.schedule()  # a decodes (outside the budget); b finishes its prompt; c starts
    assert [(s.id, n) for s, n in batch.rows] == [("a", 1), ("b", 2), ("c", 8)]
    advance(batch)
    batch = sched.schedule()  # max_batch 3: d waits
    assert [(s.id, n) for s, n in batch.rows] == [("a", 1), ("b", 1), ("c", 10)] and sched.waiting[0] is d
    sched.finish(a)
    advance(batch)
    batch = sched.schedule()  # c takes the whole budget: d, admissible now, waits for budget
    assert [(s.id, n) for s, n in batch.rows] == [("b", 1), ("c", 10)] and sched.waiting[0] is d
    advance(batch)
    batch = sched.schedule()  # c's last 2 prompt tokens leave budget for d's whole prompt
    assert [(s.id, n) for s, n in batch.rows] == [("b", 1), ("c", 2), ("d", 2)]
    bm.check()


def test_scheduler_preempts_the_newest_and_requeues_it_first():
    bm = BlockManager(num_blocks=7, block_size=2, prefix_caching=False)  # 12 tokens
    sched = Scheduler(bm, max_batch=4, chunk_size=100, watermark=0)
    seqs = [Seq(f"r{i}", [i] * 3) for i in range(3)]  # 3 prompts of 3 tokens: 2 blocks each
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert [s.id for s, _ in batch.rows] == ["r0", "r1", "r2"] and bm.num_free == 0
    advance(batch)  # each has 4 tokens now, 3 computed: decoding, its 2nd block has room
    batch = sched.schedule()
    assert [n for _, n in batch.rows] == [1, 1, 1] and not batch.preempted
    advance(batch)  # 5 tokens, 4 computed: the next decode needs a third block each
    batch = sched.schedule()
    assert batch.preempted == [seqs[2]] and [s.id for s, _ in batch.rows] == ["r0", "r1"]
    assert seqs[2].num_computed == 0 and seqs[2].num_preemptions == 1 and sched.waiting[0] is seqs[2]
    assert "r2" not in bm.tables
    bm.check()
    advance(batch)
    sched.finish(seqs[0])
    batch = sched.schedule()  # r2 comes back first, recomputing its 5 tokens (prompt + generated)
    assert [(s.id, n) for s, n in batch.rows] == [("r1", 1), ("r2", 5)]
    bm.check()


def test_scheduler_breaks_a_deadlock_of_partial_prefills():
    """Two half-prefilled prompts hold every block and neither can go on: the newest is preempted."""
    bm = BlockManager(num_blocks=5, block_size=2, prefix_caching=False)  # 8 tokens
    sched = Scheduler(bm, max_batch=4, chunk_size=8, watermark=0)
    c, d = Seq("c", [1] * 7), Seq("d", [2] * 7)
    for s in (c, d):
        bm.prepare_write(s.id, 0, 4)
        s.num_computed = 4
        sched.running.append(s)
    assert bm.num_free == 0
    batch = sched.schedule()
    assert [(s.id, n) for s, n in batch.rows] == [("c", 3)] and batch.preempted == [d]
    assert sched.waiting[0] is d and d.num_computed == 0
    bm.check()


def test_scheduler_runs_an_older_prefill_on_blocks_a_later_preemption_freed():
    bm = BlockManager(num_blocks=5, block_size=2, prefix_caching=False)  # 8 tokens
    sched = Scheduler(bm, max_batch=4, chunk_size=8, watermark=0)
    a, b = Seq("a", [1] * 7), Seq("b", [2] * 5)  # a: prompt half done; b: decoding, its blocks full
    for s in (a, b):
        bm.prepare_write(s.id, 0, 4)
        s.num_computed = 4
        sched.running.append(s)
    batch = sched.schedule()  # a cannot grow, b needs a block: b (the newest) goes, then a runs
    assert batch.preempted == [b] and [(s.id, n) for s, n in batch.rows] == [("a", 3)]
    bm.check()


def test_pool_copy_blocks_and_fp8_write_round_trip():
    cfg = from_name("debug")
    cache = PagedKVCache(cfg, num_blocks=4, block_size=2)
    k = torch.randn(3, cfg.num_kv_heads, cfg.head_dim)
    cache.write(0, torch.tensor([2, 3, 4]), k, -k)  # block 1 (both slots), block 2 slot 0
    cache.copy_blocks([(1, 3)])
    torch.testing.assert_close(cache.k[0][3], k[:2])
    torch.testing.assert_close(cache.v[1][3], cache.v[1][1])
    k_back, v_back = cache.read(0, [3, 2], 3)
    torch.testing.assert_close(k_back, k)
    fp8 = PagedKVCache(cfg, num_blocks=4, block_size=2, kv_dtype=torch.float8_e4m3fn)
    fp8.k_scale[0].fill_(0.01)
    fp8.write(0, torch.tensor([2, 3, 4]), k, -k)
    k8, v8 = fp8.read(0, [1, 2], 3)
    assert fp8.k[0].dtype == torch.float8_e4m3fn
    assert ((k8 - k).abs() <= k.abs() * 2**-3 + 0.01 * 2**-9).all()  # e4m3: 3 mantissa bits
    fp8.copy_blocks([(1, 3)])
    assert torch.equal(fp8.k[0][3].view(torch.uint8), fp8.k[0][1].view(torch.uint8))


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_scheduler_admission_adopts_cached_prefix(prefix_caching):
    bm = BlockManager(num_blocks=20, block_size=4, prefix_caching=prefix_caching)
    sched = Scheduler(bm, max_batch=4, chunk_size=64, watermark=0)
    first = Seq("first", list(range(10)))
    sched.add(first)
    batch = sched.schedule()
    advance(batch)
    bm.commit("first", first.token_ids, first.num_computed)
    second = Seq("second", list(range(9)) + [99])
    sched.add(second)
    batch = sched.schedule()
    rows = dict((s.id, n) for s, n in batch.rows)
    assert rows["second"] == (2 if prefix_caching else 10)  # 8 tokens (2 blocks) from the cache
    assert second.num_computed == (8 if prefix_caching else 0)
    bm.check()
