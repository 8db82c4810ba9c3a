"""``hf-paged serve`` as a real process on 127.0.0.1, driven by the official ``openai`` client and raw HTTP.

Two servers per module run the embedded default model in float64 (exact greedy comparisons), each with
its engine in a process of its own (serve's default; ``test_server_app`` covers the in-process engine):
``server`` is open; ``guarded`` has API keys, a waiting-queue bound of 2 and one running sequence at a
time (so a request queue builds up on purpose), and is stopped with SIGTERM by the last test.
Every wait is bounded: a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
MODEL = "hf-paged-default"
KEYS = ("sk-one", "sk-two")
TIMEOUT = 60.0  # seconds for any single wait


class ServerProcess:
    def __init__(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "hf_paged", "serve", "--host", "127.0.0.1", "--port", "0", "--dtype", "float64",
               "--num-blocks", "512", "--log-level", "warning", *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = None

    def wait_ready(self) -> ServerProcess:
        deadline = time.monotonic() + 180
        while self.url is None:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError("server did not start:\n" + "".join(self.output)) from None
            if line is None:
                raise RuntimeError(f"server exited with {self.proc.wait()}:\n" + "".join(self.output))
            match = re.search(r"ready on (http://\S+)", line)
            if match:
                self.url = match.group(1)
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def servers():
    # Both start at once: loading torch and the model is most of a start, and they overlap.
    open_ = ServerProcess()
    guarded_ = ServerProcess("--api-key", KEYS[0], "--api-key", KEYS[1], "--max-queued-requests", "2",
                             "--max-num-seqs", "1", "--served-model-name", "guarded-model", "--shutdown-timeout", "60")
    try:
        yield open_.wait_ready(), guarded_.wait_ready()
    finally:
        open_.stop()
        guarded_.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def guarded(servers):
    return servers[1]


@pytest.fixture(scope="module")
def tokenizer():
    return PreTrainedTokenizerFast.from_pretrained(str(ROOT / "hf_paged" / "default_model"))


def client(s: ServerProcess, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key=key, timeout=TIMEOUT, max_retries=0)


def metrics(s: ServerProcess) -> dict[str, float]:
    text = httpx.get(s.url + "/metrics", timeout=TIMEOUT).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[re.sub(r',?model_name="[^"]*"', "", name).replace("{}", "")] = float(value)
    return out


def wait_for(predicate, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def sse_chunks(response: httpx.Response) -> list:
    """Every ``data:`` payload of an SSE response (JSON decoded; the final "[DONE]" as is)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---- completions and chat --------------------------------------------------------------------------
def test_models_and_health(server):
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_streamed_equals_whole(server):
    c = client(server)
    whole = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12
    pieces, finish = [], None
    for chunk in c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
                                      stream=True):
        for choice in chunk.choices:
            pieces.append(choice.text)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].text
    assert finish == "length"


def test_completion_prompt_forms(server, tokenizer):
    c = client(server)
    ids = tokenizer("Hello there")["input_ids"]
    by_text = c.completions.create(model=MODEL, prompt="Hello there", max_tokens=6, temperature=0)
    by_ids = c.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids)  # one BOS, added by the tokenizer
    several = c.completions.create(model=MODEL, prompt=["Hello there", "Good morning"], max_tokens=6, temperature=0, n=2)
    assert [ch.index for ch in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text == by_text.choices[0].text
    assert several.usage.completion_tokens == 24
    # A prompt that starts with the BOS text (a rendered chat template) is not given a second BOS.
    rendered = c.completions.create(model=MODEL, prompt="<s>Hello there", max_tokens=6, temperature=0)
    assert rendered.usage.prompt_tokens == len(ids) and rendered.choices[0].text == by_text.choices[0].text


def test_chat_streamed_equals_whole_and_single_bos(server, tokenizer):
    c = client(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    whole = c.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    text, roles = [], []
    for chunk in c.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0,
                                           stream=True):
        for choice in chunk.choices:
            roles += [choice.delta.role] if choice.delta.role else []
            text.append(choice.delta.content or "")
    assert "".join(text) == whole.choices[0].message.content
    assert roles == ["assistant"]
    # The template writes the BOS; encoding must not add a second one.
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    assert whole.usage.prompt_tokens == len(ids)


def test_n_with_seed_is_reproducible(server):
    c = client(server)
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, n=3, seed=1234)
    first = [ch.text for ch in c.completions.create(**kwargs).choices]
    again = [ch.text for ch in c.completions.create(**kwargs).choices]
    assert first == again
    assert len(set(first)) > 1  # the samples draw different noise (seed + k)
    other = [ch.text for ch in c.completions.create(**{**kwargs, "seed": 99}).choices]
    assert other != first
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=8, n=2, seed=7)
    assert [ch.message.content for ch in c.chat.completions.create(**chat).choices] == [
        ch.message.content for ch in c.chat.completions.create(**chat).choices
    ]


