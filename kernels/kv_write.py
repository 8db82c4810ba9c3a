"""Scatter this step's new K/V rows into the paged KV pool.

The op nano-vllm calls `store_kvcache` and vLLM `reshape_and_cache_flash`: every new token has a
slot (``block_id * block_size + offset_in_block``) chosen by the block allocator, and its key and
value rows are copied there, one program per token and group of KV heads. A negative slot marks a
padding token, which is skipped, so CUDA-graph batches can be padded with ``-1``.

Differences from nano-vllm's kernel: the source may be any strided view (typically ``[B, H, q, D]``
transposed to ``[B*q, H, D]`` without a copy), the pool is addressed through its strides (it is
usually one layer's view into a bigger tensor), block offsets are 64-bit, and values are cast to the
cache dtype on the way in.

FP8 caches (``torch.float8_e4m3fn``): each token's K (and V) row of each KV head is stored as e4m3
values plus one float32 scale, ``scale = amax(|row|) / 448`` (448 is e4m3's largest finite value), so
the largest element of every row lands on the top of the e4m3 range and nothing saturates. Why per
token and head rather than one scale per layer: a row's quantization then depends on that row only,
so a request's cached K/V are the same whatever it was batched with, prefix-cached blocks stay valid
for every later request, and no calibration pass or checkpoint scales are needed; the cost is 4 bytes
per row (3% of a 128-wide fp8 row). Readers dequantize with ``value = e4m3 * scale``.

``write_kv_reference`` is the readable PyTorch version; it is also the CPU path.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: write_kv_reference below is its path (see _no_triton.py)
    from ._no_triton import tl, triton

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value


@triton.jit
def _write_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int64
    k_scale_ptr,  # [num_blocks, block_size, num_kv_heads] fp32 (FP8 only)
    v_scale_ptr,  # [num_blocks, block_size, num_kv_heads] fp32 (FP8 only)
    stride_kt, stride_kh,  # key strides (tokens, heads); last dim contiguous
    stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,  # k_cache strides (block, slot, head)
    stride_vcb, stride_vcs, stride_vch,
    stride_ksb, stride_kss,  # k_scale strides (block, slot); heads contiguous
    stride_vsb, stride_vss,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV block
    BLOCK_H: tl.constexpr,  # KV heads per program (power of 2)
    BLOCK_D: tl.constexpr,  # next power of 2 >= HEAD_DIM
    FP8: tl.constexpr,  # quantize to e4m3 with one scale per (token, head)
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

    k = tl.load(key_ptr + src_k, mask=mask, other=0.0)
    v = tl.load(value_ptr + src_v, mask=mask, other=0.0)
    if FP8:
        h_ok = heads < NUM_KV_HEADS
        k, k_scale = _quantize_rows(k)
        v, v_scale = _quantize_rows(v)
        tl.store(k_scale_ptr + block_id * stride_ksb + offset * stride_kss + heads, k_scale, mask=h_ok)
        tl.store(v_scale_ptr + block_id * stride_vsb + offset * stride_vss + heads, v_scale, mask=h_ok)
    tl.store(k_cache_ptr + dst_k, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst_v, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_rows(x):
    """``x`` [BLOCK_H, BLOCK_D] -> (x / scale clamped to the e4m3 range, scale [BLOCK_H] = amax / 448)."""
    x = x.to(tl.float32)
    amax = tl.max(tl.abs(x), 1)  # [BLOCK_H]
    inv = 448.0 / tl.maximum(amax, 1e-30)  # an all-zero row stores zeros with scale 0
    x = tl.minimum(tl.maximum(x * inv[:, None], -448.0), 448.0)  # rounding must not step past 448
    return x, amax / 448.0


def write_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; < 0 = padding, skipped
    k_scale: torch.Tensor | None = None,  # [num_blocks, block_size, num_kv_heads] fp32, FP8 caches only
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write ``key[t]``/``value[t]`` into pool slot ``slot_mapping[t]`` (hot path: no host syncs).

    FP8 caches also get each row's scale in ``k_scale``/``v_scale`` (see the module docstring)."""
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
    fp8 = _check_scales(k_cache, v_cache, k_scale, v_scale)
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
        k_scale_ptr=k_scale if fp8 else slot_mapping,  # never read without FP8
        v_scale_ptr=v_scale if fp8 else slot_mapping,
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
        stride_ksb=k_scale.stride(0) if fp8 else 0,
        stride_kss=k_scale.stride(1) if fp8 else 0,
        stride_vsb=v_scale.stride(0) if fp8 else 0,
        stride_vss=v_scale.stride(1) if fp8 else 0,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        FP8=fp8,
        num_warps=4 if block_h * block_d >= 1024 else 1,
    )


def _check_scales(k_cache, v_cache, k_scale, v_scale) -> bool:
    """Whether the caches are FP8; FP8 caches need fp32 scales ``[num_blocks, block_size, num_kv_heads]``."""
    fp8 = k_cache.dtype == FP8_DTYPE
    if not fp8:
        assert k_scale is None and v_scale is None, f"scales given for a {k_cache.dtype} cache"
        return False
    assert v_cache.dtype == FP8_DTYPE, f"{k_cache.dtype = } {v_cache.dtype = }"
    for scale in (k_scale, v_scale):
        assert scale is not None and scale.dtype == torch.float32, "FP8 caches need float32 scales"
        assert scale.shape == k_cache.shape[:3] and scale.stride(-1) == 1, f"{scale.shape = } {k_cache.shape = }"
        assert scale.device == k_cache.device
    return True


def write_kv_reference(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; < 0 = padding, skipped
    k_scale: torch.Tensor | None = None,  # [num_blocks, block_size, num_kv_heads] fp32, FP8 caches only
    v_scale: torch.Tensor | None = None,
) -> None:
    """PyTorch version of `write_kv`; also the CPU path. Reads ``slot_mapping`` on the host."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    fp8 = _check_scales(k_cache, v_cache, k_scale, v_scale)
    valid = slot_mapping >= 0  # [num_tokens]
    slots = slot_mapping[valid]  # [num_valid]
    for src, cache, scale in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        flat = cache.view(num_blocks * block_size, num_kv_heads, head_dim)  # shares storage with cache
        rows = src[valid]  # [num_valid, num_kv_heads, head_dim]
        if fp8:
            rows, row_scale = quantize_fp8_reference(rows)
            scale.view(num_blocks * block_size, num_kv_heads).index_copy_(0, slots, row_scale)
            # CPU torch has no index_copy_ for float8: copy the bytes
            flat.view(torch.uint8).index_copy_(0, slots, rows.view(torch.uint8))
        else:
            flat.index_copy_(0, slots, rows.to(cache.dtype))


def quantize_fp8_reference(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., head_dim]`` -> (e4m3 ``[..., head_dim]``, fp32 scale ``[...]``), as the kernel computes them."""
    x = rows.float()
    amax = x.abs().amax(dim=-1)  # [...]
    inv = FP8_MAX / amax.clamp_min(1e-30)
    q = (x * inv[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, amax / FP8_MAX


def dequantize_fp8_reference(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 ``[..., head_dim]`` and scales ``[...]`` -> values in ``dtype`` (computed in fp32, or fp64)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return (q.to(compute) * scale.to(compute)[..., None]).to(dtype)
