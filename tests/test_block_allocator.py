"""The allocator is pure Python: free list, reference counts, "no room" as a value."""

import pytest

from hf_paged.memory.block_allocator import BlockAllocator, block_keys


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


# ---- prefix cache ----------------------------------------------------------------------------------


def test_block_keys_chain_over_the_whole_prefix():
    a = block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 4, seed="m")
    assert len(a) == 2  # only full blocks get keys
    b = block_keys([9, 2, 3, 4, 5, 6, 7, 8], 4, seed="m")
    assert a[1].tokens == b[1].tokens and a[1] != b[1]  # same tokens, different prefix: different key
    assert block_keys([1, 2, 3, 4], 4, seed="other")[0] != a[0]  # another model's K/V never match
    assert block_keys([1, 2, 3, 4, 5, 6, 7, 8], 4, seed="m", start=a[:1]) == a  # extends incrementally


def test_registered_blocks_outlive_their_owner_and_are_evicted_lru():
    a = BlockAllocator(4)
    keys = block_keys(list(range(12)), 4, seed=0)
    blocks = a.allocate(3)
    assert a.register(blocks, keys) == blocks
    a.free(blocks[::-1])  # tail first, as requests free
    assert a.num_free == 4 and a.num_used == 0 and a.is_whole()  # cached blocks count as free
    assert [a.lookup(k) for k in keys] == blocks  # ... and are still found
    a.take_cached(blocks[:1])  # a hit revives a free cached block
    assert a.ref_count(blocks[0]) == 1 and a.num_free == 3
    fresh = a.allocate(2)  # the never-cached block first, then the least recently freed: the tail
    assert fresh[0] not in blocks and fresh[1] == blocks[2]
    assert a.lookup(keys[2]) is None and a.lookup(keys[1]) == blocks[1] and a.num_evictions == 1
    a.free(fresh + blocks[:1])
    a.clear_cache()
    assert a.num_cached == 0 and all(a.lookup(k) is None for k in keys) and a.is_whole()


def test_register_keeps_the_first_block_of_a_prefix():
    a = BlockAllocator(2)
    (key,) = block_keys([5, 6, 7, 8], 4, seed=0)
    x, y = a.allocate(2)
    assert a.register([x], [key]) == [x]
    assert a.register([y], [key]) == [x]  # an equal prefix computed twice: the second copy stays private
    a.free([y])
    assert a.num_cached == 1 and a.lookup(key) == x
    a.free([x])
    assert a.is_whole()
    with pytest.raises(AssertionError, match="register free block"):
        a.register([y], [key])
