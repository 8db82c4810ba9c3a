"""``AsyncEngine.from_spec``: the step loop in a child process that loads the model from a folder.

A tiny float64 Llama and a character tokenizer are saved with ``save_pretrained`` to a temporary
folder; the child loads them by path, the test process keeps only the tokenizer. Greedy outputs are
checked against stock ``model.generate`` on each prompt alone (the same folder loaded here). Failures:
the child killed with SIGKILL mid-stream, and a step that raises inside the child (a model folder whose
own code, loaded with ``trust_remote_code``, raises on one token id). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from models import make_model
from test_async_engine import collect, run, shutdown_drains_then_refuses
from test_generator import char_tokenizer

from hf_paged import AsyncEngine, EngineDeadError, EngineProcessError, ModelSpec, SamplingParams

TIMEOUT = 120  # seconds for any single wait

# A model folder's own code (loaded with trust_remote_code): a Llama whose forward raises when it sees
# token BOOM, as a CUDA error or a bug in a model's code would, in the middle of serving.
BOOM = 77
REMOTE_CODE = f'''
import transformers


class BoomConfig(transformers.LlamaConfig):
    model_type = "boom_llama"


class BoomForCausalLM(transformers.LlamaForCausalLM):
    config_class = BoomConfig

    def forward(self, input_ids=None, **kwargs):
        if input_ids is not None and bool((input_ids == {BOOM}).any()):
            raise RuntimeError("boom: token {BOOM} reached the model")
        return super().forward(input_ids=input_ids, **kwargs)
'''


def stock_greedy(model, prompt: list[int], new: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)[0, len(prompt) :].tolist()
    eos = model.generation_config.eos_token_id
    return out[: out.index(eos) + 1] if eos in out else out  # stock pads after EOS; the engine stops


def settled(engine: AsyncEngine) -> bool:
    s = engine.stats
    return s.running == 0 and s.waiting == 0 and s.kv_blocks_used == 0


async def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    make_model("llama").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine(folder):
    engine = AsyncEngine.from_spec(ModelSpec(str(folder), dtype="float64", device="cpu"), num_blocks=128, max_num_seqs=6)
    yield engine
    engine.shutdown(timeout=5)


def test_greedy_outputs_equal_stock_generate(engine, folder):
    assert engine.in_own_process and engine.model is None and engine.core is None
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    tok = engine.tokenizer
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 96, (int(n),), generator=g).tolist() for n in torch.randint(3, 30, (10,), generator=g)]
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    stop = SamplingParams(max_new_tokens=40, temperature=0, stop=["~"], ignore_eos=True)
    logprobs = SamplingParams(max_new_tokens=5, temperature=0, logprobs=2)

    async def main():
        tasks = [asyncio.create_task(collect(engine.generate(p, greedy, request_id=f"g{i}"))) for i, p in enumerate(prompts)]
        tasks.append(asyncio.create_task(collect(engine.generate("hello world", stop))))  # text made in the child
        first = engine.generate(prompts[0], logprobs)
        events = [e async for e in first]
        return await asyncio.gather(*tasks), events

    outs, lp_events = run(main())
    for i, p in enumerate(prompts):
        ids, reason, text = outs[i][0]
        assert ids == stock_greedy(model, p, 12), f"prompt {i}"
        assert text == tok.decode(ids, skip_special_tokens=True)  # made here, from the child's token ids
        assert reason in ("length", "stop")
    ids, reason, text = outs[-1][0]
    assert "~" not in text and (reason == "stop" or len(ids) == 40)
    assert [t for e in lp_events for t in e.token_ids] == stock_greedy(model, prompts[0], 12)[:5]
    entries = [lp for e in lp_events for lp in e.logprobs]
    assert len(entries) == 5 and all(len(lp.top) == 2 and lp.top[0][0] == lp.token_id for lp in entries)
    assert lp_events[0].num_prompt_tokens == len(prompts[0])
    run(wait_until(lambda: settled(engine), "the engine to go idle"))


def test_concurrent_requests_with_aborts_free_their_blocks(engine):
    long = SamplingParams(max_new_tokens=300, temperature=0.8, seed=3, ignore_eos=True)
    short = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    before = engine.stats.finished.get("abort", 0)

    async def main():
        started = {i: asyncio.Event() for i in range(2)}

        async def consume(i, params):
            out = []
            async for event in engine.generate([5 + i, 6, 7, 8], params, request_id=f"c{i}"):
                out.extend(event.token_ids)
                if i in started and event.token_ids:
                    started[i].set()
                if event.finished:
                    return out, event.finish_reason

        tasks = [asyncio.create_task(consume(i, long if i < 2 else short)) for i in range(8)]
        await started[0].wait()
        await started[1].wait()
        await engine.abort("c0")  # ends its stream with "abort"
        tasks[1].cancel()  # a consumer that goes away aborts its request too
        outs = await asyncio.gather(*tasks, return_exceptions=True)
        await wait_until(lambda: settled(engine), "the aborted requests' blocks to be freed")
        return outs

    outs = run(main())
    assert outs[0][1] == "abort" and 0 < len(outs[0][0]) < 300
    assert isinstance(outs[1], asyncio.CancelledError)
    assert all(o == (o[0], "length") and len(o[0]) == 8 for o in outs[2:])
    stats = engine.stats
    assert stats.kv_blocks_used == 0 and stats.finished.get("abort", 0) == before + 2

    async def again():  # ids are free again once their requests ended
        return await collect(engine.generate([5, 6], short, request_id="c0"))

    assert len(run(again())[0][0]) == 8


def test_shutdown_drains_then_the_child_exits(engine):
    process = engine._backend.process
    shutdown_drains_then_refuses(engine, [[9, 10 + i, 11] for i in range(4)])
    assert not process.is_alive() and process.exitcode == 0
    engine.shutdown()  # idempotent


def test_a_killed_engine_process_fails_every_request(folder):
    engine = AsyncEngine.from_spec(ModelSpec(str(folder), dtype="float64", device="cpu"), num_blocks=128, max_num_seqs=2)
    params = SamplingParams(max_new_tokens=1000, temperature=0, ignore_eos=True)
    try:
        async def main():
            streams = [engine.generate([5, 6 + i, 7], params) for i in range(4)]  # two run, two wait
            first = streams[0].__aiter__()
            await first.__anext__()  # tokens are flowing
            os.kill(engine._backend.process.pid, signal.SIGKILL)
            outcomes = await asyncio.gather(collect(first), *(collect(s) for s in streams[1:]), return_exceptions=True)
            with pytest.raises(EngineDeadError, match="SIGKILL"):
                engine.generate([5, 6], params)
            return outcomes

        outcomes = run(main())
        assert all(isinstance(o, EngineDeadError) for o in outcomes), outcomes
        assert all("killed by SIGKILL" in str(o) and isinstance(o.__cause__, EngineProcessError) for o in outcomes)
        assert not engine.is_healthy and isinstance(engine.error, EngineProcessError)
        assert engine.stats.running == 0 and engine.stats.kv_blocks_used == 0
    finally:
        engine.shutdown(timeout=0)
    assert not engine._backend.process.is_alive()


def test_a_step_failing_in_the_child_reaches_every_caller_with_its_traceback(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).to(torch.float64).save_pretrained(tmp_path)
    (tmp_path / "modeling_boom.py").write_text(REMOTE_CODE)
    import json

    saved = json.loads((tmp_path / "config.json").read_text())
    saved.update(model_type="boom_llama", architectures=["BoomForCausalLM"],
                 auto_map={"AutoConfig": "modeling_boom.BoomConfig", "AutoModelForCausalLM": "modeling_boom.BoomForCausalLM"})
    (tmp_path / "config.json").write_text(json.dumps(saved))
    char_tokenizer().save_pretrained(tmp_path)
    spec = ModelSpec(str(tmp_path), dtype="float64", device="cpu", trust_remote_code=True)
    engine = AsyncEngine.from_spec(spec, num_blocks=128, max_num_seqs=8)
    params = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
    try:
        async def main():
            streams = [engine.generate([5, 6 + i, 7], params) for i in range(3)]
            first = streams[0].__aiter__()
            await first.__anext__()
            boom = engine.generate([BOOM, 5], params)  # joins the next step, which raises in the child
            return await asyncio.gather(collect(first), *(collect(s) for s in (*streams[1:], boom)),
                                        return_exceptions=True)

        outcomes = run(main())
        assert all(isinstance(o, EngineDeadError) for o in outcomes), outcomes
        for o in outcomes:  # the child's traceback, down to the model's own line
            assert "boom: token 77 reached the model" in str(o) and "modeling_boom.py" in str(o)
        assert not engine.is_healthy and engine.stats.kv_blocks_used == 0
    finally:
        engine.shutdown(timeout=0)
    assert not engine._backend.process.is_alive()


def test_specs_and_options_are_checked_before_a_process_starts(tmp_path):
    with pytest.raises(ValueError, match="local model folder"):
        ModelSpec(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="dtype"):
        ModelSpec(dtype="fp32")
    with pytest.raises(ValueError, match="device"):
        ModelSpec(device="tpu")
    with pytest.raises(TypeError, match="ModelSpec"):
        AsyncEngine.from_spec("/some/path")
    with pytest.raises(TypeError, match="blok_size"):
        AsyncEngine.from_spec(ModelSpec(), blok_size=16)
    with pytest.raises(ValueError, match="max_queued_requests"):
        AsyncEngine.from_spec(ModelSpec(), max_queued_requests=0)


def test_a_model_that_fails_to_load_raises_with_the_child_traceback(tmp_path):
    char_tokenizer().save_pretrained(tmp_path)  # a tokenizer, but no model
    with pytest.raises(EngineProcessError, match="while loading the model"):
        AsyncEngine.from_spec(ModelSpec(str(tmp_path), device="cpu"), num_blocks=16)


ORPHAN_SCRIPT = """
import asyncio, sys, time
from hf_paged import AsyncEngine, ModelSpec, SamplingParams

async def main():
    engine = AsyncEngine.from_spec(ModelSpec(device="cpu"), num_blocks=64)
    stream = engine.generate([5, 6, 7], SamplingParams(max_new_tokens=1000, ignore_eos=True))
    await stream.__anext__()
    print("engine process", engine._backend.process.pid, flush=True)  # busy: stepping the long request
    await asyncio.sleep(600)

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_the_engine_process_exits_when_its_parent_dies():
    root = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()
        assert line.startswith("engine process"), line
        child = int(line.split()[-1])
        parent.kill()  # no shutdown, no exit hooks: as the OOM killer would
        parent.wait(timeout=TIMEOUT)
        deadline = time.monotonic() + 30
        while _alive(child):
            assert time.monotonic() < deadline, "the engine process outlived its parent"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # exited but not yet reaped by its new parent
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