def test_logprobs(server):
    c = client(server)
    out = c.completions.create(model=MODEL, prompt="One two three", max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 3 <= len(top) <= 4
        assert logprob == pytest.approx(max(top.values()))  # greedy picks the most likely token
        assert top[token] == pytest.approx(logprob)
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=4,
                                     temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and "".join(e.token for e in content) == chat.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert bytes(e.bytes).decode() == e.token
    streamed = [e for chunk in c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=4, temperature=0, logprobs=True,
        top_logprobs=2, stream=True) for ch in chunk.choices if ch.logprobs for e in ch.logprobs.content]
    assert [(e.token, round(e.logprob, 6)) for e in streamed] == [(e.token, round(e.logprob, 6)) for e in content]


def test_stop_strings(server):
    c = client(server)
    prompt = "Tell me a story about a river"
    full = c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    # A stop string taken from the middle of the greedy output: the answer ends just before it.
    start = len(full) // 2
    stop = full[start : start + 4]
    assert stop.strip(), full
    expected = full[: full.find(stop)]
    for stream in (False, True):
        if stream:
            chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop],
                                               stream=True))
            text = "".join(ch.text for chunk in chunks for ch in chunk.choices)
            finish = [ch.finish_reason for chunk in chunks for ch in chunk.choices if ch.finish_reason]
        else:
            out = c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop)
            text, finish = out.choices[0].text, [out.choices[0].finish_reason]
        assert text == expected
        assert finish == ["stop"]


def test_usage_chunk(server, tokenizer):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 5, "temperature": 0, "stream": True, "n": 2,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = sse_chunks(r)
    assert chunks[-1] == "[DONE]"
    with_usage = [ch for ch in chunks[:-1] if ch["usage"] is not None]
    assert len(with_usage) == 1 and with_usage[0] is chunks[-2]  # exactly one, the last
    assert with_usage[0]["choices"] == []
    prompt_tokens = len(tokenizer("Hello")["input_ids"])  # counted once, whatever n is
    assert with_usage[0]["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 10,
                                      "total_tokens": prompt_tokens + 10}
    body.pop("stream_options")
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        chunks = sse_chunks(r)
    assert all("usage" not in ch for ch in chunks[:-1]) and chunks[-1] == "[DONE]"
    # The official client sees the same single usage chunk.
    stream = client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                    max_completion_tokens=3, stream=True,
                                                    stream_options={"include_usage": True})
    usages = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usages) == 1 and usages[0].completion_tokens == 3


# ---- errors ----------------------------------------------------------------------------------------
BAD_BODIES = [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "temperature": "0.5"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**6}, "max_tokens"),  # beyond the model's context
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "stop": [""]}, "stop.0"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": -2.5}, "frequency_penalty"),
    ({"prompt": "x", "top_k": -2}, "top_k"),
    ({"prompt": "x", "min_p": 2}, "min_p"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "max_token": 5}, "max_token"),  # unknown field
    ({"prompt": [5, 99999]}, "prompt"),  # a token id outside the vocabulary
    ({"prompt": []}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({}, "prompt"),
]
BAD_CHAT_BODIES = [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
]


