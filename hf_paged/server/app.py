"""The OpenAI-compatible HTTP API over one ``AsyncEngine``: a thin translation layer.

    app = build_app(engine, model_name="my-model", api_keys=("sk-...",))

Per request: check the key, parse and validate the body (400 naming the field, before any work), turn
it into token ids and ``SamplingParams`` (defaults from the model's ``generation_config``), submit every
prompt to the engine (429 when its queue is full, 503 when it is dead or the server is draining), then
either collect the events into one JSON answer or stream them as Server-Sent Events in OpenAI's chunk
format. Whatever ends a request early (a client that disconnects, an error) aborts its engine requests,
which frees their KV blocks at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import EngineDeadError, EngineOverloadedError, SamplingParams
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, bad_request, parse

# Used when a tokenizer has no chat template: plain "role: content" lines, no special tokens (the
# tokenizer adds its BOS, if it has one, when the rendered text is encoded).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# OpenAI's default max_tokens for completions when neither the request nor the model says otherwise.
DEFAULT_COMPLETION_MAX_TOKENS = 16
# SamplingParams field -> the request field a ValueError about it is reported under.
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "stop_token_ids": "stop"}


@dataclass(frozen=True, slots=True)
class Defaults:
    """Sampling defaults taken from the model's ``generation_config`` (None: the API's own default).

    Unlike ``EngineCore.default_sampling_params`` (which follows ``model.generate``: transformers'
    ``do_sample=False`` default means greedy), only fields the model's authors set count here, so an
    OpenAI client that sends no temperature gets OpenAI's default unless the checkpoint asks otherwise.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None

    @classmethod
    def from_generation_config(cls, generation_config: Any) -> Defaults:
        if generation_config is None:
            return cls()
        # Only what the model's authors set (to_diff_dict drops transformers' own defaults).
        set_ = generation_config.to_diff_dict()
        temperature = set_.get("temperature")
        if set_.get("do_sample") is False:
            temperature = 0.0  # the authors asked for greedy decoding
        return cls(
            temperature=temperature,
            top_p=set_.get("top_p"),
            top_k=set_.get("top_k"),
            min_p=set_.get("min_p"),
            repetition_penalty=set_.get("repetition_penalty"),
            max_new_tokens=set_.get("max_new_tokens"),
        )


