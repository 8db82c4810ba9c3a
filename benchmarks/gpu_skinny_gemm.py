"""cuBLAS bandwidth of the Llama-3.1-8B shape's linear layers at decode batch sizes (1, 2, 4 rows), one GPU.

    python benchmarks/gpu_skinny_gemm.py

A single-stream decode step reads every weight once, so its GEMMs are bound by memory bandwidth: this
times ``F.linear`` (bf16, what the compiled decoder layers call) for each weight shape, 32 calls in one
CUDA graph replayed 10 times (launch gaps as in a captured decode step), cycling over 4 weights so the
L2 cache holds none of them. The fused rows ("qkv", "gate_up") are the shapes a merged projection
would run: what concatenating q/k/v and gate/up into one GEMM each would buy.

    python benchmarks/gpu_skinny_gemm.py --sweep     # also hf_paged's skinny_gemm over its configs

``--sweep`` times ``hf_paged.kernels.skinny_gemm`` (the weight-streaming kernel) on the same shapes over a
grid of (BLOCK_N, BLOCK_K, num_warps, num_stages), checks it against cuBLAS, and prints the best config
per shape next to cuBLAS and the kernel's default choice.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F

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
    from hf_paged.kernels.skinny_gemm import skinny_gemm

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
