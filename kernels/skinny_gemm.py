"""A weight-streaming GEMM for a few rows: ``y[M, N] = x[M, K] @ weight[N, K]^T`` for ``M <= 16``.

A decode step of one to a few sequences reads every weight once and does almost no arithmetic, so its
linear layers run at the speed weights stream from memory. cuBLAS picks split-K GEMM kernels for these
shapes that reach 2.7 TB/s on a 4096 x 4096 weight and 1.5 TB/s on 1024 x 4096 on an H200 (4.2 TB/s
only on the 128256-row LM head; ``benchmarks/gpu_skinny_gemm.py``). Here each program owns ``BLOCK_N``
output columns, streams its ``[BLOCK_N, K]`` slab of the weight once with deep software pipelining, and
multiplies it by the (padded to 16) rows of ``x`` on the tensor cores, accumulating in float32: one
kernel, no split-K reduction pass.

``skinny_gemm_reference`` is the readable PyTorch version that tests compare against.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: skinny_gemm_reference below is its path (see _no_triton.py)
    from ._no_triton import tl, triton

MAX_ROWS = 16  # tl.dot's smallest tile: rows beyond the real ones are masked loads of zeros
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,  # [M, K], last dim contiguous
    w_ptr,  # [N, K], last dim contiguous
    b_ptr,  # [N] bias (read only if HAS_BIAS)
    y_ptr,  # [M, N], last dim contiguous
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" keeps float32 inputs exact
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _config(n: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an ``n``-column output (H200 sweep, see RESULTS)."""
    return (16, 256, 4, 5) if n <= 2048 else (32, 256, 4, 5)


def skinny_gemm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: tuple[int, int, int, int] | None = None
) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for a 2D ``x`` of at most ``MAX_ROWS`` rows (``F.linear``'s layout).

    ``config`` overrides ``(BLOCK_N, BLOCK_K, num_warps, num_stages)`` (benchmarks sweep it).
    """
    assert x.dim() == 2 and weight.dim() == 2, f"{x.shape = } {weight.shape = }"
    m, k = x.shape
    n, k_w = weight.shape
    assert k == k_w, f"{x.shape = } does not match {weight.shape = }"
    assert 1 <= m <= MAX_ROWS, f"{m} rows: skinny_gemm takes 1..{MAX_ROWS}"
    assert x.dtype == weight.dtype and x.dtype in DTYPES, f"{x.dtype = } {weight.dtype = }"
    assert x.stride(-1) == 1 and weight.stride(-1) == 1, "x and weight need a contiguous last dim"
    assert x.device == weight.device, f"{x.device = } {weight.device = }"
    if bias is not None:
        assert bias.shape == (n,) and bias.dtype == x.dtype and bias.is_contiguous(), f"{bias.shape = } {bias.dtype = }"
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n, block_k, num_warps, num_stages = config or _config(n)
    _skinny_gemm_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else y, y,
        m, n, k,
        x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=MAX_ROWS,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    return y


def skinny_gemm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What ``skinny_gemm`` computes: float32 accumulation, one rounding to the input dtype at the end."""
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
