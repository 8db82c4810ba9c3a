"""Tensor parallelism on CPU: 2 processes over gloo, tiny random models loaded with transformers' TP plan.

Each model is built here, saved with ``save_pretrained`` and loaded in both processes with
``from_pretrained(path, tp_plan="auto")``: the weights become DTensor shards and the model's own
all-reduces run over gloo. Rank 0 runs ``enable()`` + ``generate`` (with rank 1 doing the same, as
transformers' TP requires), then a ``ContinuousGenerator`` and an ``AsyncEngine`` while rank 1 runs
``hf_paged.run_worker``. References come from the unsharded model in this process: stock ``generate``
one prompt at a time for greedy decoding, a single-process ``ContinuousGenerator`` for seeded
sampling (float64: the sharded sums round differently, and near-ties must not decide a token).

One spawn per architecture runs every check (process start-up and imports dominate the time).
"""

from __future__ import annotations

import asyncio
import functools
import time

import pytest
import torch
from models import VOCAB, make_model
from tp_harness import RankError, run_ranks, unwrap

ARCHS = ["llama", "qwen2"]
LENGTHS = [5, 23, 17, 40]
NEW = 12
NUM_BLOCKS = 40

pytestmark = pytest.mark.slow  # each spawn of 2 processes costs ~20 s of start-up on 2 cores


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


def greedy():
    from hf_paged import SamplingParams

    return SamplingParams(max_new_tokens=NEW, temperature=0.0)


def with_prompt_logprobs():
    from hf_paged import SamplingParams

    return SamplingParams(max_new_tokens=3, temperature=0.0, prompt_logprobs=2)


def logprob_table(results) -> list[list[tuple[int, float] | None]]:
    return [[None if e is None else (e.token_id, e.logprob) for e in r.prompt_logprobs] for r in results]


def sampled():
    from hf_paged import SamplingParams

    # n=2 forks the prompt's blocks (copy-on-write copies travel with the steps); seeded noise.
    return SamplingParams(max_new_tokens=NEW, temperature=1.0, top_k=20, n=2, seed=7)


def load_tp(path: str):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float64)
    model.generation_config.pad_token_id = 0
    return model


@functools.cache
def references(name: str, root: str) -> dict:
    """Save the model; stock greedy continuations (one prompt at a time) and single-process sampled ones."""
    from hf_paged import ContinuousGenerator

    model = make_model(name)
    path = f"{root}/{name}"
    model.save_pretrained(path)
    greedy_refs = []
    for p in prompts():
        out = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False)
        greedy_refs.append(out[0, len(p) :].tolist())
    with ContinuousGenerator(model, num_blocks=NUM_BLOCKS, progress=False) as gen:
        sampled_refs = [[s.token_ids for s in r.samples] for r in gen.generate(prompts(), sampled())]
        prompt_logprobs = logprob_table(gen.generate(prompts(), with_prompt_logprobs()))
    kv1 = None
    if name == "llama":  # a model whose single KV head two ranks cannot split
        model.config.num_key_value_heads = 1
        kv1 = f"{root}/llama_kv1"
        type(model)(model.config).to(torch.float64).save_pretrained(kv1)
    return {"path": path, "greedy": greedy_refs, "sampled": sampled_refs, "kv1": kv1, "prompt_logprobs": prompt_logprobs}


