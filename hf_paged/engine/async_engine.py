"""``AsyncEngine``: the online engine. Requests join, stream and are cancelled while it runs.

    engine = AsyncEngine(model, tokenizer)                        # the step loop in a thread of this process
    engine = AsyncEngine.from_spec(ModelSpec("/models/llama"))    # ... or in a process of its own
    async for event in engine.generate("Hello", SamplingParams(max_new_tokens=32), request_id="a"):
        print(event.text, end="")
    await engine.abort("a")          # or cancel the task consuming the stream
    engine.shutdown()

Two parts. The front end (this object, in the caller's process) checks and admits requests, keeps one
stream per request, makes the text and calls the listeners. The back end runs the one step loop
(``step_loop.StepLoop``: it owns the ``EngineCore``, i.e. the scheduler, pool, runner and sampler) either
in a thread of this process (``AsyncEngine(model, tokenizer)``) or in a child process that loads the
model itself (``AsyncEngine.from_spec``). The process back end keeps the front end's Python (an HTTP
server streaming to hundreds of clients) from taking the interpreter lock away from the step loop.

Callers (any thread, usually an asyncio event loop) only put commands in an inbox (add, abort) under a
lock; the back end takes them between steps, so a request submitted mid-step joins the next one. Each
step's output comes back as one message and goes to each caller's event loop with one
``call_soon_threadsafe`` per loop per step (not one per token: at 512 running requests that would cost
milliseconds of wake-ups per step).

Failure: if a step raises (or the engine process dies), the loop dies: every in-flight and queued
request gets ``EngineDeadError`` from its iterator (caused by the original exception, or by an
``EngineProcessError`` holding the engine process's traceback), ``is_healthy`` turns False and new
requests are refused. Nothing hangs.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import itertools
import logging
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..options import EngineOptions, from_kwargs
from .core import EngineCore, EngineStats, RequestMetrics
from .inputs import check_request, sampling_params_from_generation_config
from .model_spec import ModelSpec
from .request import IncrementalDetokenizer, StreamEvent
from .sampling_params import SamplingParams
from .step_loop import (
    AbortRequest,
    AddRequest,
    EngineDeadError,
    EngineFacts,
    EngineOverloadedError,
    EngineProcessError,
    StepLoop,
    StepOutput,
)

__all__ = ["AsyncEngine", "EngineDeadError", "EngineOverloadedError", "EngineProcessError"]

logger = logging.getLogger("hf_paged")

# Python's GIL switch interval while an in-process engine runs (see AsyncEngine.__init__).
ENGINE_SWITCH_INTERVAL_S = 0.001


@dataclass(eq=False)
class _Stream:
    """The caller's side of one request: a queue on the caller's event loop."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    num_samples: int
    num_prompt_tokens: int
    # Text of samples the engine does not detokenize (no stop strings): done here, in the caller's
    # thread, so the step loop's host time per step stays small.
    detokenizers: list[IncrementalDetokenizer] | None = None
    chars_sent: list[int] = field(default_factory=list)  # per sample: text already handed out
    num_finished: int = 0
    ended: bool = False  # the engine side is done with it (finished, aborted or failed)


@dataclass
class _Inbox:
    commands: list = field(default_factory=list)
    stop: bool = False  # shutdown: abort what is left and end the loop