class Server:
    """State shared by the routes: the engine, its facts, the metrics and the draining flag."""

    def __init__(self, engine: Any, model_name: str, api_keys: tuple[str, ...] = ()) -> None:
        self.engine = engine
        self.model_name = model_name
        self.api_keys = tuple(k.encode() for k in api_keys)
        self.tokenizer = engine.tokenizer
        if self.tokenizer is None:
            raise ValueError("the server needs a tokenizer (for text prompts, chat templates and text outputs)")
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size
        self.defaults = Defaults.from_generation_config(engine.generation_config)
        self.chat_template = getattr(self.tokenizer, "chat_template", None)
        self.created = int(time.time())
        self.draining = False
        self.metrics = ServerMetrics(engine, model_name)
        engine.add_request_listener(self.metrics.observe)
        self.token_text = lru_cache(maxsize=1 << 16)(self._token_text)

    # ---- checks ----------------------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest against every key: the time taken does not tell how much of a key matched.
        ok = scheme.lower() == "bearer" and any(hmac.compare_digest(token.strip().encode(), k) for k in self.api_keys)
        if not ok:
            raise OpenAIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                              code="invalid_api_key")

    def check_serving(self) -> None:
        if self.draining:
            raise OpenAIError(503, "the server is shutting down", code="shutting_down")
        if not self.engine.is_healthy:
            raise OpenAIError(503, f"the engine is not running ({self.engine.error!r})", code="engine_dead")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise OpenAIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                              param="model", code="model_not_found")

    # ---- inputs ----------------------------------------------------------------------------------
    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        out = []
        for i, prompt in enumerate(req.prompts()):
            if isinstance(prompt, str):
                # A prompt that already starts with the BOS text (a rendered chat template) gets no second one.
                bos = self.tokenizer.bos_token
                add_special = not (isinstance(bos, str) and bos and prompt.startswith(bos))
                ids = self.tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
            else:
                bad = next((t for t in prompt if t >= self.vocab_size), None)
                if bad is not None:
                    raise bad_request(f"prompt: token id {bad} is outside the vocabulary (size {self.vocab_size})", "prompt")
                ids = list(prompt)
            if not ids:
                raise bad_request(f"prompt {i} is empty after tokenization", "prompt")
            out.append(ids)
        return out

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = [m.as_template_dict() for m in req.messages]
        own = self.chat_template is not None
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                chat_template=None if own else DEFAULT_CHAT_TEMPLATE,
                add_generation_prompt=req.add_generation_prompt,
                tokenize=False,
            )
        except Exception as err:  # the template's own checks (roles must alternate, ...) are the user's to fix
            raise bad_request(f"messages: the chat template refused them: {err}", "messages") from None
        # A model's template writes its own special tokens (BOS included); encoding must not add a second
        # BOS. The default template has none, so the tokenizer adds what it normally adds.
        return self.tokenizer(text, add_special_tokens=not own)["input_ids"]

    def sampling_params(self, req: Any, prompt_len: int, max_tokens: int | None, logprobs: int | None,
                        default_max_tokens: int) -> SamplingParams:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise bad_request(
                f"prompt: {prompt_len} tokens leave no room to generate in the model's context of "
                f"{self.max_model_len} tokens", "messages" if isinstance(req, ChatCompletionRequest) else "prompt")
        if max_tokens is not None and max_tokens > room:
            name = "max_completion_tokens" if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens else "max_tokens"
            raise bad_request(
                f"{name}: {max_tokens} new tokens after a {prompt_len}-token prompt exceed the model's context of "
                f"{self.max_model_len} tokens (at most {room})", name)
        d = self.defaults
        kwargs = dict(
            max_new_tokens=max_tokens if max_tokens is not None else min(d.max_new_tokens or default_max_tokens, room),
            min_new_tokens=req.min_tokens,
            temperature=_first(req.temperature, d.temperature, 1.0),
            top_p=_first(req.top_p, d.top_p, 1.0),
            top_k=max(0, _first(req.top_k, d.top_k, 0)),
            min_p=_first(req.min_p, d.min_p, 0.0),
            repetition_penalty=_first(req.repetition_penalty, d.repetition_penalty, 1.0),
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            seed=req.seed,
            stop=tuple(req.stop_list),
            ignore_eos=req.ignore_eos,
            n=req.n,
            logprobs=logprobs,
        )
        if kwargs["min_new_tokens"] > kwargs["max_new_tokens"]:
            raise bad_request(f"min_tokens: {req.min_tokens} is more than max_tokens ({kwargs['max_new_tokens']})", "min_tokens")
        try:
            params = SamplingParams(**kwargs)
            params.validate()
        except (ValueError, TypeError) as err:
            field = str(err).split(" ", 1)[0]
            raise bad_request(str(err), _PARAM_NAMES.get(field, field)) from None
        return params

    # ---- submission ------------------------------------------------------------------------------
    def submit(self, base_id: str, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple[str, Any]]:
        """Submit every prompt; all or none (a refusal aborts the ones already submitted)."""
        streams: list[tuple[str, Any]] = []
        try:
            for i, (ids, sp) in enumerate(zip(prompts, params)):
                rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
                streams.append((rid, self.engine.generate(ids, sp, request_id=rid)))
        except BaseException as err:
            for rid, _ in streams:
                self.engine.abort_nowait(rid)
            raise _engine_error(err) from err
        return streams

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def _engine_error(err: BaseException) -> BaseException:
    if isinstance(err, EngineOverloadedError):
        return OpenAIError(429, f"the server is overloaded: {err}", code="queue_full")
    if isinstance(err, EngineDeadError):
        return OpenAIError(503, f"the engine is not running: {err}", code="engine_dead")
    if isinstance(err, (ValueError, TypeError)):
        return bad_request(str(err))
    return err


