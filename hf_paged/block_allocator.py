"""Pure-Python allocator of KV blocks: a free list plus reference counts.

It knows nothing about tensors or devices, only block ids ``0 .. num_blocks-1``, so it is tested on
CPU in isolation. Reference counts exist so that several sequences can point at the same physical
block (beam search, parallel sampling, prefix caching); a block returns to the free list when its
count drops to zero. Running out of blocks is an ordinary outcome that drives preemption or a clear
error upstream, so ``allocate`` reports it as ``None`` instead of raising.
"""

from __future__ import annotations

import threading
from collections import deque


class BlockAllocator:
    """Hands out block ids and tracks how many owners each block has.

    Thread-safe: several ``generate`` calls on one enabled model share one pool.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        # FIFO reuse spreads writes over the pool; order has no effect on correctness.
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_count = [0] * num_blocks
        self._lock = threading.Lock()
        self.peak_used = 0  # high-water mark of num_used, for memory reports

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """Take ``n`` fresh blocks (reference count 1 each), or ``None`` if fewer than ``n`` are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        with self._lock:
            if n > len(self._free):
                return None
            blocks = [self._free.popleft() for _ in range(n)]
            for b in blocks:
                assert self._ref_count[b] == 0, f"block {b} was free with ref_count {self._ref_count[b]}"
                self._ref_count[b] = 1
            self.peak_used = max(self.peak_used, self.num_blocks - len(self._free))
            return blocks

    def share(self, blocks: list[int]) -> None:
        """Add one owner to each block (a second sequence now reads them)."""
        with self._lock:
            for b in blocks:
                assert self._ref_count[b] > 0, f"cannot share free block {b}"
                self._ref_count[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one owner from each block; blocks with no owner left return to the free list."""
        with self._lock:
            for b in blocks:
                assert self._ref_count[b] > 0, f"double free of block {b}"
                self._ref_count[b] -= 1
                if self._ref_count[b] == 0:
                    self._free.append(b)

    def reset_peak(self) -> None:
        self.peak_used = self.num_used

    def ref_count(self, block: int) -> int:
        return self._ref_count[block]

    def is_whole(self) -> bool:
        """True when every block is free again (no leaks); tests assert this after each run."""
        return len(self._free) == self.num_blocks and not any(self._ref_count)
