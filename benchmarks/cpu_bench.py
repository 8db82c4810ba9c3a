"""CPU throughput: ContinuousGenerator vs HF static ``generate`` (batch 32) on one tiny Llama, one process.

Workload: 96 requests, prompt lengths U[8, 96], new tokens U[8, 96] per request (greedy, EOS ignored),
on 2 threads. HF static ``generate`` takes the requests in arrival order, 32 per left-padded batch, and
each batch runs until its longest request is done (what static batching costs); both systems are
credited with the same useful tokens, the sum of every request's own new-token count. Tokens are
checked: each request's ContinuousGenerator output must equal the first ``new_tokens`` tokens of its row
in HF's batch output.

    python benchmarks/cpu_bench.py                        # tiny shape, float32, 5 interleaved runs each
    python benchmarks/cpu_bench.py --dtype float64 --with-reference-attention --profile out.prof

Timings on a machine that other processes share swing by several times from run to run (two torch
threads wait for each other whenever one is descheduled), so the table gives every run, the median and
the best, and the process CPU time.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import os
import platform
import pstats
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import transformers

import hf_paged
from hf_paged import ContinuousGenerator, SamplingParams
from hf_paged.entrypoints.bench import build_model, left_padded


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


@dataclass(frozen=True, slots=True)
class CpuWorkload:
    num_requests: int = 96
    min_prompt: int = 8
    max_prompt: int = 96
    min_new: int = 8
    max_new: int = 96
    seed: int = 0

    def make(self, vocab_size: int) -> tuple[list[list[int]], list[int]]:
        g = torch.Generator().manual_seed(self.seed)
        lens = torch.randint(self.min_prompt, self.max_prompt + 1, (self.num_requests,), generator=g).tolist()
        new = torch.randint(self.min_new, self.max_new + 1, (self.num_requests,), generator=g).tolist()
        prompts = [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lens]
        return prompts, new


def hf_static(model, prompts, new_tokens, batch_size) -> list[list[int]]:
    """Stock ``generate``, ``batch_size`` left-padded prompts at a time; each request's own new tokens."""
    outputs: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        chunk, wants = prompts[i : i + batch_size], new_tokens[i : i + batch_size]
        batch = left_padded(chunk, "cpu")
        most = max(wants)
        out = model.generate(**batch, max_new_tokens=most, min_new_tokens=most, do_sample=False)
        width = batch["input_ids"].shape[1]
        outputs += [out[row, width : width + n].tolist() for row, n in enumerate(wants)]
    return outputs


def continuous(gen, prompts, new_tokens) -> list[list[int]]:
    params = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in new_tokens]
    return [r.token_ids for r in gen.generate(prompts, params)]


def timed(fn) -> tuple[list[list[int]], float, float]:
    """(result, wall seconds, CPU seconds of the process: less sensitive to other processes on the machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def reference_attention():
    """Context manager: the paged attention runs the per-row reference (the CPU path before the batched one)."""
    import contextlib

    from hf_paged.integration import attention
    from hf_paged.kernels.paged_attention import paged_attention_reference

    def reference(*args, plans=None, **kwargs):  # the reference plans nothing
        return paged_attention_reference(*args, **kwargs)

    @contextlib.contextmanager
    def swapped():
        original = attention._attention_impl
        attention._attention_impl = lambda triton: reference if not triton else original(triton)
        try:
            yield
        finally:
            attention._attention_impl = original

    return swapped()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny | a local model folder (see hf_paged.entrypoints.bench)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each system, interleaved")
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--num-requests", type=int, default=96)
    parser.add_argument("--with-reference-attention", action="store_true",
                        help="also run ContinuousGenerator on the per-row reference attention (one run)")
    parser.add_argument("--profile", help="write a cProfile (CPU time) of one extra ContinuousGenerator run here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, "cpu", dtype)
    workload = CpuWorkload(num_requests=args.num_requests)
    prompts, new_tokens = workload.make(model.config.vocab_size)
    useful = sum(new_tokens)

    gen = ContinuousGenerator(model, progress=False)
    # Warm-up of both systems outside the timing (first-call allocations, lazy imports).
    hf_static(model, prompts[:4], [4] * 4, 4)
    continuous(gen, prompts[:4], [4] * 4)

    def run_continuous():
        gen.reset_prefix_cache()  # each run computes every prompt
        return continuous(gen, prompts, new_tokens)

    def run_reference():
        with reference_attention():
            return run_continuous()

    systems = {"hf_static": lambda: hf_static(model, prompts, new_tokens, args.hf_batch_size), "continuous": run_continuous}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in systems}
    outs: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):  # interleaved, so every system sees the same machine
        for name, fn in systems.items():
            outs[name], wall, cpu = timed(fn)
            runs[name].append((wall, cpu))
    if args.with_reference_attention:
        outs["continuous, reference attention"], wall, cpu = timed(run_reference)
        runs["continuous, reference attention"] = [(wall, cpu)]

    med = {name: statistics.median(w for w, _ in r) for name, r in runs.items()}
    best = {name: min(w for w, _ in r) for name, r in runs.items()}
    cpu = {name: statistics.median(c for _, c in r) for name, r in runs.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {datetime.date.today()} | {_cpu_name()} | {args.threads} torch threads, {os.cpu_count()} cores, "
          f"load average {load:.1f} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"hf_paged {hf_paged.__version__}")
    print(f"# model {args.model} ({args.dtype}); {workload}; {useful} useful new tokens, "
          f"{sum(map(len, prompts))} prompt tokens; HF static batch {args.hf_batch_size}; {args.repeats} interleaved runs")
    print("| system | out tok/s (median wall) | out tok/s (best wall) | wall s, each run | CPU s (median) "
          "| vs HF static: median wall / best wall / CPU | tokens = HF static |")
    print("|---|---|---|---|---|---|---|")
    agree_all = True
    for name in runs:
        walls = ", ".join(f"{w:.2f}" for w, _ in runs[name])
        agree = sum(a == b for a, b in zip(outs["hf_static"], outs[name]))
        agree_all &= agree == len(prompts)
        print(f"| {name} | {useful / med[name]:.0f} | {useful / best[name]:.0f} | {walls} | {cpu[name]:.2f} | "
              f"{med['hf_static'] / med[name]:.2f}x / {best['hf_static'] / best[name]:.2f}x / "
              f"{cpu['hf_static'] / cpu[name]:.2f}x | {agree}/{len(prompts)} |")

    if args.profile:
        profiler = cProfile.Profile(time.process_time)  # CPU time: the profile holds on a loaded machine
        profiler.enable()
        run_continuous()
        profiler.disable()
        profiler.dump_stats(args.profile)
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)
    return 0 if agree_all or args.dtype != "float64" else 1


if __name__ == "__main__":
    sys.exit(main())
