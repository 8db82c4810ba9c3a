"""The online engine's step loop, the same code whether it runs in a thread or in a process of its own.

``AsyncEngine``'s front end (streams, admission control, text, listeners) talks to the loop through plain
messages only, so the loop can run next to it (a thread: ``ThreadBackend``) or in a child process
(``engine_process.ProcessBackend``), where the HTTP server's Python no longer competes with it for the
interpreter lock. The two differ only in how the messages travel::

    front end --[AddRequest, AbortRequest, ..., stop]--> StepLoop.run --[StepOutput per step]--> front end

One iteration of ``StepLoop.run``: take the commands that arrived (waiting for them only when nothing is
running), apply them, run one ``EngineCore.step()``, and publish what it produced as one ``StepOutput``
(new tokens per sample, requests that ended with their metrics, a stats snapshot). If anything raises,
every request is aborted, the pool freed, and ``on_failure`` reports the error with the last stats.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .core import EngineCore, EngineStats, RequestGroup, RequestMetrics
from .gc_freeze import objects_before_frozen
from .inputs import RequestLimits
from .sampling_params import SamplingParams


class EngineOverloadedError(RuntimeError):
    """The waiting queue already holds ``max_queued_requests`` requests; retry later (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine's step loop has died (its cause is the original error) or the engine was shut down."""


class EngineProcessError(RuntimeError):
    """The engine's own process failed: a step raised there (the message holds its traceback), or the
    process died (killed, out of memory, a crash in native code)."""


@dataclass(frozen=True, slots=True)
class AddRequest:
    """Start a request (already checked by the front end)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    engine_text: bool  # detokenize in the engine (to find stop strings); else the front end makes the text
    arrival_time: float  # time.perf_counter() at submission (the same clock in every process of a machine)


@dataclass(frozen=True, slots=True)
class AbortRequest:
    """End a request at the next step boundary; unknown or ended ids are ignored."""

    request_id: str


@dataclass(frozen=True, slots=True)
class EngineFacts:
    """What the front end needs to know about the engine it does not hold: sent once, at startup."""

    limits: RequestLimits  # to check requests before they are sent
    max_model_len: int | None
    eos_token_ids: frozenset[int]
    generation_config: Any  # the model's transformers GenerationConfig (request defaults), or None

    @classmethod
    def of(cls, core: EngineCore, copy_config: bool) -> EngineFacts:
        config = getattr(core.model, "generation_config", None)
        return cls(core.limits, core.max_model_len, core.eos_token_ids, copy.deepcopy(config) if copy_config else config)


# One new-output record per sample that advanced in a step (``EngineCore.event_record``; tuples, since
# hundreds per step cross a pipe): (request_id, sample, new token ids, new text or None, finish_reason or
# None, logprobs or None, prompt_logprobs or None). The front end makes the ``StreamEvent``.
EventRecord = tuple


@dataclass(slots=True)
class StepOutput:
    """What one iteration of the loop produced."""

    events: list[EventRecord] = field(default_factory=list)
    finished: list[RequestMetrics] = field(default_factory=list)  # user requests that ended, in order
    stats: EngineStats | None = None  # after this iteration
    num_adds: int = 0  # AddRequests applied in this iteration (now counted by ``stats``)
    final: bool = False  # the loop stopped after this output (shutdown): nothing follows


class StepLoop:
    """Runs an ``EngineCore`` for the engine's whole life, driven by commands, reporting ``StepOutput``s."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.groups: dict[str, RequestGroup] = {}  # request id -> its group in the core

    def run(
        self,
        take: Callable[[bool], tuple[list, bool]],
        publish: Callable[[StepOutput], None],
        on_failure: Callable[[BaseException, EngineStats | None], None],
    ) -> None:
        """Loop until told to stop or a step fails.

        ``take(block)`` returns ``(commands, stop)``: the commands that arrived since the last call, and
        whether to stop (abort what is left, close the core, publish a final output). With ``block``
        (nothing is running) it waits for something to arrive. ``publish`` hands one output on;
        ``on_failure(error, stats)`` is called once if anything raises, after every request was aborted.
        """
        core = self.core
        try:
            with objects_before_frozen():  # for the loop's life: no collector pauses that walk the model's objects
                self._loop(take, publish)
        except BaseException as error:  # noqa: BLE001 - every failure must reach the callers, not vanish
            stats = None
            try:
                core.abort_all(reason="error")
                stats = core.stats()
            except BaseException:  # noqa: BLE001 - the pool may be unusable after e.g. a CUDA error
                pass
            self.groups.clear()
            on_failure(error, stats)

    def _loop(self, take: Callable[[bool], tuple[list, bool]], publish: Callable[[StepOutput], None]) -> None:
        core = self.core
        while True:
            commands, stop = take(not core.has_unfinished())
            out = StepOutput()
            for command in commands:
                self._apply(command, out)
            if stop:
                for request_id in list(self.groups):
                    self._abort(request_id, out)
                out.stats, out.final = core.stats(), True
                core.close()
                publish(out)
                return
            if core.has_unfinished():
                result = core.step()
                out.events.extend(map(core.event_record, result.advanced))
                for group in result.finished:
                    self._finished(group, out)
            elif not commands:
                continue  # woken with nothing to do
            out.stats = core.stats()
            publish(out)

    def _apply(self, command: Any, out: StepOutput) -> None:
        core = self.core
        if isinstance(command, AddRequest):
            if not core.has_unfinished():
                core.check_weights_unchanged()  # safe only while nothing is in flight
            group = core.make_group(
                command.request_id, 0, command.prompt_token_ids, command.params, text=command.engine_text,
                arrival_time=command.arrival_time,
            )
            self.groups[command.request_id] = group
            core.add(group)
            out.num_adds += 1
        elif isinstance(command, AbortRequest):
            self._abort(command.request_id, out)
        else:
            raise TypeError(f"unknown engine command {command!r}")

    def _abort(self, request_id: str, out: StepOutput) -> None:
        group = self.groups.get(request_id)
        if group is None:
            return
        result = self.core.abort(group)
        out.events.extend(map(self.core.event_record, result.advanced))
        for g in result.finished:
            self._finished(g, out)

    def _finished(self, group: RequestGroup, out: StepOutput) -> None:
        self.groups.pop(group.request_id, None)
        out.finished.append(self.core.metrics(group))