# ---- merging the events of several engine requests -----------------------------------------------
async def _events(streams: list[tuple[str, Any]]) -> AsyncIterator[tuple[int, Any]]:
    """(prompt position, event) for every event of every stream, in arrival order."""
    if len(streams) == 1:
        async for event in streams[0][1]:
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(pos: int, stream: Any) -> None:
        try:
            async for event in stream:
                queue.put_nowait((pos, event))
        except BaseException as err:  # handed to the consumer, which raises it
            queue.put_nowait((pos, err))
        finally:
            queue.put_nowait((pos, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, (_, s) in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            pos, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield pos, item
    finally:
        for task in tasks:
            task.cancel()


@dataclass(slots=True)
class _Choice:
    text: list[str]
    token_ids: list[int]
    logprobs: list[Any]
    finish_reason: str | None = None


# ---- response bodies -----------------------------------------------------------------------------
class _Formatter:
    """Builds the JSON of one response (completion or chat), whole or as chunks."""

    def __init__(self, server: Server, chat: bool, rid: str, num_top: int | None) -> None:
        self.server = server
        self.chat = chat
        self.rid = rid
        self.num_top = num_top
        self.created = int(time.time())
        self.model = server.model_name
        self.text_offsets: dict[int, int] = {}

    def logprobs(self, index: int, entries: list[Any] | None) -> Any:
        if self.num_top is None or entries is None:
            return None
        text = self.server.token_text
        if self.chat:
            content = []
            for e in entries:
                tok = text(e.token_id)
                top = [{"token": text(t), "logprob": lp, "bytes": list(text(t).encode())} for t, lp in e.top[: self.num_top]]
                content.append({"token": tok, "logprob": e.logprob, "bytes": list(tok.encode()), "top_logprobs": top})
            return {"content": content}
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        offset = self.text_offsets.get(index, 0)
        for e in entries:
            tok = text(e.token_id)
            tokens.append(tok)
            token_logprobs.append(e.logprob)
            top = {text(t): lp for t, lp in e.top[: self.num_top]}
            top.setdefault(tok, e.logprob)
            top_logprobs.append(top)
            offsets.append(offset)
            offset += len(tok)
        self.text_offsets[index] = offset
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}

    def whole(self, choices: list[_Choice], usage: dict) -> dict:
        body_choices = []
        for i, c in enumerate(choices):
            logprobs = self.logprobs(i, c.logprobs) if self.num_top is not None else None
            if self.chat:
                body_choices.append({"index": i, "message": {"role": "assistant", "content": "".join(c.text)},
                                     "logprobs": logprobs, "finish_reason": c.finish_reason})
            else:
                body_choices.append({"index": i, "text": "".join(c.text), "logprobs": logprobs,
                                     "finish_reason": c.finish_reason})
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.model, "choices": body_choices, "usage": usage}

    # Streamed chunks are written as strings around json.dumps of the variable parts: one chunk per
    # token per request is the server's hottest path (thousands a second on a GPU).
    def start_stream(self, include_usage: bool) -> None:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        self._head = (f'data: {{"id":{json.dumps(self.rid)},"object":"{obj}","created":{self.created},'
                      f'"model":{json.dumps(self.model)},"choices":[')
        self._tail = '],"usage":null}\n\n' if include_usage else "]}\n\n"

    def chunk(self, index: int, text: str | None, logprobs: Any, finish_reason: str | None, role: bool = False) -> str:
        lp = "null" if logprobs is None else json.dumps(logprobs, ensure_ascii=False)
        finish = "null" if finish_reason is None else f'"{finish_reason}"'
        if self.chat:
            if role:
                delta = '{"role":"assistant","content":""}'
            else:
                delta = f'{{"content":{json.dumps(text, ensure_ascii=False)}}}' if text else "{}"
            choice = f'{{"index":{index},"delta":{delta},"logprobs":{lp},"finish_reason":{finish}}}'
        else:
            choice = f'{{"index":{index},"text":{json.dumps(text or "", ensure_ascii=False)},"logprobs":{lp},"finish_reason":{finish}}}'
        return self._head + choice + self._tail

    def usage_chunk(self, usage: dict) -> str:
        return self._head + f'],"usage":{json.dumps(usage)}}}\n\n'


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator, so that the iterator's cleanup (aborting
    the engine requests) runs at once when the client goes away, not whenever the generator is collected."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


