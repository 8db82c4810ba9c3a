"""The host KV pool: zero-filled memory committed as blocks are used, and a log line saying what was reserved."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch

from hf_paged.memory.kv_pool import KVLayout, KVPool
from hf_paged.options import PoolOptions

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, dtype=torch.float32, device=torch.device("cpu"))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_cpu_pool_logs_what_it_reserved(caplog):
    with caplog.at_level(logging.INFO, logger="hf_paged"):
        pool = KVPool.create(PoolOptions(cpu_memory_bytes=64 << 20), LAYOUT)
    assert pool.num_blocks == (64 << 20) // LAYOUT.bytes_per_block(16)
    assert f"{pool.num_blocks} blocks x 16 tokens" in caplog.text and "64.0 MiB reserved" in caplog.text


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_cpu_pool_is_zero_and_writable(kv_cache_dtype):
    pool = KVPool.create(PoolOptions(num_blocks=40, kv_cache_dtype=kv_cache_dtype), LAYOUT)
    assert pool.kv.is_contiguous() and not pool.kv.float().any()
    if pool.scales is not None:
        assert pool.scales.is_contiguous() and not pool.scales.any()
    k_cache, _ = pool.layer(1)
    k_cache[7, 3] = 1.0
    assert pool.kv[1, 0, 7, 3].float().eq(1.0).all() and int(pool.kv.float().count_nonzero()) == 64
    pool.copy_blocks([7], [9])
    assert torch.equal(pool.kv[:, :, 9], pool.kv[:, :, 7])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_cpu_pool_commits_memory_only_as_blocks_are_used():
    before = _rss_bytes()
    pool = KVPool.create(PoolOptions(cpu_memory_bytes=1 << 30), LAYOUT)  # the default budget
    assert pool.nbytes == 1 << 30
    k_cache, v_cache = pool.layer(0)
    k_cache[:100] = 1.0
    v_cache[:100] = 1.0
    assert _rss_bytes() - before < 64 << 20  # 200 blocks x 2 KiB touched, not 1 GiB


def test_cuda_budget_counts_memory_the_caching_allocator_holds_unused(monkeypatch):
    """A pool sized after a previous pool was freed must see those bytes: PyTorch keeps them reserved, so
    the driver's free figure alone would give the next pool a fraction of the memory (seen under TP)."""
    from hf_paged.memory import kv_pool

    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 140 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 100 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 20 * gib)
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, dtype=torch.float32, device=torch.device("cuda", 0))
    options = PoolOptions(memory_fraction=0.5)
    assert kv_pool.cuda_free_bytes(layout.device) == 90 * gib
    assert kv_pool.resolve_num_blocks(options, layout) == (45 * gib) // layout.bytes_per_block(16)
