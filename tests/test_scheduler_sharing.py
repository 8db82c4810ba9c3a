"""Shared blocks in the scheduler, on CPU with the fake model: prefix caching, forks, copy-on-write, windows.

The fake model writes tokens into pool slots and samples a hash of what the block tables let it read
back, so a shared block with the wrong contents, a missed copy or a freed block still in use changes
the outputs. Every test compares against the same requests run with no sharing at all.
"""

from __future__ import annotations

import pytest
from test_scheduler import BS, FakePagedModel, make_request, make_scheduler

from hf_paged.engine.request import Request

SEED = "fake-model"


def run(sched, groups: list[list[Request]], model=None, on_step=None) -> dict[int, list[int]]:
    """Run request groups (first = the one computing the prompt, rest = its forked samples); outputs by id."""
    model = model or FakePagedModel()
    for first, *samples in groups:
        sched.add(first, samples)
    steps = 0
    while sched.has_unfinished():
        batch = sched.schedule()
        check_ownership(sched)
        sched.update(batch, model.step(batch))
        if on_step:
            on_step(sched, batch)
        steps += 1
        assert steps < 10_000
    assert sched.allocator.is_whole(), "a reference count is not back to zero"
    return {r.request_id: r.output_token_ids for g in groups for r in g}


def check_ownership(sched) -> None:
    """Reference counts equal the number of sequences holding each block (exact freeing)."""
    holders: dict[int, int] = {}
    for r in [*sched.running, *sched.waiting]:
        for b in r.block_ids[r.num_released_blocks :]:
            holders[b] = holders.get(b, 0) + 1
    for b, n in holders.items():
        assert sched.allocator.ref_count(b) == n, f"block {b}: {n} holders, ref_count {sched.allocator.ref_count(b)}"
    assert sum(holders.values()) >= sched.allocator.num_used == len(holders)


def with_prompt(rid: int, prompt: list[int], sample: int = 0, **params) -> Request:
    r = make_request(rid, len(prompt), **params)
    r.token_ids, r.sample = list(prompt), sample
    return r


PREFIX = [11 + i % 40 for i in range(3 * BS + 2)]  # ends inside a block


def prompts_sharing_prefix(count: int, tail: int = 5) -> list[list[int]]:
    return [PREFIX + [60 + (7 * k + i) % 30 for i in range(tail)] for k in range(count)]


@pytest.mark.parametrize("num_blocks", [64, 12])  # 12: cached blocks are evicted mid-run
def test_prefix_caching_reuses_full_blocks_and_changes_no_output(num_blocks):
    prompts = prompts_sharing_prefix(6) + [PREFIX[: 2 * BS]]  # the last one is all cached but its last block
    make = lambda: [[with_prompt(i, p, max_new_tokens=9)] for i, p in enumerate(prompts)]  # noqa: E731
    plain = run(make_scheduler(num_blocks=num_blocks, max_num_seqs=2), make())
    sched = make_scheduler(num_blocks=num_blocks, max_num_seqs=2, prefix_cache_seed=SEED)
    model = FakePagedModel()  # one model = one pool's contents across runs
    groups = make()
    assert run(sched, groups, model) == plain
    # Requests admitted after the first share its 3 full prefix blocks; at least one token is computed.
    hits = [g[0].num_cached_tokens for g in groups]
    assert hits[0] == 0 and hits[-1] == BS and all(h == 3 * BS for h in hits[2:-1])
    if num_blocks == 64:
        assert sched.num_cached_tokens == sum(hits) and sched.num_queried_tokens == sum(map(len, prompts))
    else:  # (a preempted request is looked up again when readmitted)
        assert sched.allocator.num_evictions > 0 and sched.num_queried_tokens >= sum(map(len, prompts))
    # The cache outlives the run: the same prompt again finds all its full blocks, its own tail's too.
    again = make()
    assert run(sched, again, model) == plain
    if num_blocks == 64:
        assert again[0][0].num_cached_tokens == (len(prompts[0]) - 1) // BS * BS


