"""The server app in process (Starlette's TestClient) for what a live process cannot show on demand:
an engine whose step loop dies mid-stream (503 from then on, an error event in the stream), and the
request -> SamplingParams translation (defaults from the model's generation_config)."""

from __future__ import annotations

import itertools
import json

import pytest
from fastapi.testclient import TestClient

from hf_paged import AsyncEngine
from hf_paged.server.app import Defaults, build_app
from hf_paged.engine.model_spec import ModelSpec


@pytest.fixture
def engine():
    model, tokenizer = ModelSpec(device="cpu", dtype="float32").load()
    engine = AsyncEngine(model, tokenizer, num_blocks=64)
    yield engine
    engine.shutdown(timeout=5)


def test_engine_death_gives_503_and_an_error_event(engine):
    step = engine.core.step
    calls = itertools.count()

    def failing_step():
        if next(calls) >= 4:  # a few tokens stream, then the step raises (as a CUDA error would)
            raise RuntimeError("injected step failure")
        return step()

    engine.core.step = failing_step
    with TestClient(build_app(engine, "m")) as client:
        assert client.get("/health").status_code == 200
        body = {"model": "m", "prompt": "hello", "max_tokens": 50, "ignore_eos": True, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        error = json.loads(data[-2])["error"]
        assert error["code"] == "engine_dead" and "injected step failure" in error["message"]
        assert all("choices" in json.loads(d) for d in data[:-2]) and len(data) > 2  # tokens came first
        health = client.get("/health")
        assert health.status_code == 503 and "injected step failure" in health.json()["error"]["message"]
        for path, req in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
            r = client.post(path, json=req)
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert client.get("/metrics").status_code == 200  # still answers, for the operator


def test_a_dead_engine_process_gives_503_and_an_error_event():
    """The engine in its own process (serve's default), killed mid-stream as the OOM killer would."""
    import os
    import signal

    engine = AsyncEngine.from_spec(ModelSpec(device="cpu", dtype="float32"), num_blocks=64)
    try:
        with TestClient(build_app(engine, "m")) as client:
            assert client.get("/health").status_code == 200
            body = {"model": "m", "prompt": "hello", "max_tokens": 900, "ignore_eos": True, "stream": True}
            with client.stream("POST", "/v1/completions", json=body) as r:
                data = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        data.append(line[6:])
                        if len(data) == 3:  # tokens are streaming: the engine process dies now
                            os.kill(engine._backend.process.pid, signal.SIGKILL)
            assert data[-1] == "[DONE]"
            error = json.loads(data[-2])["error"]
            assert error["code"] == "engine_dead" and "killed by SIGKILL" in error["message"]
            health = client.get("/health")
            assert health.status_code == 503 and "SIGKILL" in health.json()["error"]["message"]
            r = client.post("/v1/completions", json={"prompt": "x"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    finally:
        engine.shutdown(timeout=0)
    assert not engine._backend.process.is_alive()


def test_defaults_come_from_generation_config(engine):
    gc = engine.model.generation_config
    gc.temperature, gc.top_p, gc.top_k, gc.max_new_tokens = 0.6, 0.9, 40, 7
    server = build_app(engine, "m").state.server
    assert server.defaults == Defaults(temperature=0.6, top_p=0.9, top_k=40, max_new_tokens=7)
    from hf_paged.server.protocol import CompletionRequest

    params = server.sampling_params(CompletionRequest(prompt="x"), 3, None, None, 16)
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens) == (0.6, 0.9, 40, 7)
    override = CompletionRequest(prompt="x", temperature=0, top_p=1, top_k=-1, max_tokens=5)
    params = server.sampling_params(override, 3, 5, None, 16)
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens) == (0, 1, 0, 5)
    gc.do_sample = False  # the model's authors asked for greedy decoding
    assert Defaults.from_generation_config(gc).temperature == 0.0
    # With nothing set, OpenAI's defaults: temperature 1, 16 new tokens for completions.
    plain = Defaults.from_generation_config(type(gc)())
    assert plain == Defaults()
