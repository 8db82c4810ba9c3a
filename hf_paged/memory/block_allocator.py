"""Pure-Python allocator of KV blocks: a free list, reference counts and the prefix cache's index.

It knows nothing about tensors or devices, only block ids ``0 .. num_blocks-1``, so it is tested on
CPU in isolation. Reference counts exist so that several sequences can point at the same physical
block (beam search, parallel sampling, prefix caching); a block returns to the free list when its
count drops to zero. Running out of blocks is an ordinary outcome that drives preemption or a clear
error upstream, so ``allocate`` reports it as ``None`` instead of raising.

Prefix caching (after vLLM's automatic prefix caching): a full block whose K/V are computed can be
``register``-ed under a ``BlockKey`` that names its contents (its tokens and, through a hash chain,
everything before them). When its last owner frees it, a registered block is not wiped: it waits in
an LRU list of *cached* free blocks, still findable with ``lookup``. ``allocate`` takes never-cached
blocks first and then evicts cached ones, least recently freed first, dropping their keys. So cached
blocks cost nothing: they only occupy memory nobody asked for, and count as free.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from typing import NamedTuple


class BlockKey(NamedTuple):  # a NamedTuple, not a frozen dataclass: built per block, 5x cheaper
    """What a full block holds: the hash of its whole prefix chain, verified against its own tokens.

    ``chain`` is ``hash((parent.chain, tokens))`` (the root's parent is a per-model seed), so equal
    chains mean equal prefixes up to a 64-bit hash collision; ``tokens`` and ``parent`` are compared
    too, so a collision would also need the block's own tokens and its parent's hash to match.
    """

    chain: int
    parent: int
    tokens: tuple[int, ...]


def block_keys(
    token_ids: Sequence[int], block_size: int, seed: Hashable, start: list[BlockKey] | None = None, num_blocks: int | None = None
) -> list[BlockKey]:
    """Keys of the first ``num_blocks`` (default: every full) blocks of ``token_ids``.

    ``start`` (the keys computed so far) is extended in place and returned.
    """
    keys = start if start is not None else []
    parent = keys[-1].chain if keys else hash(("hf_paged", seed))
    end = len(token_ids) // block_size if num_blocks is None else num_blocks
    for i in range(len(keys), end):
        tokens = tuple(token_ids[i * block_size : (i + 1) * block_size])
        key = BlockKey(hash((parent, tokens)), parent, tokens)
        keys.append(key)
        parent = key.chain
    return keys


class BlockAllocator:
    """Hands out block ids, tracks how many owners each block has, and indexes cached full blocks.

    Thread-safe: several ``generate`` calls on one enabled model share one pool.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        # FIFO reuse spreads writes over the pool; order has no effect on correctness.
        self._free: deque[int] = deque(range(num_blocks))
        # Free blocks that still hold a registered prefix, least recently freed first (evicted first).
        self._cached_free: OrderedDict[int, None] = OrderedDict()
        self._ref_count = [0] * num_blocks
        self._key_of: dict[int, BlockKey] = {}  # registered blocks -> their key
        self._block_of: dict[int, int] = {}  # key.chain -> registered block
        self._lock = threading.Lock()
        self.peak_used = 0  # high-water mark of num_used, for memory reports
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks ``allocate`` can hand out: never-cached free blocks plus evictable cached ones."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Registered blocks, owned or not."""
        return len(self._key_of)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int] | None:
        """Take ``n`` fresh blocks (reference count 1 each), or ``None`` if fewer than ``n`` are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        with self._lock:
            if n > self.num_free:
                return None
            blocks = []
            for _ in range(n):
                if self._free:
                    b = self._free.popleft()
                else:
                    b, _ = self._cached_free.popitem(last=False)
                    self._unregister(b)
                    self.num_evictions += 1
                assert self._ref_count[b] == 0, f"block {b} was free with ref_count {self._ref_count[b]}"
                self._ref_count[b] = 1
                blocks.append(b)
            self.peak_used = max(self.peak_used, self.num_used)
            return blocks

    def share(self, blocks: list[int]) -> None:
        """Add one owner to each block (a second sequence now reads them)."""
        with self._lock:
            for b in blocks:
                assert self._ref_count[b] > 0, f"cannot share free block {b}"
                self._ref_count[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one owner from each block; blocks with no owner left become free (cached ones stay findable).

        Callers free a sequence's blocks last-first, so a prefix's tail is evicted before its head:
        the head is what other requests share most.
        """
        with self._lock:
            for b in blocks:
                assert self._ref_count[b] > 0, f"double free of block {b}"
                self._ref_count[b] -= 1
                if self._ref_count[b] == 0:
                    if b in self._key_of:
                        self._cached_free[b] = None
                    else:
                        self._free.append(b)

    # ---- prefix cache ------------------------------------------------------------------------
    def register(self, blocks: Sequence[int], keys: Sequence[BlockKey]) -> list[int]:
        """Index each block (owned, K/V computed) under its key; returns the block now indexed per key.

        When another block already holds the same prefix (two equal prompts computed in the same
        step), the first one stays indexed and the new one stays a private copy.
        """
        indexed = []
        with self._lock:
            for block, key in zip(blocks, keys):
                assert self._ref_count[block] > 0, f"cannot register free block {block}"
                existing = self._block_of.get(key.chain)
                if existing is None:
                    old = self._key_of.get(block)
                    assert old is None or old == key, f"block {block} is already registered with other contents"
                    self._key_of[block] = key
                    self._block_of[key.chain] = existing = block
                indexed.append(existing)
        return indexed

    def lookup(self, key: BlockKey) -> int | None:
        """The block holding ``key``'s prefix, or None."""
        block = self._block_of.get(key.chain)
        if block is None or self._key_of[block] != key:
            return None
        return block

    def take_cached(self, blocks: list[int]) -> None:
        """Add one owner to each of these registered blocks, reviving the ones that were free."""
        with self._lock:
            for b in blocks:
                assert b in self._key_of, f"block {b} is not in the prefix cache"
                if self._ref_count[b] == 0:
                    del self._cached_free[b]
                self._ref_count[b] += 1
            self.peak_used = max(self.peak_used, self.num_used)

    def clear_cache(self) -> None:
        """Forget every cached prefix (e.g. after the model's weights changed); owned blocks stay owned."""
        with self._lock:
            for b in list(self._key_of):
                self._unregister(b)
            self._free.extend(self._cached_free)
            self._cached_free.clear()

    def _unregister(self, block: int) -> None:
        key = self._key_of.pop(block)
        if self._block_of.get(key.chain) == block:
            del self._block_of[key.chain]

    # ---- accounting --------------------------------------------------------------------------
    def reset_peak(self) -> None:
        self.peak_used = self.num_used

    def ref_count(self, block: int) -> int:
        return self._ref_count[block]

    @property
    def ref_counts(self) -> list[int]:
        """Every block's reference count (read only: the scheduler's per-step check reads it directly)."""
        return self._ref_count

    def is_whole(self) -> bool:
        """True when no block has an owner (cached free blocks included); tests assert this after each run."""
        return self.num_free == self.num_blocks and not any(self._ref_count)
