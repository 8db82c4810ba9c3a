"""Kernel-level benchmarks (pytest-benchmark): paged decode and chunked prefill, and write_kv.

    python -m pytest benchmarks/bench_kernels.py --benchmark-only

Shapes are Llama-3-8B attention heads (32 q / 8 kv heads, head_dim 128, bf16, block 16). Each timed call
synchronizes; compilation happens in the warm-up rounds. `extra_info` carries the achieved bandwidth (decode)
or TFLOP/s (prefill). The full sweep with SDPA baselines is `benchmarks/gpu_kernels.py`.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a GPU")

from hf_paged.kernels import kv_write as kv_write_module  # noqa: E402
from hf_paged.kernels import paged_attention as paged_attention_module  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16




def _problem(num_seqs: int, seq_len: int, num_q: int):
    blocks = math.ceil(seq_len / BS)
    pool = torch.randn(2, num_seqs * blocks, BS, HKV, D, device="cuda", dtype=torch.bfloat16)
    block_tables = torch.randperm(num_seqs * blocks, device="cuda").view(num_seqs, blocks).to(torch.int32)
    query = torch.randn(num_seqs * num_q, HQ, D, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device="cuda")
    qsl = torch.arange(num_seqs + 1, dtype=torch.int32, device="cuda") * num_q
    return query, pool[0], pool[1], block_tables, seq_lens, qsl, num_q


def _timed(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("batch,ctx", [(1, 8192), (16, 2048), (64, 2048), (256, 2048)])
def test_bench_decode(benchmark, batch, ctx):
    paged_attention = paged_attention_module.paged_attention
    args = _problem(batch, ctx, 1)
    out = torch.empty_like(args[0])
    fn = _timed(lambda: paged_attention(*args, scale=D**-0.5, out=out))
    benchmark.pedantic(fn, rounds=50, warmup_rounds=5)
    nbytes = 2 * batch * ctx * HKV * D * 2 + 2 * args[0].numel() * 2
    benchmark.extra_info.update(batch=batch, ctx=ctx, gbps=nbytes / benchmark.stats.stats.median / 1e9)


@pytest.mark.parametrize("new,cached", [(512, 4096), (2048, 0)])
def test_bench_prefill(benchmark, new, cached):
    paged_attention = paged_attention_module.paged_attention
    args = _problem(1, new + cached, new)
    out = torch.empty_like(args[0])
    fn = _timed(lambda: paged_attention(*args, scale=D**-0.5, out=out))
    benchmark.pedantic(fn, rounds=30, warmup_rounds=3)
    flops = 4 * HQ * D * (new * cached + new * (new + 1) / 2)
    benchmark.extra_info.update(new=new, cached=cached, tflops=flops / benchmark.stats.stats.median / 1e12)


@pytest.mark.parametrize("num_tokens", [256, 4096])
def test_bench_write_kv(benchmark, num_tokens):
    write_kv = kv_write_module.write_kv
    pool = torch.randn(2, num_tokens // BS + 1, BS, HKV, D, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(2, HKV, num_tokens, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # strided views
    slots = torch.randperm(pool.shape[1] * BS, device="cuda")[:num_tokens]
    fn = _timed(lambda: write_kv(kv[0], kv[1], pool[0], pool[1], slots))
    benchmark.pedantic(fn, rounds=50, warmup_rounds=5)
    benchmark.extra_info.update(gbps=4 * kv[0].numel() * 2 / benchmark.stats.stats.median / 1e9)