# ---- the app -------------------------------------------------------------------------------------
def build_app(engine: Any, model_name: str, api_keys: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``model_name``; ``/v1/*`` needs one of ``api_keys`` if any."""
    server = Server(engine, model_name, api_keys)
    app = FastAPI(title="hf_paged", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, err: OpenAIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(bad_request(str(err)).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        e = OpenAIError(err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None)
        return JSONResponse(e.body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse(OpenAIError(500, f"internal error: {type(err).__name__}: {err}").body(), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        if server.draining:
            return JSONResponse(OpenAIError(503, "shutting down").body(), status_code=503)
        if not engine.is_healthy:
            return JSONResponse(OpenAIError(503, f"engine not running: {engine.error!r}").body(), status_code=503)
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        server.check_key(request)
        card = {"id": model_name, "object": "model", "created": server.created, "owned_by": "hf_paged",
                "max_model_len": server.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await _read(request, server, CompletionRequest)
        prompts = server.completion_prompts(req)
        params = [server.sampling_params(req, len(p), req.max_tokens, req.logprobs, DEFAULT_COMPLETION_MAX_TOKENS)
                  for p in prompts]
        server.check_serving()
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = server.submit(rid, prompts, params)
        fmt = _Formatter(server, chat=False, rid=rid, num_top=req.logprobs)
        return await _respond(request, server, fmt, req, streams, prompts)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await _read(request, server, ChatCompletionRequest)
        prompt = server.chat_prompt(req)
        params = server.sampling_params(req, len(prompt), req.max_new_tokens, req.num_top_logprobs,
                                        server.max_model_len - len(prompt))
        server.check_serving()
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = server.submit(rid, [prompt], [params])
        fmt = _Formatter(server, chat=True, rid=rid, num_top=req.num_top_logprobs)
        return await _respond(request, server, fmt, req, streams, [prompt])

    return app


async def _read(request: Request, server: Server, model: type) -> Any:
    server.check_key(request)
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON: {err}") from None
    req = parse(model, body)
    server.check_model(req.model)
    return req


async def _respond(request: Request, server: Server, fmt: _Formatter, req: Any, streams, prompts) -> Response:
    n = req.n
    num_prompt_tokens = sum(len(p) for p in prompts)
    rids = [rid for rid, _ in streams]

    unfinished = {(pos, k) for pos in range(len(streams)) for k in range(n)}

    def abort_all() -> None:
        # Frees the blocks of a request that ends early (cancelled, disconnected, failed); the common case,
        # every sample finished, costs nothing.
        if unfinished:
            for rid in rids:
                server.engine.abort_nowait(rid)

    if req.stream:
        return _SSEResponse(_sse(fmt, req, streams, num_prompt_tokens, unfinished, abort_all),
                            media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def collect() -> dict:
        choices = [_Choice([], [], []) for _ in range(len(streams) * n)]
        try:
            async with contextlib.aclosing(_events(streams)) as events:
                async for pos, event in events:
                    c = choices[pos * n + event.sample]
                    if event.text:
                        c.text.append(event.text)
                    c.token_ids.extend(event.token_ids)
                    if event.logprobs:
                        c.logprobs.extend(event.logprobs)
                    if event.finished:
                        c.finish_reason = event.finish_reason
                        unfinished.discard((pos, event.sample))
        except EngineDeadError as err:
            raise OpenAIError(503, f"the engine stopped: {err}", code="engine_dead") from None
        finally:
            abort_all()  # a no-op for finished requests; frees the rest if we were cancelled or failed
        usage = _usage(num_prompt_tokens, sum(len(c.token_ids) for c in choices))
        return fmt.whole(choices, usage)

    body = await _until_disconnected(request, collect())
    if body is None:  # the client left; nobody reads this (499: nginx's "client closed request")
        return Response(status_code=499)
    return JSONResponse(body)


async def _until_disconnected(request: Request, work) -> Any:
    """Run ``work``; cancel it (aborting its requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return None
    return task.result()


async def _sse(fmt: _Formatter, req: Any, streams, num_prompt_tokens: int, unfinished: set, abort_all) -> AsyncIterator[str]:
    n = req.n
    include_usage = req.include_usage
    completion_tokens = 0
    try:
        fmt.start_stream(include_usage)
        if fmt.chat:  # OpenAI's first chunk of each choice names the role
            for index in range(len(streams) * n):
                yield fmt.chunk(index, "", None, None, role=True)
        async with contextlib.aclosing(_events(streams)) as events:
            async for pos, event in events:
                completion_tokens += len(event.token_ids)
                index = pos * n + event.sample
                if event.finished:
                    unfinished.discard((pos, event.sample))
                logprobs = fmt.logprobs(index, event.logprobs) if fmt.num_top is not None else None
                if not event.text and logprobs is None and not event.finished:
                    continue  # tokens whose text is held back (an incomplete character, a possible stop string)
                finish = event.finish_reason if event.finished else None
                yield fmt.chunk(index, event.text, logprobs, finish)
        if include_usage:
            yield fmt.usage_chunk(_usage(num_prompt_tokens, completion_tokens))
    except EngineDeadError as err:
        yield f"data: {json.dumps(OpenAIError(503, f'the engine stopped: {err}', code='engine_dead').body())}\n\n"
    finally:
        abort_all()
    yield "data: [DONE]\n\n"
