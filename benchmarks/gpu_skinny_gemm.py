"""cuBLAS bandwidth of the Llama-3.1-8B shape's linear layers at decode batch sizes (1, 2, 4 rows), one GPU.

    python benchmarks/gpu_skinny_gemm.py

A single-stream decode step reads every weight once, so its GEMMs are bound by memory bandwidth: this
times ``F.linear`` (bf16, what the compiled decoder layers call) for each weight shape, 32 calls in one
CUDA graph replayed 10 times (launch gaps as in a captured decode step), cycling over 4 weights so the
L2 cache holds none of them. The fused rows ("qkv", "gate_up") are the shapes a merged projection
would run: what concatenating q/k/v and gate/up into one GEMM each would buy.

    python benchmarks/gpu_skinny_gemm.py --sweep     # also a weight-streaming Triton kernel, below

``--sweep`` times ``skinny_gemm`` (defined here: each program owns ``BLOCK_N`` output columns, streams its
``[BLOCK_N, K]`` slab of the weight once with software pipelining and multiplies it by the rows of ``x``,
padded to 16, on the tensor cores; one kernel, no split-K pass) on the same shapes over a grid of
(BLOCK_N, BLOCK_K, num_warps, num_stages), checks it against cuBLAS, and prints the best config per
shape next to cuBLAS. It was an experiment for single-stream decode: at best 0-7% faster than cuBLAS
(4% on the LM head), slower on the small k/v weights, so the engine does not use it (see RESULTS).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# name -> (out_features N, in_features K), Llama-3.1-8B
SHAPES = {
    "q/o": (4096, 4096),
    "k/v": (1024, 4096),
    "gate/up": (14336, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
    "qkv": (6144, 4096),
    "gate_up": (28672, 4096),
}


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


def time_calls(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n: int, k: int, m: int,
               calls: int = 32, replays: int = 10) -> float:
    """Microseconds per ``fn(x, weight)`` with ``x`` ``[m, k]`` and ``weight`` ``[n, k]`` (bf16), inside a
    replayed CUDA graph."""
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(4 if n * k < 1 << 28 else 1)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    for w in weights:  # kernels picked, compiled and loaded outside the capture
        fn(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(x, weights[i % len(weights)])
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls)


def time_linear(n: int, k: int, m: int) -> float:
    return time_calls(F.linear, n, k, m)


def sweep() -> None:
    configs = list(itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 5)))
    print("\n| weight | N x K | rows | cuBLAS us | skinny default us | best us (TB/s) | best (BLOCK_N, BLOCK_K, warps, stages) | max |diff| vs cuBLAS |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        x = torch.randn(2, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        diff = (skinny_gemm(x, w).float() - F.linear(x, w).float()).abs().max().item()
        for m in (1, 2):
            cublas = time_linear(n, k, m)
            default = time_calls(skinny_gemm, n, k, m)
            timed = []
            for config in configs:
                try:
                    timed.append((time_calls(lambda a, b, c=config: skinny_gemm(a, b, config=c), n, k, m), config))
                except Exception as e:  # a config the GPU cannot run (shared memory): skipped
                    print(f"  {name} {config}: {type(e).__name__}")
            best_us, best = min(timed)
            print(f"| {name} | {n} x {k} | {m} | {cublas:.1f} | {default:.1f} | {best_us:.1f} ({n * k * 2 / best_us / 1e6:.2f}) | "
                  f"{best} | {diff:.2e} |", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", action="store_true", help="also time hf_paged's skinny_gemm over its configs")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| weight | N x K | rows | us per call | TB/s |")
    print("|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        for m in (1, 2, 4):
            us = time_linear(n, k, m)
            print(f"| {name} | {n} x {k} | {m} | {us:.1f} | {n * k * 2 / us / 1e6:.2f} |", flush=True)
    if args.sweep:
        sweep()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
