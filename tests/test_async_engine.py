"""The online engine on CPU with a tiny float64 Llama: requests that join, stream and are cancelled
while the engine runs, failures that reach every caller, admission control, shutdown.

Greedy outputs are checked against stock ``model.generate`` on each prompt alone; seeded samples
against the same request run alone (their noise depends only on seed and position).
"""

from __future__ import annotations

import asyncio
import functools
import threading

import pytest
import torch
from models import VOCAB, make_model
from test_generator import char_tokenizer

from hf_paged import AsyncEngine, EngineDeadError, EngineOverloadedError, SamplingParams
from hf_paged.entrypoints.generator import ContinuousGenerator

TIMEOUT = 120  # seconds: every test bounds its waits, so a hang fails instead of blocking CI


@functools.cache
def llama():
    return make_model("llama")


def prompts(n: int, seed: int, lo: int = 3, hi: int = 24) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in lengths]


def stock_greedy(model, prompt: list[int], new: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)
    return out[0, len(prompt) :].tolist()


async def collect(stream) -> dict[int, list]:
    """sample -> [token ids, finish_reason, text]."""
    out: dict[int, list] = {}
    async for event in stream:
        entry = out.setdefault(event.sample, [[], None, ""])
        entry[0].extend(event.token_ids)
        entry[2] += event.text or ""
        if event.finished:
            entry[1] = event.finish_reason
    return out


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def new_engine(model=None, tokenizer=None, **kw) -> AsyncEngine:
    kw.setdefault("num_blocks", 128)
    return AsyncEngine(model if model is not None else llama(), tokenizer, **kw)


# ---- many concurrent requests, some cancelled ------------------------------------------------------


def test_concurrent_requests_with_cancellations_and_forks():
    model = llama()
    ps = prompts(44, seed=1)
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    seeded = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=20, seed=7, n=2)
    long = SamplingParams(max_new_tokens=200, temperature=0.8, seed=3, ignore_eos=True)
    kinds = ["cancel" if i % 9 == 4 else "fork" if i % 4 == 1 else "greedy" for i in range(len(ps))]
    params = {"cancel": long, "fork": seeded, "greedy": greedy}
    cancelled_by_task = {i for i, k in enumerate(kinds) if k == "cancel" and i % 2 == 0}

    # Seeded samples must equal the same request run alone, offline.
    solo = ContinuousGenerator(model, num_blocks=128, progress=False)
    fork_refs = {i: [s.token_ids for s in solo.generate([ps[i]], seeded)[0].samples] for i, k in enumerate(kinds) if k == "fork"}

    engine = new_engine(model, max_num_seqs=16)

    async def main():
        results: dict[int, dict] = {}
        started: dict[int, asyncio.Event] = {i: asyncio.Event() for i in range(len(ps))}

        async def consume(i):
            out: dict[int, list] = {}
            async for event in engine.generate(ps[i], params[kinds[i]], request_id=f"r{i}"):
                out.setdefault(event.sample, [[], None])[0].extend(event.token_ids)
                if event.token_ids:
                    started[i].set()
                if event.finished:
                    out[event.sample][1] = event.finish_reason
            results[i] = out

        tasks = {}
        for i in range(len(ps)):
            tasks[i] = asyncio.create_task(consume(i))
            await asyncio.sleep(0)  # arrivals spread over the engine's steps
        for i, kind in enumerate(kinds):
            if kind != "cancel":
                continue
            await started[i].wait()  # mid-stream: it has produced tokens and is still running
            if i in cancelled_by_task:
                tasks[i].cancel()
            else:
                await engine.abort(f"r{i}")
        done = await asyncio.gather(*tasks.values(), return_exceptions=True)
        return results, dict(zip(tasks, done))

    try:
        results, outcomes = run(main())
        for i, kind in enumerate(kinds):
            if i in cancelled_by_task:
                assert isinstance(outcomes[i], asyncio.CancelledError), f"request {i}: {outcomes[i]!r}"
                continue
            assert outcomes[i] is None, f"request {i} raised {outcomes[i]!r}"
            out = results[i]
            if kind == "greedy":
                assert out[0][0] == stock_greedy(model, ps[i], 10), f"request {i}"
            elif kind == "fork":
                assert [out[k][0] for k in range(2)] == fork_refs[i], f"request {i}"
            else:
                assert out[0][1] == "abort" and 0 < len(out[0][0]) < 200, f"request {i}: {out[0][1]}, {len(out[0][0])} tokens"

        def settled():
            s = engine.stats
            return s.running == 0 and s.waiting == 0 and s.kv_blocks_used == 0

        run(_wait_for(settled))
        assert engine.core.pool.allocator.is_whole()
        stats = engine.stats
        assert stats.finished.get("abort") == kinds.count("cancel")
        assert stats.steps_scheduled_ahead > 0  # cancellations landed while decode steps were queued ahead

        # Every id is reusable once its request ended (cancelled ones included).
        async def reuse():
            return await collect(engine.generate(ps[4], greedy, request_id="r4"))

        assert run(reuse())[0][0] == stock_greedy(model, ps[4], 10)
    finally:
        engine.shutdown()


