"""Block accounting for the paged KV pool: free blocks, reference counts, one block table per
sequence, and the prefix cache (content-hashed full blocks, reused by later sequences, evicted LRU).

    bm = BlockManager(num_blocks=1024, block_size=16)
    hits = bm.lookup_prefix(prompt_ids)          # cached blocks of the prompt's leading full blocks
    bm.adopt_prefix("a", hits)                   # a's table starts with them (refcounts + 1)
    copies = bm.prepare_write("a", start, end)   # blocks for positions [start, end); None if they don't fit
    slots = bm.slots("a", start, end)            # pool slot (block * bs + offset) of each position
    bm.commit("a", token_ids, num_computed)      # full blocks whose KV is written become cached
    bm.fork("a", "b"); bm.truncate("a", 40); bm.free("a")

The pool has `num_blocks` blocks of `block_size` tokens. Block 0 is the null block: never handed
out, it absorbs the writes of padding rows (a CUDA-graph bucket larger than the batch) and pads
block tables. A sequence's token at position p lives in block table[p // bs] at offset p % bs; the
table always covers exactly the positions written so far (plus those being written this step).

Reference counts: a block is referenced by every table that holds it (a shared prompt prefix,
forked sequences). A block whose count drops to 0 returns to the free list, or, when it holds a
cached full block, to the evictable list (LRU: oldest first; a finished sequence's blocks enter
tail first, so its last blocks are evicted before its prefix). Allocation takes a free block first,
else evicts the least recently used cached block. `num_free` counts both kinds.

Prefix cache: a full block is identified by the hash of its tokens chained with the hash of the
block before it (blake2b, 128 bits), so equal hashes mean equal token prefixes. `commit` registers
a sequence's full blocks once their KV is written; `lookup_prefix` walks a new prompt's blocks and
returns the cached ones in order, up to (but never including) the block holding the prompt's last
token: that token is always computed, its logits give the first output token. Hits and queries
are counted in tokens.

Writes never touch a shared block: `prepare_write` copies a shared partial block first
(copy-on-write: it returns (src, dst) pairs for the engine to copy in the pool before the forward),
and a cached full block that only this sequence holds is dropped from the cache before it is
written again (after `truncate`, e.g. a speculative-decoding rollback).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence

NULL_BLOCK = 0


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Hash of a full block: its tokens chained to the hash of the blocks before it (b"" first)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in token_ids))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 2 or block_size <= 0:
            raise ValueError(f"need >= 2 blocks (block 0 is reserved) of >= 1 token, got {num_blocks} x "
                             f"{block_size}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))  # holding nothing worth keeping
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first
        self._hash_of: dict[int, bytes] = {}  # cached block -> its hash
        self._block_of: dict[bytes, int] = {}  # hash -> cached block
        self.tables: dict[Hashable, list[int]] = {}
        self._hashes: dict[Hashable, list[bytes]] = {}  # chain hashes of a sequence's committed blocks
        self.prefix_queries = self.prefix_hits = 0  # tokens looked up / found in the prefix cache
        self.evictions = 0

    # --- counts -------------------------------------------------------------------------------------
    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (free + evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks in the prefix cache (referenced or evictable)."""
        return len(self._block_of)

    def stats(self) -> dict[str, int]:
        return dict(kv_blocks_total=self.num_usable, kv_blocks_used=self.num_used,
                    kv_blocks_free=self.num_free, kv_blocks_cached=self.num_cached,
                    kv_block_size=self.block_size, prefix_cache_queries_total=self.prefix_queries,
                    prefix_cache_hits_total=self.prefix_hits, prefix_cache_evictions_total=self.evictions)

    def num_tokens_capacity(self, seq: Hashable) -> int:
        return len(self.tables.get(seq, ())) * self.block_size

    # --- blocks -------------------------------------------------------------------------------------
    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            self._uncache(block)
            self.evictions += 1
        self.ref_counts[block] = 1
        return block

    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self._evictable[block]
        self.ref_counts[block] += 1

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} released twice"
        if self.ref_counts[block] == 0:
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def _uncache(self, block: int) -> None:
        h = self._hash_of.pop(block, None)
        if h is not None:
            del self._block_of[h]

    # --- sequences ----------------------------------------------------------------------------------
    def lookup_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Cached blocks equal to the prompt's leading full blocks, in order (no side effects). The
        block holding the last token is never matched (that token must be computed)."""
        if not self.prefix_caching:
            return []
        bs, found, h = self.block_size, [], b""
        for j in range((len(token_ids) - 1) // bs):
            h = block_hash(h, token_ids[j * bs:(j + 1) * bs])
            block = self._block_of.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def blocks_to_adopt(self, hits: list[int]) -> int:
        """Free blocks that adopting `hits` uses up (the evictable ones leave the free count)."""
        return sum(self.ref_counts[b] == 0 for b in hits)

    def adopt_prefix(self, seq: Hashable, token_ids: Sequence[int], hits: list[int]) -> int:
        """Start `seq`'s table with the cached blocks `hits` (from lookup_prefix on the same tokens);
        counts the query. Returns the number of tokens whose KV is already there."""
        assert not self.tables.get(seq), f"sequence {seq!r} already holds blocks"
        table, hashes, h = [], [], b""
        for j, block in enumerate(hits):
            h = block_hash(h, token_ids[j * self.block_size:(j + 1) * self.block_size])
            assert self._block_of.get(h) == block, "hits do not match these tokens"
            self._ref(block)
            table.append(block)
            hashes.append(h)
        self.tables[seq], self._hashes[seq] = table, hashes
        if self.prefix_caching:
            self.prefix_queries += len(token_ids)
            self.prefix_hits += len(hits) * self.block_size
        return len(hits) * self.block_size

    def blocks_needed(self, seq: Hashable, start: int, end: int) -> int:
        """Blocks prepare_write(seq, start, end) would allocate (new ones plus a copy-on-write)."""
        table = self.tables.get(seq, [])
        new = max(0, -(-end // self.block_size) - len(table))
        j = start // self.block_size
        cow = start < end and j < len(table) and self.ref_counts[table[j]] > 1
        return new + int(cow)

    def prepare_write(self, seq: Hashable, start: int, end: int) -> list[tuple[int, int]] | None:
        """Make positions [start, end) of `seq` writable: allocate blocks past its table and copy a
        shared block holding `start`. Returns the (src, dst) block copies to do before writing, or
        None (and changes nothing) when the free blocks do not suffice."""
        if self.blocks_needed(seq, start, end) > self.num_free:
            return None
        table = self.tables.setdefault(seq, [])
        self._hashes.setdefault(seq, [])
        copies = []
        j = start // self.block_size
        assert j >= len(table) - 1 or start >= end, "writes go into the last block or past it"
        if start < end and j < len(table):
            block = table[j]
            if self.ref_counts[block] > 1:  # shared (a fork, a prefix): write into a private copy
                table[j] = self._take()
                copies.append((block, table[j]))
                self._release(block)
            else:  # ours alone: if it was cached, its content is about to change
                self._uncache(block)
        while len(table) * self.block_size < end:
            table.append(self._take())
        return copies

    def slots(self, seq: Hashable, start: int, end: int) -> list[int]:
        """Pool slots (block * bs + offset) of positions [start, end) of `seq`."""
        table, bs = self.tables[seq], self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def commit(self, seq: Hashable, token_ids: Sequence[int], num_computed: int) -> None:
        """`seq` has KV for positions [0, num_computed): its full blocks join the prefix cache (a block
        whose hash is already cached elsewhere stays private)."""
        if not self.prefix_caching:
            return
        table, hashes, bs = self.tables[seq], self._hashes[seq], self.block_size
        for j in range(len(hashes), num_computed // bs):
            h = block_hash(hashes[-1] if hashes else b"", token_ids[j * bs:(j + 1) * bs])
            hashes.append(h)
            if h not in self._block_of and table[j] not in self._hash_of:
                self._block_of[h], self._hash_of[table[j]] = table[j], h

    def free(self, seq: Hashable) -> None:
        """Release every block of `seq` (last block first, so the prefix stays cached longest)."""
        for block in reversed(self.tables.pop(seq, [])):
            self._release(block)
        self._hashes.pop(seq, None)

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """`child` shares all of `parent`'s blocks (n > 1 samples of one prompt); the first write into
        a shared partial block copies it (prepare_write)."""
        assert child not in self.tables or not self.tables[child]
        self.tables[child] = list(self.tables[parent])
        self._hashes[child] = list(self._hashes[parent])
        for block in self.tables[child]:
            self._ref(block)

    def truncate(self, seq: Hashable, length: int) -> None:
        """Keep the KV of positions [0, length) of `seq` (e.g. reject speculative tokens); blocks past
        it are released."""
        table, bs = self.tables[seq], self.block_size
        keep = -(-length // bs)
        for block in reversed(table[keep:]):
            self._release(block)
        del table[keep:]
        del self._hashes[seq][length // bs:]

    def check(self) -> None:
        """Assert the accounting invariants (tests): every usable block is exactly one of free,
        evictable or referenced, and reference counts equal the number of tables holding a block."""
        held = [0] * self.num_blocks
        for table in self.tables.values():
            for block in table:
                held[block] += 1
        assert held == self.ref_counts, "reference counts differ from the tables"
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not free & evictable and NULL_BLOCK not in free | evictable
        for block in range(1, self.num_blocks):
            assert (block in free) + (block in evictable) + (held[block] > 0) == 1, f"block {block}"
        assert all(b in self._hash_of for b in evictable)
        assert all(self._block_of[h] == b for b, h in self._hash_of.items())
