"""Paged attention for CPUs (and any device without the Triton kernel): a few batched torch ops per call.

Same contract as ``paged_attention`` in ``paged_attention.py`` (length vocabulary and position rule
there): query token ``i`` of row ``b`` sits at position ``p = seq_len - num_q + i`` and attends to keys
``j <= p`` (and ``p - j < sliding_window``); ``p < 0`` (left padding) attends to nothing and gets 0.

How it is batched. Rows are split into two classes, each computed as one padded batch:

* decode rows (one query token): ``[n, Hkv, G, W]`` logits, where ``W`` covers the longest row's keys;
* multi-token rows (prefill chunks, prompts of ``generate``): ``[n, Hkv, Q*G, W]`` logits, ``Q`` the
  longest row's query count. Rows are sorted by query count so a batch pads little.

A mixed step of many decodes and one prompt chunk would pad every decode row to the chunk's length
if they shared one batch; two classes keep the padding small. Each class is cut into pieces only
when its logits would pass ``_MAX_ELEMENTS`` (long prompts), so memory stays bounded.

K/V are gathered a whole block at a time (``index_select`` over block ids, not over slots): keys
``[first_block * block_size, ...)`` of each row land contiguously in ``[n, W, Hkv, D]``; keys past a
row's end, before its window, or in the future of a query are masked. The pool is zero-initialised,
so masked keys are finite and ``0 * v`` stays 0.

Computes in float64 for float64 queries, float32 otherwise (as the reference does). The metadata is
read on the host (a CPU step has no device to wait for); on a GPU it works too (``backend="torch"``,
head dims the Triton kernel lacks) but syncs a few times per call, so it is not for CUDA graphs.
"""

from __future__ import annotations

import torch

# Most logits materialised at once per piece (32 M elements = 128 MiB in float32).
_MAX_ELEMENTS = 1 << 25