async def _wait_for(predicate, timeout: float = 30.0):
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# ---- arrival-order invariance ---------------------------------------------------------------------


def test_outputs_do_not_depend_on_what_else_runs():
    model = llama()
    target, other = prompts(2, seed=5, lo=10, hi=30)
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    seeded = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    crowd = prompts(100, seed=6)
    crowd_params = SamplingParams(max_new_tokens=4, temperature=0.7)
    engine = new_engine(model, num_blocks=256, max_num_seqs=32, max_num_batched_tokens=64)

    async def alone():
        return await collect(engine.generate(target, greedy)), await collect(engine.generate(other, seeded))

    async def in_the_middle():
        tasks = [asyncio.create_task(collect(engine.generate(p, crowd_params))) for p in crowd[:50]]
        await asyncio.sleep(0.05)
        mine = [asyncio.create_task(collect(engine.generate(target, greedy))), asyncio.create_task(collect(engine.generate(other, seeded)))]
        tasks += [asyncio.create_task(collect(engine.generate(p, crowd_params))) for p in crowd[50:]]
        out = await asyncio.gather(*mine)
        await asyncio.gather(*tasks)
        return out

    try:
        g_alone, s_alone = run(alone())
        engine.core.pool.allocator.clear_cache()  # the crowd run computes everything again
        g_crowd, s_crowd = run(in_the_middle())
        assert g_alone[0][0] == g_crowd[0][0] == stock_greedy(model, target, 12)
        assert s_alone[0][0] == s_crowd[0][0] and len(s_alone[0][0]) > 0
        assert engine.stats.steps > 10
    finally:
        engine.shutdown()


# ---- failures -------------------------------------------------------------------------------------


def test_a_failing_step_reaches_every_caller_and_marks_the_engine_dead():
    engine = new_engine(max_num_seqs=4)
    execute = engine.core.runner.execute
    calls = {"n": 0}

    def failing(batch, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("injected CUDA error")
        return execute(batch, *args, **kwargs)

    engine.core.runner.execute = failing
    params = SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True)

    async def main():
        tasks = [asyncio.create_task(collect(engine.generate(p, params))) for p in prompts(8, seed=2)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        outcomes = run(main())
        assert all(isinstance(o, EngineDeadError) for o in outcomes), outcomes  # queued ones too
        assert all("injected CUDA error" in repr(o.__cause__) for o in outcomes)
        assert not engine.is_healthy and isinstance(engine.error, RuntimeError)

        async def again():
            engine.generate([5, 6, 7], params)

        with pytest.raises(EngineDeadError, match="injected"):
            run(again())
        assert engine.stats.kv_blocks_used == 0
    finally:
        engine.shutdown()


def test_bad_input_is_refused_before_any_work_and_names_the_field():
    engine = new_engine()

    async def submit(*args, **kw):
        return engine.generate(*args, **kw)

    try:
        with pytest.raises(ValueError, match="token id"):
            run(submit([5, VOCAB + 3]))
        with pytest.raises(ValueError, match="empty"):
            run(submit([]))
        with pytest.raises(TypeError, match="sampling_params"):
            run(submit([5, 6], {"max_new_tokens": 3}))
        with pytest.raises(TypeError, match="request_id"):
            run(submit([5, 6], request_id=7))
        with pytest.raises(ValueError, match="no tokenizer"):
            run(submit("hello"))

        async def duplicate():
            params = SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True)
            first = engine.generate([5, 6, 7], params, request_id="same")
            with pytest.raises(ValueError, match="in use"):
                engine.generate([5, 6, 7], params, request_id="same")
            return await collect(first)

        assert len(run(duplicate())[0][0]) == 50
        assert engine.is_healthy and engine.stats.kv_blocks_used == 0
    finally:
        engine.shutdown()


def test_overload_is_refused_at_once_while_accepted_requests_finish():
    engine = new_engine(max_num_seqs=1, max_queued_requests=3)
    long = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)

    async def main():
        first = engine.generate([5, 6, 7], long)
        it = first.__aiter__()
        await it.__anext__()  # running now: the queue is empty
        accepted = [engine.generate([8 + i, 9], long) for i in range(3)]
        with pytest.raises(EngineOverloadedError, match="max_queued_requests=3"):
            engine.generate([20, 21], long)
        rest = [e async for e in it]
        outs = await asyncio.gather(*(collect(s) for s in accepted))
        later = await collect(engine.generate([20, 21], long))  # room again
        return rest, outs, later

    try:
        rest, outs, later = run(main())
        assert rest[-1].finished and all(len(o[0][0]) == 40 for o in outs) and len(later[0][0]) == 40
    finally:
        engine.shutdown()


