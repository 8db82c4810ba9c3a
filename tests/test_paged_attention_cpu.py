"""The batched CPU paged attention (`kernels/paged_attention_cpu.py`) against the readable reference."""

from __future__ import annotations

import math

import pytest
import torch

from hf_paged.kernels import paged_attention_cpu as pac
from hf_paged.kernels.paged_attention import paged_attention_reference

# Rows as (seq_len, num_q): keys in the pool after this step, and this step's query tokens.
ROWS = {
    # decodes next to prompt chunks on a cached prefix, a whole prompt, an idle row, left padding
    "mixed": [(17, 1), (33, 1), (40, 7), (16, 16), (5, 0), (3, 6), (64, 1), (97, 40), (1, 1)],
    "decode": [(1, 1), (16, 1), (17, 1), (32, 1), (33, 1), (70, 1), (129, 1)],
    "prefill": [(47, 47), (96, 32), (20, 20)],
    # generate's left-padded prompt batch: every row has the same query count, short ones start < 0
    "left_padded": [(30, 30), (12, 30), (1, 30), (25, 30)],
}
# Relative Frobenius error against the reference computed from the same inputs.
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}


def make_problem(rows, *, num_q_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """Random pool and queries, a random non-contiguous block assignment; unused table slots hold wrong blocks."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_row = [math.ceil(s / block_size) for s, _ in rows]
    num_blocks = sum(blocks_per_row) + 5
    pool = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen, dtype=torch.float64).to(dtype)
    width = max(blocks_per_row) + 2
    tables = torch.randint(0, num_blocks, (len(rows), width), generator=gen, dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    used = 0
    for row, n in enumerate(blocks_per_row):
        tables[row, :n] = perm[used : used + n]
        used += n
    num_q = torch.tensor([q for _, q in rows])
    qsl = torch.zeros(len(rows) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(num_q, 0)
    query = torch.randn(int(qsl[-1]), num_q_heads, head_dim, generator=gen, dtype=torch.float64).to(dtype)
    seq_lens = torch.tensor([s for s, _ in rows], dtype=torch.int32)
    return (query, pool[0], pool[1], tables, seq_lens, qsl, max(1, int(num_q.max())))


def positions(args) -> torch.Tensor:
    _, _, _, _, seq_lens, qsl, _ = args
    out = []
    for row, s in enumerate(seq_lens.tolist()):
        n = int(qsl[row + 1] - qsl[row])
        out += range(s - n, s)
    return torch.tensor(out, dtype=torch.long)


CASES = [  # (rows, group, head_dim, block_size, features)
    ("mixed", 4, 32, 16, {}),
    ("mixed", 1, 64, 32, {}),  # MHA
    ("mixed", 8, 32, 16, {}),  # MQA (one KV head)
    ("mixed", 4, 80, 16, {"sliding_window": 9}),
    ("mixed", 4, 32, 32, {"softcap": 5.0}),
    ("mixed", 4, 32, 16, {"sinks": True}),
    ("mixed", 2, 96, 16, {"sliding_window": 20, "softcap": 5.0, "sinks": True}),
    ("decode", 4, 128, 16, {}),
    ("decode", 8, 64, 32, {"sliding_window": 16}),
    ("decode", 1, 64, 16, {"sinks": True, "softcap": 30.0}),
    ("prefill", 4, 64, 16, {}),
    ("prefill", 1, 48, 16, {"sliding_window": 33}),
    ("left_padded", 4, 32, 16, {}),
    ("left_padded", 2, 32, 16, {"sliding_window": 7, "sinks": True}),
]
KV_HEADS = {1: 2, 2: 3, 4: 2, 8: 1}  # group -> KV heads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,group,head_dim,block_size,features", CASES)
def test_matches_reference(rows, group, head_dim, block_size, features, dtype):
    num_kv_heads = KV_HEADS[group]
    num_q_heads = group * num_kv_heads
    args = make_problem(ROWS[rows], num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                        block_size=block_size, dtype=dtype, seed=group * 100 + head_dim)
    kwargs = dict(features, scale=head_dim**-0.5)
    if kwargs.pop("sinks", False):
        kwargs["sinks"] = torch.randn(num_q_heads, generator=torch.Generator().manual_seed(7)).to(dtype) * 2
    out = torch.full_like(args[0], float("nan"))
    ret = pac.paged_attention_cpu(*args, out=out, **kwargs)
    assert ret is out
    ref = paged_attention_reference(*args, **kwargs)
    assert torch.isfinite(out).all(), "a token was left unwritten or is not finite"
    err = (out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)
    assert err < REL_TOL[dtype], f"relative error {err:.2e}"
    padded = positions(args) < 0  # left padding: exactly zero
    assert (out[padded] == 0).all()
    if padded.any():
        assert (out[~padded] != 0).any()


def test_small_budget_cuts_rows_and_queries(monkeypatch):
    """Pieces (several rows, then query slices of one long row) give the one-shot result."""
    args = make_problem([(300, 260), (90, 1), (40, 40), (70, 1), (9, 30)], num_q_heads=4, num_kv_heads=2,
                        head_dim=32, block_size=16, dtype=torch.float64, seed=5)
    whole = pac.paged_attention_cpu(*args, scale=0.2, sliding_window=100)
    monkeypatch.setattr(pac, "_MAX_ELEMENTS", 4 * 64 * 300)  # forces slices of the 260-token row
    cut = pac.paged_attention_cpu(*args, scale=0.2, sliding_window=100)
    torch.testing.assert_close(cut, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cut, paged_attention_reference(*args, scale=0.2, sliding_window=100),
                               rtol=1e-10, atol=1e-10)


def test_small_budget_cuts_a_decode_step(monkeypatch):
    """A pure decode step (row b = token b, read without index ops) cut into pieces of rows."""
    args = make_problem([(s, 1) for s in (3, 40, 17, 90, 64, 1, 33)], num_q_heads=4, num_kv_heads=1,
                        head_dim=32, block_size=16, dtype=torch.float64, seed=8)
    monkeypatch.setattr(pac, "_MAX_ELEMENTS", 4 * 96 * 2)  # two rows per piece
    out = pac.paged_attention_cpu(*args, scale=0.2)
    torch.testing.assert_close(out, paged_attention_reference(*args, scale=0.2), rtol=1e-10, atol=1e-10)


def test_leaves_unowned_tokens_and_idle_rows():
    args = list(make_problem([(5, 0), (20, 3), (9, 0)], num_q_heads=4, num_kv_heads=2, head_dim=32,
                             block_size=16, dtype=torch.float32, seed=6))
    args[0] = torch.cat([args[0], torch.randn(2, 4, 32)])  # two tokens no row owns (graph padding)
    out = torch.full_like(args[0], float("nan"))
    pac.paged_attention_cpu(*args, scale=0.3, out=out)
    assert torch.isnan(out[3:]).all() and torch.isfinite(out[:3]).all()
    empty = list(args)
    empty[5] = torch.zeros(4, dtype=torch.int32)
    out = torch.full_like(args[0], float("nan"))
    pac.paged_attention_cpu(*empty, scale=0.3, out=out)
    assert torch.isnan(out).all()


def test_rejects_mismatched_inputs():
    args = list(make_problem([(20, 3)], num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=16,
                             dtype=torch.float32))
    with pytest.raises(AssertionError, match="dtype"):
        pac.paged_attention_cpu(args[0].double(), *args[1:], scale=1.0)
    with pytest.raises(AssertionError, match="query_start_loc"):
        pac.paged_attention_cpu(*args[:5], args[5][:1], args[6], scale=1.0)


@pytest.mark.parametrize("features", [{}, {"sliding_window": 11, "sinks": True}], ids=["causal", "window+sinks"])
def test_fp8_cache_matches_reference(features):
    """e4m3 caches with a float32 scale per (slot, KV head), dequantized while gathering."""
    query, k_full, v_full, *meta = make_problem(ROWS["mixed"], num_q_heads=8, num_kv_heads=2, head_dim=32,
                                                block_size=16, dtype=torch.float32, seed=9)
    gen = torch.Generator().manual_seed(10)
    k_scale = torch.rand(k_full.shape[:3], generator=gen) + 0.1
    v_scale = torch.rand(v_full.shape[:3], generator=gen) + 0.1
    k_cache, v_cache = k_full.to(torch.float8_e4m3fn), v_full.to(torch.float8_e4m3fn)
    kwargs = dict(features, scale=0.2)
    if kwargs.pop("sinks", False):
        kwargs["sinks"] = torch.randn(8, generator=gen)
    args = (query, k_cache, v_cache, *meta)
    out = pac.paged_attention_cpu(*args, k_scale=k_scale, v_scale=v_scale, **kwargs)
    ref = paged_attention_reference(*args, k_scale=k_scale, v_scale=v_scale, **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the scales are applied: unscaled FP8 values give a different answer
    plain = pac.paged_attention_cpu(query, k_cache.float(), v_cache.float(), *meta, **kwargs)
    assert not torch.allclose(plain, out, atol=1e-3)


def test_buckets_cover_rows_and_split_uneven_widths(monkeypatch):
    width = [40, 39, 38, 5, 4, 4, 3, 1]  # sorted descending, two clear groups
    q = [1] * 8
    monkeypatch.setattr(pac, "_BUCKET_OVERHEAD", 0)
    cuts = pac._buckets(q, width, unit=1)
    assert cuts[0][0] == 0 and cuts[-1][1] == 8 and all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
    assert 3 in {b for _, b in cuts}  # the long rows are cut from the short ones
    monkeypatch.setattr(pac, "_BUCKET_OVERHEAD", 1 << 40)
    assert pac._buckets(q, width, unit=1) == [(0, 8)]


@pytest.mark.parametrize("overhead", [0, 1 << 40], ids=["many-buckets", "one-bucket"])
@pytest.mark.parametrize("features", [{}, {"sliding_window": 10, "softcap": 3.0}], ids=["plain", "window+softcap"])
def test_bucketing_does_not_change_results(monkeypatch, overhead, features):
    rows = ROWS["mixed"] + [(150, 1), (2, 1), (120, 30), (9, 9)]
    args = make_problem(rows, num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.float64, seed=3)
    monkeypatch.setattr(pac, "_BUCKET_OVERHEAD", overhead)
    out = pac.paged_attention_cpu(*args, scale=0.3, **features)
    torch.testing.assert_close(out, paged_attention_reference(*args, scale=0.3, **features), rtol=1e-10, atol=1e-10)


def test_plan_is_reused_across_layers_and_remade_for_new_metadata():
    """One plan per step (made by the first layer); other layers' data go through it unchanged, and
    a call with different metadata tensors plans anew instead of reusing a stale plan."""
    args = make_problem(ROWS["mixed"], num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=16,
                        dtype=torch.float64, seed=21)
    query, k_cache, v_cache, *meta = args
    plans: dict = {}
    for layer in range(3):  # each "layer" has its own queries and K/V, same metadata
        gen = torch.Generator().manual_seed(layer)
        q, k, v = (torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (query, k_cache, v_cache))
        for window in (None, 12):
            out = pac.paged_attention_cpu(q, k, v, *meta, scale=0.25, sliding_window=window, plans=plans)
            ref = paged_attention_reference(q, k, v, *meta, scale=0.25, sliding_window=window)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert len(plans) == 2  # one per window, shared by the layers
    tables, seq_lens, qsl, max_q = meta
    longer = (tables.clone(), seq_lens + 5, qsl.clone(), max_q)  # same shapes, new tensors: a later step
    out = pac.paged_attention_cpu(query, k_cache, v_cache, *longer, scale=0.25, plans=plans)
    ref = paged_attention_reference(query, k_cache, v_cache, *longer, scale=0.25)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
