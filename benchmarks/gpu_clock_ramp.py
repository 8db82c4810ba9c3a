"""The same ContinuousGenerator workload three times in one process, right after its warm-up or after
``--burn`` seconds of GPU matmuls: how much an idle GPU's clock ramp costs a short timed run.

    python benchmarks/gpu_clock_ramp.py                 # 1B shape, 512 prompts U[64,1024] -> 256 new
    python benchmarks/gpu_clock_ramp.py --burn 5        # the same after 5 s of matmuls

Each run prints out tok/s, TTFT p50 and the engine's step profile, plus how many device segments the
CUDA allocator added, allocation retries and pinned host allocations during the run (so those can be
ruled out as the cause of a slow first run).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_paged import ContinuousGenerator, SamplingParams
from hf_paged.entrypoints.bench import Workload, build_model, ready_for_timing, warm_up_generator


def allocator_counts() -> dict[str, int]:
    device = torch.cuda.memory_stats()
    host = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    return {
        "device segments": device.get("num_device_alloc", 0),
        "alloc retries": device.get("num_alloc_retries", 0),
        "pinned allocs": host.get("num_host_alloc", 0),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-1b", choices=("llama-1b", "llama-8b"))
    p.add_argument("--burn", type=float, default=0.0, help="seconds of matmuls between the warm-up and the first run")
    args = p.parse_args()
    num_prompts = 512 if args.shape == "llama-1b" else 256
    model = build_model(args.shape, "cuda", torch.bfloat16)
    prompts = Workload(num_prompts, 64, 1024, 256).prompts(model.config.vocab_size)
    greedy = SamplingParams(max_new_tokens=256, temperature=0.0, ignore_eos=True)
    with ContinuousGenerator(model, progress=False, profile=True) as gen:
        warm_up_generator(gen, prompts, 256)
        ready_for_timing("cuda", args.burn)
        for run in range(3):
            before, start = allocator_counts(), time.perf_counter()
            results = gen.generate(prompts, greedy)
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
            after = allocator_counts()
            out = sum(len(r.token_ids) for r in results)
            ttft = statistics.median(r.ttft_s for r in results)
            added = ", ".join(f"{k} +{after[k] - before[k]}" for k in before)
            print(f"run {run}: {out / wall:,.0f} out tok/s, TTFT p50 {ttft * 1e3:.0f} ms ({added})")
            print(gen.stats.profile.render(), flush=True)
            gen.reset_prefix_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
