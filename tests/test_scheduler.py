"""Scheduler tests on CPU with fake step outputs (no torch, no model).

``FakePagedModel`` stands in for the model runner: it writes each scheduled token into a dict keyed
by pool slot (through the request's block table, exactly like the real K/V writer) and "samples" a
token that is a hash of everything the request's block table lets it read back. Wrong block tables,
missed recomputation or lost tokens therefore change the outputs.
"""

from __future__ import annotations

import random

import pytest

from hf_paged.memory.block_allocator import BlockAllocator
from hf_paged.engine.request import IncrementalDetokenizer, Request, RequestStatus
from hf_paged.engine.sampling_params import SamplingParams
from hf_paged.engine.scheduler import ScheduledBatch, Scheduler

BS = 4  # small blocks: many block boundaries in short tests
EOS = 2


def make_request(rid: int, prompt_len: int, **params) -> Request:
    prompt = [10 + (rid * 7 + i) % 50 for i in range(prompt_len)]
    return Request(rid, rid, 0, prompt_len, list(prompt), SamplingParams(**params), seed=rid, arrival_time=0.0)


def make_scheduler(num_blocks=64, max_num_seqs=16, max_num_batched_tokens=64, **kw) -> Scheduler:
    return Scheduler(
        BlockAllocator(num_blocks),
        BS,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        eos_token_ids=[EOS],
        **kw,
    )