# ---- lifetime -------------------------------------------------------------------------------------


def shutdown_drains_then_refuses(engine: AsyncEngine, prompt_list: list[list[int]], while_running=lambda: None) -> None:
    """Start every prompt (30 tokens each), shut down while they run: each still gets all 30 tokens, and a new
    request after the shutdown is refused. ``while_running`` is called once, before the shutdown."""
    params = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)

    async def main():
        tasks = [asyncio.create_task(collect(engine.generate(p, params))) for p in prompt_list]
        await asyncio.sleep(0.05)
        while_running()
        await asyncio.to_thread(engine.shutdown, 60.0)
        outs = await asyncio.gather(*tasks)
        with pytest.raises(EngineDeadError, match="shut down"):
            engine.generate([5, 6], params)
        return outs

    outs = run(main())
    assert all(o[0][1] == "length" and len(o[0][0]) == 30 for o in outs)
    assert not engine.is_healthy


def test_shutdown_drains_in_flight_requests_then_refuses_new_ones():
    import gc

    frozen_before = gc.get_freeze_count()
    engine = new_engine(max_num_seqs=4)

    def frozen_while_running():
        assert gc.get_freeze_count() > frozen_before

    shutdown_drains_then_refuses(engine, prompts(6, seed=3), frozen_while_running)
    assert not engine._backend.is_alive()
    # The step loop froze the objects older than it for its life (no collector pauses over the model), and
    # gave them back to the collector when it stopped.
    assert gc.get_freeze_count() == frozen_before
    engine.shutdown()  # idempotent


def test_shutdown_timeout_aborts_what_is_left():
    engine = new_engine(max_num_seqs=2)
    params = SamplingParams(max_new_tokens=10_000 // 16, temperature=0, ignore_eos=True)

    async def main():
        tasks = [asyncio.create_task(collect(engine.generate(p, params))) for p in prompts(4, seed=4)]
        await asyncio.sleep(0.05)
        await asyncio.to_thread(engine.shutdown, 0.0)
        return await asyncio.gather(*tasks)

    outs = run(main())
    assert all(o[0][1] == "abort" for o in outs)
    assert not engine._backend.is_alive()


def test_async_with_and_request_metrics():
    seen = []

    async def main():
        async with new_engine(tokenizer=char_tokenizer()) as engine:
            engine.add_request_listener(seen.append)
            stop = SamplingParams(max_new_tokens=30, temperature=0, stop=["~"], ignore_eos=True)
            plain = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
            a = await collect(engine.generate("hello", plain, request_id="plain"))
            b = await collect(engine.generate("hello", stop, request_id="stop"))
            return engine, a, b

    engine, a, b = run(main())
    tok = char_tokenizer()
    assert a[0][2] == tok.decode(a[0][0], skip_special_tokens=True)  # text deltas add up to the text
    assert "~" not in b[0][2]
    by_id = {m.request_id: m for m in seen}
    m = by_id["plain"]
    assert m.finish_reason == "length" and m.num_generation_tokens == 12 and m.num_prompt_tokens == len(tok("hello").input_ids)
    assert 0 <= m.queue_time_s <= m.ttft_s <= m.e2e_s and len(m.inter_token_latencies_s) == 11
    assert not engine._backend.is_alive()


def test_engine_options_are_explicit():
    engine = new_engine()
    try:
        with pytest.raises(RuntimeError, match="running asyncio event loop"):
            engine.generate([5, 6])
    finally:
        engine.shutdown()
    with pytest.raises(TypeError, match="blok_size"):
        AsyncEngine(llama(), blok_size=16)
    with pytest.raises(ValueError, match="max_queued_requests"):
        AsyncEngine(llama(), max_queued_requests=0)


def test_generate_can_be_called_from_several_event_loops_in_threads():
    engine = new_engine(max_num_seqs=8)
    params = SamplingParams(max_new_tokens=6, temperature=0)
    ps = prompts(4, seed=9)
    outs: dict[int, list[int]] = {}

    async def one(i):
        return await collect(engine.generate(ps[i], params))

    def worker(i):
        outs[i] = asyncio.run(one(i))[0][0]

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert all(outs[i] == stock_greedy(llama(), ps[i], 6) for i in range(4))
    finally:
        engine.shutdown()


def test_a_failing_listener_does_not_stop_the_engine(caplog):
    engine = new_engine()

    def broken(metrics):
        raise RuntimeError("listener bug")

    engine.add_request_listener(broken)
    params = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)

    async def two():
        return [await collect(engine.generate([5, 6, 7], params)) for _ in range(2)]

    try:
        outs = run(two())
        assert all(len(o[0][0]) == 5 for o in outs) and engine.is_healthy
        assert "listener bug" in caplog.text
    finally:
        engine.shutdown()
