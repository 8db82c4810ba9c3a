"""Paged attention for CPUs (and any device without the Triton kernel): a few batched torch ops per call.

Same contract as ``paged_attention`` in ``paged_attention.py`` (length vocabulary and position rule
there): query token ``i`` of row ``b`` sits at position ``p = seq_len - num_q + i`` and attends to keys
``j <= p`` (and ``p - j < sliding_window``); ``p < 0`` (left padding) attends to nothing and gets 0.

How it is batched. Rows are computed as padded batches ``[n, Hkv, G * Q, W]`` (the G query heads of a
KV head share its K/V and their mask, so they ride along the query axis and every KV head is read
once), ``Q`` the batch's most query tokens, ``W`` its widest key range:

* decode rows (one query token) and multi-token rows (prompt chunks, ``generate``'s prompts) are
  separate classes, so a step of many decodes and one prompt chunk does not pad every decode row
  to the chunk's length;
* within a class, rows are sorted by key range and cut into a few buckets where padding everything
  to the longest row would cost more than another batch's fixed cost (``_BUCKET_OVERHEAD``);
* a bucket is cut further only when its logits would pass ``_MAX_ELEMENTS`` (long prompts): rows
  first, then the query tokens of a single row, so memory stays bounded.

K/V are gathered a whole block at a time (``index_select`` over block ids, not over slots): the keys
of each row from its first visible block on land contiguously in ``[n, W, Hkv, D]``; keys past a
row's end, before its window, or in the future of a query are masked. Without softcap and sinks the
attention itself is ``scaled_dot_product_attention`` (fused on CPU: no logits in memory); with
either, explicit matmul / softmax. The pool is zero-initialised, so masked keys are finite.

Computes in float64 for float64 queries, float32 otherwise (as the reference does). The metadata is
read on the host (a CPU step has no device to wait for); on a GPU it works too (``backend="torch"``,
head dims the Triton kernel lacks) but syncs a few times per call, so it is not for CUDA graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Most logits (rows x query heads x query tokens x keys) in one piece: 32 M = 128 MiB in float32.
_MAX_ELEMENTS = 1 << 25
# A batch's fixed cost (~25 small ops, ~0.2 ms on one core) in units of padded work (query heads x head
# dims x query tokens x keys): a bucket split must save more than this.
_BUCKET_OVERHEAD = 1 << 18


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
    # Blocks each row reads: from the one holding its first query's window edge to its last key.
    first = seq - num_q  # position of each row's first query token
    lo = torch.zeros_like(seq) if sliding_window is None else (first - sliding_window + 1).clamp(min=0)
    num_b = -(-seq // block_size) - torch.minimum(lo, seq) // block_size  # [B]
    sink = None if sinks is None else sinks.to(compute).view(1, num_kv_heads, num_q_heads // num_kv_heads, 1, 1)
    attend = _Attend(query, k_cache, v_cache, k_scale, v_scale, block_tables, qsl, seq, out, compute, scale,
                     sliding_window, softcap, sink)
    attend.padded = bool(first.min() < 0)
    for decode in (True, False):
        rows = (num_q == 1 if decode else num_q > 1).nonzero().flatten()
        if rows.numel():
            width, order = num_b[rows].sort(descending=True)
            attend.run(rows[order], num_q[rows[order]], width, decode)
    return out


def _buckets(q: torch.Tensor, width: torch.Tensor, unit: int, depth: int = 3) -> list[tuple[int, int]]:
    """Cut rows sorted by ``width`` (descending) into ``[a, b)`` ranges, padded cost ``(b - a) * max(q) * width[a]``.

    Binary splits, each at its cheapest point, kept only when they save more than ``_BUCKET_OVERHEAD``
    (``unit``: padded work per query token and key block).
    """
    n = q.numel()
    if depth == 0 or n < 2:
        return [(0, n)]
    pre = q.cummax(0).values  # max query count of rows [0, i]
    suf = q.flip(0).cummax(0).values.flip(0)  # of rows [i, n)
    i = torch.arange(1, n)
    split_cost = i * pre[:-1] * width[0] + (n - i) * suf[1:] * width[1:]
    k = int(split_cost.argmin())
    saved = (n * int(pre[-1]) * int(width[0]) - int(split_cost[k])) * unit
    if saved <= _BUCKET_OVERHEAD:
        return [(0, n)]
    k += 1
    left = _buckets(q[:k], width[:k], unit, depth - 1)
    right = _buckets(q[k:], width[k:], unit, depth - 1)
    return left + [(a + k, b + k) for a, b in right]


class _Attend:
    """One call's shared inputs; ``run`` computes one class of rows in padded batches."""

    def __init__(self, query, k_cache, v_cache, k_scale, v_scale, block_tables, qsl, seq, out, compute, scale,
                 window, softcap, sink):
        self.query, self.k_cache, self.v_cache, self.block_tables = query, k_cache, v_cache, block_tables
        self.k_scale, self.v_scale = k_scale, v_scale
        self.qsl, self.seq, self.out, self.compute = qsl, seq, out, compute
        self.scale, self.window, self.softcap, self.sink = scale, window, softcap, sink
        self.num_q_heads, self.head_dim = query.shape[1], query.shape[2]
        self.block_size = k_cache.shape[1]
        self.padded = True  # some token sits at a position < 0 (its output must be exactly 0)

    def run(self, rows: torch.Tensor, num_q: torch.Tensor, width: torch.Tensor, decode: bool) -> None:
        """Rows sorted by ``width`` (key blocks, descending); ``num_q`` their query counts."""
        bs = self.block_size
        for a, b in _buckets(num_q, width, self.num_q_heads * self.head_dim * bs):
            max_q = 1 if decode else int(num_q[a:b].max())
            per_row = self.num_q_heads * max_q * int(width[a]) * bs  # logits of one padded row
            step = max(1, _MAX_ELEMENTS // per_row)
            if step > 1 or max_q == 1:  # whole rows per piece
                for r0 in range(a, b, step):
                    r1 = min(b, r0 + step)
                    q1 = 1 if decode else int(num_q[r0:r1].max())
                    self._piece(rows[r0:r1], 0, q1, all_real=decode)
                continue
            # One row alone is too big: cut its queries into slices (their causal key range shrinks too).
            q_step = max(1, _MAX_ELEMENTS // (self.num_q_heads * int(width[a]) * bs))
            for r in range(a, b):
                count = int(num_q[r])
                for q0 in range(0, count, q_step):
                    self._piece(rows[r : r + 1], q0, min(count, q0 + q_step), all_real=True)

    def _piece(self, rows: torch.Tensor, q0: int, q1: int, all_real: bool) -> None:
        """Query tokens ``[q0, q1)`` of each row in ``rows`` (padded to ``q1 - q0``), one batched pass.

        ``all_real``: every row has at least ``q1`` query tokens (no padded query slots)."""
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
        tok = start[:, None] + q0 + i  # [n, nq] packed index of each query slot
        # Keys [lo, hi) hold everything the piece may see; gathered from block lo // bs on.
        hi = torch.minimum(seq, first + nq).clamp(min=0)  # [n]
        lo = torch.zeros_like(hi) if self.window is None else (first - self.window + 1).clamp(min=0)
        b_lo = torch.minimum(lo, hi) // bs
        num_b = int((-(-hi // bs) - b_lo).max())
        if num_b <= 0:  # nothing visible anywhere (all padding)
            self._store(tok, pos, num_q - q0, None, all_real)
            return
        cols = (b_lo[:, None] + torch.arange(num_b, device=device)).clamp(max=self.block_tables.shape[1] - 1)
        # Table entries past a row's blocks are only ever masked; clamped so any value there is a valid id.
        blocks = self.block_tables[rows[:, None], cols].long().flatten().clamp_(0, self.k_cache.shape[0] - 1)
        k = self._gather(self.k_cache, self.k_scale, blocks, n)  # [n, Hkv, W, D], W = num_b * bs
        v = self._gather(self.v_cache, self.v_scale, blocks, n)
        j = b_lo[:, None] * bs + torch.arange(num_b * bs, device=device)  # [n, W] key positions
        visible = (j[:, None, :] <= pos[:, :, None]) & (j < hi[:, None])[:, None, :]  # [n, nq, W]
        if self.window is not None:
            visible &= pos[:, :, None] - j[:, None, :] < self.window

        num_kv_heads = k.shape[1]
        group = self.num_q_heads // num_kv_heads
        d = self.head_dim
        if nq == 1:
            q = self.query.index_select(0, tok[:, 0]).view(n, num_kv_heads, group, d)
        else:  # [n, nq, Hq, D] -> [n, Hkv, G * nq, D], query heads of one KV head adjacent
            q = self.query[tok.clamp(max=self.query.shape[0] - 1)].view(n, nq, num_kv_heads, group, d)
            q = q.permute(0, 2, 3, 1, 4).reshape(n, num_kv_heads, group * nq, d)
        q = q.to(self.compute)
        if self.softcap is None and self.sink is None:
            mask = visible[:, None] if nq == 1 else visible[:, None, None].expand(n, 1, group, nq, -1).reshape(n, 1, group * nq, -1)
            # Fused on CPU: no [.., W] logits in memory.
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:
            o = self._attend_explicit(q, k, v, visible, group, nq)
        o = o.view(n, num_kv_heads, group, nq, d).permute(0, 3, 1, 2, 4).reshape(n, nq, self.num_q_heads, d)
        self._store(tok, pos, num_q - q0, o, all_real)

    def _attend_explicit(self, q, k, v, visible, group, nq) -> torch.Tensor:
        """Softcap and sinks, which SDPA lacks: ``[n, Hkv, G * nq, D]`` from q ``[n, Hkv, G * nq, D]``, k/v ``[n, Hkv, W, D]``."""
        n, num_kv_heads = q.shape[:2]
        logits = torch.matmul(q, k.transpose(2, 3)).view(n, num_kv_heads, group, nq, -1)
        if self.softcap is not None:
            logits = torch.tanh(logits.mul_(self.scale / self.softcap)).mul_(self.softcap)
        else:
            logits.mul_(self.scale)
        logits.masked_fill_(~visible[:, None, None], float("-inf"))
        if self.sink is None:
            probs = torch.softmax(logits, dim=-1)  # NaN for tokens that see nothing: zeroed by _store
        else:  # the sink is one more logit per head, in the denominator only
            m = torch.maximum(logits.amax(dim=-1, keepdim=True), self.sink)
            probs = (logits - m).exp_()
            probs = probs.div_(probs.sum(dim=-1, keepdim=True) + (self.sink - m).exp())
        return torch.matmul(probs.view(n, num_kv_heads, group * nq, -1), v)

    def _gather(self, cache: torch.Tensor, scale: torch.Tensor | None, blocks: torch.Tensor, n: int) -> torch.Tensor:
        """Whole blocks of one cache as ``[n, Hkv, W, D]`` (a transposed view) in the compute dtype,
        dequantized when FP8."""
        _, bs, heads, dim = cache.shape
        x = cache.index_select(0, blocks).view(n, -1, heads, dim).to(self.compute)
        if scale is not None:
            x.mul_(scale.index_select(0, blocks).view(n, -1, heads, 1))
        return x.transpose(1, 2)

    def _store(self, tok, pos, count, o, all_real) -> None:
        """Write the outputs ``o`` ``[n, nq, Hq, D]`` (None: zeros) of the real query slots (slot ``i`` of
        row ``r`` is real when ``i < count[r]``); tokens at positions < 0 get exactly 0.

        Every token at a position >= 0 sees at least its own key, so position < 0 is exactly "sees nothing".
        """
        if all_real:
            dst, blind = tok.flatten(), pos.flatten() < 0
        else:
            real = torch.arange(tok.shape[1], device=tok.device)[None, :] < count[:, None]  # [n, nq]
            dst, blind = tok[real], pos[real] < 0
            if o is not None:
                o = o[real]
        if o is None:
            self.out[dst] = 0
            return
        o = o.reshape(dst.shape[0], *o.shape[-2:])
        if self.padded:
            o = o.masked_fill(blind[:, None, None], 0.0)  # also replaces the NaN of a softmax over nothing
        self.out.index_copy_(0, dst, o.to(self.out.dtype))
