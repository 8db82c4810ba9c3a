"""Kernel-level profile of ContinuousGenerator on the GPU: which CUDA kernels the step time goes to.

    python benchmarks/gpu_profile.py [llama-1b|llama-8b] [num_prompts] [new_tokens] [--decode-only]

Steps run eagerly here (cuda_graphs=False) so the profiler attributes every kernel. With
``--decode-only`` the profiler starts once every prompt has its first token (all prefills done) and
the table is per decode step, grouped by kind of kernel, next to the graph-replayed step time of the
same workload: the gap between the two is launch overhead the graphs remove.
"""

import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from hf_paged import ContinuousGenerator, SamplingParams
from hf_paged.entrypoints.bench import Workload, build_model

args = [a for a in sys.argv[1:] if not a.startswith("--")]
decode_only = "--decode-only" in sys.argv
shape = args[0] if args else "llama-1b"
num_prompts = int(args[1]) if len(args) > 1 else 256
new_tokens = int(args[2]) if len(args) > 2 else 32

KINDS = (  # first match wins
    ("attention", ("_paged_attention", "_merge_splits")),
    ("kv write", ("_write_kv",)),
    ("GEMM", ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas")),
    ("sampling", ("topk", "sort", "argmax", "cumsum", "softmax", "log_softmax", "bitonic", "radix")),
    ("copies / cat", ("copy", "Cat", "index", "gather", "scatter")),
    ("norm reductions", ("reduce_kernel",)),
    ("elementwise", ("elementwise",)),
)


def kind(name: str) -> str:
    for label, keys in KINDS:
        if any(k in name for k in keys):
            return label
    return "other"


model = build_model(shape, "cuda", torch.bfloat16)
prompts = Workload(num_prompts, 64, 1024, new_tokens).prompts(model.config.vocab_size)
params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
gen = ContinuousGenerator(model, progress=False, cuda_graphs=False, profile=True, prefix_caching=False)
gen.generate(prompts[:8], params)  # warm-up: Triton compiles
torch.cuda.synchronize()

if not decode_only:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        gen.generate(prompts, params)
        torch.cuda.synchronize()
    print(gen.stats.profile.render())
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
    sys.exit(0)

prof = profile(activities=[ProfilerActivity.CUDA])
started, first_tokens, decode_steps, last_step = False, set(), 0, 0
for event in gen.stream(prompts, params):
    first_tokens.add(event.index)
    if started and gen.stats.steps != last_step:
        decode_steps += 1
    last_step = gen.stats.steps
    if not started and len(first_tokens) == num_prompts:
        torch.cuda.synchronize()
        prof.start()
        started = True
torch.cuda.synchronize()
prof.stop()
per_kind: dict[str, float] = defaultdict(float)
for e in prof.key_averages():
    per_kind[kind(e.key)] += e.device_time_total / 1e3  # ms
total = sum(per_kind.values())
print(f"{shape}: {num_prompts} sequences, {decode_steps} eager decode steps profiled (kernel time per step):")
for label, ms in sorted(per_kind.items(), key=lambda kv: -kv[1]):
    print(f"  {label:<16} {ms / decode_steps:7.2f} ms/step  {ms / total:6.1%}")
print(f"  {'all kernels':<16} {total / decode_steps:7.2f} ms/step")
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))

graphs = ContinuousGenerator(model, progress=False, prefix_caching=False)
graphs.generate(prompts[:8], params)
torch.cuda.synchronize()
seen, start, steps_at_start = set(), None, 0
for event in graphs.stream(prompts, params):
    seen.add(event.index)
    if start is None and len(seen) == num_prompts:
        torch.cuda.synchronize()
        start, steps_at_start = time.perf_counter(), graphs.stats.steps
torch.cuda.synchronize()
steps = graphs.stats.steps - steps_at_start
print(f"graph-replayed decode, same workload: {(time.perf_counter() - start) / steps * 1e3:.2f} ms/step over {steps} steps")
