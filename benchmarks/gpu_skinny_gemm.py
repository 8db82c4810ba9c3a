"""cuBLAS bandwidth of the Llama-3.1-8B shape's linear layers at decode batch sizes (1, 2, 4 rows), one GPU.

    python benchmarks/gpu_skinny_gemm.py

A single-stream decode step reads every weight once, so its GEMMs are bound by memory bandwidth: this
times ``F.linear`` (bf16, what the compiled decoder layers call) for each weight shape, 32 calls in one
CUDA graph replayed 10 times (launch gaps as in a captured decode step), cycling over 4 weights so the
L2 cache holds none of them. The fused rows ("qkv", "gate_up") are the shapes a merged projection
would run: what concatenating q/k/v and gate/up into one GEMM each would buy.
"""

from __future__ import annotations

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


def time_linear(n: int, k: int, m: int, calls: int = 32, replays: int = 10) -> float:
    """Microseconds per ``F.linear`` of ``[m, k]`` by ``[n, k]`` (bf16), inside a replayed CUDA graph."""
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(4 if n * k < 1 << 28 else 1)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    for w in weights:  # cuBLAS picks and loads its kernels outside the capture
        F.linear(x, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            F.linear(x, weights[i % len(weights)])
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls)


def main() -> int:
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| weight | N x K | rows | us per call | TB/s |")
    print("|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        for m in (1, 2, 4):
            us = time_linear(n, k, m)
            print(f"| {name} | {n} x {k} | {m} | {us:.1f} | {n * k * 2 / us / 1e6:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