def test_invalid_fields_are_400_naming_the_field_before_any_work(server):
    before = metrics(server)
    for path, cases in (("/v1/completions", BAD_BODIES), ("/v1/chat/completions", BAD_CHAT_BODIES)):
        for body, param in cases:
            r = httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=TIMEOUT)
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert error["param"] == param, (body, error)
            assert error["type"] == "invalid_request_error" and param.split(".")[0] in error["message"]
    for raw in (b"{not json", b"[1, 2]", b""):
        r = httpx.post(server.url + "/v1/completions", content=raw, headers={"content-type": "application/json"},
                       timeout=TIMEOUT)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    after = metrics(server)
    assert after["hf_paged:prompt_tokens_total"] == before["hf_paged:prompt_tokens_total"]  # nothing was submitted
    # The official client raises its own error class for each status.
    with pytest.raises(openai.BadRequestError):
        client(server).completions.create(model=MODEL, prompt="x", temperature=5)


def test_unknown_model_and_route(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "gpt-4", "prompt": "x"}, timeout=TIMEOUT)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(server.url + "/v1/nothing", timeout=TIMEOUT).status_code == 404


# ---- concurrency and disconnects -------------------------------------------------------------------
def test_64_concurrent_streams_and_batch_invariance(server):
    greedy = dict(model=MODEL, prompt="A greedy request among many", max_tokens=16, temperature=0)
    solo = client(server).completions.create(**greedy).choices[0].text

    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        kwargs = greedy if i == 17 else dict(model=MODEL, prompt=f"Request {i}: " + "word " * (i % 13), max_tokens=8 + i % 9,
                                            temperature=1.0, seed=i)
        stream = await c.completions.create(**kwargs, stream=True)
        text, finish = [], None
        async for chunk in stream:
            for ch in chunk.choices:
                text.append(ch.text)
                finish = ch.finish_reason or finish
        return "".join(text), finish

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)))

    results = asyncio.run(asyncio.wait_for(main(), 2 * TIMEOUT))
    assert all(finish in ("length", "stop") for _, finish in results)
    assert results[17][0] == solo
    wait_for(lambda: metrics(server)["hf_paged:num_requests_running"] == 0, "the engine to go idle")


