"""End-to-end pytest-benchmark suite: every system on the same model and workload, in one process.

CPU (CI): a tiny model and small counts, so the suite is exercised on every run.
GPU: the random-weight Llama-3.2-1B / Llama-3.1-8B shapes. ``HF_PAGED_BENCH=llama-1b`` (default on
CUDA) or ``llama-8b`` picks the shape and its workload (the ones in ``benchmarks/RESULTS.md``).

    python -m pytest benchmarks/test_bench_e2e.py --benchmark-json=out.json
"""

from __future__ import annotations

import os

import pytest
import torch

from hf_paged.entrypoints.bench import Workload, build_model, run_continuous, run_enable_generate, run_hf_generate_batch, run_static_generate

CUDA = torch.cuda.is_available()
SHAPE = os.environ.get("HF_PAGED_BENCH", "llama-1b" if CUDA else "tiny")
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32

# shape -> (workload, HF static batch size)
WORKLOADS = {
    "tiny": (Workload(num_prompts=12, min_len=8, max_len=64, new_tokens=8), 4),
    "llama-1b": (Workload(num_prompts=512, min_len=64, max_len=1024, new_tokens=256), 64),
    "llama-8b": (Workload(num_prompts=256, min_len=64, max_len=1024, new_tokens=256), 32),
}
WORKLOAD, HF_BATCH = WORKLOADS[SHAPE]


@pytest.fixture(scope="module")
def model():
    return build_model(SHAPE, DEVICE, DTYPE)


@pytest.fixture(scope="module")
def prompts(model):
    return WORKLOAD.prompts(model.config.vocab_size)


def _record(benchmark, result):
    benchmark.extra_info.update({k: v for k, v in result.as_dict().items() if k != "extra"})
    benchmark.extra_info.update(shape=SHAPE, device=torch.cuda.get_device_name() if CUDA else "cpu", workload=str(WORKLOAD))
    assert result.output_tokens == WORKLOAD.num_prompts * WORKLOAD.new_tokens


def _once(benchmark, fn):
    # One round: each call already runs a whole workload (and its own warm-up).
    return benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)


RUNNERS = {
    "continuous": lambda model, prompts: run_continuous(model, prompts, WORKLOAD.new_tokens, DEVICE),
    "hf_static": lambda model, prompts: run_static_generate(model, prompts, WORKLOAD.new_tokens, HF_BATCH, DEVICE),
    "hf_generate_batch": lambda model, prompts: run_hf_generate_batch(model, prompts, WORKLOAD.new_tokens, DEVICE),
    "enable_generate": lambda model, prompts: run_enable_generate(model, prompts, WORKLOAD.new_tokens, HF_BATCH, DEVICE),
}


@pytest.mark.parametrize("system", list(RUNNERS))
def test_end_to_end(benchmark, model, prompts, system):
    result = _once(benchmark, lambda: RUNNERS[system](model, prompts))
    _record(benchmark, result)
