"""Kernel-level profile of ContinuousGenerator on the GPU: which CUDA kernels the step time goes to.

    python benchmarks/gpu_profile.py [llama-1b|llama-8b] [num_prompts] [new_tokens]

Decode steps run eagerly here (cuda_graphs=False) so the profiler attributes every kernel; the
profile of `hf-paged bench --profile` shows graphs do not change GPU time at these batch sizes.
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from hf_paged import ContinuousGenerator, SamplingParams
from hf_paged.bench import Workload, build_model

shape = sys.argv[1] if len(sys.argv) > 1 else "llama-1b"
num_prompts = int(sys.argv[2]) if len(sys.argv) > 2 else 256
new_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 32

model = build_model(shape, "cuda", torch.bfloat16)
prompts = Workload(num_prompts, 64, 1024, new_tokens).prompts(model.config.vocab_size)
params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
gen = ContinuousGenerator(model, progress=False, cuda_graphs=False, profile=True)
gen.generate(prompts[:8], params)  # warm-up: Triton compiles
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    gen.generate(prompts, params)
    torch.cuda.synchronize()
print(gen.stats.profile.render())
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
