"""Host time of a graph-replayed decode step, split by stage (diagnoses host-side gaps between steps).

    python benchmarks/gpu_decode_host.py [llama-1b|llama-8b] [num_prompts] [new_tokens]
"""

import sys
import time
from collections import defaultdict

import torch

from hf_paged import ContinuousGenerator, SamplingParams
from hf_paged.entrypoints.bench import Workload, build_model
from hf_paged.engine import cuda_graphs, model_runner, sampler as sampler_mod

shape = sys.argv[1] if len(sys.argv) > 1 else "llama-8b"
num_prompts = int(sys.argv[2]) if len(sys.argv) > 2 else 256
new_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 64
memory_fraction = float(sys.argv[4]) if len(sys.argv) > 4 else 0.9
T = defaultdict(float)
N = defaultdict(int)


EVENTS = defaultdict(list)  # label -> [(start, end)] CUDA events: GPU time of the wrapped call's work


def timed(cls, name, label, gpu=False):
    original = getattr(cls, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        if gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        out = original(*args, **kwargs)
        if gpu:
            end.record()
            EVENTS[label].append((start, end))
        T[label] += time.perf_counter() - t
        N[label] += 1
        return out

    setattr(cls, name, wrapper)


timed(cuda_graphs.DecodeGraphs, "_load", "graphs._load")
timed(cuda_graphs.DecodeGraphs, "run", "graphs.run (load + replay launch)")
timed(torch.cuda.CUDAGraph, "replay", "CUDAGraph.replay", gpu=True)
timed(model_runner.ModelRunner, "execute", "runner.execute")
timed(model_runner.ModelRunner, "forward", "runner.forward (eager steps)")
timed(sampler_mod.Sampler, "prepare", "sampler.prepare")
timed(sampler_mod.Sampler, "sample", "sampler.sample (incl. sync)", gpu=True)

model = build_model(shape, "cuda", torch.bfloat16)
prompts = Workload(num_prompts, 64, 1024, new_tokens).prompts(model.config.vocab_size)
params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
gen = ContinuousGenerator(model, progress=False, prefix_caching=False, memory_fraction=memory_fraction)
gen.generate(prompts[:8], params)
gen.runner.prepare(max(map(len, prompts)) + new_tokens)
gen.runner.graphs.capture_all()
torch.cuda.synchronize()
T.clear()
N.clear()
EVENTS.clear()
before = torch.cuda.memory_stats()
t = time.perf_counter()
gen.generate(prompts, params)
torch.cuda.synchronize()
wall = time.perf_counter() - t
after = torch.cuda.memory_stats()
grew = {k: after.get(k, 0) - before.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")}
print(f"{shape}: memory_fraction {memory_fraction}, pool {gen.pool.nbytes / 2**30:.1f} GiB, {gen.stats.steps} steps, {wall:.2f} s; during the run: {grew}")
for label in T:
    print(f"  {label:<36} {N[label]:5d} calls {T[label] * 1e3 / max(1, N[label]):8.3f} ms/call {T[label]:7.3f} s")
for label, pairs in EVENTS.items():
    ms = [a.elapsed_time(b) for a, b in pairs]
    print(f"  GPU time of {label:<26} {sum(ms) / len(ms):8.3f} ms/call (min {min(ms):.3f}, max {max(ms):.3f})")
# Replay alone, back to back, on the largest bucket used: GPU time of one graph-replayed step.
graphs = gen.runner.graphs
size = graphs.bucket_for(min(num_prompts, gen.options.max_num_seqs))
b = graphs._buckets[size]
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(20):
    b.graph.replay()
torch.cuda.synchronize()
print(f"  bucket {size}: back-to-back replay {(time.perf_counter() - t) / 20 * 1e3:.2f} ms/step (inputs of the run's last step)")
