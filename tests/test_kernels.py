"""Triton kernels (`kernels/kv_write.py`, `kernels/paged_attention.py`) against their references,
and the references against dense attention.

Runs everywhere: on a CUDA machine with larger shapes, elsewhere under the Triton interpreter
(``TRITON_INTERPRET=1``, set below before triton is imported) with small shapes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:  # must precede the first import of triton: kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402




from hf_paged.kernels import kv_write as kvw  # noqa: E402
from hf_paged.kernels import paged_attention as pa  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
LOW_DTYPE = torch.bfloat16 if ON_GPU else torch.float16  # the interpreter has no fast bf16 path
# Relative Frobenius error allowed against the fp32 reference computed from the same inputs.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# Rows as (seq_len, num_q): keys in the pool after this step, and this step's query tokens.
# seq_len < num_q makes left padding (positions < 0); num_q = 0 is an idle row.
if ON_GPU:
    ROWS = {
        "mixed": [(1000, 1), (2049, 1), (513, 200), (300, 300), (7, 0), (5, 20), (4096, 1), (1537, 129),
                  (16, 1), (17, 1), (256, 64)],
        "decode": [(1, 1), (16, 1), (17, 1), (255, 1), (256, 1), (257, 1), (1024, 1), (4097, 1), (3000, 1)],
        "prefill": [(700, 700), (2048, 512)],
    }
    NUM_KV_HEADS = {1: 4, 4: 8, 8: 2}  # group -> KV heads
else:
    ROWS = {
        "mixed": [(17, 1), (33, 1), (40, 7), (16, 16), (5, 0), (3, 6), (64, 1), (97, 40)],
        "decode": [(1, 1), (16, 1), (17, 1), (32, 1), (33, 1), (70, 1)],
        "prefill": [(47, 47), (96, 32)],
    }
    NUM_KV_HEADS = {1: 2, 4: 2, 8: 1}


@dataclass
class Problem:
    query: torch.Tensor  # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim], a view into a pool
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    max_query_len: int

    def args(self):
        return (self.query, self.k_cache, self.v_cache, self.block_tables, self.seq_lens,
                self.query_start_loc, self.max_query_len)

    def positions(self) -> torch.Tensor:
        """[num_tokens] position of every query token (the rule the kernel implements)."""
        out = []
        starts = self.query_start_loc.tolist()
        for row, seq_len in enumerate(self.seq_lens.tolist()):
            num_q = starts[row + 1] - starts[row]
            out += range(seq_len - num_q, seq_len)
        return torch.tensor(out, dtype=torch.long)


def make_problem(rows, *, num_q_heads, num_kv_heads, head_dim, block_size=16, dtype=torch.float32,
                 extra_tokens=0, seed=0) -> Problem:
    """Random pool, random (non-contiguous) block assignment, random queries. Never zeros."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_row = [math.ceil(seq_len / block_size) for seq_len, _ in rows]
    num_blocks = sum(blocks_per_row) + 5
    pool = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    width = max(blocks_per_row) + 2
    # unused table entries hold valid but wrong blocks: reading them would show up as an error
    block_tables = torch.randint(0, num_blocks, (len(rows), width), generator=gen, dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    used = 0
    for row, n in enumerate(blocks_per_row):
        block_tables[row, :n] = perm[used : used + n]
        used += n
    num_q = torch.tensor([q for _, q in rows])
    query_start_loc = torch.zeros(len(rows) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.cumsum(num_q, 0)
    num_tokens = int(query_start_loc[-1]) + extra_tokens
    query = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen).to(dtype)
    pool = pool.to(DEVICE)
    return Problem(
        query=query.to(DEVICE),
        k_cache=pool[0],
        v_cache=pool[1],
        block_tables=block_tables.to(DEVICE),
        seq_lens=torch.tensor([s for s, _ in rows], dtype=torch.int32, device=DEVICE),
        query_start_loc=query_start_loc.to(DEVICE),
        max_query_len=max(1, int(num_q.max())),
    )


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    err = (out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)
    assert err < REL_TOL[dtype], f"relative error {err:.2e} > {REL_TOL[dtype]:.0e}"


# --------------------------------------------------------------------------------------------------
# paged_attention vs its reference
# --------------------------------------------------------------------------------------------------

# (rows, group, head_dim, block_size, features)
ATTENTION_CASES = [
    ("mixed", 4, 64, 16, {}),
    ("mixed", 1, 64, 32, {}),
    ("mixed", 8, 128, 16, {}),
    ("mixed", 4, 80, 16, {"sliding_window": 9}),
    ("mixed", 4, 64, 32, {"softcap": 5.0}),
    ("mixed", 4, 64, 16, {"sinks": True}),
    ("mixed", 4, 96, 16, {"sliding_window": 20, "softcap": 5.0, "sinks": True}),
    ("decode", 4, 128, 16, {}),
    ("decode", 8, 64, 32, {"sliding_window": 16}),
    ("decode", 1, 64, 16, {"sinks": True, "softcap": 30.0}),
    ("prefill", 4, 64, 16, {}),
    ("prefill", 1, 256, 16, {"sliding_window": 33}),
]


def _features(features: dict, num_q_heads: int) -> dict:
    kwargs = dict(features)
    if kwargs.pop("sinks", False):
        kwargs["sinks"] = (torch.randn(num_q_heads, generator=torch.Generator().manual_seed(7)) * 2).to(DEVICE)
    return kwargs


@pytest.mark.parametrize("dtype", [torch.float32, LOW_DTYPE], ids=str)
@pytest.mark.parametrize("num_kv_splits", [1, 3])
@pytest.mark.parametrize("rows,group,head_dim,block_size,features", ATTENTION_CASES)
def test_paged_attention_matches_reference(rows, group, head_dim, block_size, features, num_kv_splits, dtype):
    num_kv_heads = NUM_KV_HEADS[group]
    num_q_heads = group * num_kv_heads
    prob = make_problem(ROWS[rows], num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                        block_size=block_size, dtype=dtype, seed=group * 1000 + head_dim + block_size)
    kwargs = _features(features, num_q_heads)
    scale = head_dim**-0.5
    out = torch.full_like(prob.query, float("nan"))
    ret = pa.paged_attention(*prob.args(), scale=scale, out=out, num_kv_splits=num_kv_splits, **kwargs)
    assert ret is out
    ref = pa.paged_attention_reference(*prob.args(), scale=scale, **kwargs)
    assert_close(out, ref, dtype)
    # left padding: tokens at negative positions attend to nothing and are exactly zero
    padded = prob.positions().to(DEVICE) < 0
    assert (out[padded] == 0).all()


@pytest.mark.parametrize("rows", ["mixed", "decode"])
def test_paged_attention_default_heuristic_and_loose_max_query_len(rows):
    """No split override, and a max_query_len far above the real one (it is only an upper bound)."""
    prob = make_problem(ROWS[rows], num_q_heads=8, num_kv_heads=2, head_dim=64, dtype=LOW_DTYPE, seed=3)
    for max_query_len in (prob.max_query_len, prob.max_query_len + 37):
        prob.max_query_len = max_query_len
        out = pa.paged_attention(*prob.args(), scale=0.125)
        ref = pa.paged_attention_reference(*prob.args(), scale=0.125)
        assert_close(out, ref, LOW_DTYPE)


@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_paged_attention_leaves_unowned_tokens(num_kv_splits):
    """Tokens past query_start_loc[-1] (graph padding) belong to no row and are left untouched."""
    prob = make_problem(ROWS["mixed"], num_q_heads=8, num_kv_heads=2, head_dim=64, extra_tokens=3, seed=4)
    out = torch.full_like(prob.query, float("nan"))
    pa.paged_attention(*prob.args(), scale=0.125, out=out, num_kv_splits=num_kv_splits)
    owned = int(prob.query_start_loc[-1])
    assert torch.isnan(out[owned:]).all()
    ref = pa.paged_attention_reference(*prob.args(), scale=0.125)
    assert_close(out[:owned], ref[:owned], torch.float32)


def test_paged_attention_all_rows_idle():
    prob = make_problem([(5, 0), (9, 0)], num_q_heads=4, num_kv_heads=4, head_dim=64, extra_tokens=2)
    out = torch.full_like(prob.query, float("nan"))
    pa.paged_attention(*prob.args(), scale=0.125, out=out, num_kv_splits=2)
    assert torch.isnan(out).all()


def test_split_heuristic_from_shapes():
    """Few long rows get split; a big batch does not; the choice never needs device values."""
    shape = dict(max_query_len=1, num_kv_heads=8, group=4, head_dim=128, elem_bytes=2, max_kv_len=8192, num_sms=132)
    few = pa._choose_config(num_tokens=1, num_seqs=1, num_kv_splits=None, **shape)
    many = pa._choose_config(num_tokens=256, num_seqs=256, num_kv_splits=None, **shape)
    forced = pa._choose_config(num_tokens=1, num_seqs=1, num_kv_splits=5, **shape)
    assert few.num_splits > 1 and many.num_splits == 1 and forced.num_splits == 5


# --------------------------------------------------------------------------------------------------
# The reference against dense attention (so that it can be trusted as an oracle and a CPU path)
# --------------------------------------------------------------------------------------------------


def _dense_row(q, k, v, positions, *, scale, sliding_window=None, softcap=None, sinks=None):
    """Plain dense attention of one row: q [n, Hq, D], k/v [seq_len, Hkv, D] contiguous."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # [seq_len, Hq, D]
    v = v.repeat_interleave(group, dim=1)
    logits = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    j = torch.arange(k.shape[0])
    visible = j[None, :] <= positions[:, None]
    if sliding_window is not None:
        visible &= positions[:, None] - j[None, :] < sliding_window
    logits = logits.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        logits = torch.cat([logits, sinks.view(-1, 1, 1).expand(-1, q.shape[0], 1).to(logits.dtype)], -1)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows that see nothing: 0
    if sinks is not None:
        probs = probs[..., :-1]
    return torch.einsum("hqk,khd->qhd", probs, v)


def _gather_rows(prob: Problem):
    """Per row: (query tokens, contiguous K, contiguous V, positions), read back through the table."""
    block_size = prob.k_cache.shape[1]
    starts = prob.query_start_loc.tolist()
    for row, seq_len in enumerate(prob.seq_lens.tolist()):
        n = math.ceil(seq_len / block_size)
        blocks = prob.block_tables[row, :n].long()
        k = prob.k_cache[blocks].flatten(0, 1)[:seq_len]
        v = prob.v_cache[blocks].flatten(0, 1)[:seq_len]
        q = prob.query[starts[row] : starts[row + 1]]
        yield starts[row], q, k, v, torch.arange(seq_len - q.shape[0], seq_len)


@pytest.mark.parametrize("features", [{}, {"sliding_window": 7}], ids=["causal", "window"])
def test_reference_matches_sdpa(features):
    prob = make_problem(ROWS["mixed"][:6] if not ON_GPU else ROWS["mixed"], num_q_heads=8, num_kv_heads=2,
                        head_dim=64, dtype=torch.float64, seed=11)
    prob.query, prob.k_cache, prob.v_cache = prob.query.cpu(), prob.k_cache.cpu(), prob.v_cache.cpu()
    prob.block_tables, prob.seq_lens = prob.block_tables.cpu(), prob.seq_lens.cpu()
    prob.query_start_loc = prob.query_start_loc.cpu()
    ref = pa.paged_attention_reference(*prob.args(), scale=0.3, **features)
    assert ref.dtype == torch.float64
    for start, q, k, v, pos in _gather_rows(prob):
        if q.shape[0] == 0:
            continue
        j = torch.arange(k.shape[0])
        mask = j[None, :] <= pos[:, None]  # [n, seq_len]
        if "sliding_window" in features:
            mask &= pos[:, None] - j[None, :] < features["sliding_window"]
        dense = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=0.3, enable_gqa=True
        ).transpose(0, 1)  # [n, Hq, D]
        dense = torch.where(mask.any(-1)[:, None, None], dense, torch.zeros_like(dense))  # SDPA gives NaN there
        torch.testing.assert_close(ref[start : start + q.shape[0]], dense, rtol=1e-10, atol=1e-10)


def test_reference_matches_dense_softcap_sinks():
    prob = make_problem(ROWS["mixed"][:6], num_q_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.float64,
                        seed=12)
    for name in ("query", "k_cache", "v_cache", "block_tables", "seq_lens", "query_start_loc"):
        setattr(prob, name, getattr(prob, name).cpu())
    sinks = torch.randn(8, dtype=torch.float64)
    kwargs = dict(scale=0.3, softcap=2.5, sinks=sinks, sliding_window=12)
    ref = pa.paged_attention_reference(*prob.args(), **kwargs)
    for start, q, k, v, pos in _gather_rows(prob):
        dense = _dense_row(q, k, v, pos, **kwargs)
        torch.testing.assert_close(ref[start : start + q.shape[0]], dense, rtol=1e-10, atol=1e-10)


def test_reference_chunks_long_rows():
    """The reference processes long rows in chunks; the chunked result equals the one-shot result."""
    prob = make_problem([(300, 260)], num_q_heads=2, num_kv_heads=1, head_dim=64, dtype=torch.float64, seed=13)
    for name in ("query", "k_cache", "v_cache", "block_tables", "seq_lens", "query_start_loc"):
        setattr(prob, name, getattr(prob, name).cpu())
    big = pa.paged_attention_reference(*prob.args(), scale=0.2)
    (start, q, k, v, pos), = _gather_rows(prob)
    torch.testing.assert_close(big, _dense_row(q, k, v, pos, scale=0.2), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# write_kv
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("src_dtype,cache_dtype", [(torch.float32, torch.float32), (torch.float32, LOW_DTYPE),
                                                   (LOW_DTYPE, LOW_DTYPE)], ids=str)
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(2, 64, 16), (3, 80, 32), (8, 128, 16)])
def test_write_kv_matches_reference(num_kv_heads, head_dim, block_size, src_dtype, cache_dtype):
    gen = torch.Generator().manual_seed(num_kv_heads * head_dim)
    num_layers, num_blocks, num_tokens = 2, 9, 37
    # the caches are one layer's views into a bigger pool, as in the library
    pool = torch.randn(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    pool = pool.to(cache_dtype).to(DEVICE)
    # key/value as the transposed view of [num_kv_heads, num_tokens, head_dim]: strided, last dim contiguous
    key = torch.randn(num_kv_heads, num_tokens, head_dim, generator=gen).to(src_dtype).to(DEVICE).transpose(0, 1)
    value = torch.randn(num_kv_heads, num_tokens, head_dim, generator=gen).to(src_dtype).to(DEVICE).transpose(0, 1)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::5] = -1  # padding tokens
    slot_mapping = slots.to(DEVICE)

    expected = pool.clone()
    kvw.write_kv_reference(key, value, expected[1, 0], expected[1, 1], slot_mapping)
    kvw.write_kv(key, value, pool[1, 0], pool[1, 1], slot_mapping)
    assert torch.equal(pool, expected)
    # and the reference itself: every valid slot holds its token, the rest is unchanged
    flat_k = expected[1, 0].flatten(0, 1)
    valid = slots >= 0
    assert torch.equal(flat_k[slot_mapping[valid.to(DEVICE)]], key[valid.to(DEVICE)].to(cache_dtype))


def test_write_kv_all_padding_and_empty():
    pool = torch.randn(2, 4, 16, 2, 64).to(DEVICE)
    before = pool.clone()
    key = torch.randn(3, 2, 64, device=DEVICE)
    kvw.write_kv(key, key, pool[0], pool[1], torch.full((3,), -1, dtype=torch.int64, device=DEVICE))
    kvw.write_kv(key[:0], key[:0], pool[0], pool[1], torch.empty(0, dtype=torch.int64, device=DEVICE))
    assert torch.equal(pool, before)


# --------------------------------------------------------------------------------------------------
# GPU only: CUDA graphs and 64-bit pool offsets
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_paged_attention_cuda_graph_replay():
    """Captured once, replayed with new lengths and queries: the launch reads nothing on the host."""
    rows = [(500, 1), (1200, 1), (33, 1), (3000, 1)]
    prob = make_problem(rows, num_q_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, seed=21)
    prob.block_tables = prob.block_tables.clone()
    out = torch.empty_like(prob.query)
    for splits in (None, 4):
        pa.paged_attention(*prob.args(), scale=0.1, out=out, num_kv_splits=splits)  # compile outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            pa.paged_attention(*prob.args(), scale=0.1, out=out, num_kv_splits=splits)
        for step in range(3):
            prob.query.copy_(torch.randn_like(prob.query))
            prob.seq_lens.copy_(torch.tensor([s - 7 * step for s, _ in rows], dtype=torch.int32))
            out.fill_(float("nan"))
            graph.replay()
            ref = pa.paged_attention_reference(*prob.args(), scale=0.1)
            assert_close(out, ref, torch.bfloat16)


@pytest.mark.skipif(not ON_GPU, reason="needs > 4 GiB of device memory")
def test_kernels_64bit_block_offsets():
    """Blocks whose element offset (block_id * stride) is past 2^31 are read and written correctly."""
    num_kv_heads, head_dim, block_size = 1, 64, 16
    per_block = block_size * num_kv_heads * head_dim
    num_blocks = 2**31 // per_block + 64  # 4 GiB per cache in bf16
    pool = torch.empty(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    k_cache, v_cache = pool[0], pool[1]
    rows = [(100, 1), (40, 40), (300, 17)]
    blocks = torch.arange(num_blocks - 60, num_blocks, dtype=torch.int32, device="cuda")  # the far end
    assert (num_blocks - 60) * per_block > 2**31
    block_tables = blocks.view(3, 20).flip(1).contiguous()  # 20 blocks = 320 keys per row, in reverse
    # write every token of every row through write_kv, from a random source
    slots = torch.cat([block_tables[r].repeat_interleave(block_size).long()[: s] * block_size
                       + torch.arange(s, device="cuda") % block_size for r, (s, _) in enumerate(rows)])
    key = torch.randn(slots.numel(), num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    value = torch.randn_like(key)
    kvw.write_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache.flatten(0, 1)[slots], key) and torch.equal(v_cache.flatten(0, 1)[slots], value)
    num_q = torch.tensor([q for _, q in rows])
    qsl = torch.zeros(4, dtype=torch.int32)
    qsl[1:] = torch.cumsum(num_q, 0)
    query = torch.randn(int(qsl[-1]), 4, head_dim, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.tensor([s for s, _ in rows], dtype=torch.int32, device="cuda")
    args = (query, k_cache, v_cache, block_tables, seq_lens, qsl.cuda(), int(num_q.max()))
    for splits in (1, 3):
        out = torch.full_like(query, float("nan"))
        pa.paged_attention(*args, scale=0.125, out=out, num_kv_splits=splits)
        assert_close(out, pa.paged_attention_reference(*args, scale=0.125), torch.bfloat16)