def test_requests_wait_one_step_for_a_prefix_being_computed():
    """Equal prompts submitted together: the first computes the prefix, the rest find it next step."""
    prompts = prompts_sharing_prefix(5, tail=2)
    sched = make_scheduler(prefix_cache_seed=SEED)
    groups = [[with_prompt(i, p, max_new_tokens=3)] for i, p in enumerate(prompts)]
    first_steps = []
    run(sched, groups, on_step=lambda s, b: first_steps.append([r.request.request_id for r in b.requests]))
    assert first_steps[0] == [0] and sorted(first_steps[1]) == [0, 1, 2, 3, 4]
    assert [g[0].num_cached_tokens for g in groups] == [0] + [3 * BS] * 4


def test_preempted_request_finds_its_own_blocks_in_the_cache():
    prompts = [[13 + (k * 5 + i) % 70 for i in range(10)] for k in range(5)]
    make = lambda: [[with_prompt(i, p, max_new_tokens=14)] for i, p in enumerate(prompts)]  # noqa: E731
    plain = run(make_scheduler(num_blocks=16), make())
    sched = make_scheduler(num_blocks=16, prefix_cache_seed=SEED)
    assert run(sched, make()) == plain
    assert sched.num_preemptions > 0 and sched.num_cached_tokens > 0


@pytest.mark.parametrize("prompt_len", [9, 8, 1])  # last prompt token inside a block, at a block start, alone
@pytest.mark.parametrize("caching", [False, True])
def test_forked_samples_share_the_prompt_and_copy_only_the_partial_block(prompt_len, caching):
    prompt = [20 + i for i in range(prompt_len)]
    seed = SEED if caching else None
    independent = [[with_prompt(k, prompt, max_new_tokens=6)] for k in range(4)]
    plain = run(make_scheduler(), independent)
    copies = []
    sched = make_scheduler(prefix_cache_seed=seed)
    group = [with_prompt(k, prompt, sample=k, max_new_tokens=6) for k in range(4)]
    peak = []
    out = run(sched, [group], on_step=lambda s, b: (copies.extend(b.block_copies), peak.append(s.allocator.num_used)))
    assert out == plain
    assert sched.num_forked_samples == 3
    context = prompt_len - 1
    if context % BS:  # the samples and the first one all write the shared partial block: 3 of 4 copy it
        assert len(copies) == 3
    else:
        assert copies == []
    # Prompt blocks are held once, not four times.
    assert max(peak) <= -(-context // BS) + 4 * -(-(prompt_len + 6 - context) // BS)


def test_fork_survives_preemption_of_the_first_sample():
    prompt = [30 + i for i in range(13)]
    plain = run(make_scheduler(), [[with_prompt(k, prompt, max_new_tokens=12)] for k in range(3)])
    # 3 samples of 13 + 12 tokens need 3 * 7 blocks alone; 9 blocks force preemptions around the fork.
    sched = make_scheduler(num_blocks=9)
    out = run(sched, [[with_prompt(k, prompt, sample=k, max_new_tokens=12) for k in range(3)]])
    assert out == plain and sched.num_preemptions > 0


@pytest.mark.parametrize("caching", [False, True])
def test_sliding_window_frees_blocks_behind_the_window(caching):
    window = 6
    prompts = [[40 + (k + i) % 30 for i in range(n)] for k, n in enumerate([3, 21, 9])]
    make = lambda: [[with_prompt(i, p, max_new_tokens=30)] for i, p in enumerate(prompts)]  # noqa: E731
    plain = run(make_scheduler(max_num_batched_tokens=8), make(), model=FakePagedModel(window))
    most_held = []

    def held(sched, batch):
        most_held.append(max((len(r.block_ids) - r.num_released_blocks for r in sched.running), default=0))
        for r in sched.running:  # every block the next query can see is still held
            first_visible = max(0, r.num_computed_tokens - window + 1)
            assert r.num_released_blocks <= first_visible // BS

    # A small pool reuses released blocks at once: releasing one still in the window would show.
    sched = make_scheduler(
        num_blocks=12, max_num_batched_tokens=8, sliding_window=window, prefix_cache_seed=SEED if caching else None
    )
    assert run(sched, make(), model=FakePagedModel(window), on_step=held) == plain
    assert sched.num_preemptions == 0
    # A request holds the blocks of its window plus the ones this step's chunk (<= 8 tokens) needs.
    assert max(most_held) <= -(-(window + 8) // BS) + 1
    assert max(most_held) < -(-(21 + 30) // BS)
