"""Preemption by swapping (``preemption_mode="swap"``): a preempted request's blocks go to host memory and
come back into fresh blocks, so outputs equal those without preemption, nothing is recomputed, and
the pool and the swap space end empty."""

from __future__ import annotations

import functools

import pytest
import torch
from models import VOCAB, make_model

from hf_paged import ContinuousGenerator, SamplingParams

LENGTHS = [3, 60, 17, 33, 8, 45]
NEW = 20
GREEDY = SamplingParams(max_new_tokens=NEW, temperature=0)


def make_prompts(seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


@functools.cache
def model_and_refs(name: str):
    """The tiny model and its greedy outputs from a pool big enough that nothing is preempted."""
    model = make_model(name)
    gen = ContinuousGenerator(model, num_blocks=64, progress=False)
    refs = [r.token_ids for r in gen.generate(make_prompts(), GREEDY)]
    assert gen.stats.preemptions == 0
    for p, ref in zip(make_prompts()[:2], refs):  # and stock generate agrees (the suite's parity check)
        assert model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False)[0, len(p) :].tolist() == ref
    return model, refs


def block_bytes(gen: ContinuousGenerator) -> int:
    return gen.pool.bytes_per_block


def assert_empty(gen: ContinuousGenerator) -> None:
    assert gen.pool.allocator.is_whole()
    assert gen.core.scheduler.num_swap_slots_used == 0


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])  # mistral: sliding window releases blocks
def test_swap_preemption_matches_no_preemption(name):
    model, refs = model_and_refs(name)
    gen = ContinuousGenerator(model, num_blocks=6, preemption_mode="swap", swap_space_gb=2**-10, progress=False)
    assert gen.core.scheduler.num_swap_blocks == 2**20 // block_bytes(gen)
    results = gen.generate(make_prompts(), GREEDY)
    assert [r.token_ids for r in results] == refs
    stats = gen.stats
    assert stats.preemptions > 0 and stats.swapped_out_blocks > 0
    assert stats.swapped_in_blocks == stats.swapped_out_blocks and stats.recomputed_tokens == 0
    assert_empty(gen)
    # a second run on the same generator reuses the swap space
    assert [r.token_ids for r in gen.generate(make_prompts(), GREEDY)] == refs
    assert gen.stats.swapped_out_blocks > 0
    assert_empty(gen)


def test_victims_that_do_not_fit_are_recomputed():
    model, refs = model_and_refs("llama")
    probe = ContinuousGenerator(model, num_blocks=6, progress=False)
    gen = ContinuousGenerator(
        model, num_blocks=6, preemption_mode="swap", swap_space_gb=2 * block_bytes(probe) / 2**30, progress=False
    )
    assert gen.core.scheduler.num_swap_blocks == 2
    results = gen.generate(make_prompts(), GREEDY)
    assert [r.token_ids for r in results] == refs
    stats = gen.stats
    assert stats.swapped_out_blocks > 0 and stats.recomputed_tokens > 0  # both paths taken
    assert stats.swapped_in_blocks == stats.swapped_out_blocks
    assert_empty(gen)


def test_swap_with_fp8_pool_and_seeded_sampling():
    """FP8 blocks (values and scales) come back bit for bit: swap equals no preemption, sampling included."""
    model, _ = model_and_refs("llama")
    params = [SamplingParams(max_new_tokens=NEW, temperature=0.8, top_k=20, seed=10 + i) for i in range(len(LENGTHS))]
    roomy = ContinuousGenerator(model, num_blocks=64, kv_cache_dtype="fp8", progress=False)
    expected = [r.token_ids for r in roomy.generate(make_prompts(), params)]
    gen = ContinuousGenerator(
        model, num_blocks=6, kv_cache_dtype="fp8", preemption_mode="swap", swap_space_gb=2**-10, progress=False
    )
    assert [r.token_ids for r in gen.generate(make_prompts(), params)] == expected
    assert gen.stats.swapped_out_blocks > 0 and gen.stats.recomputed_tokens == 0
    assert_empty(gen)


def test_leaving_a_stream_early_frees_swap_slots():
    model, _ = model_and_refs("llama")
    gen = ContinuousGenerator(model, num_blocks=6, preemption_mode="swap", swap_space_gb=2**-10, progress=False)
    stream = gen.stream(make_prompts(), GREEDY)
    for _ in stream:
        if gen.core.scheduler.num_swap_slots_used:
            break
    else:
        pytest.fail("nothing was ever swapped out")
    stream.close()
    assert_empty(gen)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(preemption_mode="swapping"), "preemption_mode"),
        (dict(preemption_mode="swap", swap_space_gb=0), "swap_space_gb"),
        (dict(preemption_mode="swap", swap_space_gb="4"), "swap_space_gb"),
        (dict(preemption_mode="swap", swap_space_gb=1e-9), "holds no KV block"),
    ],
)
def test_bad_swap_options(options, match):
    model, _ = model_and_refs("llama")
    with pytest.raises(ValueError, match=match):
        ContinuousGenerator(model, num_blocks=6, progress=False, **options)


def test_server_flags_reach_the_engine_options():
    import argparse

    from hf_paged.options import EngineOptions
    from hf_paged.server.main import add_serve_arguments, engine_options

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--kv-cache-dtype", "fp8", "--preemption-mode", "swap", "--swap-space-gb", "2.5"])
    options = EngineOptions(**engine_options(args))
    assert (options.kv_cache_dtype, options.preemption_mode, options.swap_space_gb) == ("fp8", "swap", 2.5)
    defaults = EngineOptions(**engine_options(parser.parse_args([])))
    assert defaults.preemption_mode == "recompute" and defaults.async_scheduling is True
    assert EngineOptions(**engine_options(parser.parse_args(["--no-async-scheduling"]))).async_scheduling is False