def test_disconnect_frees_blocks(server):
    before = metrics(server)
    body = {"model": MODEL, "prompt": "Keep talking " * 40, "max_tokens": 1500, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        during = metrics(server)
        assert during["hf_paged:num_requests_running"] == 1
        assert during["hf_paged:kv_cache_usage_perc"] > 0
    # Leaving the block closed the connection: the request is aborted and its blocks return to the pool.
    after = wait_for(lambda: (m := metrics(server))["hf_paged:kv_cache_usage_perc"] == 0 and m, "the blocks to be freed")
    assert after["hf_paged:num_requests_running"] == 0
    key = 'hf_paged:request_success_total{finished_reason="abort"}'
    assert after[key] == before[key] + 1
    assert after["hf_paged:generation_tokens_total"] - before["hf_paged:generation_tokens_total"] < 1500
    # A client that gives up on a non-streamed answer is noticed too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=httpx.Timeout(60, read=1.0))
    after = wait_for(lambda: (m := metrics(server))[key] == before[key] + 2 and m, "the second abort")
    assert after["hf_paged:kv_cache_usage_perc"] == 0 and after["hf_paged:num_requests_running"] == 0


def test_metrics_names(server):
    m = metrics(server)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "num_preemptions_total", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count", "request_queue_time_seconds_count"):
        assert "hf_paged:" + name in m, name
    assert m['hf_paged:request_success_total{finished_reason="length"}'] > 0
    assert m["hf_paged:time_to_first_token_seconds_count"] > 0


# ---- the guarded server: keys, overload, SIGTERM ---------------------------------------------------
def test_api_keys(guarded):
    body = {"model": "guarded-model", "prompt": "x", "max_tokens": 2}
    assert httpx.post(guarded.url + "/v1/completions", json=body, timeout=TIMEOUT).status_code == 401
    wrong = httpx.post(guarded.url + "/v1/completions", json=body, headers={"Authorization": "Bearer sk-nope"},
                       timeout=TIMEOUT)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(guarded.url + "/v1/models", timeout=TIMEOUT).status_code == 401
    for key in KEYS:
        assert client(guarded, key).completions.create(model="guarded-model", prompt="x", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        client(guarded, "sk-nope").models.list()
    assert httpx.get(guarded.url + "/health", timeout=TIMEOUT).status_code == 200
    assert httpx.get(guarded.url + "/metrics", timeout=TIMEOUT).status_code == 200


def test_overload_429_while_accepted_requests_finish(guarded):
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    long = {"model": "guarded-model", "prompt": "long", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    short = {"model": "guarded-model", "prompt": "short", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    results: list = []

    def post_short():
        results.append(httpx.post(guarded.url + "/v1/completions", json=short, headers=auth, timeout=TIMEOUT))

    with httpx.stream("POST", guarded.url + "/v1/completions", json=long, headers=auth, timeout=TIMEOUT) as r:
        lines = r.iter_lines()  # kept: dropping a half-read iterator closes the connection (an abort)
        next(lines)  # the long request runs (max_num_seqs=1): everything else waits
        waiting = [threading.Thread(target=post_short) for _ in range(2)]
        for t in waiting:
            t.start()
        wait_for(lambda: metrics(guarded)["hf_paged:num_requests_waiting"] == 2, "two waiting requests")
        refused = httpx.post(guarded.url + "/v1/completions", json=short, headers=auth, timeout=TIMEOUT)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            client(guarded, KEYS[0]).completions.create(**{k: v for k, v in short.items() if k != "ignore_eos"})
    # The long request is gone (its client left); the two accepted ones run and finish.
    for t in waiting:
        t.join(TIMEOUT)
    assert [r.status_code for r in results] == [200, 200]
    assert all(r.json()["choices"][0]["finish_reason"] == "length" for r in results)
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in results)


def child_processes(pid: int) -> dict[int, str]:
    """pid -> command line of every live child of ``pid`` (Linux /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid and stat.rsplit(")", 1)[1].split()[0] != "Z":
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
    return out


def test_sigterm_finishes_in_flight_then_exits_0(guarded):
    # The engine runs in a process of its own (serve's default); it must not outlive the server.
    children = child_processes(guarded.proc.pid)
    assert any("spawn_main" in cmd for cmd in children.values()), children
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    body = {"model": "guarded-model", "prompt": "drain", "max_tokens": 40, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", guarded.url + "/v1/completions", json=body, headers=auth, timeout=TIMEOUT) as r:
        lines = r.iter_lines()
        next(lines)
        guarded.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    finishes = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in rest[:-1]]
    assert finishes[-1] == "length"  # the in-flight request ran to its end
    assert guarded.proc.wait(timeout=TIMEOUT) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(guarded.url + "/health", timeout=5)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not reaped yet

    wait_for(lambda: all(gone(pid) for pid in children), "the engine process to exit with the server", timeout=15)


def test_load_generator(server, tmp_path, monkeypatch):
    """benchmarks/bench_serve.py against the live server: every request completes with the asked lengths."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "benchmarks" / "bench_serve.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_serve", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "run.json"
    argv = ["run", "--base-url", server.url, "--tokenizer", str(ROOT / "hf_paged" / "default_model"), "--num-prompts", "6",
            "--input-len", "8:24", "--output-len", "5", "--rates", "40,inf", "--ignore-eos", "--warmup", "1",
            "--goodput", "ttft:60000,tpot:60000", "--out", str(out), "--fail-on-error"]
    assert bench.main(argv) == 0
    record = json.loads(out.read_text())
    for rate, row in zip((40.0, float("inf")), record["rows"]):  # each rate sends its own prompts
        seed = bench.rate_prompt_seed(0, rate)
        _, lengths = bench.make_prompts(6, (8, 24), seed, str(ROOT / "hf_paged" / "default_model"), None)
        assert (row["sent"], row["completed"], row["output_tokens"]) == (6, 6, 30)
        assert row["prompt_tokens"] == sum(lengths) + 6  # exact prompt lengths, plus each prompt's BOS
        assert row["goodput_req_per_s"] == pytest.approx(row["req_per_s"])
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"] and row["itl_p50_ms"] > 0
    assert bench.rate_prompt_seed(0, float("inf")) == 0 != bench.rate_prompt_seed(0, 40.0)  # inf: --seed's prompts
    with pytest.raises(SystemExit, match="127.0.0.1"):
        bench.main(["run", "--base-url", "http://example.com:8000", "--vocab-size", "100"])
    with pytest.raises(SystemExit, match="--client-processes"):
        bench.main(["run", "--vocab-size", "100", "--client-processes", "0"])
    with pytest.raises(SystemExit, match="--num-prompts"):
        bench.main(["run", "--vocab-size", "100", "--num-prompts", "0"])

    # The same rate-inf requests from two client processes, with the server's CPU use recorded.
    out2 = tmp_path / "run2.json"
    argv2 = argv[: argv.index("--rates")] + ["--rates", "inf", "--client-processes", "2", "--server-pid",
                                             str(server.proc.pid), "--ignore-eos", "--warmup", "0", "--out", str(out2), "--fail-on-error"]
    assert bench.main(argv2) == 0
    row = json.loads(out2.read_text())["rows"][0]
    assert (row["sent"], row["completed"], row["output_tokens"]) == (6, 6, 30)
    assert row["prompt_tokens"] == record["rows"][1]["prompt_tokens"]  # the same six prompts as above
    assert 1 <= row["peak_in_flight"] <= 6
    # The server's own histograms over just this run (its /metrics before and after): 6 requests of 5 tokens.
    assert row["server_ttft_mean_ms"] > 0 and 0 < row["server_itl_mean_ms"] <= row["server_e2el_mean_ms"]
    cpu = row["cpu"]
    assert cpu["client_processes"] == 2 and len(cpu["client_pct"]) == 2 and cpu["server_pct"] is not None
    engine = [pid for pid, cmd in child_processes(server.proc.pid).items() if "spawn_main" in cmd]
    assert engine and set(cpu["server_children_pct"]) <= {str(pid) for pid in bench.CpuMeter(server.proc.pid)._descendants()}
    assert engine[0] in bench.CpuMeter(server.proc.pid)._descendants()


def test_load_generator_schedule(monkeypatch):
    """Arrival offsets and their split over client processes: every request once, on the parent's schedule."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "benchmarks" / "bench_serve.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_serve", bench)
    spec.loader.exec_module(bench)
    assert bench.arrival_offsets(5, float("inf"), 0, 10.0) == [0.0] * 5
    offsets = bench.arrival_offsets(200, 4.0, 0, 10.0)
    assert offsets[0] == 0.0 and offsets == sorted(offsets) and 20 < len(offsets) < 200 and offsets[-1] <= 10.0
    assert offsets == bench.arrival_offsets(200, 4.0, 0, 10.0) != bench.arrival_offsets(200, 4.0, 1, 10.0)
    shares = bench.split_round_robin(list(range(10)), 3)
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [bench.share_of(8, 3, k) for k in range(3)] == [3, 3, 2] and bench.share_of(None, 3, 0) is None
    assert bench.client_process_count("3", 2, None) == 2 and bench.client_process_count("4", 100, 3) == 3
    assert bench.client_process_count("auto", 10, None) == 1
    outcome = bench.RequestOutcome
    spans = [outcome(ok=True, prompt_tokens=1, sent_at=a, ended_at=b) for a, b in ((0, 2), (1, 3), (2, 4), (5, 6))]
    assert bench.peak_in_flight(spans) == 2  # one ends at 2 as the third starts
