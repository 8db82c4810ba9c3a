"""Paged attention for CPUs (and any device without the Triton kernel): a few batched torch ops per call.

Same contract as ``paged_attention`` in ``paged_attention.py`` (length vocabulary and position rule
there): query token ``i`` of row ``b`` sits at position ``p = seq_len - num_q + i`` and attends to keys
``j <= p`` (and ``p - j < sliding_window``); ``p < 0`` (left padding) attends to nothing and gets 0.

How it is batched. Rows are computed as padded batches of ``n`` rows x ``Q`` query tokens (the batch's
most) x ``W`` keys (its widest key range). Decode batches put the G query heads of a KV head on the
query axis (``[n, Hkv, G, D]`` queries: they share the KV head and its mask, so each KV head is read once);
multi-token batches attend as ``[n, Hq, Q, D]`` with SDPA's GQA, which measured faster than a G-fold
query axis and its G-fold mask.

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

Everything above depends on the step's metadata only, not on the layer: with ``plans`` (a dict that
lives as long as the step's metadata, ``StepMetadata.plans``) it is computed by the first layer and
reused by the others, which then run ~10 ops each. A plan is reused only for the very tensors it was
made from; code that rewrites them in place for another step must clear ``plans``.

Computes in float64 for float64 queries, float32 otherwise (as the reference does). The metadata is
read on the host (a CPU step has no device to wait for); on a GPU it works too (``backend="torch"``,
head dims the Triton kernel lacks) but syncs a few times per call, so it is not for CUDA graphs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

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
    plans: dict | None = None,  # the step's scratch dict: the row plan is made once and reused per layer
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
    group = num_q_heads // num_kv_heads
    meta = (query_start_loc, seq_lens, block_tables)
    key = ("cpu", sliding_window, num_blocks, block_size, num_tokens, num_q_heads, num_kv_heads, head_dim, compute)
    plan = None if plans is None else plans.get(key)
    if plan is None or any(a is not b for a, b in zip(plan.meta, meta)):  # (a replaced tensor: plan anew)
        plan = _plan(*meta, sliding_window, num_blocks, block_size, num_tokens, num_q_heads, group, head_dim, compute)
        if plans is not None:
            plans[key] = plan
    sink = None if sinks is None else sinks.to(compute).view(1, num_kv_heads, group, 1, 1)
    for piece in plan.pieces:
        _attend(piece, query, k_cache, v_cache, k_scale, v_scale, out, compute, scale, softcap, sink, group)
    return out


@dataclass(frozen=True, slots=True)
class _Piece:
    """One padded batch of ``n`` rows x ``nq`` query slots against ``W`` keys (everything but the layer's data)."""

    n: int
    nq: int
    blocks: torch.Tensor | None  # [n * W / block_size] block ids to gather; None: nothing visible
    tokens: tuple[int, int] | None  # (first, count): the slots are packed tokens [first, first + count), all real
    q_index: torch.Tensor | None  # [n] (nq == 1) or [n, nq] packed token of each query slot (None with tokens)
    visible: torch.Tensor  # [n, nq, W] bool: query slot i of row r sees key w
    mask: torch.Tensor  # the same as SDPA's additive mask (0 / -inf, compute dtype): [n, 1, 1, W] or [n, 1, nq, W]
    real: torch.Tensor | None  # [n, nq] bool: slots that are tokens of the row; None: all are
    dst: torch.Tensor | None  # [m] packed token of each real slot (None with tokens)
    blind: torch.Tensor | None  # [m] bool: at a position < 0 (sees nothing, output 0); None: no such slot


@dataclass(frozen=True, slots=True)
class _Plan:
    meta: tuple  # the metadata tensors it was made from (checked by identity before reuse)
    pieces: list


def _plan(query_start_loc, seq_lens, block_tables, window, num_blocks, bs, num_tokens, num_q_heads, group, head_dim,
          compute) -> _Plan:
    """Rows into classes, buckets and pieces, with every index and mask the layers need.

    The decisions (classes, buckets, piece sizes) are made on host integers: a few dozen small tensor ops
    would cost more than these list passes, and they run once per step, not per layer.
    """
    qsl = query_start_loc.tolist()
    seq = seq_lens.tolist()
    num_q = [b - a for a, b in zip(qsl, qsl[1:])]
    first = [s - q for s, q in zip(seq, num_q)]  # position of each row's first query token
    # Key blocks each row reads: from the one holding its first query's window edge to its last key.
    if window is None:
        width = [-(-s // bs) for s in seq]
    else:
        width = [-(-s // bs) - min(max(f - window + 1, 0), s) // bs for s, f in zip(seq, first)]
    padded = min(first, default=0) < 0  # some token sits at a position < 0 (its output must be exactly 0)
    planner = _Planner(query_start_loc, seq_lens, block_tables, window, num_blocks, bs, num_tokens, num_q_heads,
                       group, head_dim, padded, compute)
    decode = [r for r, q in enumerate(num_q) if q == 1]
    multi = [r for r, q in enumerate(num_q) if q > 1]
    for rows, is_decode in ((decode, True), (multi, False)):
        if rows:
            planner.rows(rows, num_q, width, is_decode)
    return _Plan((query_start_loc, seq_lens, block_tables), planner.pieces)


def _attend(p: _Piece, query, k_cache, v_cache, k_scale, v_scale, out, compute, scale, softcap, sink, group) -> None:
    """One piece of one layer: gather K/V, attend, write the real slots."""
    if p.blocks is None:
        _store(p, out, None)
        return
    n, nq = p.n, p.nq
    num_kv_heads, d = k_cache.shape[2], k_cache.shape[3]
    k = _gather(k_cache, k_scale, p.blocks, n, compute)  # [n, Hkv, W, D]
    v = _gather(v_cache, v_scale, p.blocks, n, compute)
    if p.tokens is not None:
        q = query.narrow(0, p.tokens[0], p.tokens[1])
    else:
        q = query.index_select(0, p.q_index) if nq == 1 else query[p.q_index]
    q = _cast(q, compute)
    num_q_heads = num_kv_heads * group
    if softcap is None and sink is None:  # fused on CPU: no logits in memory
        if nq == 1:  # the G query heads of a KV head on the query axis: each KV head read once
            o = F.scaled_dot_product_attention(q.view(n, num_kv_heads, group, d), k, v, attn_mask=p.mask, scale=scale)
            o = o.view(n, 1, num_q_heads, d)  # [n, Hkv, G, D] is already head-major
        else:  # [n, Hq, nq, D] as a strided view of the gathered tokens (faster than a copy to G * nq rows)
            o = F.scaled_dot_product_attention(q.view(n, nq, num_q_heads, d).transpose(1, 2), k, v, attn_mask=p.mask,
                                               scale=scale, enable_gqa=True)
            o = o.transpose(1, 2)  # [n, nq, Hq, D]
    else:  # [n, Hkv, G * nq, D], query heads of one KV head adjacent
        q = q.view(n, nq, num_kv_heads, group, d).permute(0, 2, 3, 1, 4).reshape(n, num_kv_heads, group * nq, d)
        o = _attend_explicit(q, k, v, p.visible, group, nq, scale, softcap, sink)
        o = o.view(n, num_kv_heads, group, nq, d).permute(0, 3, 1, 2, 4)  # [n, nq, Hkv, G, D]
    o = o.reshape(n * nq, num_q_heads, d) if p.real is None else o[p.real].reshape(-1, num_q_heads, d)
    if p.blind is not None:
        o = o.masked_fill(p.blind[:, None, None], 0.0)  # also replaces the NaN of a softmax over nothing
    _store(p, out, o)


def _store(p: _Piece, out: torch.Tensor, o: torch.Tensor | None) -> None:
    """Write the piece's real slots (``o`` ``[m, Hq, D]``; None: zeros)."""
    if p.tokens is not None:
        dst = out.narrow(0, p.tokens[0], p.tokens[1])
        dst.zero_() if o is None else dst.copy_(o)
    elif o is None:
        out[p.dst] = 0
    else:
        out.index_copy_(0, p.dst, _cast(o, out.dtype))


def _attend_explicit(q, k, v, visible, group, nq, scale, softcap, sink) -> torch.Tensor:
    """Softcap and sinks, which SDPA lacks: ``[n, Hkv, G * nq, D]`` from q ``[n, Hkv, G * nq, D]``, k/v ``[n, Hkv, W, D]``."""
    n, num_kv_heads = q.shape[:2]
    logits = torch.matmul(q, k.transpose(2, 3)).view(n, num_kv_heads, group, nq, -1)
    if softcap is not None:
        logits = torch.tanh(logits.mul_(scale / softcap)).mul_(softcap)
    else:
        logits.mul_(scale)
    logits.masked_fill_(~visible[:, None, None], float("-inf"))
    if sink is None:
        probs = torch.softmax(logits, dim=-1)  # NaN for tokens that see nothing: zeroed by the caller
    else:  # the sink is one more logit per head, in the denominator only
        m = torch.maximum(logits.amax(dim=-1, keepdim=True), sink)
        probs = (logits - m).exp_()
        probs = probs.div_(probs.sum(dim=-1, keepdim=True) + (sink - m).exp())
    return torch.matmul(probs.view(n, num_kv_heads, group * nq, -1), v)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)  # (a no-op .to() still costs a dispatch, per layer)


def _gather(cache: torch.Tensor, scale: torch.Tensor | None, blocks: torch.Tensor, n: int, compute) -> torch.Tensor:
    """Whole blocks of one cache as ``[n, Hkv, W, D]`` (a transposed view) in the compute dtype,
    dequantized when FP8."""
    _, bs, heads, dim = cache.shape
    x = _cast(cache.index_select(0, blocks).view(n, -1, heads, dim), compute)
    if scale is not None:
        x.mul_(scale.index_select(0, blocks).view(n, -1, heads, 1))
    return x.transpose(1, 2)


def _buckets(q: list[int], width: list[int], unit: int, depth: int = 3) -> list[tuple[int, int]]:
    """Cut rows sorted by ``width`` (descending) into ``[a, b)`` ranges, padded cost ``(b - a) * max(q) * width[a]``.

    Binary splits, each at its cheapest point, kept only when they save more than ``_BUCKET_OVERHEAD``
    (``unit``: padded work per query token and key block).
    """
    n = len(q)
    full = n * max(q, default=0) * (width[0] if width else 0)
    if depth == 0 or n < 2 or full * unit <= _BUCKET_OVERHEAD:
        return [(0, n)]  # (no split can save more than a batch costs)
    pre = list(itertools.accumulate(q, max))  # max query count of rows [0, i]
    suf = list(itertools.accumulate(reversed(q), max))[::-1]  # of rows [i, n)
    cost, k = min((i * pre[i - 1] * width[0] + (n - i) * suf[i] * width[i], i) for i in range(1, n))
    if (full - cost) * unit <= _BUCKET_OVERHEAD:
        return [(0, n)]
    left = _buckets(q[:k], width[:k], unit, depth - 1)
    right = _buckets(q[k:], width[k:], unit, depth - 1)
    return left + [(a + k, b + k) for a, b in right]


class _Planner:
    """Collects the pieces of one step: ``rows`` adds one class of rows."""

    def __init__(self, qsl, seq, block_tables, window, num_blocks, bs, num_tokens, num_q_heads, group, head_dim, padded,
                 compute):
        self.qsl, self.seq, self.block_tables, self.window, self.block_size = qsl.long(), seq.long(), block_tables, window, bs
        self.num_blocks, self.device = num_blocks, qsl.device
        self.num_tokens, self.num_q_heads, self.group, self.head_dim = num_tokens, num_q_heads, group, head_dim
        self.padded, self.compute = padded, compute
        self.pieces: list[_Piece] = []

    def rows(self, rows: list[int], num_q: list[int], width: list[int], decode: bool) -> None:
        """One class of rows (indices into the step's rows; ``num_q``/``width``: every row's query count and key blocks)."""
        bs = self.block_size
        rows = sorted(rows, key=width.__getitem__, reverse=True)
        q = [1] * len(rows) if decode else [num_q[r] for r in rows]
        w = [width[r] for r in rows]
        cuts = _buckets(q, w, self.num_q_heads * self.head_dim * bs)
        if len(cuts) == 1 and self.num_q_heads * max(q) * w[0] * bs * len(rows) <= _MAX_ELEMENTS:
            self._piece(sorted(rows), 0, max(q), all_real=decode)  # one piece: in step order (slices, no index)
            return
        for a, b in cuts:
            max_q = max(q[a:b])
            step = max(1, _MAX_ELEMENTS // (self.num_q_heads * max_q * w[a] * bs))  # rows per piece
            if step > 1 or max_q == 1:
                for r0 in range(a, b, step):
                    r1 = min(b, r0 + step)
                    self._piece(rows[r0:r1], 0, max(q[r0:r1]), all_real=decode)
                continue
            # One row alone is too big: cut its queries into slices (their causal key range shrinks too).
            q_step = max(1, _MAX_ELEMENTS // (self.num_q_heads * w[a] * bs))
            for r in range(a, b):
                for q0 in range(0, q[r], q_step):
                    self._piece(rows[r : r + 1], q0, min(q[r], q0 + q_step), all_real=True)

    def _piece(self, rows: list[int], q0: int, q1: int, all_real: bool) -> None:
        """Query slots ``[q0, q1)`` of each row in ``rows``. ``all_real``: every row has ``>= q1`` query tokens."""
        bs = self.block_size
        nq = q1 - q0
        n = len(rows)
        consecutive = rows == list(range(rows[0], rows[0] + n))
        if consecutive:  # slices, not gathers
            sel = slice(rows[0], rows[0] + n)
            start, end, seq, tables = self.qsl[sel], self.qsl[sel.start + 1 : sel.stop + 1], self.seq[sel], self.block_tables[sel]
        else:
            idx = torch.tensor(rows, device=self.device)
            start, end, seq, tables = self.qsl[idx], self.qsl[idx + 1], self.seq[idx], self.block_tables[idx]
        num_q = end - start
        first = seq - num_q + q0  # [n] position of the piece's first query slot
        i = torch.arange(nq, device=self.device)
        pos = first[:, None] + i  # [n, nq]
        tok = start[:, None] + q0 + i  # [n, nq] packed index of each query slot
        real = None if all_real else i[None, :] < (num_q - q0)[:, None]
        dst, blind = (tok.flatten(), pos.flatten() < 0) if real is None else (tok[real], pos[real] < 0)
        blind = blind if self.padded else None
        tokens = None
        # One row's slots, or one token per row of consecutive rows, are consecutive packed tokens.
        if all_real and (n == 1 or (nq == 1 and consecutive)):
            tokens, dst = (int(tok[0, 0]), n * nq), None
        q_index = None if tokens is not None else tok[:, 0] if nq == 1 else tok.clamp(max=self.num_tokens - 1)
        # Keys [lo, hi) hold everything the piece may see; gathered from block lo // bs on.
        hi = torch.minimum(seq, first + nq).clamp(min=0)  # [n]
        lo = torch.zeros_like(hi) if self.window is None else (first - self.window + 1).clamp(min=0)
        b_lo = torch.minimum(lo, hi) // bs
        num_b = int((-(-hi // bs) - b_lo).max())
        if num_b <= 0:  # nothing visible anywhere (all padding)
            self.pieces.append(_Piece(n, nq, None, tokens, q_index, pos, pos, real, dst, blind))
            return
        cols = (b_lo[:, None] + torch.arange(num_b, device=self.device)).clamp(max=tables.shape[1] - 1)
        # Table entries past a row's blocks are only ever masked; clamped so any value there is a valid id.
        blocks = tables.gather(1, cols).long().flatten().clamp_(0, self.num_blocks - 1)
        j = b_lo[:, None] * bs + torch.arange(num_b * bs, device=self.device)  # [n, W] key positions
        visible = (j[:, None, :] <= pos[:, :, None]) & (j < hi[:, None])[:, None, :]  # [n, nq, W]
        if self.window is not None:
            visible &= pos[:, :, None] - j[:, None, :] < self.window
        # Additive, in the compute dtype: SDPA would convert a boolean mask in every layer.
        mask = torch.zeros(visible.shape, dtype=self.compute, device=self.device).masked_fill_(~visible, float("-inf"))
        mask = mask[:, None]  # [n, 1, nq, W]: the same for every head
        self.pieces.append(_Piece(n, nq, blocks, tokens, q_index, visible, mask, real, dst, blind))
