"""``AsyncEngine``: the online engine. Requests join, stream and are cancelled while it runs.

    engine = AsyncEngine(model, tokenizer)
    async for event in engine.generate("Hello", SamplingParams(max_new_tokens=32), request_id="a"):
        print(event.text, end="")
    await engine.abort("a")          # or cancel the task consuming the stream
    engine.shutdown()

Threads: one engine thread owns the ``EngineCore`` (scheduler, pool, runner, sampler) for the engine's
whole life and runs the step loop. Callers (any thread, usually an asyncio event loop) only put
commands in an inbox (add, abort) under a lock; the engine thread applies them between steps, so a
request submitted mid-step joins the next one. Events go back to each caller's event loop with one
``call_soon_threadsafe`` per loop per step (not one per token: at 512 running requests that would cost
milliseconds of wake-ups per step).

Failure: if a step raises, the loop dies: every in-flight and queued request gets ``EngineDeadError``
(with the original exception as its cause) from its iterator, ``is_healthy`` turns False and new
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
from .core import EngineCore, EngineStats, RequestGroup, RequestMetrics
from .request import IncrementalDetokenizer, StreamEvent
from .sampling_params import SamplingParams


logger = logging.getLogger("hf_paged")

# Python's GIL switch interval while an engine runs (see AsyncEngine.__init__).
ENGINE_SWITCH_INTERVAL_S = 0.001


class EngineOverloadedError(RuntimeError):
    """The waiting queue already holds ``max_queued_requests`` requests; retry later (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine's step loop has died (its cause is the original error) or the engine was shut down."""


@dataclass(eq=False)
class _Stream:
    """The caller's side of one request: a queue on the caller's event loop."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    num_samples: int
    # Text of samples the engine does not detokenize (no stop strings): done here, in the caller's
    # thread, so the engine thread's host time per step stays small.
    detokenizers: list[IncrementalDetokenizer] | None = None
    chars_sent: list[int] = field(default_factory=list)  # per sample: text already handed out
    num_finished: int = 0
    ended: bool = False  # the engine side is done with it (finished, aborted or failed)


@dataclass
class _Add:
    group: RequestGroup
    stream: _Stream


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Inbox:
    commands: list = field(default_factory=list)
    num_adds: int = 0  # adds among commands: they count as waiting for admission control


class AsyncEngine:
    """Continuous batching for requests that arrive, stream and are cancelled at any time.

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
        if max_queued_requests is not None and (
            not isinstance(max_queued_requests, int) or isinstance(max_queued_requests, bool) or max_queued_requests < 1
        ):
            raise ValueError(f"max_queued_requests must be None or an int >= 1, got {max_queued_requests!r}")
        options.setdefault("progress", False)
        self.options = from_kwargs(EngineOptions, options, where="AsyncEngine()")
        self.core = EngineCore(model, tokenizer, self.options)  # validates the model, allocates the pool
        self.max_queued_requests = max_queued_requests
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox = _Inbox()
        self._streams: dict[str, _Stream] = {}  # request ids in use (submitted, not yet ended)
        self._groups: dict[str, RequestGroup] = {}  # engine thread only: id -> group in the core
        self._listeners: list[Callable[[RequestMetrics], None]] = []
        self._ids = itertools.count()
        self._accepting = True
        self._stop = False  # tells the loop to abort what is left and exit
        self._drain_deadline: float | None = None
        self._error: BaseException | None = None
        self._stats = self.core.stats()
        self._in_transit = 0  # adds taken from the inbox whose requests the stats do not count yet
        # The engine thread needs the GIL back as soon as each step's GPU sync returns; while callers'
        # threads stream events, Python's default 5 ms switch interval can add up to 5 ms to every step.
        self._switch_interval = sys.getswitchinterval()
        if self._switch_interval > ENGINE_SWITCH_INTERVAL_S:
            sys.setswitchinterval(ENGINE_SWITCH_INTERVAL_S)
        self._thread = threading.Thread(target=self._loop, name="hf_paged-engine", daemon=True)
        self._thread.start()
        # A program that exits (or is interrupted) without shutdown() still stops the thread first.
        atexit.register(_shutdown_at_exit, weakref.ref(self))

    # ---- facts -----------------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self.core.model

    @property
    def tokenizer(self) -> Any:
        return self.core.tokenizer

    @property
    def max_model_len(self) -> int | None:
        return self.core.max_model_len

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.core.eos_token_ids

    @property
    def is_healthy(self) -> bool:
        """True while the step loop is alive and accepting requests."""
        return self._error is None and self._accepting and self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        """The exception that killed the step loop, or None."""
        return self._error

    @property
    def stats(self) -> EngineStats:
        """Live numbers, refreshed by the engine thread after every step (reading them costs nothing)."""
        return self._stats

    def add_request_listener(self, listener: Callable[[RequestMetrics], None]) -> None:
        """Call ``listener(metrics)`` from the engine thread once per finished user request."""
        if not callable(listener):
            raise TypeError(f"listener must be callable, got {type(listener).__name__}")
        self._listeners.append(listener)

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
        params = self.core.default_sampling_params() if sampling_params is None else sampling_params
        self._check_alive()
        ids, params = self.core.check(f"request {request_id!r}" if request_id else "request", prompt, params)
        engine_text = bool(params.stop)  # the engine needs the text only to find stop strings
        with self._lock:
            self._check_alive()
            rid = request_id if request_id is not None else f"req-{next(self._ids)}"
            if rid in self._streams:
                raise ValueError(f"request_id {rid!r} is in use by a request that has not ended")
            if self.max_queued_requests is not None:
                queued = self._stats.waiting + self._inbox.num_adds + self._in_transit
                if queued >= self.max_queued_requests:
                    raise EngineOverloadedError(
                        f"{queued} requests are waiting (max_queued_requests={self.max_queued_requests}); retry later"
                    )
            group = self.core.make_group(rid, 0, ids, params, text=engine_text)
            detok = None
            if self.core.tokenizer is not None and not engine_text:
                detok = [IncrementalDetokenizer(self.core.tokenizer, ()) for _ in range(params.n)]
            stream = _Stream(rid, loop, asyncio.Queue(), params.n, detok, [0] * params.n)
            self._streams[rid] = stream
            self._inbox.commands.append(_Add(group, stream))
            self._inbox.num_adds += 1
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
            if request_id in self._streams:
                self._inbox.commands.append(_Abort(request_id))
                self._wake.notify()

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine's step loop died: {self._error!r}") from self._error
        if not self._accepting:
            raise EngineDeadError("the engine is shut down")

    # ---- the engine thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        core = self.core
        try:
            while True:
                with self._lock:
                    while not (self._inbox.commands or self._stop or core.has_unfinished()):
                        self._wake.wait()
                    commands, self._in_transit = self._inbox.commands, self._inbox.num_adds
                    self._inbox = _Inbox()
                    stop = self._stop
                deliveries: dict[asyncio.AbstractEventLoop, list] = {}
                for command in commands:
                    self._apply(command, deliveries)
                if commands:
                    with self._lock:  # one atomic swap: an added request is counted exactly once
                        self._stats = core.stats()
                        self._in_transit = 0
                if stop:
                    for request_id in list(self._groups):
                        self._apply(_Abort(request_id), deliveries)
                    self._stats = core.stats()
                    self._deliver(deliveries)
                    return
                if core.has_unfinished():
                    result = core.step()
                    for request in result.advanced:
                        self._emit(request.group.request_id, core.event(request), deliveries)
                    for group in result.finished:
                        self._finished(group, deliveries)
                self._stats = core.stats()
                self._deliver(deliveries)
        except BaseException as e:  # noqa: BLE001 - every failure must reach the callers, not vanish
            self._die(e)

    def _apply(self, command: Any, deliveries: dict) -> None:
        core = self.core
        if isinstance(command, _Add):
            group = command.group
            if not core.has_unfinished():
                core.check_weights_unchanged()  # safe only while nothing is in flight
            self._groups[group.request_id] = group
            core.add(group)
        else:
            group = self._groups.get(command.request_id)
            if group is None:
                return
            result = core.abort(group)
            for request in result.advanced:
                self._emit(group.request_id, core.event(request), deliveries)
            for g in result.finished:
                self._finished(g, deliveries)

    def _emit(self, request_id: str, event: Any, deliveries: dict) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            deliveries.setdefault(stream.loop, []).append((stream.queue, event))

    def _finished(self, group: RequestGroup, deliveries: dict) -> None:
        """A user request ended (its final events are already queued): free its id, tell the listeners."""
        self._groups.pop(group.request_id, None)
        with self._lock:
            stream = self._streams.pop(group.request_id, None)
        if stream is not None:
            stream.ended = True
        metrics = self.core.metrics(group)
        for listener in self._listeners:
            try:
                listener(metrics)
            except Exception:  # a broken metrics hook must not take the engine (and every request) down
                logger.exception("request listener %r failed; the engine goes on", listener)

    @staticmethod
    def _emit_to(stream: _Stream, event: Any, deliveries: dict) -> None:
        deliveries.setdefault(stream.loop, []).append((stream.queue, event))

    @staticmethod
    def _deliver(deliveries: dict) -> None:
        for loop, items in deliveries.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening any more
                pass

    def _die(self, error: BaseException) -> None:
        self._error = error
        dead = EngineDeadError(f"the engine's step loop died: {error!r}")
        dead.__cause__ = error
        try:
            self.core.abort_all(reason="error")
            self._stats = self.core.stats()  # before anyone hears of the failure and reads them
        except BaseException:  # noqa: BLE001 - the pool may be unusable after e.g. a CUDA error
            pass
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
            self._inbox = _Inbox()
            self._accepting = False
        deliveries: dict = {}
        for stream in streams:
            stream.ended = True
            self._emit_to(stream, dead, deliveries)
        self._deliver(deliveries)

    # ---- lifetime --------------------------------------------------------------------------------
    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish within ``timeout`` s (then abort them), free the
        pool and join the engine thread. Idempotent; callable from any thread."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + max(0.0, timeout)
        while self._thread.is_alive() and time.monotonic() < deadline:
            with self._lock:
                idle = not self._streams and not self._inbox.commands
            if idle:
                break
            time.sleep(0.01)
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()
        if self._error is None:
            self.core.close()
        if sys.getswitchinterval() == ENGINE_SWITCH_INTERVAL_S < self._switch_interval:
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