class FakePagedModel:
    """Writes tokens into 'slots' and samples from what it reads back through the block tables.

    Like the real runner it first applies the batch's copy-on-write block copies; with ``window`` it
    reads only the last ``window`` positions, like sliding-window attention. ``tables``: each request's
    block table as the step was launched with (default: its blocks now).
    """

    def __init__(self, window: int | None = None) -> None:
        self.slots: dict[int, int] = {}
        self.window = window

    def step(self, batch: ScheduledBatch, tables: list[list[int]] | None = None) -> list[int]:
        for src, dst in batch.block_copies:
            for i in range(BS):
                if src * BS + i in self.slots:
                    self.slots[dst * BS + i] = self.slots[src * BS + i]
        out = []
        for k, s in enumerate(batch.requests):
            r = s.request
            table = r.block_ids if tables is None else tables[k]
            for pos in range(s.context_len, s.seq_len):
                self.slots[table[pos // BS] * BS + pos % BS] = r.token_ids[pos]
            if s.samples:
                first = 0 if self.window is None else max(0, s.seq_len - self.window)
                seen = tuple(self.slots[table[p // BS] * BS + p % BS] for p in range(first, s.seq_len))
                out.append(3 + hash(seen) % 90)  # never EOS (2)
        return out


def check_invariants(sched: Scheduler, batch: ScheduledBatch) -> None:
    assert batch.num_scheduled_tokens <= sched.max_num_batched_tokens
    assert batch.num_scheduled_tokens == sum(s.num_scheduled_tokens for s in batch.requests)
    assert len(sched.running) <= sched.max_num_seqs
    owned = [b for r in sched.running for b in r.block_ids]
    assert len(owned) == len(set(owned)) == sched.allocator.num_used
    for s in batch.requests:
        assert s.num_scheduled_tokens > 0
        assert len(s.request.block_ids) == -(-s.seq_len // BS)  # exactly the blocks this step needs
    assert all(not r.block_ids for r in sched.waiting)


def run_to_completion(sched: Scheduler, requests: list[Request], model=None) -> list[ScheduledBatch]:
    model = model or FakePagedModel()
    for r in requests:
        sched.add(r)
    batches = []
    while sched.has_unfinished():
        batch = sched.schedule()
        check_invariants(sched, batch)
        sched.update(batch, model.step(batch))
        batches.append(batch)
        assert len(batches) < 10_000
    assert sched.allocator.is_whole()
    return batches


def test_budget_respected_and_prompt_chunked():
    sched = make_scheduler(max_num_batched_tokens=10)
    req = make_request(0, 25, max_new_tokens=3)
    batches = run_to_completion(sched, [req])
    plan = [(b.requests[0].context_len, b.requests[0].num_scheduled_tokens, b.requests[0].samples) for b in batches]
    assert plan == [(0, 10, False), (10, 10, False), (20, 5, True), (25, 1, True), (26, 1, True)]
    assert req.num_output_tokens == 3 and req.finish_reason == "length"


def test_decodes_and_prompt_chunks_mix_in_one_step():
    sched = make_scheduler(max_num_batched_tokens=8)
    a = make_request(0, 3, max_new_tokens=10)
    sched.add(a)
    first = sched.schedule()
    sched.update(first, FakePagedModel().step(first))
    b = make_request(1, 20, max_new_tokens=2)
    sched.add(b)
    batch = sched.schedule()
    # Running decode first (1 token), then the waiting prompt's first chunk fills the budget.
    assert [(s.request.request_id, s.num_scheduled_tokens, s.samples) for s in batch.requests] == [(0, 1, True), (1, 7, False)]
    assert batch.num_scheduled_tokens == 8


def test_waiting_requests_fifo_and_max_num_seqs():
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=100)
    reqs = [make_request(i, 5, max_new_tokens=4) for i in range(5)]
    for r in reqs:
        sched.add(r)
    batch = sched.schedule()
    assert [s.request.request_id for s in batch.requests] == [0, 1]
    batches = [batch]
    model = FakePagedModel()
    sched.update(batch, model.step(batch))
    while sched.has_unfinished():
        batch = sched.schedule()
        check_invariants(sched, batch)
        assert len(batch.requests) <= 2
        sched.update(batch, model.step(batch))
        batches.append(batch)
    admitted = []
    for b in batches:
        for s in b.requests:
            if s.context_len == 0:
                admitted.append(s.request.request_id)
    assert admitted == [0, 1, 2, 3, 4]
    assert sched.allocator.is_whole()


def test_blocks_freed_when_request_finishes():
    sched = make_scheduler()
    a = make_request(0, 6, max_new_tokens=1)
    b = make_request(1, 6, max_new_tokens=5)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    used = sched.allocator.num_used
    assert used == 4  # 2 blocks each
    finished = [r for r in sched.update(batch, [50, 51]) if r.finished]
    assert finished == [a] and a.block_ids == [] and a.status is RequestStatus.FINISHED
    assert sched.allocator.num_used == 2  # a's blocks are back at once
    assert sched.running == [b]


def test_preemption_lifo_front_of_queue_and_recompute():
    # 3 blocks of 4 tokens; three 4-token prompts fill the pool, then every decode needs a new block.
    sched = make_scheduler(num_blocks=3)
    a, b, c = (make_request(i, 4, max_new_tokens=2) for i in range(3))
    for r in (a, b, c):
        sched.add(r)
    model = FakePagedModel()
    step1 = sched.schedule()
    assert [s.request for s in step1.requests] == [a, b, c]
    sched.update(step1, model.step(step1))

    step2 = sched.schedule()
    # a needs a block: c (most recent) is preempted; b then needs one and is the last left: preempted too.
    assert [s.request for s in step2.requests] == [a]
    assert list(sched.waiting) == [b, c]  # older first, at the front of the queue
    assert sched.num_preemptions == 2 and sched.num_recomputed_tokens == 8
    assert b.num_computed_tokens == c.num_computed_tokens == 0 and b.num_output_tokens == 1
    sched.update(step2, model.step(step2))
    assert a.finished

    step3 = sched.schedule()
    # b is recomputed: prompt + its generated token in one chunk, which samples the next token.
    (sb,) = step3.requests
    assert sb.request is b and sb.context_len == 0 and sb.num_scheduled_tokens == 5 and sb.samples
    sched.update(step3, model.step(step3))
    while sched.has_unfinished():
        batch = sched.schedule()
        check_invariants(sched, batch)
        sched.update(batch, model.step(batch))
    assert sched.allocator.is_whole()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outputs_unchanged_under_preemption(seed):
    rng = random.Random(seed)
    specs = [(rng.randint(1, 30), rng.randint(1, 12)) for _ in range(12)]

    def run(num_blocks, budget):
        sched = make_scheduler(num_blocks=num_blocks, max_num_batched_tokens=budget, max_num_seqs=8)
        reqs = [make_request(i, p, max_new_tokens=m) for i, (p, m) in enumerate(specs)]
        run_to_completion(sched, reqs)
        return [r.output_token_ids for r in reqs], sched

    roomy, s1 = run(num_blocks=200, budget=64)
    tight, s2 = run(num_blocks=11, budget=16)  # 11 blocks = 44 tokens: the longest request just fits
    assert s1.num_preemptions == 0 and s2.num_preemptions > 0 and s2.num_recomputed_tokens > 0
    assert tight == roomy
    assert [len(o) for o in roomy] == [m for _, m in specs]


def test_stop_conditions():
    sched = make_scheduler(max_model_len=12)
    eos = make_request(0, 3, max_new_tokens=10)
    ignore = make_request(1, 3, max_new_tokens=3, ignore_eos=True)
    stop_id = make_request(2, 3, max_new_tokens=10, stop_token_ids=(77,))
    ctx = make_request(3, 10, max_new_tokens=10)  # hits max_model_len after 2 tokens
    for r in (eos, ignore, stop_id, ctx):
        sched.add(r)
    script = {0: [5, EOS], 1: [EOS, EOS, EOS], 2: [76, 77], 3: [5, 6]}
    while sched.has_unfinished():
        batch = sched.schedule()
        out = [script[s.request.request_id][s.request.num_output_tokens] for s in batch.sampling]
        sched.update(batch, out)
    assert (eos.output_token_ids, eos.finish_reason) == ([5, EOS], "stop")
    assert (ignore.output_token_ids, ignore.finish_reason) == ([EOS, EOS, EOS], "length")
    assert (stop_id.output_token_ids, stop_id.finish_reason) == ([76, 77], "stop")
    assert (ctx.output_token_ids, ctx.finish_reason) == ([5, 6], "length")
    assert sched.allocator.is_whole()


class CharTokenizer:
    """decode(ids) = one character per id (ids < 3 are special and skipped)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i - 3) for i in ids if i >= 3)


def test_stop_string_cuts_text_and_ends_request():
    sched = make_scheduler()
    r = make_request(0, 3, max_new_tokens=20, stop=("cd",))
    r.detokenizer = IncrementalDetokenizer(CharTokenizer(), r.params.stop)
    sched.add(r)
    tokens = iter([3, 4, 5, 6, 7, 8])  # "a b c d e f"
    while sched.has_unfinished():
        batch = sched.schedule()
        sched.update(batch, [next(tokens) for _ in batch.sampling])
    assert r.output_token_ids == [3, 4, 5, 6]  # the token completing "cd" is kept
    assert r.finish_reason == "stop" and r.detokenizer.text == "ab"
    assert sched.allocator.is_whole()


def test_abort_all_frees_everything():
    sched = make_scheduler(max_num_batched_tokens=6)
    for i in range(4):
        sched.add(make_request(i, 5, max_new_tokens=5))
    batch = sched.schedule()
    assert sched.allocator.num_used > 0
    sched.abort_all()
    assert sched.allocator.is_whole() and not sched.has_unfinished()
    assert batch.requests[0].request.block_ids == []