def paged_attention_cpu(
    query: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: keys in the pool per row, this step's included
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32: row b owns tokens [qsl[b], qsl[b+1])
    max_query_len: int,  # upper bound of the per-row query counts
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,  # [num_q_heads] extra logit per head, no value
    out: torch.Tensor | None = None,  # [num_tokens, num_q_heads, head_dim], query dtype
    num_kv_splits: int | None = None,  # the Triton kernel's tuning knob; accepted and ignored
    k_scale: torch.Tensor | None = None,  # [num_blocks, block_size, num_kv_heads] fp32, FP8 caches only
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed query tokens over their rows' paged K/V; returns ``out``.

    Tokens past ``query_start_loc[-1]`` are not written. FP8 (e4m3) caches are dequantized as they are
    gathered: ``value = e4m3 * scale`` with one scale per (slot, KV head).
    """
    del num_kv_splits
    num_tokens, num_q_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, cache_dim = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert query.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64), f"{query.dtype = }"
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    assert k_cache.dtype == v_cache.dtype and (fp8 or k_cache.dtype == query.dtype), (
        f"{query.dtype = } {k_cache.dtype = } {v_cache.dtype = }"
    )
    assert (k_scale is not None and v_scale is not None) == fp8, "FP8 caches need k_scale and v_scale, others none"
    if fp8:
        for s in (k_scale, v_scale):
            assert s.dtype == torch.float32 and s.shape == k_cache.shape[:3], f"{s.dtype = } {s.shape = } {k_cache.shape = }"
    assert v_cache.shape == k_cache.shape and cache_dim == head_dim, f"{query.shape = } {k_cache.shape = }"
    assert num_q_heads % num_kv_heads == 0, f"{num_q_heads = } {num_kv_heads = }"
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs, f"{block_tables.shape = } {num_seqs = }"
    assert query_start_loc.shape == (num_seqs + 1,), f"{query_start_loc.shape = } {num_seqs = }"
    assert max_query_len >= 0
    assert sliding_window is None or sliding_window >= 1, f"{sliding_window = }"
    assert softcap is None or softcap > 0, f"{softcap = }"
    if sinks is not None:
        assert sinks.shape == (num_q_heads,), f"{sinks.shape = }"
    if out is None:
        out = torch.empty_like(query)
    assert out.shape == query.shape and out.dtype == query.dtype, f"{out.shape = } {out.dtype = }"
    if num_tokens == 0 or num_seqs == 0:
        return out

    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    qsl = query_start_loc.long()
    num_q = qsl[1:] - qsl[:-1]  # [B]
    seq = seq_lens.long()
    k_sink = None if sinks is None else sinks.to(compute).view(num_kv_heads, num_q_heads // num_kv_heads, 1)
    attend = _Attend(query, k_cache, v_cache, k_scale, v_scale, block_tables, qsl, seq, out, compute, scale,
                     sliding_window, softcap, k_sink)

    decode = (num_q == 1).nonzero().flatten()
    if decode.numel():
        attend.rows(decode, 1)
    multi = (num_q > 1).nonzero().flatten()
    if multi.numel():
        counts, order = num_q[multi].sort(descending=True)
        attend.rows(multi[order], int(counts[0]), counts)
    return out


class _Attend:
    """One call's shared inputs; ``rows`` computes a class of rows in padded pieces."""

    def __init__(self, query, k_cache, v_cache, k_scale, v_scale, block_tables, qsl, seq, out, compute, scale,
                 window, softcap, sink):
        self.query, self.k_cache, self.v_cache, self.block_tables = query, k_cache, v_cache, block_tables
        self.k_scale, self.v_scale = k_scale, v_scale
        self.qsl, self.seq, self.out, self.compute = qsl, seq, out, compute
        self.scale, self.window, self.softcap, self.sink = scale, window, softcap, sink
        self.num_q_heads = query.shape[1]
        self.block_size = k_cache.shape[1]

    def rows(self, rows: torch.Tensor, max_q: int, counts: torch.Tensor | None = None) -> None:
        """Rows ``rows`` (each with ``<= max_q`` query tokens; ``counts`` sorted descending, if given)."""
        bs = self.block_size
        seq = self.seq[rows]
        # Keys a row's queries can see span at most min(seq_len, max_q + window - 1), plus the part of
        # the first block before the window.
        span = int(seq.max())
        if self.window is not None:
            span = min(span, max_q + self.window - 1 + bs - 1)
        width = -(-span // bs) * bs + (bs if self.window is not None else 0)
        per_row = self.num_q_heads * max_q * width
        n = rows.numel()
        step = max(1, _MAX_ELEMENTS // per_row)
        if step >= n:
            self._piece(rows, 0, max_q)
            return
        if step > 1 or max_q == 1:  # several rows per piece
            for r0 in range(0, n, step):
                piece = rows[r0 : r0 + step]
                q_hi = max_q if counts is None else int(counts[r0])
                self._piece(piece, 0, q_hi)
            return
        # One row alone is too big: cut its queries into slices (their causal key range shrinks too).
        q_step = max(1, _MAX_ELEMENTS // (self.num_q_heads * width))
        for r0 in range(n):
            q_hi = max_q if counts is None else int(counts[r0])
            for q0 in range(0, q_hi, q_step):
                self._piece(rows[r0 : r0 + 1], q0, min(q_hi, q0 + q_step))

    def _piece(self, rows: torch.Tensor, q0: int, q1: int) -> None:
        """Query tokens ``[q0, q1)`` of each row in ``rows`` (padded to ``q1 - q0``), one batched pass."""
        bs = self.block_size
        nq = q1 - q0
        n = rows.numel()
        start = self.qsl[rows]  # [n]
        num_q = self.qsl[rows + 1] - start
        seq = self.seq[rows]
        first = seq - num_q + q0  # [n] position of the piece's first query token
        device = self.query.device
        i = torch.arange(nq, device=device)
        pos = first[:, None] + i  # [n, nq]
        q_ok = (q0 + i)[None, :] < num_q[:, None]  # [n, nq] real query token of the row
        # Keys [lo, hi) hold everything the piece may see; gathered from block lo // bs on.
        hi = torch.minimum(seq, first + nq).clamp(min=0)  # [n]
        lo = torch.zeros_like(hi) if self.window is None else (first - self.window + 1).clamp(min=0)
        lo = torch.minimum(lo, hi)
        b_lo = lo // bs
        num_b = int((-(-hi // bs) - b_lo).max())
        if num_b <= 0:  # nothing visible anywhere (all padding)
            self._store(rows, start, q0, q_ok, None)
            return
        cols = (b_lo[:, None] + torch.arange(num_b, device=device)).clamp(max=self.block_tables.shape[1] - 1)  # [n, num_b]
        # Table entries past a row's blocks are only ever masked; clamped so any value there is a valid id.
        blocks = self.block_tables[rows[:, None], cols].long().flatten().clamp_(0, self.k_cache.shape[0] - 1)
        k = self._gather(self.k_cache, self.k_scale, blocks, n)  # [n, W, Hkv, D], W = num_b * bs
        v = self._gather(self.v_cache, self.v_scale, blocks, n)
        j = b_lo[:, None] * bs + torch.arange(num_b * bs, device=device)  # [n, W] key positions
        visible = (j[:, None, :] <= pos[:, :, None]) & (j < hi[:, None])[:, None, :]  # [n, nq, W]
        if self.window is not None:
            visible &= pos[:, :, None] - j[:, None, :] < self.window

        q = self.query[(start[:, None] + q0 + i).clamp(max=self.query.shape[0] - 1)]  # [n, nq, Hq, D]
        num_kv_heads, head_dim = k.shape[2], k.shape[3]
        group = self.num_q_heads // num_kv_heads
        # [n, Hkv, nq * G, D] x [n, Hkv, D, W]: each KV head's K/V is read once for its G query heads.
        q = q.to(self.compute).view(n, nq, num_kv_heads, group, head_dim).permute(0, 2, 1, 3, 4)
        q = q.reshape(n, num_kv_heads, nq * group, head_dim)
        logits = torch.matmul(q, k.permute(0, 2, 3, 1)).view(n, num_kv_heads, nq, group, -1)
        if self.softcap is not None:
            logits = torch.tanh(logits.mul_(self.scale / self.softcap)).mul_(self.softcap)
        else:
            logits.mul_(self.scale)
        logits.masked_fill_(~visible[:, None, :, None, :], float("-inf"))
        if self.sink is None:
            probs = torch.softmax(logits, dim=-1)  # NaN on rows that see nothing: replaced in _store
        else:  # the sink is one more logit per head, in the denominator only
            sink = self.sink.view(1, num_kv_heads, 1, group, 1)
            m = torch.maximum(logits.amax(dim=-1, keepdim=True), sink)
            probs = (logits - m).exp_()
            probs = probs.div_(probs.sum(dim=-1, keepdim=True) + (sink - m).exp())
        o = torch.matmul(probs.view(n, num_kv_heads, nq * group, -1), v.permute(0, 2, 1, 3))  # [n, Hkv, nq*G, D]
        o = o.view(n, num_kv_heads, nq, group, head_dim).permute(0, 2, 1, 3, 4).reshape(n, nq, -1, head_dim)
        self._store(rows, start, q0, q_ok, o, visible.any(dim=-1))

    def _gather(self, cache: torch.Tensor, scale: torch.Tensor | None, blocks: torch.Tensor, n: int) -> torch.Tensor:
        """Whole blocks of one cache as ``[n, W, Hkv, D]`` in the compute dtype (dequantized when FP8)."""
        _, bs, heads, dim = cache.shape
        x = cache.index_select(0, blocks).view(n, -1, heads, dim).to(self.compute)
        if scale is not None:
            x.mul_(scale.index_select(0, blocks).view(n, -1, heads, 1))
        return x

    def _store(self, rows, start, q0, q_ok, o, seen=None) -> None:
        """Write the real query tokens' outputs; tokens that saw no key get exactly 0."""
        tok = start[:, None] + q0 + torch.arange(q_ok.shape[1], device=q_ok.device)  # [n, nq]
        dst = tok[q_ok]
        if o is None:
            self.out[dst] = 0
            return
        o = o[q_ok]  # [m, Hq, D]
        blind = ~seen[q_ok]
        if bool(blind.any()):
            o[blind] = 0
        self.out[dst] = o.to(self.out.dtype)