def _parity_rank(rank: int, path: str, kv1_path: str | None) -> dict:
    import hf_paged
    from hf_paged import AsyncEngine, ContinuousGenerator

    model = load_tp(path)
    out: dict = {"sharded_rows": model.model.layers[0].self_attn.k_proj.weight.to_local().shape[0]}

    # enable() + generate: every rank runs the same generate (transformers' TP contract).
    hf_paged.enable(model, num_blocks=NUM_BLOCKS)
    out["enable_single"] = []
    for p in prompts():
        ids = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False)
        out["enable_single"].append(ids[0, len(p) :].tolist())
    width = max(LENGTHS)
    batch = torch.zeros((len(LENGTHS), width), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts()):
        batch[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    out["enable_batch"] = ids[:, width:].tolist()
    out["enable_pool_heads"] = model._hf_paged_state.pool.layout.num_kv_heads
    hf_paged.disable(model)

    if rank != 0:
        for _ in range(4):  # the generator, the tight generators (recompute, swap), the engine
            hf_paged.run_worker(model)
        out["worker_sessions"] = 4
    else:
        with ContinuousGenerator(model, num_blocks=NUM_BLOCKS, progress=False) as gen:
            out["pool_heads"] = gen.pool.layout.num_kv_heads
            out["generator"] = [r.token_ids for r in gen.generate(prompts(), greedy())]
            out["sampled"] = [[s.token_ids for s in r.samples] for r in gen.generate(prompts(), sampled())]
        # A pool too small for every request at once, and 16-token chunks: preemption and chunked prefill.
        with ContinuousGenerator(model, num_blocks=8, max_num_batched_tokens=16, progress=False) as gen:
            out["tight"] = [r.token_ids for r in gen.generate(prompts(), greedy())]
            out["tight_preemptions"] = gen.stats.preemptions
            # Prompt logprobs add logit rows to chunked prefill steps: every rank must keep the same rows.
            out["prompt_logprobs"] = logprob_table(gen.generate(prompts(), with_prompt_logprobs()))
        # The same by swapping: preempted blocks go to host memory and back on every rank.
        tight = dict(num_blocks=8, max_num_batched_tokens=16, preemption_mode="swap", swap_space_gb=2**-10)
        with ContinuousGenerator(model, progress=False, **tight) as gen:
            out["swapped"] = [r.token_ids for r in gen.generate(prompts(), greedy())]
            out["swapped_in_blocks"] = gen.stats.swapped_in_blocks
        out["engine"] = asyncio.run(_engine_tokens(model))

    if kv1_path is not None:
        small = load_tp(kv1_path)
        for what, call in [
            ("enable", lambda: hf_paged.enable(small)),
            ("generator", lambda: ContinuousGenerator(small, num_blocks=8, progress=False)),
        ]:
            try:
                call()
                out[f"refused_{what}"] = None
            except ValueError as e:
                out[f"refused_{what}"] = str(e)
        out["kv1_enabled"] = hf_paged.is_enabled(small)
    return out


async def _engine_tokens(model) -> list[list[int]]:
    from hf_paged import AsyncEngine

    engine = AsyncEngine(model, None, num_blocks=NUM_BLOCKS)

    async def one(prompt):
        tokens = []
        async for event in engine.generate(prompt, greedy()):
            tokens += event.token_ids
        return tokens

    try:
        return list(await asyncio.gather(*(one(p) for p in prompts())))
    finally:
        engine.shutdown()


@functools.cache
def _parity_results(name: str, root: str) -> tuple[dict, list[dict]]:
    refs = references(name, root)
    return refs, [unwrap(r) for r in run_ranks(_parity_rank, refs["path"], refs["kv1"], timeout=240)]


@pytest.fixture(scope="module")
def tp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tp"))


@pytest.mark.parametrize("name", ARCHS)
def test_enable_generate_under_tp_matches_single_process(name, tp_root):
    refs, results = _parity_results(name, tp_root)
    heads = make_model(name).config.num_key_value_heads
    for rank, res in enumerate(results):
        assert res["sharded_rows"] == heads // 2 * 16, "the model was not loaded sharded"
        assert res["enable_pool_heads"] == heads // 2, f"rank {rank}'s pool holds {res['enable_pool_heads']} KV heads"
        assert res["enable_single"] == refs["greedy"], f"rank {rank} (one prompt at a time)"
        assert res["enable_batch"] == refs["greedy"], f"rank {rank} (left-padded batch)"


@pytest.mark.parametrize("name", ARCHS)
def test_generator_under_tp_matches_single_process(name, tp_root):
    refs, (r0, r1) = _parity_results(name, tp_root)
    assert r0["pool_heads"] == make_model(name).config.num_key_value_heads // 2
    assert r0["generator"] == refs["greedy"]
    assert r0["sampled"] == refs["sampled"], "seeded samples (n=2, forked blocks) differ from one process"
    assert r0["tight"] == refs["greedy"]
    assert r0["tight_preemptions"] > 0, "the tight pool was meant to preempt"
    for got, want in zip(r0["prompt_logprobs"], refs["prompt_logprobs"], strict=True):
        assert got[0] is None and want[0] is None and len(got) == len(want)
        assert [g[0] for g in got[1:]] == [w[0] for w in want[1:]]
        assert max(abs(g[1] - w[1]) for g, w in zip(got[1:], want[1:])) < 1e-9  # float64, sharded sums
    assert r0["swapped"] == refs["greedy"]
    assert r0["swapped_in_blocks"] > 0, "the tight pool was meant to swap"
    assert r1["worker_sessions"] == 4


@pytest.mark.parametrize("name", ARCHS)
def test_async_engine_under_tp_matches_single_process(name, tp_root):
    refs, (r0, _) = _parity_results(name, tp_root)
    assert r0["engine"] == refs["greedy"]


def test_tp_size_that_splits_a_kv_head_is_refused(tp_root):
    _, results = _parity_results("llama", tp_root)
    for rank, res in enumerate(results):
        for what in ("enable", "generator"):
            message = res[f"refused_{what}"]
            assert message is not None, f"rank {rank}: {what} accepted a TP size of 2 for 1 KV head"
            assert "tensor parallel size (2)" in message and "KV heads (1)" in message, message
        assert not res["kv1_enabled"]


# ---- failures ---------------------------------------------------------------------------------------


def _fail_on_call(model, call: int, message: str) -> None:
    """Make the last decoder layer raise on its ``call``-th forward (mid-step, between collectives)."""
    calls = [0]

    def hook(module, args):
        calls[0] += 1
        if calls[0] == call:
            raise RuntimeError(message)

    model.model.layers[-1].register_forward_pre_hook(hook)


def _worker_fails_rank(rank: int, path: str) -> str:
    import hf_paged
    from hf_paged import ContinuousGenerator

    model = load_tp(path)
    if rank == 1:
        _fail_on_call(model, 4, "injected failure on rank 1")
        hf_paged.run_worker(model)
        return "rank 1 returned"
    with ContinuousGenerator(model, num_blocks=NUM_BLOCKS, progress=False) as gen:
        try:
            gen.generate(prompts(), greedy())
        except hf_paged.TensorParallelError as e:
            try:
                gen.generate(prompts(), greedy())  # the group is gone: refused at once, no hang
            except hf_paged.TensorParallelError as again:
                return f"{e} | then: {again}"
        return "rank 0 finished"


def test_a_failing_worker_ends_rank_0_with_its_error(tp_root):
    path = references("llama", tp_root)["path"]
    r0, r1 = run_ranks(_worker_fails_rank, path)
    assert isinstance(r1, RankError) and r1.type_name == "RuntimeError" and "injected failure on rank 1" in r1.message
    assert isinstance(r0, str) and r0.startswith("rank 1 failed: RuntimeError: injected failure on rank 1"), r0
    assert "workers are gone" in r0


def _rank0_fails_rank(rank: int, path: str) -> str:
    import hf_paged
    from hf_paged import ContinuousGenerator

    model = load_tp(path)
    if rank == 1:
        hf_paged.run_worker(model, grace_s=2.0)
        return "rank 1 returned"
    _fail_on_call(model, 4, "injected failure on rank 0")
    gen = ContinuousGenerator(model, num_blocks=NUM_BLOCKS, progress=False)
    try:
        gen.generate(prompts(), greedy())
    except RuntimeError as e:
        # Stay alive: rank 1 is blocked in the model's all-reduce of this step, which rank 0 left.
        time.sleep(8)
        return f"{type(e).__name__}: {e}"
    return "rank 0 finished"


def test_rank_0_failing_mid_step_ends_the_worker(tp_root):
    path = references("llama", tp_root)["path"]
    r0, r1 = run_ranks(_rank0_fails_rank, path)
    assert r0 == "RuntimeError: injected failure on rank 0"
    # Blocked in a collective rank 0 never joins: the watchdog ends it after its grace period.
    assert isinstance(r1, RankError) and r1.message == "process exited with code 1", r1


# ---- hf-paged serve --tensor-parallel-size ----------------------------------------------------------


def _children(pid: int) -> dict[int, int]:
    """rank -> pid of the processes ``hf-paged serve --tensor-parallel-size`` started (Linux /proc)."""
    out = {}
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        for child in f.read().split():
            with open(f"/proc/{child}/environ", "rb") as env:
                fields = dict(kv.split(b"=", 1) for kv in env.read().split(b"\0") if b"=" in kv)
            out[int(fields[b"RANK"])] = int(child)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except FileNotFoundError:
        return False


def test_serve_tensor_parallel(tmp_path):
    """Two servers of 2 ranks each: greedy completions equal stock generate and SIGTERM drains and exits
    0; killing a worker ends the whole server with an error instead of leaving rank 0 up."""
    import os
    import signal

    import httpx
    from test_server import ROOT, ServerProcess  # the serve-process helper of the server tests
    from transformers import PreTrainedTokenizerFast

    from hf_paged.entrypoints.demo import load_model

    prompts_ = [[5, 6, 7, 8, 9, 10, 11], [300, 41, 2000, 17, 9]]
    model, _ = load_model(None, "cpu", torch.float64)
    model.generation_config.eos_token_id = model.config.eos_token_id  # what the server stops at
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(ROOT / "hf_paged" / "default_model"))
    expected = [model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, len(p) :].tolist() for p in prompts_]
    clean = ServerProcess("--tensor-parallel-size", "2", "--shutdown-timeout", "30")
    doomed = ServerProcess("--tensor-parallel-size", "2")
    try:
        for server in (clean.wait_ready(), doomed.wait_ready()):
            for p, want in zip(prompts_, expected):
                body = {"model": "hf-paged-default", "prompt": p, "max_tokens": 10, "temperature": 0}
                reply = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()
                assert reply["usage"]["completion_tokens"] == len(want), reply
                assert reply["choices"][0]["text"] == tokenizer.decode(want, skip_special_tokens=True)
        ranks = _children(clean.proc.pid)
        assert sorted(ranks) == [0, 1]
        clean.proc.send_signal(signal.SIGTERM)
        assert clean.proc.wait(timeout=120) == 0, "".join(clean.output)
        assert not any(_alive(pid) for pid in ranks.values())

        ranks = _children(doomed.proc.pid)
        os.kill(ranks[1], signal.SIGKILL)
        code = doomed.proc.wait(timeout=120)
        assert code != 0 and "rank 1 exited" in "".join(doomed.output)
        assert not _alive(ranks[0]), "rank 0 kept serving without its worker"
    finally:
        clean.stop()
        doomed.stop()