class AsyncEngine:
    """Continuous batching for requests that arrive, stream and are cancelled at any time.

    Two ways to build one (the same API afterwards):

    - ``AsyncEngine(model, tokenizer, ...)``: the step loop runs in a thread of this process, on the
      model object given.
    - ``AsyncEngine.from_spec(spec, ...)``: the step loop runs in a child process that loads the model
      described by a ``ModelSpec``; this process keeps only the tokenizer. For servers: the callers'
      Python never slows the steps down. ``model`` and ``core`` are None then.

    Args:
        model: a transformers causal LM (see ``ContinuousGenerator``).
        tokenizer: needed for string prompts, stop strings and text.
        max_queued_requests: most requests waiting to be scheduled; beyond it ``generate`` raises
            ``EngineOverloadedError`` at once (None: no bound).
        **options: the ``ContinuousGenerator`` options (``block_size``, ``num_blocks``,
            ``max_num_seqs``, ``max_num_batched_tokens``, ``memory_fraction``, ``backend``,
            ``cuda_graphs``, ``prefix_caching``, ...); unknown names raise ``TypeError``.

    ``generate`` must be called from a running asyncio event loop; ``abort_nowait``, ``stats``,
    ``is_healthy`` and ``shutdown`` may be called from any thread.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, *, max_queued_requests: int | None = None, **options: Any) -> None:
        engine_options = _engine_options(options, max_queued_requests)
        core = EngineCore(model, tokenizer, engine_options)  # validates the model, allocates the pool
        self._setup(tokenizer, engine_options, max_queued_requests, EngineFacts.of(core, copy_config=False), core.stats())
        self.core: EngineCore | None = core
        self._model: torch.nn.Module | None = model
        # The engine thread needs the GIL back as soon as each step's GPU sync returns; while callers'
        # threads stream events, Python's default 5 ms switch interval can add up to 5 ms to every step.
        self._switch_interval = sys.getswitchinterval()
        if self._switch_interval > ENGINE_SWITCH_INTERVAL_S:
            sys.setswitchinterval(ENGINE_SWITCH_INTERVAL_S)
        self._backend = _ThreadBackend(self, core)
        # A program that exits (or is interrupted) without shutdown() still stops the loop first.
        atexit.register(_shutdown_at_exit, weakref.ref(self))

    @classmethod
    def from_spec(cls, spec: ModelSpec, *, max_queued_requests: int | None = None, **options: Any) -> AsyncEngine:
        """An engine whose step loop runs in a child process (``multiprocessing``, spawn) that loads
        ``spec``'s model and owns the pool; this process loads only the tokenizer.

        Returns once the child is ready to step (its model loaded, its pool allocated). Options are
        checked here first; a failure in the child while loading raises ``EngineProcessError`` with the
        child's traceback. The child exits after ``shutdown`` (or at interpreter exit), and also on its
        own when this process dies (it watches the command pipe), so no process is left behind. It
        ignores SIGINT and SIGTERM: a signal to the whole process group reaches this process, which
        drains its requests and then stops the child.

        As with any ``multiprocessing`` spawn, a script that calls this at import level must guard its
        entry point with ``if __name__ == "__main__":`` (the child imports the main module).
        """
        from .engine_process import ProcessBackend

        if not isinstance(spec, ModelSpec):
            raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
        engine_options = _engine_options(options, max_queued_requests)
        self = cls.__new__(cls)
        backend = ProcessBackend(self, spec, engine_options)  # starts loading the model in the child
        try:
            tokenizer = spec.load_tokenizer()
            facts, stats = backend.wait_ready()
        except BaseException:
            backend.kill()
            raise
        self._setup(tokenizer, engine_options, max_queued_requests, facts, stats)
        self.core = None
        self._model = None
        self._switch_interval = None
        self._backend = backend
        backend.start_threads()
        atexit.register(_shutdown_at_exit, weakref.ref(self))
        return self

    def _setup(self, tokenizer: Any, options: EngineOptions, max_queued_requests: int | None, facts: EngineFacts,
               stats: EngineStats) -> None:
        self.options = options
        self.max_queued_requests = max_queued_requests
        self.facts = facts
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox = _Inbox()
        self._streams: dict[str, _Stream] = {}  # request ids in use (submitted, not yet ended)
        self._listeners: list[Callable[[RequestMetrics], None]] = []
        self._ids = itertools.count()
        self._accepting = True
        self._error: BaseException | None = None
        self._stats = stats
        self._pending_adds = 0  # adds sent whose requests the stats do not count yet

    # ---- facts -----------------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module | None:
        """The model (None when it lives in the engine's own process: ``from_spec``)."""
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int | None:
        return self.facts.max_model_len

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.facts.eos_token_ids

    @property
    def generation_config(self) -> Any:
        """The model's ``GenerationConfig`` (a copy taken at startup for ``from_spec`` engines), or None."""
        return self.facts.generation_config

    @property
    def vocab_size(self) -> int:
        """Rows of the model's input embeddings: token ids must be below this."""
        return self.facts.limits.num_embeddings

    @property
    def in_own_process(self) -> bool:
        """True when the step loop runs in a child process (``from_spec``)."""
        return self.core is None

    @property
    def is_healthy(self) -> bool:
        """True while the step loop is alive and accepting requests."""
        return self._error is None and self._accepting and self._backend.is_alive()

    @property
    def error(self) -> BaseException | None:
        """The exception that killed the step loop, or None."""
        return self._error

    @property
    def stats(self) -> EngineStats:
        """Live numbers, refreshed after every step (reading them costs nothing)."""
        return self._stats

    def add_request_listener(self, listener: Callable[[RequestMetrics], None]) -> None:
        """Call ``listener(metrics)`` once per finished user request, from the thread that delivers the
        engine's outputs (the engine thread, or the thread reading the engine process's outputs)."""
        if not callable(listener):
            raise TypeError(f"listener must be callable, got {type(listener).__name__}")
        self._listeners.append(listener)

    def default_sampling_params(self) -> SamplingParams:
        """What a request without ``SamplingParams`` uses: the model's ``generation_config``, as ``generate`` does."""
        return sampling_params_from_generation_config(self.facts.generation_config)

    # ---- requests --------------------------------------------------------------------------------
    def generate(
        self, prompt: Any, sampling_params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[StreamEvent]:
        """Submit one request now and return the async iterator of its ``StreamEvent``s.

        Raises at once (before any work): ``ValueError`` / ``TypeError`` for bad input,
        ``EngineOverloadedError`` when the queue is full, ``EngineDeadError`` when the engine is dead
        or shut down, ``ValueError`` if ``request_id`` belongs to a request that has not ended.
        Leaving the iteration early or cancelling the consuming task aborts the request.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "AsyncEngine.generate must be called from a running asyncio event loop "
                "(in synchronous code use ContinuousGenerator)"
            ) from None
        if request_id is not None and not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str or None, got {type(request_id).__name__}")
        # None: the model's generation_config (greedy unless it sets do_sample), as generate() does.
        params = self.default_sampling_params() if sampling_params is None else sampling_params
        self._check_alive()
        where = f"request {request_id!r}" if request_id else "request"
        ids, params = check_request(where, prompt, params, self._tokenizer, self.facts.limits)
        engine_text = bool(params.stop)  # the engine needs the text only to find stop strings
        arrival = time.perf_counter()
        with self._lock:
            self._check_alive()
            rid = request_id if request_id is not None else f"req-{next(self._ids)}"
            if rid in self._streams:
                raise ValueError(f"request_id {rid!r} is in use by a request that has not ended")
            if self.max_queued_requests is not None:
                queued = self._stats.waiting + self._pending_adds
                if queued >= self.max_queued_requests:
                    raise EngineOverloadedError(
                        f"{queued} requests are waiting (max_queued_requests={self.max_queued_requests}); retry later"
                    )
            detok = None
            if self._tokenizer is not None and not engine_text:
                detok = [IncrementalDetokenizer(self._tokenizer, ()) for _ in range(params.n)]
            stream = _Stream(rid, loop, asyncio.Queue(), params.n, len(ids), detok, [0] * params.n)
            self._streams[rid] = stream
            self._inbox.commands.append(AddRequest(rid, ids, params, engine_text, arrival))
            self._pending_adds += 1
            self._wake.notify()
        return self._iterate(stream)

    async def _iterate(self, stream: _Stream) -> AsyncIterator[StreamEvent]:
        try:
            while stream.num_finished < stream.num_samples:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    stream.num_finished += 1
                if stream.detokenizers is not None:
                    item = _with_text(item, stream.detokenizers[item.sample], stream.chars_sent)
                yield item
        finally:
            if stream.num_finished < stream.num_samples and not stream.ended:
                self.abort_nowait(stream.request_id)  # the consumer left early or was cancelled

    async def abort(self, request_id: str) -> None:
        """End a request at the next step boundary (its stream ends with finish_reason "abort")."""
        self.abort_nowait(request_id)

    def abort_nowait(self, request_id: str) -> None:
        """``abort`` from any thread. Unknown or ended ids are ignored."""
        with self._lock:
            if request_id in self._streams and self._error is None:
                self._inbox.commands.append(AbortRequest(request_id))
                self._wake.notify()

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine's step loop died: {_describe(self._error)}") from self._error
        if not self._accepting:
            raise EngineDeadError("the engine is shut down")

    # ---- what the back end calls -----------------------------------------------------------------
    def _take_inbox(self, block: bool) -> tuple[list, bool]:
        """The commands that arrived and whether to stop; with ``block``, wait until there is either."""
        with self._lock:
            while block and not (self._inbox.commands or self._inbox.stop or self._error is not None):
                self._wake.wait()
            inbox, self._inbox = self._inbox, _Inbox(stop=self._inbox.stop)
            return inbox.commands, inbox.stop or self._error is not None

    def _dispatch(self, out: StepOutput) -> None:
        """Hand one step's output to the streams, the listeners and the stats (one thread calls this)."""
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        streams = self._streams
        for rid, sample, token_ids, text, reason, logprobs, prompt_logprobs in out.events:
            stream = streams.get(rid)
            if stream is not None:
                event = StreamEvent(0, sample, token_ids, text, reason is not None, reason, rid, logprobs,
                                    stream.num_prompt_tokens, prompt_logprobs)
                deliveries.setdefault(stream.loop, []).append((stream.queue, event))
        with self._lock:  # one atomic swap: an added request is counted exactly once
            for m in out.finished:
                stream = streams.pop(m.request_id, None)
                if stream is not None:
                    stream.ended = True
            if out.stats is not None:
                self._stats = out.stats
            self._pending_adds -= out.num_adds
        for m in out.finished:
            for listener in self._listeners:
                try:
                    listener(m)
                except Exception:  # a broken metrics hook must not take the engine (and every request) down
                    logger.exception("request listener %r failed; the engine goes on", listener)
        _deliver(deliveries)

    def _die(self, error: BaseException, stats: EngineStats | None) -> None:
        """The step loop is gone: fail every stream, refuse new requests."""
        dead = EngineDeadError(f"the engine's step loop died: {_describe(error)}")
        dead.__cause__ = error
        with self._lock:
            self._error = error
            if stats is not None:
                self._stats = stats  # before anyone hears of the failure and reads them
            streams, self._streams = list(self._streams.values()), {}
            self._inbox = _Inbox(stop=True)
            self._pending_adds = 0
            self._accepting = False
            self._wake.notify_all()
        deliveries: dict = {}
        for stream in streams:
            stream.ended = True
            deliveries.setdefault(stream.loop, []).append((stream.queue, dead))
        _deliver(deliveries)

    # ---- lifetime --------------------------------------------------------------------------------
    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish within ``timeout`` s (then abort them), free the
        pool and end the step loop (joining its thread, or its process). Idempotent; callable from any thread."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + max(0.0, timeout)
        while self._backend.is_alive() and time.monotonic() < deadline:
            with self._lock:
                idle = not self._streams and not self._inbox.commands
            if idle:
                break
            time.sleep(0.01)
        with self._lock:
            self._inbox.stop = True
            self._wake.notify_all()
        self._backend.join()
        if self._switch_interval is not None and sys.getswitchinterval() == ENGINE_SWITCH_INTERVAL_S < self._switch_interval:
            sys.setswitchinterval(self._switch_interval)  # ours, unchanged since: give the old one back

    def __enter__(self) -> "AsyncEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    async def __aenter__(self) -> "AsyncEngine":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        # Off the event loop: shutdown waits for in-flight requests, whose events need the loop running.
        await asyncio.to_thread(self.shutdown)


class _ThreadBackend:
    """The step loop in a thread of this process, on the caller's model."""

    def __init__(self, frontend: AsyncEngine, core: EngineCore) -> None:
        loop = StepLoop(core)
        self.thread = threading.Thread(
            target=loop.run, args=(frontend._take_inbox, frontend._dispatch, frontend._die), name="hf_paged-engine",
            daemon=True,
        )
        self.thread.start()

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def join(self) -> None:
        if self.thread is not threading.current_thread():
            self.thread.join()


def _engine_options(options: dict, max_queued_requests: Any) -> EngineOptions:
    if max_queued_requests is not None and (
        not isinstance(max_queued_requests, int) or isinstance(max_queued_requests, bool) or max_queued_requests < 1
    ):
        raise ValueError(f"max_queued_requests must be None or an int >= 1, got {max_queued_requests!r}")
    options.setdefault("progress", False)
    return from_kwargs(EngineOptions, options, where="AsyncEngine()")


def _describe(error: BaseException) -> str:
    # The engine process's errors carry its traceback as their message: show it whole.
    return str(error) if isinstance(error, EngineProcessError) else repr(error)


def _deliver(deliveries: dict) -> None:
    for loop, items in deliveries.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass


def _put_all(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _with_text(event: StreamEvent, detok: IncrementalDetokenizer, chars_sent: list[int]) -> StreamEvent:
    """Fill in the text of an event whose sample the engine did not detokenize (it has no stop strings)."""
    for token in event.token_ids:
        detok.append(token)
    if event.finished:
        detok.flush()
    text = detok.text[chars_sent[event.sample] :]
    chars_sent[event.sample] = len(detok.text)
    return dataclasses.replace(event, text=text)


def _shutdown_at_exit(ref: "weakref.ref[AsyncEngine]") -> None:
    engine = ref()
    if engine is not None:
        engine.shutdown(timeout=0.0)
