"""Shared KV blocks end to end on CPU (float64): prefix caching, parallel sampling, sliding windows, beams.

Every output is compared with the same requests computed without sharing (and with stock
``generate``), and every test ends with the pool whole: no block has an owner left.
"""

from __future__ import annotations

import pytest
import torch
from models import VOCAB, left_padded_batch, make_model
from test_generator import model_and_refs, new_generator

import hf_paged
from hf_paged.engine.sampling_params import SamplingParams

BS = 16
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


def shared_prefix_prompts(count: int, prefix_len: int = 37, seed: int = 5) -> list[list[int]]:
    """``count`` prompts sharing ``prefix_len`` tokens (ending inside a block) plus unique tails."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, VOCAB, (prefix_len,), generator=g).tolist()
    return [prefix + torch.randint(3, VOCAB, (3 + 5 * k,), generator=g).tolist() for k in range(count)]


def stock_greedy(model, prompts, new):
    return [model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False)[0, len(p) :].tolist() for p in prompts]


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "qwen2", "gpt2"])
def test_prefix_caching_on_equals_off_equals_stock(name):
    model, _ = model_and_refs(name)
    prompts = shared_prefix_prompts(5)
    ref = stock_greedy(model, prompts, 12)
    off = new_generator(model, prefix_caching=False)
    assert [r.token_ids for r in off.generate(prompts, GREEDY)] == ref
    assert off.stats.prefix_queried_tokens == 0 and off.stats.kv_blocks_cached == 0

    on = new_generator(model, max_num_seqs=2)  # later prompts are admitted after the first ones computed the prefix
    assert [r.token_ids for r in on.generate(prompts, GREEDY)] == ref
    stats = on.stats
    assert stats.prefix_hit_tokens >= 3 * 2 * BS  # prompts 2.. reuse the 2 full prefix blocks
    assert stats.prefix_queried_tokens == sum(map(len, prompts)) and 0 < stats.prefix_hit_rate < 1
    assert on.pool.allocator.is_whole() and stats.kv_blocks_cached > 0  # kept, but owned by nobody

    # A second call finds the prompts' own full blocks too, and still changes nothing.
    assert [r.token_ids for r in on.generate(prompts, GREEDY)] == ref
    assert on.stats.prefix_hit_tokens == sum((len(p) - 1) // BS * BS for p in prompts)
    assert on.pool.allocator.is_whole()


def test_prefix_caching_with_evictions_mid_run():
    model, _ = model_and_refs("llama")
    prompts = shared_prefix_prompts(6) + shared_prefix_prompts(4, seed=9)
    ref = stock_greedy(model, prompts, 12)
    gen = new_generator(model, num_blocks=9, max_num_seqs=3)
    for _ in range(2):
        assert [r.token_ids for r in gen.generate(prompts, GREEDY)] == ref
        assert gen.pool.allocator.is_whole()
    assert gen.pool.allocator.num_evictions > 0 and gen.stats.prefix_hit_tokens > 0


def test_cache_is_dropped_when_the_weights_change():
    model = make_model("llama", seed=3)
    prompts = shared_prefix_prompts(3)
    gen = new_generator(model, max_num_seqs=1)
    gen.generate(prompts, GREEDY)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)  # e.g. an optimizer step
    out = gen.generate(prompts, GREEDY)
    assert [r.token_ids for r in out] == stock_greedy(model, prompts, 12)
    assert gen.stats.prefix_hit_tokens == 2 * BS * 2  # only blocks computed by this call's first prompt
    gen.reset_prefix_cache()
    assert gen.stats.kv_blocks_cached == 0


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("prompt_len", [40, 33])  # the last prompt token inside a block / first of a block
def test_n_samples_share_the_prompt_and_match_separate_seeded_requests(prefix_caching, prompt_len):
    model, _ = model_and_refs("llama")
    prompt = shared_prefix_prompts(1, prefix_len=prompt_len - 3)[0]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=40, n=4, seed=11)
    gen = new_generator(model, prefix_caching=prefix_caching)
    (res,) = gen.generate([prompt], params)
    assert gen.stats.forked_samples == 3
    shared_peak = gen.stats.kv_blocks_peak
    assert gen.pool.allocator.is_whole()

    separate = new_generator(model, prefix_caching=False)
    singles = separate.generate([prompt] * 4, [SamplingParams(max_new_tokens=10, temperature=1.0, top_k=40, seed=11 + k) for k in range(4)])
    assert [s.token_ids for s in res.samples] == [r.token_ids for r in singles]
    assert len({tuple(s.token_ids) for s in res.samples}) > 1
    # Four samples hold the prompt's blocks once (plus their own tails): 2 full blocks saved per sample.
    assert shared_peak <= separate.stats.kv_blocks_peak - 3 * ((prompt_len - 1) // BS)


def test_sliding_window_keeps_memory_bounded():
    model = make_model("mistral")  # every layer has a 7-token window
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (70, 5, 41)]
    params = SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True)
    ref = [model.generate(torch.tensor([p]), max_new_tokens=60, min_new_tokens=60, do_sample=False)[0, len(p) :].tolist() for p in prompts]
    gen = new_generator(model, max_num_batched_tokens=32)
    assert [r.token_ids for r in gen.generate(prompts, params)] == ref
    assert gen.runner.cache.sliding_window == 7
    # Without release the run needs sum(ceil((len + 60) / 16)) = 9 + 5 + 7 blocks at its peak; with it,
    # each sequence holds its window's blocks plus the ones its current chunk writes.
    assert gen.stats.kv_blocks_peak <= 3 * (-(-(7 + 32) // BS) + 1) < 21
    assert gen.pool.allocator.is_whole()


def test_mixed_window_model_keeps_every_block():
    model, _ = model_and_refs("gemma2")  # sliding and full layers alternate: nothing can be released
    gen = new_generator(model)
    gen.generate(shared_prefix_prompts(2), GREEDY)
    assert set(gen.runner.cache.layer_windows) == {6, None}  # one windowed and one full layer seen
    assert gen.runner.cache.sliding_window is None


def test_beam_search_under_enable_shares_blocks_and_matches_stock():
    model = make_model("llama")
    batch = left_padded_batch([40, 35], seed=4)  # 3 and 3 blocks of prompt
    kw = dict(max_new_tokens=8, num_beams=4, do_sample=False)
    stock = model.generate(**batch, **kw)
    hf_paged.enable(model, num_blocks=64)
    try:
        paged = model.generate(**batch, **kw)
        assert torch.equal(stock, paged)
        allocator = model._hf_paged_state.pool.allocator  # created by this generate: its peak is this run's
        # 8 beams of <= 48 tokens: 24 blocks if each beam copied its prompt; shared, the prompt blocks
        # are held once per prompt and beams add only their own last blocks.
        assert allocator.peak_used <= 3 + 3 + 8 * 2 < 24
        assert allocator.is_whole()

        # num_return_sequences expands the prompts the same way: 2 full blocks stored once per prompt,
        # and each of the 8 samples copies only the partly filled third block when it first writes it.
        kw = dict(max_new_tokens=8, do_sample=True, num_return_sequences=4, top_k=20)
        torch.manual_seed(7)
        paged = model.generate(**batch, **kw)
        allocator.reset_peak()
        torch.manual_seed(7)
        assert torch.equal(model.generate(**batch, **kw), paged)
        assert allocator.peak_used <= 2 + 2 + 8 < 24
        assert allocator.is_whole()
    finally:
        hf_paged.disable(model)
    torch.manual_seed(7)
    assert torch.equal(model.generate(**batch, **kw), paged)
