"""Paged attention over a block-table KV pool: one Triton kernel for decode, chunked prefill,
prefill on a cached prefix and left-padded batches.

Provenance: the design follows vLLM's Triton "unified attention" (IBM) and Flash-Decoding; the code is
written from scratch. What it keeps from them:

* Q-block GQA packing: a program owns one KV head and ``BLOCK_Q`` query tokens of one sequence, and
  packs those tokens x the KV head's ``GROUP`` query heads into the ``BLOCK_M`` rows of ``tl.dot``. Each
  K/V tile is loaded once per KV head, and decode runs on tensor cores too.
* Page-independent tiles: the physical block of every key is looked up through the block table, so any
  ``block_size`` that is a multiple of 16 works with any ``TILE``.
* A grid sized from shapes only (``num_tokens // BLOCK_Q + num_seqs`` q-blocks, or ``num_seqs x
  cdiv(max_query_len, BLOCK_Q)`` when that is smaller), so the launch can be captured in a CUDA graph.
* Split-KV: when there are too few (q-block, KV head) programs to fill the GPU, each sequence's key range
  is cut into ``num_splits`` parts whose partial results are merged by log-sum-exp in a second kernel.

What differs: one kernel body for split and unsplit launches (a constexpr picks the epilogue), key
tiles that need no mask run in their own loop, the heaviest q-blocks are scheduled first, KV heads are
the fastest grid axis (the programs reading one page run together), and the position rule below
replaces separate context/query length arguments.

Length vocabulary (per sequence/row ``b`` of the batch)::

    |---------------- seq_len = seq_lens[b] ----------------|   keys in the pool after this step's write
    |------ context (seq_len - num_q) ------|---- num_q ----|   num_q = query_start_loc[b+1] - query_start_loc[b]
                                            ^ query token i sits at position p = seq_len - num_q + i

Query token at position ``p`` attends to keys ``j <= p`` (and ``p - j < sliding_window``). ``p < 0``
happens for left padding: such tokens attend to nothing and get exactly 0.

FP8 caches (``torch.float8_e4m3fn`` K/V with one float32 scale per token and KV head, written by
``kv_write.write_kv``) are dequantized tile by tile on the way from memory to the dot products: key
scales multiply the logits' columns (``q . (k * s) = (q . k) * s``), value scales multiply the
probabilities' columns before ``P @ V``. No dequantized copy of the cache is ever made. With 16-bit
queries both dots run in fp16, whatever the query dtype: e4m3 -> fp16 is one instruction per two values
(-> bf16 takes three), e4m3 values are exact in fp16, and fp16 keeps more mantissa than bf16 for the
probabilities. bf16 queries are scaled into fp16's range by a power of 2 (exact) and the logits back.
The probabilities are multiplied by ``v_scale / v_max`` (at most 1, so nothing falls into fp16's
subnormals) and the accumulator is kept in units of ``v_max``, the tile's largest value scale. On CUDA
the value tile is converted by inline PTX in its load layout (see ``_e4m3_to_f16_ptx``). fp32 queries
convert K/V to fp32 instead.

``paged_attention_reference`` (bottom of the file) is the readable PyTorch version the tests compare
against (the library's CPU path is the batched ``paged_attention_cpu.py``). Untested here: head_dim
outside {64, 80, 96, 128, 256}.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .softmax import softmax_with_sink

LOG2E = 1.4426950408889634  # softmax runs in base 2: exp(x) = exp2(x * LOG2E)
FP8_DTYPE = torch.float8_e4m3fn  # the FP8 cache dtype (kv_write.py quantizes into it)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _find_row(
    query_start_loc_ptr,  # [num_seqs + 1] int32
    q_block_id,  # program's global q-block index
    num_seqs,
    BLOCK_Q: tl.constexpr,
):
    """Largest row b with ``query_start_loc[b] // BLOCK_Q + b <= q_block_id`` (binary search).

    Row b owns the q-block ids ``[query_start_loc[b] // BLOCK_Q + b, query_start_loc[b+1] // BLOCK_Q + b + 1)``,
    which holds at least ``cdiv(num_q, BLOCK_Q)`` ids; surplus ids find no tokens and exit.
    """
    lo = q_block_id * 0
    hi = q_block_id * 0 + num_seqs - 1  # (a tensor even when num_seqs is specialized to 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first_id = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first_id <= q_block_id, mid, lo)
        hi = tl.where(first_id <= q_block_id, hi, mid - 1)
    return lo


@triton.jit
def _kv_tile_ptrs(k_base, v_base, block_id, j, stride_kb, stride_ks, stride_vb, stride_vs, offs_d,
                  BLOCK_SIZE: tl.constexpr):
    """Pointers to K^T [HEAD_PAD, TILE] and V [TILE, HEAD_PAD] of keys ``j`` living in blocks ``block_id``."""
    in_block = j % BLOCK_SIZE
    kt_ptr = k_base + (block_id * stride_kb + in_block * stride_ks)[None, :] + offs_d[:, None]
    v_ptr = v_base + (block_id * stride_vb + in_block * stride_vs)[:, None] + offs_d[None, :]
    return kt_ptr, v_ptr


@triton.jit
def _e4m3_to_f16_ptx(x):
    """e4m3 -> fp16 with inline PTX, four values per instance (CUDA only; the interpreter has no PTX).

    Not marked pure on purpose: Triton then converts where this is written, in the tile's load layout.
    A plain ``.to(tl.float16)`` is moved past the layout change into the MMA operand layout, where the
    value tile's keys (the reduction axis) are not contiguous: 8-bit elements then take byte loads and
    byte shuffles (no transposing ldmatrix exists for 8 bits), and about 1.4x the loop's instructions.
    Converted first, the fp16 tile goes through shared memory and ``ldmatrix.trans`` like a bf16 one.
    """
    return tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
        "=r,=r,r", [x], dtype=tl.float16, is_pure=False, pack=4,
    )


@triton.jit
def _softmax_step(
    acc, m_i, l_i,  # running state: [BLOCK_M, HEAD_PAD], [BLOCK_M], [BLOCK_M] fp32 (base-2 logits)
    v_ref,  # scalar: acc holds the output times 1 / v_ref (F16_DOT; else 1)
    q, kt, v,  # [BLOCK_M, HEAD_PAD], [HEAD_PAD, TILE], [TILE, HEAD_PAD] (K/V in the query dtype)
    k_scale, v_scale,  # [TILE] fp32 per-key scales of FP8 caches (else unused)
    j, pos,  # [TILE] key positions, [BLOCK_M] query positions
    scale_log2, softcap_log2, sliding_window,
    MASKED: tl.constexpr,  # False: every (row, key) of the tile is visible, skip the mask
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr, F16_DOT: tl.constexpr,  # see the module docstring
):
    """One online-softmax update with a tile of keys (shared by every loop and launch mode)."""
    s = tl.dot(q, kt, input_precision=DOT_PRECISION)  # [BLOCK_M, TILE] fp32
    if USE_SOFTCAP:
        if KV_FP8:
            s = s * k_scale[None, :]
        # softcap * tanh(x / softcap) with x = s * scale, tanh(y) = 2 * sigmoid(2y) - 1, in base 2.
        s = softcap_log2 * (2.0 * tl.sigmoid((2.0 * scale_log2 / softcap_log2) * s) - 1.0)
    elif KV_FP8:
        s = s * (k_scale * scale_log2)[None, :]  # one multiply per logit: the scales fold per key first
    else:
        s = s * scale_log2
    if MASKED:
        visible = j[None, :] <= pos[:, None]  # causal
        if USE_WINDOW:
            visible = visible & (pos[:, None] - j[None, :] < sliding_window)
        s = tl.where(visible, s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]
    if MASKED:  # a row that has seen no key yet keeps m = -inf; shift by 0 to avoid inf - inf
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    p = tl.exp2(s - m_ref[:, None])  # [BLOCK_M, TILE]
    alpha = tl.exp2(m_i - m_ref)  # [BLOCK_M] rescales what was accumulated so far
    l_i = l_i * alpha + tl.sum(p, 1)
    if KV_FP8 and F16_DOT:
        # p * v_scale would fall into fp16's subnormals for small scales: the probabilities are scaled
        # by v_scale / v_max (v_max = the tile's largest v_scale, so at most 1) and the accumulator is
        # kept in units of v_max, rescaled from the previous tile's units along with alpha. No second
        # accumulator tile: the dot still accumulates in place.
        v_max = tl.max(v_scale, 0)
        v_max = tl.where(v_max > 0.0, v_max, 1.0)  # all-zero rows (and masked keys) have scale 0
        p16 = (p * (v_scale / v_max)[None, :]).to(tl.float16)
        acc = tl.dot(p16, v, acc * (alpha * (v_ref / v_max))[:, None], input_precision=DOT_PRECISION)
        v_ref = v_max
    else:
        if KV_FP8:  # fp32 queries: K/V converted to fp32, value scales on the probabilities
            p = p * v_scale[None, :]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i, v_ref


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, v_ref,  # running state, see _softmax_step
    q,  # [BLOCK_M, HEAD_PAD] query rows of this program
    pos,  # [BLOCK_M] int32 position of each row's query token
    k_base, v_base,  # cache pointers already offset to this KV head
    ks_base, vs_base,  # scale pointers already offset to this KV head (FP8 caches)
    block_table_row,  # pointer to block_tables[row, 0]
    tile_begin, tile_end,  # tiles [tile_begin, tile_end) of this call
    kv_start, kv_end,  # key positions of tile 0 and one past the last key any row may see
    stride_kb, stride_ks, stride_vb, stride_vs,
    stride_ksb, stride_kss, stride_vsb, stride_vss,
    scale_log2, softcap_log2, sliding_window,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    MASKED: tl.constexpr,  # False: every (row, key) of these tiles is visible, skip all masks
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr, F16_DOT: tl.constexpr, PTX_CVT: tl.constexpr,
):
    """Accumulate tiles ``[tile_begin, tile_end)``; Triton's pipeliner overlaps the loads (``num_stages``).
    Physical offsets are 64-bit: block_id * stride_kb can pass 2^31 elements on big pools."""
    offs_t = tl.arange(0, TILE)  # [TILE]
    offs_d = tl.arange(0, HEAD_PAD)  # [HEAD_PAD]
    d_ok = offs_d < HEAD_DIM
    for t in range(tile_begin, tile_end):
        j = kv_start + t * TILE + offs_t  # [TILE] key positions
        if MASKED:
            j_ok = j < kv_end
            block_id = tl.load(block_table_row + j // BLOCK_SIZE, mask=j_ok, other=0).to(tl.int64)
        else:
            block_id = tl.load(block_table_row + j // BLOCK_SIZE).to(tl.int64)  # [TILE]
        kt_ptr, v_ptr = _kv_tile_ptrs(k_base, v_base, block_id, j, stride_kb, stride_ks, stride_vb,
                                      stride_vs, offs_d, BLOCK_SIZE)
        if MASKED:
            kt = tl.load(kt_ptr, mask=j_ok[None, :] & d_ok[:, None], other=0.0)  # [HEAD_PAD, TILE]
            v = tl.load(v_ptr, mask=j_ok[:, None] & d_ok[None, :], other=0.0)  # [TILE, HEAD_PAD]
        elif HEAD_PAD != HEAD_DIM:
            kt = tl.load(kt_ptr, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptr, mask=d_ok[None, :], other=0.0)
        else:
            kt = tl.load(kt_ptr)
            v = tl.load(v_ptr)
        if KV_FP8:  # e4m3 -> the query dtype in registers; the scales go where the docstring says
            in_block = j % BLOCK_SIZE
            ks_ptr = ks_base + block_id * stride_ksb + in_block * stride_kss  # [TILE]
            vs_ptr = vs_base + block_id * stride_vsb + in_block * stride_vss
            if MASKED:
                k_scale = tl.load(ks_ptr, mask=j_ok, other=0.0)
                v_scale = tl.load(vs_ptr, mask=j_ok, other=0.0)
            else:
                k_scale = tl.load(ks_ptr)
                v_scale = tl.load(vs_ptr)
            if F16_DOT:  # one cvt.rn.f16x2.e4m3x2 per two elements (to bf16: three instructions)
                if PTX_CVT >= 2:
                    kt = _e4m3_to_f16_ptx(kt)
                else:
                    kt = kt.to(tl.float16)
                if PTX_CVT >= 1:
                    v = _e4m3_to_f16_ptx(v)
                else:
                    v = v.to(tl.float16)
            else:
                kt = kt.to(q.dtype)
                v = v.to(q.dtype)
        else:
            k_scale = kv_start  # unused
            v_scale = kv_start
        acc, m_i, l_i, v_ref = _softmax_step(acc, m_i, l_i, v_ref, q, kt, v, k_scale, v_scale, j, pos, scale_log2,
                                      softcap_log2, sliding_window, MASKED, USE_SOFTCAP, USE_WINDOW,
                                      DOT_PRECISION, KV_FP8, F16_DOT)
    return acc, m_i, l_i, v_ref


# Per-step integers are not specialised (== 1, divisible by 16): each specialisation is one more
# compile, and a run that meets a new batch size mid-way would stall on it for a second or more.
@triton.jit(do_not_specialize=["num_seqs", "q_blocks_per_row", "num_splits", "sliding_window"])
def _paged_attention_kernel(
    out_ptr,  # [num_tokens, num_q_heads, head_dim] (written when SPLIT is False)
    part_out_ptr,  # [num_tokens, num_q_heads, num_splits, head_dim] fp32 (written when SPLIT)
    part_lse_ptr,  # [num_tokens, num_q_heads, num_splits] fp32 base-2 log-sum-exp (when SPLIT)
    query_ptr,  # [num_tokens, num_q_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    k_scale_ptr,  # [num_blocks, block_size, num_kv_heads] fp32 (read when KV_FP8)
    v_scale_ptr,  # [num_blocks, block_size, num_kv_heads] fp32 (read when KV_FP8)
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    sinks_ptr,  # [num_q_heads] float (read when USE_SINKS)
    num_seqs,
    q_blocks_per_row,  # q-blocks per row when ROW_GRID (cdiv(max_query_len, BLOCK_Q))
    num_splits,
    scale_log2,  # scale * LOG2E
    softcap_log2,  # softcap * LOG2E
    sliding_window,
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ksb, stride_kss,  # scale strides (block, slot); heads contiguous
    stride_vsb, stride_vss,
    stride_bt,
    NUM_Q_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,  # next power of 2 >= HEAD_DIM
    BLOCK_SIZE: tl.constexpr,  # tokens per KV block (page)
    BLOCK_M: tl.constexpr,  # rows of the q tile = BLOCK_Q tokens x GROUP heads (+ padding)
    BLOCK_Q: tl.constexpr,
    TILE: tl.constexpr,  # keys per inner-loop step
    ROW_GRID: tl.constexpr,  # True: program id = row * q_blocks_per_row + q-block; False: search
    HEADS_FIRST: tl.constexpr,  # grid axis 0 = KV heads: programs reading the same pages run together
    SPLIT: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,  # e4m3 caches with per-(token, KV head) scales
    F16_DOT: tl.constexpr,  # FP8, 16-bit queries: K/V tiles become fp16, both dots run in fp16 (else fp32)
    PTX_CVT: tl.constexpr,  # F16_DOT on CUDA, tiles converted by _e4m3_to_f16_ptx: 0 none, 1 V, 2 K and V
):
    # Reverse order: the last q-blocks of a row see the most keys, start them first.
    if HEADS_FIRST:
        kv_head = tl.program_id(0)
        q_block_id = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
        q_block_id = tl.num_programs(0) - 1 - tl.program_id(0)
        kv_head = tl.program_id(1)
    split = tl.program_id(2)

    if ROW_GRID:
        row = q_block_id // q_blocks_per_row
        q_block = q_block_id % q_blocks_per_row
    else:
        row = _find_row(query_start_loc_ptr, q_block_id, num_seqs, BLOCK_Q)
        q_block = q_block_id - (tl.load(query_start_loc_ptr + row) // BLOCK_Q + row)
    q_start = tl.load(query_start_loc_ptr + row)
    num_q = tl.load(query_start_loc_ptr + row + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + row)  # issued before the branch: one less round trip
    if q_block * BLOCK_Q >= num_q:
        return
    context_len = seq_len - num_q  # position of the row's first query token

    # Row m of the tile = query token m // GROUP of this q-block, query head m % GROUP of this KV head.
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    tok_in_row = q_block * BLOCK_Q + offs_m // GROUP  # [BLOCK_M]
    head = kv_head * GROUP + offs_m % GROUP  # [BLOCK_M]
    row_ok = (offs_m // GROUP < BLOCK_Q) & (tok_in_row < num_q)
    pos = context_len + tok_in_row  # [BLOCK_M]
    tok = (q_start + tok_in_row).to(tl.int64)
    rd_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(
        query_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=rd_mask,
        other=0.0,
    )  # [BLOCK_M, HEAD_PAD]
    if KV_FP8 and F16_DOT and query_ptr.dtype.element_ty != tl.float16:
        # bf16 queries -> fp16: exact below 2^15 (more mantissa bits); larger queries are first scaled
        # down by a power of 2 and the logits' scale up by the same factor.
        q_max = tl.max(tl.max(tl.abs(q.to(tl.float32)), 1), 0)
        shift = tl.maximum(tl.ceil(tl.log2(q_max)) - 15.0, 0.0)
        q = (q.to(tl.float32) * tl.exp2(-shift)).to(tl.float16)
        scale_log2 = scale_log2 * tl.exp2(shift)

    # Key range of the whole q-block, in tiles counted from kv_start (TILE-aligned).
    first_pos = context_len + q_block * BLOCK_Q
    last_pos = context_len + tl.minimum(num_q, (q_block + 1) * BLOCK_Q) - 1
    kv_end = last_pos + 1
    if USE_WINDOW:
        kv_start = tl.maximum(first_pos - sliding_window + 1, 0) // TILE * TILE
        # tiles before full_lo hold keys that some row sees through its window edge
        full_lo = tl.cdiv(tl.maximum(last_pos - sliding_window + 1 - kv_start, 0), TILE)
    else:
        kv_start = 0
        full_lo = 0
    num_tiles = tl.cdiv(tl.maximum(kv_end - kv_start, 0), TILE)
    full_hi = tl.minimum(tl.maximum(first_pos + 1 - kv_start, 0) // TILE, num_tiles)  # causal edge
    full_lo = tl.minimum(full_lo, full_hi)
    if SPLIT:
        tiles_per_split = tl.cdiv(num_tiles, num_splits)
        t_begin = split * tiles_per_split
        t_end = tl.minimum(t_begin + tiles_per_split, num_tiles)
    else:
        t_begin = 0
        t_end = num_tiles

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    v_ref = scale_log2 * 0.0 + 1.0  # fp32 scalar (a loop-carried value must be a tensor, not a constant)
    if USE_SINKS:  # the sink is one more logit in the denominator; count it in split 0 only
        sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634  # [BLOCK_M], base 2
        m_i = tl.where(split == 0, sink, m_i)
        l_i = tl.where(split == 0, 1.0, l_i)

    k_base = k_cache_ptr + kv_head.to(tl.int64) * stride_kh
    v_base = v_cache_ptr + kv_head.to(tl.int64) * stride_vh
    ks_base = k_scale_ptr + kv_head
    vs_base = v_scale_ptr + kv_head
    bt_row = block_tables_ptr + row.to(tl.int64) * stride_bt
    # Only tiles on the window edge and on the causal diagonal pay for the mask.
    if USE_WINDOW:  # tiles cut by the window's lower edge
        acc, m_i, l_i, v_ref = _attend_tiles(
            acc, m_i, l_i, v_ref, q, pos, k_base, v_base, ks_base, vs_base, bt_row, t_begin,
            tl.minimum(t_end, full_lo), kv_start, kv_end, stride_kb, stride_ks, stride_vb, stride_vs,
            stride_ksb, stride_kss, stride_vsb, stride_vss, scale_log2, softcap_log2, sliding_window,
            HEAD_DIM, HEAD_PAD, BLOCK_SIZE, TILE, True, USE_SOFTCAP, USE_WINDOW, DOT_PRECISION, KV_FP8,
            F16_DOT, PTX_CVT,
        )
    acc, m_i, l_i, v_ref = _attend_tiles(  # tiles every row sees in full
        acc, m_i, l_i, v_ref, q, pos, k_base, v_base, ks_base, vs_base, bt_row, tl.maximum(t_begin, full_lo),
        tl.minimum(t_end, full_hi), kv_start, kv_end, stride_kb, stride_ks, stride_vb, stride_vs,
        stride_ksb, stride_kss, stride_vsb, stride_vss, scale_log2, softcap_log2, sliding_window,
        HEAD_DIM, HEAD_PAD, BLOCK_SIZE, TILE, False, USE_SOFTCAP, USE_WINDOW, DOT_PRECISION, KV_FP8,
        F16_DOT, PTX_CVT,
    )
    acc, m_i, l_i, v_ref = _attend_tiles(  # tiles cut by the causal diagonal (and the sequence end)
        acc, m_i, l_i, v_ref, q, pos, k_base, v_base, ks_base, vs_base, bt_row, tl.maximum(t_begin, full_hi),
        t_end, kv_start, kv_end, stride_kb, stride_ks, stride_vb, stride_vs, stride_ksb, stride_kss,
        stride_vsb, stride_vss, scale_log2, softcap_log2, sliding_window, HEAD_DIM, HEAD_PAD,
        BLOCK_SIZE, TILE, True, USE_SOFTCAP, USE_WINDOW, DOT_PRECISION, KV_FP8, F16_DOT, PTX_CVT,
    )

    # l == 0 only when a row saw no key (and no sink): its output is exactly 0.
    o = acc * (v_ref / tl.where(l_i == 0.0, 1.0, l_i))[:, None]  # [BLOCK_M, HEAD_PAD]
    if SPLIT:
        part = (tok * NUM_Q_HEADS + head) * num_splits + split  # [BLOCK_M] int64
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=rd_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(part_lse_ptr + part, lse, mask=row_ok)
    else:
        o_ptr = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptr, o.to(out_ptr.dtype.element_ty), mask=rd_mask)


@triton.jit(do_not_specialize=["num_seqs", "num_splits"])
def _merge_splits_kernel(
    out_ptr,  # [num_tokens, num_q_heads, head_dim]
    part_out_ptr,  # [num_tokens, num_q_heads, num_splits, head_dim] fp32
    part_lse_ptr,  # [num_tokens, num_q_heads, num_splits] fp32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    num_seqs,
    num_splits,
    stride_ot, stride_oh,
    NUM_Q_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,  # next power of 2 >= num_splits
    BLOCK_H: tl.constexpr,  # query heads per program
):
    """out = sum_s w_s * o_s / sum_s w_s with w_s = 2^(lse_s - max lse): one token, BLOCK_H heads."""
    tok = tl.program_id(0).to(tl.int64)
    # Tokens no row owns are left alone; the partials are read regardless (they exist, unused), so
    # that this check does not delay the loads.
    num_heads_out = tl.where(tok < tl.load(query_start_loc_ptr + num_seqs), NUM_Q_HEADS, 0)
    head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    hs_ok = (head[:, None] < NUM_Q_HEADS) & (offs_s[None, :] < num_splits)  # [BLOCK_H, SPLITS_PAD]
    part = (tok * NUM_Q_HEADS + head[:, None]) * num_splits + offs_s[None, :]  # [BLOCK_H, SPLITS_PAD]
    lse = tl.load(part_lse_ptr + part, mask=hs_ok, other=float("-inf"))
    lse_max = tl.max(lse, 1)  # [BLOCK_H]
    w = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max)[:, None])  # [BLOCK_H, SPLITS_PAD]
    o = tl.load(
        part_out_ptr + part[:, :, None] * HEAD_DIM + offs_d[None, None, :],
        mask=hs_ok[:, :, None] & (offs_d[None, None, :] < HEAD_DIM),
        other=0.0,
    )  # [BLOCK_H, SPLITS_PAD, HEAD_PAD]
    total = tl.sum(w, 1)  # [BLOCK_H]
    merged = tl.sum(o * w[:, :, None], 1) / tl.where(total == 0.0, 1.0, total)[:, None]  # [BLOCK_H, HEAD_PAD]
    tl.store(
        out_ptr + tok * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        merged.to(out_ptr.dtype.element_ty),
        mask=(head[:, None] < num_heads_out) & (offs_d[None, :] < HEAD_DIM),
    )


# --------------------------------------------------------------------------------------------------
# Launch configuration (host side; shapes only, never device values)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Config:
    block_m: int  # rows of the q tile (tokens x heads of one KV head)
    tile: int  # keys per inner-loop step
    num_warps: int
    num_stages: int  # Triton's software pipelining depth
    num_splits: int  # KV splits per (q-block, KV head); 1 = no merge kernel
    heads_first: bool = True  # grid axis 0 = KV heads
    fp8_ptx_cvt: int = 1  # FP8, 16-bit queries, CUDA: tiles converted by inline PTX: 0 none, 1 V, 2 K and V


_MAX_SPLITS = 64


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # interpreter runs: pretend to be an H100/H200
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=256)  # ~15 us of Python per call otherwise; args are plain ints
def _choose_config(
    num_tokens: int,
    num_seqs: int,
    max_query_len: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    elem_bytes: int,  # bytes per element of query / KV
    max_kv_len: int,  # capacity bound from block_tables' width, not the real lengths
    num_sms: int,
    num_kv_splits: int | None,
    kv_fp8: bool = False,  # FP8 cache with 16-bit queries (fp16 dots)
) -> _Config:
    """Launch config from shapes only (hot path: no device reads).

    Tuned by the sweep in benchmarks/gpu_kernels.py on one H200 (torch 2.11, Triton 3.6), 2026-11-21, for
    32 q / 8 kv heads, head_dim 128, bf16; readings in benchmarks/KERNELS_NOTES.md. FP8 decode: by the
    sweep in benchmarks/gpu_fp8_kernels.py (same machine and shapes).
    """
    decode_m = max(16, triton.next_power_of_2(group))
    decode = max_query_len * group <= decode_m  # every row fits in one small q tile: decode / spec-decode
    if decode:  # memory-bound: small q tile; 16 KB key tiles, 4 warps, 2 stages won or tied at every batch
        # (64 keys of 128 dims; 128 keys of 64 dims: 5-10% faster than 64 keys at batch 64-512 with
        # 64-wide bf16 heads, the Llama-3.2-1B shape, in the session-5 sweep)
        tile = 128 if elem_bytes == 2 and head_dim <= 64 and not kv_fp8 else 64 if head_dim * elem_bytes <= 256 else 32
        block_m, num_warps, num_stages = decode_m, 4, 2
        if kv_fp8 and head_dim <= 128:
            # 2 warps: FP8 tiles cost conversions, and each warp holds the whole q tile and takes part in
            # every row's cross-warp max/sum, so fewer warps per program do less of that per key
            # (0.81-0.85x of bf16's time at batch >= 64 against 1.15-1.5x with 4 warps)
            num_warps = 2
    else:  # prefill or mixed batch: compute-bound, Triton's pipeliner feeds the tensor cores
        block_m = max(128 if head_dim <= 128 else 64, triton.next_power_of_2(group))
        tile, num_warps, num_stages = (64, 8, 3) if head_dim <= 128 else (32, 8, 2)
    block_q = max(1, block_m // group)
    num_q_programs = min(num_tokens // block_q + num_seqs, num_seqs * triton.cdiv(max_query_len, block_q))
    programs = max(1, num_q_programs * num_kv_heads)
    if num_kv_splits is None:
        num_kv_splits = 1
        if decode and programs < 2 * num_sms:
            # about four programs per SM, a power of 2, and at least one tile of keys per split
            want = triton.cdiv(4 * num_sms, programs)
            want = 1 << (want.bit_length() - 1)
            num_kv_splits = max(1, min(want, triton.cdiv(max_kv_len, tile), _MAX_SPLITS))
        elif not decode and programs < 4 * num_sms and max_kv_len >= 2 * max_query_len:
            # a chunk on a longer cached context: two splits of 4 warps, two programs per SM
            # (512 on 4096 cached: 126 us against 137 us unsplit; 2048 on 4096: 515 against 545)
            num_kv_splits, num_warps = 2, 4
    return _Config(block_m, tile, num_warps, num_stages, num_kv_splits)


# --------------------------------------------------------------------------------------------------
# Public launcher
# --------------------------------------------------------------------------------------------------


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: keys in the pool per row, this step's included
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32: row b owns tokens [qsl[b], qsl[b+1])
    max_query_len: int,  # upper bound of the per-row query counts (1 for pure decode)
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,  # [num_q_heads] extra logit per head, no value
    out: torch.Tensor | None = None,  # [num_tokens, num_q_heads, head_dim], query dtype
    num_kv_splits: int | None = None,  # override of the split-KV heuristic (tests, tuning)
    k_scale: torch.Tensor | None = None,  # [num_blocks, block_size, num_kv_heads] fp32: FP8 caches only
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed query tokens over their rows' paged K/V.

    Hot path (called once per layer, CUDA-graph capturable): the launch depends on shapes and Python
    scalars only; nothing is read back from the device. Tokens past ``query_start_loc[-1]`` are not
    written. Returns ``out`` (allocated when not given), in the query dtype.
    """
    num_tokens, num_q_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, cache_dim = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert query.dtype in (torch.float16, torch.bfloat16, torch.float32), f"{query.dtype = }"
    kv_fp8 = _check_kv(query, k_cache, v_cache, k_scale, v_scale)
    assert v_cache.shape == k_cache.shape and cache_dim == head_dim, f"{query.shape = } {k_cache.shape = }"
    assert head_dim in (64, 80, 96, 128, 256), f"{head_dim = } not supported"
    assert block_size % 16 == 0, f"{block_size = } must be a multiple of 16"
    assert num_q_heads % num_kv_heads == 0, f"{num_q_heads = } {num_kv_heads = }"
    assert query.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert block_tables.dtype == seq_lens.dtype == query_start_loc.dtype == torch.int32
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs and block_tables.stride(1) == 1
    assert query_start_loc.shape == (num_seqs + 1,), f"{query_start_loc.shape = } {num_seqs = }"
    assert max_query_len >= 0
    assert sliding_window is None or sliding_window >= 1, f"{sliding_window = }"
    assert softcap is None or softcap > 0, f"{softcap = }"
    if sinks is not None:
        assert sinks.shape == (num_q_heads,), f"{sinks.shape = }"
    if out is None:
        out = torch.empty_like(query)
    assert out.shape == query.shape and out.dtype == query.dtype and out.stride(-1) == 1
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    cfg = _choose_config(
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        max_query_len=max(max_query_len, 1),
        num_kv_heads=num_kv_heads,
        group=group,
        head_dim=head_dim,
        elem_bytes=query.element_size(),
        max_kv_len=block_tables.shape[1] * block_size,
        num_sms=_num_sms(query.device),
        num_kv_splits=num_kv_splits,
        kv_fp8=kv_fp8 and query.dtype != torch.float32,
    )
    _launch(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max(max_query_len, 1),
            scale, sliding_window, softcap, sinks, out, cfg, k_scale if kv_fp8 else None,
            v_scale if kv_fp8 else None)
    return out


def _check_kv(query, k_cache, v_cache, k_scale, v_scale) -> bool:
    """Caches in the query dtype, or FP8 caches with fp32 scales ``[num_blocks, block_size, num_kv_heads]``."""
    assert v_cache.dtype == k_cache.dtype, f"{k_cache.dtype = } {v_cache.dtype = }"
    if k_cache.dtype != FP8_DTYPE:
        assert k_cache.dtype == query.dtype, f"{query.dtype = } {k_cache.dtype = }"
        assert k_scale is None and v_scale is None, f"scales given for a {k_cache.dtype} cache"
        return False
    for s in (k_scale, v_scale):
        assert s is not None and s.dtype == torch.float32, "FP8 caches need float32 scales"
        assert s.shape == k_cache.shape[:3] and s.stride(-1) == 1, f"{s.shape = } {k_cache.shape = }"
    return True


def _launch(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len, scale,
            sliding_window, softcap, sinks, out, cfg: _Config, k_scale=None, v_scale=None) -> None:
    """Launch with an explicit config (the benchmark's tuning sweep calls this directly)."""
    num_tokens, num_q_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    group = num_q_heads // num_kv_heads
    assert cfg.block_m >= group and cfg.num_splits >= 1
    block_q = cfg.block_m // group
    searched = num_tokens // block_q + num_seqs  # upper bound on the q-blocks of all rows
    per_row = triton.cdiv(max_query_len, block_q)
    row_grid = num_seqs * per_row <= searched
    num_q_programs = num_seqs * per_row if row_grid else searched
    split = cfg.num_splits > 1
    kv_fp8 = k_scale is not None
    f16_dot = kv_fp8 and query.dtype != torch.float32
    if split:
        part_out = torch.empty(num_tokens, num_q_heads, cfg.num_splits, head_dim, device=query.device,
                               dtype=torch.float32)
        part_lse = torch.empty(num_tokens, num_q_heads, cfg.num_splits, device=query.device,
                               dtype=torch.float32)
    else:
        part_out = part_lse = out  # never touched
    head_pad = triton.next_power_of_2(head_dim)
    grid = (num_kv_heads, num_q_programs) if cfg.heads_first else (num_q_programs, num_kv_heads)
    _paged_attention_kernel[(*grid, cfg.num_splits)](
        out_ptr=out,
        part_out_ptr=part_out,
        part_lse_ptr=part_lse,
        query_ptr=query,
        k_cache_ptr=k_cache,
        v_cache_ptr=v_cache,
        k_scale_ptr=k_scale if kv_fp8 else seq_lens,  # never read without FP8
        v_scale_ptr=v_scale if kv_fp8 else seq_lens,
        block_tables_ptr=block_tables,
        seq_lens_ptr=seq_lens,
        query_start_loc_ptr=query_start_loc,
        sinks_ptr=sinks if sinks is not None else query,
        num_seqs=num_seqs,
        q_blocks_per_row=per_row,
        num_splits=cfg.num_splits,
        scale_log2=scale * LOG2E,
        softcap_log2=softcap * LOG2E if softcap is not None else 0.0,
        sliding_window=sliding_window if sliding_window is not None else 0,
        stride_qt=query.stride(0),
        stride_qh=query.stride(1),
        stride_ot=out.stride(0),
        stride_oh=out.stride(1),
        stride_kb=k_cache.stride(0),
        stride_ks=k_cache.stride(1),
        stride_kh=k_cache.stride(2),
        stride_vb=v_cache.stride(0),
        stride_vs=v_cache.stride(1),
        stride_vh=v_cache.stride(2),
        stride_ksb=k_scale.stride(0) if kv_fp8 else 0,
        stride_kss=k_scale.stride(1) if kv_fp8 else 0,
        stride_vsb=v_scale.stride(0) if kv_fp8 else 0,
        stride_vss=v_scale.stride(1) if kv_fp8 else 0,
        stride_bt=block_tables.stride(0),
        NUM_Q_HEADS=num_q_heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        HEAD_PAD=head_pad,
        BLOCK_SIZE=block_size,
        BLOCK_M=cfg.block_m,
        BLOCK_Q=block_q,
        TILE=cfg.tile,
        ROW_GRID=row_grid,
        HEADS_FIRST=cfg.heads_first,
        SPLIT=split,
        USE_SOFTCAP=softcap is not None,
        USE_WINDOW=sliding_window is not None,
        USE_SINKS=sinks is not None,
        # fp32 inputs: exact fp32 products rather than tf32, so fp32 results match the reference.
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        KV_FP8=kv_fp8,
        F16_DOT=f16_dot,
        PTX_CVT=cfg.fp8_ptx_cvt if f16_dot and query.is_cuda and os.environ.get("TRITON_INTERPRET") != "1" else 0,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if split:
        splits_pad = triton.next_power_of_2(cfg.num_splits)
        # about 2K partial elements per program
        block_h = min(triton.next_power_of_2(num_q_heads), max(1, 2048 // (splits_pad * head_pad)))
        _merge_splits_kernel[(num_tokens, triton.cdiv(num_q_heads, block_h))](
            out_ptr=out,
            part_out_ptr=part_out,
            part_lse_ptr=part_lse,
            query_start_loc_ptr=query_start_loc,
            num_seqs=num_seqs,
            num_splits=cfg.num_splits,
            stride_ot=out.stride(0),
            stride_oh=out.stride(1),
            NUM_Q_HEADS=num_q_heads,
            HEAD_DIM=head_dim,
            HEAD_PAD=head_pad,
            SPLITS_PAD=splits_pad,
            BLOCK_H=block_h,
            num_warps=4,
        )


# --------------------------------------------------------------------------------------------------
# Reference (readable PyTorch, one row at a time: the oracle of the tests)
# --------------------------------------------------------------------------------------------------


def paged_attention_reference(
    query: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    max_query_len: int,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    num_kv_splits: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `paged_attention`, one row at a time with explicit masks.

    Computes in float64 for float64 queries, float32 otherwise. Reads the metadata on the host, so it
    is not for CUDA graphs. Memory stays bounded by processing long query rows in chunks. FP8 caches
    are dequantized one row's key range at a time.
    """
    del max_query_len, num_kv_splits  # launch hints of the kernel; the loop needs neither
    num_tokens, num_q_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    if out is None:
        out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for row, seq_len in enumerate(lens):
        q_start, num_q = starts[row], starts[row + 1] - starts[row]
        context_len = seq_len - num_q  # position of the row's first query token
        # about 2**24 logits at a time
        chunk = max(1, 2**24 // max(1, num_q_heads * seq_len))
        for c0 in range(0, num_q, chunk):
            c1 = min(num_q, c0 + chunk)
            first, last = context_len + c0, context_len + c1 - 1  # positions of this chunk
            lo = 0 if sliding_window is None else max(0, first - sliding_window + 1)
            hi = max(0, last + 1)  # keys [lo, hi) cover every key a token of the chunk may see
            out_rows = out[q_start + c0 : q_start + c1]  # [n, num_q_heads, head_dim]
            if hi <= lo:
                out_rows.zero_()
                continue
            b0, b1 = lo // block_size, -(-hi // block_size)
            blocks = block_tables[row, b0:b1].long()  # physical blocks holding keys [b0*bs, b1*bs)
            k = k_cache[blocks].flatten(0, 1)[lo - b0 * block_size : hi - b0 * block_size]  # [n_k, Hkv, D]
            v = v_cache[blocks].flatten(0, 1)[lo - b0 * block_size : hi - b0 * block_size]
            if k_scale is not None:  # e4m3 * per-(token, head) scale
                k = k.to(compute) * k_scale[blocks].flatten(0, 1)[lo - b0 * block_size : hi - b0 * block_size, :, None]
                v = v.to(compute) * v_scale[blocks].flatten(0, 1)[lo - b0 * block_size : hi - b0 * block_size, :, None]
            q = query[q_start + c0 : q_start + c1].to(compute)  # [n, Hq, D]
            q = q.view(c1 - c0, num_kv_heads, group, head_dim)  # [n, Hkv, G, D]

            logits = torch.einsum("qhgd,khd->hgqk", q, k.to(compute)) * scale  # [Hkv, G, n, n_k]
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
            p = torch.arange(first, last + 1, device=query.device)[:, None]  # [n, 1] query positions
            j = torch.arange(lo, hi, device=query.device)[None, :]  # [1, n_k] key positions
            visible = j <= p
            if sliding_window is not None:
                visible &= p - j < sliding_window
            logits = logits.masked_fill(~visible, float("-inf"))
            sink = None if sinks is None else sinks.to(compute).view(num_kv_heads, group, 1, 1)
            probs = softmax_with_sink(logits, sink)
            o = torch.einsum("hgqk,khd->qhgd", probs, v.to(compute))  # [n, Hkv, G, D]
            out_rows.copy_(o.reshape(c1 - c0, num_q_heads, head_dim))
    return out
