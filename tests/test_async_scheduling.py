"""Async scheduling: a decode step scheduled and queued before the previous step's tokens are read back.

Scheduler level (pure Python, fake outputs): ``Scheduler.schedule_ahead`` plus a driver that runs the
steps in the device's order (a step scheduled ahead computes after the previous one's tokens exist,
through the block tables of its launch) must give the same tokens, finish reasons and block
accounting as the synchronous loop, with requests stopping on end tokens mid-flight, preemption
and prefix caching (``FakePagedModel.step`` with the block tables of each step's launch: the device
reads its own copy; the host may free a finished request's blocks before the step computes). Engine level (tiny float64 models): ``ContinuousGenerator`` with and without it
gives identical outputs for greedy, seeded sampling, penalties, ``min_new_tokens``, logprobs, ``n``
samples, stop ids and stop strings, and greedy equals stock ``generate``.
"""

from __future__ import annotations

import random

import pytest
import torch
from models import make_model
from test_generator import GREEDY, NEW, assert_parity, char_tokenizer, make_prompts, model_and_refs, new_generator
from test_scheduler import FakePagedModel, make_request, make_scheduler

from hf_paged.engine.sampling_params import SamplingParams


def run_sync(sched, requests):
    model = FakePagedModel()
    for r in requests:
        sched.add(r)
    while sched.has_unfinished():
        batch = sched.schedule()
        assert batch.num_scheduled_tokens <= sched.max_num_batched_tokens
        sched.update(batch, model.step(batch, [list(s.request.block_ids) for s in batch.requests]))
    return 0


def run_ahead(sched, requests):
    """The engine's order: launch t+1 (schedule_ahead) before applying t; t+1 computes after t's tokens
    are appended (on the device its ids come straight from t's sampling)."""
    model = FakePagedModel()
    for r in requests:
        sched.add(r)
    ahead = None
    num_ahead = 0
    while sched.has_unfinished():
        if ahead is not None and all(s.request.finished for s in ahead[0].requests):
            ahead = None
        if ahead is None:
            batch = sched.schedule()
            assert batch.num_scheduled_tokens <= sched.max_num_batched_tokens
            launched = (batch, [list(s.request.block_ids) for s in batch.requests])
        else:
            launched = ahead
        nxt = sched.schedule_ahead(launched[0])
        ahead = None if nxt is None else (nxt, [list(s.request.block_ids) for s in nxt.requests])
        num_ahead += ahead is not None
        sched.update(launched[0], model.step(*launched))
    return num_ahead


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("tight", [False, True])
def test_scheduling_ahead_changes_nothing_but_the_order_of_host_work(seed, tight):
    rng = random.Random(seed)
    # Prompts share prefixes (prefix caching hits); stop ids end some requests while a step ahead runs.
    base = [10 + i % 40 for i in range(12)]
    specs = [(rng.randint(1, 30), rng.randint(1, 14), rng.random() < 0.5) for _ in range(14)]

    def run(driver):
        sched = make_scheduler(
            num_blocks=14 if tight else 200, max_num_batched_tokens=16 if tight else 64, max_num_seqs=6, prefix_cache_seed="m"
        )
        reqs = []
        for i, (n, m, shared) in enumerate(specs):
            r = make_request(i, n, max_new_tokens=m, stop_token_ids=(7, 19, 33, 48, 61))
            if shared:
                r.token_ids[: min(n, len(base))] = base[: min(n, len(base))]
            reqs.append(r)
        num_ahead = driver(sched, reqs)
        assert sched.allocator.is_whole() and not sched.running and not sched.waiting
        return [(r.output_token_ids, r.finish_reason) for r in reqs], sched, num_ahead

    sync, s1, _ = run(run_sync)
    ahead, s2, num_ahead = run(run_ahead)
    assert ahead == sync
    assert num_ahead > 0
    assert any(reason == "stop" for _, reason in sync) and any(reason == "length" for _, reason in sync)
    if tight:
        assert s2.num_preemptions > 0


def test_schedule_ahead_is_the_next_decode_step_or_nothing():
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=64)
    a, b = make_request(0, 3, max_new_tokens=5), make_request(1, 4, max_new_tokens=1)
    sched.add(a)
    sched.add(b)
    first = sched.schedule()  # both prompts, both sample
    ahead = sched.schedule_ahead(first)
    # b stops on length with this step's token: only a runs on.
    assert [(s.request, s.context_len, s.num_scheduled_tokens, s.samples) for s in ahead.requests] == [(a, 3, 1, True)]
    assert len(a.block_ids) == 1 and len(b.block_ids) == 1  # position 3 fits a's first block of 4
    sched.update(first, [50, 51])
    assert a.token_ids[-1] == 50 and not a.finished and b.finish_reason == "length"
    # a's next position (4) starts a new block: scheduling ahead of the ahead step allocates it.
    nxt = sched.schedule_ahead(ahead)
    assert [(s.context_len, s.samples) for s in nxt.requests] == [(4, True)] and len(a.block_ids) == 2
    sched.update(ahead, [52])
    assert a.num_computed_tokens == 4 and a.token_ids[-2:] == [50, 52]

    # Waiting requests that could be admitted: only schedule() decides the next step.
    sched.add(make_request(2, 3, max_new_tokens=3))
    assert sched.schedule_ahead(nxt) is None


