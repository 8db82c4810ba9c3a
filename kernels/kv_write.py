"""Scatter this step's new K/V rows into the paged KV pool.

The op nano-vllm calls `store_kvcache` and vLLM `reshape_and_cache_flash`: every new token has a
slot (``block_id * block_size + offset_in_block``) chosen by the block allocator, and its key and
value rows are copied there, one program per token and group of KV heads. A negative slot marks a
padding token, which is skipped, so CUDA-graph batches can be padded with ``-1``.

Differences from nano-vllm's kernel: the source may be any strided view (typically ``[B, H, q, D]``
transposed to ``[B*q, H, D]`` without a copy), the pool is addressed through its strides (it is
usually one layer's view into a bigger tensor), block offsets are 64-bit, and values are cast to the
cache dtype on the way in.

``write_kv_reference`` is the readable PyTorch version; it is also the CPU path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int64
    stride_kt, stride_kh,  # key strides (tokens, heads); last dim contiguous
    stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,  # k_cache strides (block, slot, head)
    stride_vcb, stride_vcs, stride_vch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV block
    BLOCK_H: tl.constexpr,  # KV heads per program (power of 2)
    BLOCK_D: tl.constexpr,  # next power of 2 >= HEAD_DIM
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:  # padding token: nothing to write
        return
    block_id = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)  # [BLOCK_H, BLOCK_D]

    src_k = token * stride_kt + heads[:, None] * stride_kh + dims[None, :]
    src_v = token * stride_vt + heads[:, None] * stride_vh + dims[None, :]
    dst_k = block_id * stride_kcb + offset * stride_kcs + heads[:, None] * stride_kch + dims[None, :]
    dst_v = block_id * stride_vcb + offset * stride_vcs + heads[:, None] * stride_vch + dims[None, :]

    k = tl.load(key_ptr + src_k, mask=mask)
    v = tl.load(value_ptr + src_v, mask=mask)
    tl.store(k_cache_ptr + dst_k, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst_v, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; < 0 = padding, skipped
) -> None:
    """Write ``key[t]``/``value[t]`` into pool slot ``slot_mapping[t]`` (hot path: no host syncs)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    num_blocks, block_size, cache_heads, cache_dim = k_cache.shape
    assert value.shape == key.shape, f"{value.shape = } != {key.shape = }"
    assert v_cache.shape == k_cache.shape, f"{v_cache.shape = } != {k_cache.shape = }"
    assert (cache_heads, cache_dim) == (num_kv_heads, head_dim), f"{k_cache.shape = } vs {key.shape = }"
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "key/value need a contiguous last dim"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "caches need a contiguous last dim"
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype == torch.int64, (
        f"{slot_mapping.shape = } {slot_mapping.dtype = }"
    )
    assert key.device == k_cache.device == slot_mapping.device
    if num_tokens == 0:
        return

    block_d = triton.next_power_of_2(head_dim)
    # About 2K elements per program: one program per token covers all heads of small models.
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 2048 // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _write_kv_kernel[grid](
        key_ptr=key,
        value_ptr=value,
        k_cache_ptr=k_cache,
        v_cache_ptr=v_cache,
        slot_mapping_ptr=slot_mapping,
        stride_kt=key.stride(0),
        stride_kh=key.stride(1),
        stride_vt=value.stride(0),
        stride_vh=value.stride(1),
        stride_kcb=k_cache.stride(0),
        stride_kcs=k_cache.stride(1),
        stride_kch=k_cache.stride(2),
        stride_vcb=v_cache.stride(0),
        stride_vcs=v_cache.stride(1),
        stride_vch=v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4 if block_h * block_d >= 1024 else 1,
    )


def write_kv_reference(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; < 0 = padding, skipped
) -> None:
    """PyTorch version of `write_kv`; also the CPU path. Reads ``slot_mapping`` on the host."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    valid = slot_mapping >= 0  # [num_tokens]
    slots = slot_mapping[valid]  # [num_valid]
    for src, cache in ((key, k_cache), (value, v_cache)):
        flat = cache.view(num_blocks * block_size, num_kv_heads, head_dim)  # shares storage with cache
        flat.index_copy_(0, slots, src[valid].to(cache.dtype))
