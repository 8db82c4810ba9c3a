"""The allocator is pure Python: free list, reference counts, "no room" as a value."""

import pytest

from hf_paged.block_allocator import BlockAllocator


def test_allocate_until_full_then_none():
    a = BlockAllocator(4)
    first = a.allocate(3)
    assert len(set(first)) == 3 and a.num_free == 1
    assert a.allocate(2) is None  # no room is a value, and nothing was taken
    assert a.num_free == 1
    assert a.allocate(1) is not None and a.num_free == 0
    assert a.allocate(0) == []


def test_reference_counts_and_exact_free():
    a = BlockAllocator(3)
    blocks = a.allocate(2)
    a.share(blocks)  # a second sequence reads the same blocks (beam, fork, prefix hit)
    assert [a.ref_count(b) for b in blocks] == [2, 2]
    a.free(blocks)
    assert a.num_free == 1 and not a.is_whole()  # still owned once
    a.free(blocks)
    assert a.is_whole()


def test_misuse_is_caught():
    a = BlockAllocator(2)
    (b,) = a.allocate(1)
    a.free([b])
    with pytest.raises(AssertionError, match="double free"):
        a.free([b])
    with pytest.raises(AssertionError, match="share free"):
        a.share([b])
    with pytest.raises(ValueError):
        BlockAllocator(0)
    with pytest.raises(ValueError):
        a.allocate(-1)


def test_freed_blocks_are_reused():
    a = BlockAllocator(2)
    x = a.allocate(2)
    a.free(x[:1])
    assert a.allocate(1) == x[:1]