def test_update_drops_the_token_of_a_request_that_ended_meanwhile():
    sched = make_scheduler()
    a, b = make_request(0, 3, max_new_tokens=9), make_request(1, 3, max_new_tokens=9)
    sched.add(a)
    sched.add(b)
    first = sched.schedule()
    ahead = sched.schedule_ahead(first)
    assert len(ahead.requests) == 2
    sched.update(first, [2, 40])  # a samples EOS: it finishes and gives its blocks back
    assert a.finished and a.finish_reason == "stop" and not a.block_ids
    # The step after the one queued ahead leaves the finished request out (no synchronous step needed).
    nxt = sched.schedule_ahead(ahead)
    assert [s.request for s in nxt.requests] == [b] and nxt.requests[0].context_len == 4
    sched.update(ahead, [41, 42])
    assert a.token_ids[-1] == 2 and b.token_ids[-2:] == [40, 42]
    sched.abort([b])  # b is aborted between steps, while ``nxt`` is queued
    assert sched.update(nxt, [43]) == []
    assert b.token_ids[-1] == 42 and sched.allocator.is_whole()


def test_schedule_ahead_declines_prompt_chunks_and_a_full_pool():
    sched = make_scheduler(max_num_batched_tokens=4)
    r = make_request(0, 10, max_new_tokens=3)
    sched.add(r)
    assert sched.schedule_ahead(sched.schedule()) is None  # a prompt chunk that does not sample

    sched = make_scheduler(num_blocks=1)
    r = make_request(0, 4, max_new_tokens=3)
    sched.add(r)
    batch = sched.schedule()  # 4 tokens fill the only block; the next position needs another
    assert sched.schedule_ahead(batch) is None and len(r.block_ids) == 1


# ---- the engine: identical outputs with and without --------------------------------------------------


def mixed_params() -> list[SamplingParams]:
    return [
        SamplingParams(max_new_tokens=16, temperature=0),
        SamplingParams(max_new_tokens=14, temperature=0.9, top_k=20, top_p=0.9, seed=3, logprobs=2),
        SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2),
        SamplingParams(max_new_tokens=15, temperature=1.1, min_p=0.05, seed=11, min_new_tokens=6, n=2),
        SamplingParams(max_new_tokens=20, temperature=0.8, seed=5, stop_token_ids=(10, 20, 30, 40, 50, 60, 70)),
        SamplingParams(max_new_tokens=18, temperature=0, stop=("e", "x", "Q")),
    ]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_outputs_identical_with_and_without_async_scheduling(name):
    model = make_model(name)
    prompts = make_prompts([5, 31, 12, 20, 9, 16], seed=4)
    params = mixed_params()

    def run(async_scheduling, **kw):
        gen = new_generator(model, char_tokenizer(), async_scheduling=async_scheduling, **kw)
        results = gen.generate(prompts, params)
        assert gen.pool.allocator.is_whole()
        return [(r.token_ids, r.finish_reason, r.text, r.logprobs, [(s.token_ids, s.finish_reason) for s in r.samples])
                for r in results], gen.stats

    sync, sync_stats = run(False)
    ahead, ahead_stats = run(True)
    assert ahead == sync
    assert sync_stats.steps_scheduled_ahead == 0 and ahead_stats.steps_scheduled_ahead > 0
    assert any(reason == "stop" for _, reason, *_ in sync)  # requests ended while a step ahead ran
    # A tight pool (preemption) and small steps (prompt chunks next to decodes): the same tokens (the
    # logprobs only to rounding: other batch shapes sum in another order).
    tight, tight_stats = run(True, num_blocks=10, max_num_batched_tokens=16, prefix_caching=False)
    assert tight_stats.preemptions > 0 and tight_stats.steps_scheduled_ahead > 0
    for (ids, reason, text, lps, samples), (ids2, reason2, text2, lps2, samples2) in zip(tight, sync):
        assert (ids, reason, text, samples) == (ids2, reason2, text2, samples2)
        assert (lps is None) == (lps2 is None)
        for a, b in zip(lps or [], lps2 or []):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-9)


def test_greedy_parity_with_stock_generate_scheduling_ahead():
    model, refs = model_and_refs("llama")
    gen = new_generator(model, async_scheduling=True)
    assert_parity(gen.generate(make_prompts(), GREEDY), refs, "llama")
    assert gen.stats.steps_scheduled_ahead > 0 and gen.pool.allocator.is_whole()


def test_a_step_queued_for_requests_that_all_stopped_is_dropped_by_the_next_run():
    model, refs = model_and_refs("llama")
    gen = new_generator(model)
    prompt = make_prompts()[1]
    stop_at = refs[1].index(refs[1][3]) + 1  # greedy stops at the first occurrence of its 4th token
    (out,) = gen.generate([prompt], SamplingParams(max_new_tokens=NEW, temperature=0, stop_token_ids=(refs[1][3],)))
    assert out.token_ids == refs[1][:stop_at] and out.finish_reason == "stop"
    assert gen.core._ahead is not None and all(r.finished for r in gen.core._ahead.sampling)
    assert_parity(gen.generate(make_prompts(), GREEDY), refs, "llama")  # the next run drops it first
    assert gen.pool.allocator.is_whole()


def test_async_scheduling_option_is_checked():
    with pytest.raises(ValueError, match="async_scheduling"):
        new_generator(make_model("llama"), async_scheduling="yes")


def test_stream_left_early_while_a_step_is_queued_ahead():
    model, _ = model_and_refs("llama")
    gen = new_generator(model)
    stream = gen.stream(make_prompts(), GREEDY)
    for _ in range(12):
        next(stream)
    assert gen.core._ahead is not None  # a decode step was queued when the caller left
    stream.close()
    assert gen.core._ahead is None and gen.pool.allocator.is_whole()
    # The generator is usable afterwards and still greedy-exact.
    _, refs = model_and_refs("llama")
    assert_parity(gen.generate(make_prompts(), GREEDY), refs, "llama")
    assert torch.is_tensor(gen.pool.kv)
